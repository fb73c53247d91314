//! One process, two workers (server on this thread, client on another), UCX_TLS=tcp on
//! 127.0.0.1: eager and rendezvous active messages from registered memory, checked byte for
//! byte, and an event-driven wait (poll on the efd) for a delayed sender that must not burn CPU.

mod common;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use ucx::{Endpoint, Listener, MemoryRegion, Payload, Proto, RndvData};

const SMALL: usize = 4096;
const LARGE: usize = 8 << 20;
const DELAY: Duration = Duration::from_millis(1500);

enum Got {
    Eager { header: Vec<u8>, data: Vec<u8> },
    Rndv { header: Vec<u8>, data: RndvData },
}

fn client(addr: SocketAddr) {
    let (ctx, worker) = tcp_context("client");
    let ep = Endpoint::connect_timeout(&worker, addr, Duration::from_secs(10), |e| {
        panic!("client endpoint failed: {e}")
    })
    .expect("connect");
    let region = MemoryRegion::allocate(&ctx, SMALL + LARGE).expect("register");
    // small at [0, SMALL), large right after it: sends from an offset inside the region
    region.write(0, &pattern_vec(1, SMALL));
    region.write(SMALL, &pattern_vec(2, LARGE));
    let small = ep
        .am_send(
            7,
            &header(SMALL, 1),
            Payload::Region(region.slice(0..SMALL)),
            Proto::Eager,
        )
        .expect("send small");
    let large = ep
        .am_send(
            7,
            &header(LARGE, 2),
            Payload::Region(region.slice(SMALL..SMALL + LARGE)),
            Proto::Auto,
        )
        .expect("send large");
    small
        .wait(Duration::from_secs(20))
        .expect("small completes");
    // Rendezvous completion = the receiver has pulled the data.
    large
        .wait(Duration::from_secs(60))
        .expect("large completes");
    thread::sleep(DELAY);
    let late = ep
        .am_send(
            7,
            &header(100, 3),
            Payload::Bytes(pattern_vec(3, 100)),
            Proto::Auto,
        )
        .expect("send late");
    late.wait(Duration::from_secs(20)).expect("late completes");
    ep.close(Duration::from_secs(10)).expect("close");
}

#[test]
fn eager_and_rendezvous_over_tcp_loopback_event_driven() {
    let (ctx, worker) = tcp_context("server");
    let conns = Rc::new(RefCell::new(VecDeque::new()));
    let c2 = conns.clone();
    let listener = Listener::bind(&worker, "127.0.0.1:0".parse().unwrap(), move |req| {
        c2.borrow_mut().push_back(req)
    })
    .expect("listen");
    let addr = listener.local_addr().expect("local addr");
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0);

    let got = Rc::new(RefCell::new(VecDeque::new()));
    let g2 = got.clone();
    worker
        .set_am_handler(7, move |m| {
            let header = m.header().to_vec();
            let item = match m.take_rndv() {
                Some(data) => Got::Rndv { header, data },
                None => Got::Eager {
                    header,
                    data: m.data().expect("eager data").to_vec(),
                },
            };
            g2.borrow_mut().push_back(item);
        })
        .expect("handler");

    let (tx, rx) = mpsc::channel();
    let client = thread::spawn(move || {
        client(addr);
        tx.send(()).unwrap();
    });

    let timeout = Duration::from_secs(60);
    let mut ep = None;
    let next = |ep: &mut Option<Endpoint>| -> Got {
        loop {
            assert!(
                worker
                    .wait_until(timeout, || !conns.borrow().is_empty()
                        || !got.borrow().is_empty())
                    .expect("wait"),
                "nothing arrived within {timeout:?}"
            );
            if let Some(req) = conns.borrow_mut().pop_front() {
                assert_eq!(
                    req.peer_addr().map(|a| a.ip().to_string()).as_deref(),
                    Some("127.0.0.1")
                );
                *ep = Some(
                    req.accept(|e| eprintln!("server endpoint: {e}"))
                        .expect("accept"),
                );
            }
            if let Some(g) = got.borrow_mut().pop_front() {
                return g;
            }
        }
    };

    // 1. small: eager, inline data
    match next(&mut ep) {
        Got::Eager { header, data } => {
            assert_eq!(parse_header(&header), (SMALL, 1));
            assert_eq!(data.len(), SMALL);
            assert_eq!(first_mismatch(&data, 1), None, "small payload differs");
        }
        Got::Rndv { .. } => panic!("4 KiB sent with Proto::Eager arrived as rendezvous"),
    }
    // 2. large: rendezvous, received into a registered region at an offset
    let Got::Rndv { header, data } = next(&mut ep) else {
        panic!("8 MiB arrived eagerly: rendezvous not used");
    };
    assert_eq!(parse_header(&header), (LARGE, 2));
    assert_eq!(data.len(), LARGE);
    let dest = MemoryRegion::allocate(&ctx, LARGE + 8192).expect("register dest");
    dest.write(0, &[0xAA; 4096]);
    let req = worker
        .am_recv(data, dest.slice(4096..4096 + LARGE))
        .expect("am_recv");
    req.wait(timeout).expect("rendezvous receive");
    let mut buf = vec![0u8; LARGE + 8192];
    dest.read(0, &mut buf);
    assert_eq!(
        first_mismatch(&buf[4096..4096 + LARGE], 2),
        None,
        "large payload differs"
    );
    assert!(
        buf[..4096].iter().all(|&b| b == 0xAA),
        "bytes before the slice were overwritten"
    );
    assert!(
        buf[4096 + LARGE..].iter().all(|&b| b == 0),
        "bytes after the slice were overwritten"
    );

    // 3. the delayed sender: the wait sleeps in poll(2) on the efd
    let (wall0, cpu0) = (Instant::now(), thread_cpu());
    let Got::Eager { header, data } = next(&mut ep) else {
        panic!("100 bytes arrived as rendezvous");
    };
    let (wall, cpu) = (wall0.elapsed(), thread_cpu() - cpu0);
    assert_eq!(parse_header(&header), (100, 3));
    assert_eq!(first_mismatch(&data, 3), None);
    eprintln!("waited {wall:?} for the delayed sender, using {cpu:?} of CPU");
    assert!(
        wall >= DELAY / 2,
        "the delayed message came too early ({wall:?}) to measure the wait"
    );
    // A busy loop would use about as much CPU as wall time (half of it on a loaded 2-core box).
    assert!(
        cpu.as_secs_f64() < 0.15 * wall.as_secs_f64(),
        "waiting used {cpu:?} of CPU in {wall:?}: not event driven"
    );

    // The client's graceful close needs this side to progress too: keep serving until it ends.
    let deadline = Instant::now() + Duration::from_secs(30);
    while rx.try_recv().is_err() {
        assert!(Instant::now() < deadline, "the client did not finish");
        worker.wait(Duration::from_millis(50)).expect("wait");
    }
    client.join().expect("client thread");
    if let Some(ep) = ep {
        ep.close(Duration::from_secs(5)).expect("server close");
    }
}
