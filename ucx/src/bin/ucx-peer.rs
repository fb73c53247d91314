//! A small active-message peer, for the cross-namespace and crash tests (and manual checks
//! between two hosts).
//!
//! ```text
//! ucx-peer recv  ADDR COUNT [--dev IFACE] [--stall]   listen on exactly ADDR, accept one client,
//!                receive COUNT messages (AM id 1) and check each byte; prints "listening ADDR",
//!                then "ok LEN" per message. --stall: keep the first rendezvous message
//!                unreceived and wait forever (the crash test kills us then).
//! ucx-peer send  ADDR SIZE... [--dev IFACE]           connect, send one message per SIZE from
//!                registered memory, wait for each to complete; prints "sent LEN".
//! ```
//! Header of each message: payload length and pattern seed (u64 little endian each).
//! UCX_TLS defaults to tcp (the environment can override it); --dev sets UCX_NET_DEVICES.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::exit;
use std::rc::Rc;
use std::time::Duration;

use ucx::{Context, Endpoint, Listener, MemoryRegion, Payload, Proto, RndvData, Worker};

/// The test pattern: not periodic over small strides, so shifted or repeated blocks show.
pub fn pattern(seed: u64, i: usize) -> u8 {
    let x =
        (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    (x >> 56) as u8 ^ (i as u8)
}

fn die(msg: String) -> ! {
    eprintln!("ucx-peer: {msg}");
    exit(1)
}

fn context(dev: Option<&str>) -> Context {
    let mut b = Context::builder().name("ucx-peer");
    if std::env::var_os("UCX_TLS").is_none() {
        b = b.config("TLS", "tcp");
    }
    if let Some(d) = dev {
        b = b.config("NET_DEVICES", d);
    }
    b.build().unwrap_or_else(|e| die(format!("context: {e}")))
}

enum Msg {
    Eager(Vec<u8>, Vec<u8>),
    Rndv(Vec<u8>, RndvData),
}

fn header_fields(h: &[u8]) -> (usize, u64) {
    if h.len() != 16 {
        die(format!("header of {} bytes", h.len()));
    }
    let len = u64::from_le_bytes(h[..8].try_into().unwrap()) as usize;
    let seed = u64::from_le_bytes(h[8..].try_into().unwrap());
    (len, seed)
}

fn check(data: &[u8], len: usize, seed: u64) {
    if data.len() != len {
        die(format!("got {} bytes, header says {len}", data.len()));
    }
    if let Some(i) = (0..len).find(|&i| data[i] != pattern(seed, i)) {
        die(format!("byte {i} of {len} differs"));
    }
}

fn recv(addr: SocketAddr, count: usize, dev: Option<&str>, stall: bool) {
    let ctx = context(dev);
    let worker = Worker::new(&ctx).unwrap_or_else(|e| die(format!("worker: {e}")));
    let conns = Rc::new(RefCell::new(VecDeque::new()));
    let c2 = conns.clone();
    let listener = Listener::bind(&worker, addr, move |req| c2.borrow_mut().push_back(req))
        .unwrap_or_else(|e| die(format!("listen {addr}: {e}")));
    let msgs = Rc::new(RefCell::new(VecDeque::new()));
    let m2 = msgs.clone();
    worker
        .set_am_handler(1, move |m| {
            let h = m.header().to_vec();
            let msg = match m.take_rndv() {
                Some(r) => Msg::Rndv(h, r),
                None => Msg::Eager(h, m.data().unwrap_or_default().to_vec()),
            };
            m2.borrow_mut().push_back(msg);
        })
        .unwrap_or_else(|e| die(format!("am handler: {e}")));
    println!("listening {}", listener.local_addr().unwrap_or(addr));
    let wait = Duration::from_secs(60);
    let mut ep = None;
    let mut got = 0;
    while got < count {
        worker
            .wait_until(wait, || {
                !conns.borrow().is_empty() || !msgs.borrow().is_empty()
            })
            .unwrap_or_else(|e| die(format!("wait: {e}")));
        if let Some(req) = conns.borrow_mut().pop_front() {
            if ep.is_none() {
                ep = Some(
                    req.accept(|e| eprintln!("ucx-peer: client failed: {e}"))
                        .unwrap_or_else(|e| die(format!("accept: {e}"))),
                );
            }
        }
        let next = msgs.borrow_mut().pop_front();
        match next {
            None => {}
            Some(Msg::Eager(h, data)) => {
                let (len, seed) = header_fields(&h);
                check(&data, len, seed);
                println!("ok {len}");
                got += 1;
            }
            Some(Msg::Rndv(h, data)) => {
                let (len, seed) = header_fields(&h);
                if stall {
                    println!("stalled {len}");
                    let _keep = data;
                    loop {
                        let _ = worker.wait(Duration::from_secs(1));
                    }
                }
                let region = MemoryRegion::allocate(&ctx, len.max(1))
                    .unwrap_or_else(|e| die(format!("region: {e}")));
                let req = worker
                    .am_recv(data, region.slice(0..len))
                    .unwrap_or_else(|e| die(format!("am_recv: {e}")));
                req.wait(wait)
                    .unwrap_or_else(|e| die(format!("receive: {e}")));
                let mut buf = vec![0u8; len];
                region.read(0, &mut buf);
                check(&buf, len, seed);
                println!("ok {len}");
                got += 1;
            }
        }
    }
    if let Some(ep) = ep {
        // The sender closes first; our close then completes at once.
        let _ = ep.close(Duration::from_secs(5));
    }
}

fn send(addr: SocketAddr, sizes: &[usize], dev: Option<&str>) {
    let ctx = context(dev);
    let worker = Worker::new(&ctx).unwrap_or_else(|e| die(format!("worker: {e}")));
    let ep = Endpoint::connect_timeout(&worker, addr, Duration::from_secs(20), |e| {
        eprintln!("ucx-peer: endpoint failed: {e}")
    })
    .unwrap_or_else(|e| die(format!("connect {addr}: {e}")));
    for (n, &len) in sizes.iter().enumerate() {
        let seed = n as u64 + 7;
        let region = MemoryRegion::allocate(&ctx, len.max(1))
            .unwrap_or_else(|e| die(format!("region: {e}")));
        let data: Vec<u8> = (0..len).map(|i| pattern(seed, i)).collect();
        region.write(0, &data);
        let mut header = (len as u64).to_le_bytes().to_vec();
        header.extend_from_slice(&seed.to_le_bytes());
        let req = ep
            .am_send(
                1,
                &header,
                Payload::Region(region.slice(0..len)),
                Proto::Auto,
            )
            .unwrap_or_else(|e| die(format!("send: {e}")));
        req.wait(Duration::from_secs(60))
            .unwrap_or_else(|e| die(format!("send {len}: {e}")));
        println!("sent {len}");
    }
    ep.close(Duration::from_secs(10))
        .unwrap_or_else(|e| die(format!("close: {e}")));
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut dev = None;
    if let Some(i) = args.iter().position(|a| a == "--dev") {
        if i + 1 >= args.len() {
            die("--dev needs an interface".into());
        }
        dev = Some(args.remove(i + 1));
        args.remove(i);
    }
    let stall = if let Some(i) = args.iter().position(|a| a == "--stall") {
        args.remove(i);
        true
    } else {
        false
    };
    let usage =
        "usage: ucx-peer recv ADDR COUNT [--dev IFACE] [--stall] | send ADDR SIZE... [--dev IFACE]";
    if args.len() < 3 {
        die(usage.into());
    }
    let addr: SocketAddr = args[1]
        .parse()
        .unwrap_or_else(|_| die(format!("bad address {}", args[1])));
    let nums: Vec<usize> = args[2..]
        .iter()
        .map(|s| s.parse().unwrap_or_else(|_| die(format!("bad number {s}"))))
        .collect();
    match args[0].as_str() {
        "recv" => recv(addr, nums[0], dev.as_deref(), stall),
        "send" => send(addr, &nums, dev.as_deref()),
        _ => die(usage.into()),
    }
}
