//! The producer against what happens around it: another producer on its
//! socket path, floods of idle connections under a normal fd limit, consumers
//! that stop reading (they are told why they are dropped: DISCONNECT), slow
//! consumers at the end of the stream (EOS still reaches them), and what a
//! consumer may ask to hold (MAX_INFLIGHT).
//!
//! Producers run in their own `gst-launch-1.0` processes where the test needs
//! the process to end or to have its own limits, else in this process.
//! Run `cargo build` first: the processes load the plugin from target/debug.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use gst::prelude::*;
use gstbufshare::protocol::{self, Message, Role};
use gstbufshare::transport::unix::UnixChannel;
use gstbufshare::transport::{Channel, Received};
use rustix::process::Signal;

mod common;

use common::{gst_launch, hello, recv_msg, Proc, TempDir};

/// Raises this process's fd limit: the flood holds hundreds of connections.
fn raise_fd_limit() {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let raised = rustix::process::Rlimit {
        current: lim.maximum,
        maximum: lim.maximum,
    };
    let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, raised);
}

/// Connects without waiting: None while the producer's backlog is full.
fn connect_nonblocking(path: &Path) -> Option<OwnedFd> {
    let fd = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
        None,
    )
    .unwrap();
    let addr = rustix::net::SocketAddrUnix::new(path).unwrap();
    rustix::net::connect(&fd, &addr).ok().map(|()| fd)
}

/// Buffers that reached a `fakesink silent=false` in a `gst-launch -v` log.
fn chained(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("last-message = chain"))
        .count()
}

fn read_log(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Stops a gst-launch producer as a user would and checks it ended cleanly.
fn stop_cleanly(p: Proc, log: &Path) {
    p.signal(Signal::INT);
    let status = p.wait(Duration::from_secs(60));
    let text = read_log(log);
    assert!(status.success(), "producer exited with {status}:\n{text}");
    assert!(
        !text.contains("ERROR"),
        "the producer posted an error:\n{text}"
    );
}

/// Connects a scripted consumer and completes the handshake; returns the
/// channel and what the producer sent after its HELLO up to the first CAPS.
fn scripted_consumer(path: &Path) -> (UnixChannel, Vec<Message>) {
    let c = UnixChannel::connect(path).unwrap();
    assert!(matches!(recv_msg(&c), Some((Message::Hello(_), _))));
    c.send(
        &protocol::encode(&hello(protocol::VERSION, Role::Consumer)),
        &[],
    )
    .unwrap();
    let mut before_caps = Vec::new();
    loop {
        let (m, _) = recv_msg(&c).expect("closed before CAPS");
        let caps = matches!(m, Message::Caps { .. });
        before_caps.push(m);
        if caps {
            return (c, before_caps);
        }
    }
}

/// Every message left in `c` until the producer closed it (waiting up to
/// 10 s for each).
fn read_to_end(c: &UnixChannel) -> Vec<Message> {
    let mut out = Vec::new();
    while let Some((m, _)) = recv_msg(c) {
        out.push(m);
    }
    out
}

fn names(msgs: &[Message]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for m in msgs {
        match counts.last_mut() {
            Some((n, k)) if *n == m.name() => *k += 1,
            _ => counts.push((m.name(), 1)),
        }
    }
    counts
        .iter()
        .map(|(n, k)| format!("{n}x{k}"))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------

/// A runs; someone removes its socket file; B binds the same path; A stops.
/// B's socket must still be there and answer.
#[test]
fn a_stopping_producer_leaves_another_producers_socket_alone() {
    let dir = TempDir::new("robust", "two-producers");
    let socket = dir.path("s.sock");
    let desc = format!(
        "videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=30/1 ! bufsharesink socket={}",
        socket.display()
    );
    let a = gst_launch("producer A", &desc, &dir.path("a.log"));
    common::wait_for_path(&socket, Duration::from_secs(30));
    std::fs::remove_file(&socket).unwrap();
    let b = gst_launch("producer B", &desc, &dir.path("b.log"));
    common::wait_for_path(&socket, Duration::from_secs(30));
    // B is up (its socket answers) before A stops.
    let (c, _) = scripted_consumer(&socket);
    drop(c);
    stop_cleanly(a, &dir.path("a.log"));
    assert!(
        socket.exists(),
        "producer A removed producer B's socket file"
    );
    let (c, _) = scripted_consumer(&socket);
    drop(c);
    stop_cleanly(b, &dir.path("b.log"));
    assert!(
        !socket.exists(),
        "producer B did not remove its own socket file"
    );
}

/// A producer under `prlimit --nofile=128` while this test keeps hundreds of
/// idle connections (never a HELLO) coming: it keeps producing, a real
/// consumer keeps getting frames, and no error is posted.
#[test]
fn idle_connections_under_a_low_fd_limit_do_not_stop_the_producer() {
    raise_fd_limit();
    let dir = TempDir::new("robust", "idle-flood");
    let socket = dir.path("s.sock");
    let plog = dir.path("producer.log");
    let out = std::fs::File::create(&plog).unwrap();
    let mut cmd = Command::new("prlimit");
    cmd.arg("--nofile=128")
        .arg("gst-launch-1.0")
        .arg("-e")
        .args(
            format!(
                "videotestsrc is-live=true ! video/x-raw,format=NV12,width=320,height=240,framerate=30/1 ! bufsharesink socket={} max-inflight=16",
                socket.display()
            )
            .split_whitespace(),
        )
        .env("GST_PLUGIN_PATH", common::plugin_dir())
        .env("GST_DEBUG", "bufsharesink:4")
        .env("GST_DEBUG_NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    let producer = Proc::spawn("producer", cmd);
    common::wait_for_path(&socket, Duration::from_secs(30));

    // The flood: connections that never speak, opened as fast as the
    // producer's backlog takes them, for the whole test.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        let socket = socket.clone();
        std::thread::spawn(move || {
            let mut idle = Vec::new();
            let mut opened = 0usize;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match connect_nonblocking(&socket) {
                    Some(fd) => {
                        opened += 1;
                        idle.push(fd);
                        // Hundreds held at once; the oldest go when there are more.
                        if idle.len() > 400 {
                            idle.remove(0);
                        }
                    }
                    None => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            opened
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let clog = dir.path("consumer.log");
    let consumer = gst_launch(
        "consumer",
        &format!(
            "-v bufsharesrc socket={} timeout=20000 ! fakesink silent=false",
            socket.display()
        ),
        &clog,
    );
    // Frames flow to it while the flood goes on.
    let deadline = Instant::now() + Duration::from_secs(30);
    while chained(&clog) < 30 {
        assert!(
            Instant::now() < deadline,
            "the consumer got {} frames in 30 s during the flood:\n{}\nproducer:\n{}",
            chained(&clog),
            read_log(&clog),
            read_log(&plog)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let first = chained(&clog);
    std::thread::sleep(Duration::from_secs(4));
    let later = chained(&clog);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let opened = flood.join().unwrap();
    println!("flood: {opened} idle connections; consumer frames: {first}, 4 s later {later}");
    assert!(opened >= 200, "only {opened} idle connections were opened");
    assert!(
        later >= first + 30,
        "the consumer stopped getting frames: {first} then {later} 4 s later"
    );
    let text = read_log(&plog);
    assert!(
        text.contains("max-pending-connections"),
        "no log line about closing idle connections:\n{text}"
    );
    stop_cleanly(producer, &plog);
    consumer.wait_ok(Duration::from_secs(30));
}

/// A producer of small inline frames at a high rate, in this process: a
/// consumer that stops reading fills its socket within a second.
fn inline_producer(path: &Path, props: &str) -> (gst::Pipeline, gst::Element) {
    common::init();
    common::live_producer_of(
        path,
        "video/x-raw,format=GRAY8,width=128,height=96,framerate=200/1",
        &format!("inline-threshold=32768 {props}"),
    )
}

/// A consumer that stops reading is dropped after client-timeout, and the last
/// thing it reads before the end is DISCONNECT naming client-timeout: when its
/// socket has room (frames by fd: it holds at most max-inflight), and when its
/// socket is full (inline frames): then the DISCONNECT goes once it reads.
#[test]
fn a_stalled_consumer_reads_why_it_was_dropped() {
    common::init();
    for full in [false, true] {
        let dir = TempDir::new("robust", if full { "stall-full" } else { "stall-room" });
        let socket = dir.path("s.sock");
        let (pipeline, sink) = if full {
            inline_producer(&socket, "client-timeout=300")
        } else {
            common::live_producer_with(&socket, "client-timeout=300")
        };
        let (c, _) = scripted_consumer(&socket);
        if !full {
            // Past its start: it released a frame (else it would get 10 s).
            loop {
                let (m, _) = recv_msg(&c).unwrap();
                if let Message::Frame(f) = m {
                    if f.needs_release() {
                        let release = Message::Release {
                            frame_ids: vec![f.frame_id],
                        };
                        c.send(&protocol::encode(&release), &[]).unwrap();
                        break;
                    }
                }
            }
        }
        // Stops reading until the producer dropped it.
        let deadline = Instant::now() + Duration::from_secs(if full { 30 } else { 10 });
        while sink
            .property::<gst::Structure>("stats")
            .get::<u64>("clients-timed-out")
            .unwrap()
            < 1
        {
            assert!(Instant::now() < deadline, "full={full}: never dropped");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(sink.property::<u32>("num-clients"), 0);
        let msgs = read_to_end(&c);
        println!("full={full}: read after the drop: {}", names(&msgs));
        match msgs.last() {
            Some(Message::Disconnect { reason }) => {
                println!("full={full}: DISCONNECT: {reason}");
                assert!(reason.contains("client-timeout"), "{reason}");
            }
            other => panic!(
                "full={full}: last message {other:?}, not DISCONNECT ({})",
                names(&msgs)
            ),
        }
        if full {
            assert!(
                msgs.len() > 50,
                "full={full}: the socket was not full: {}",
                names(&msgs)
            );
        }
        pipeline.set_state(gst::State::Null).unwrap();
    }
}

/// A consumer whose socket is full when the producer's pipeline ends (SIGINT:
/// EOS, then the element stops and the process exits) still reads the EOS,
/// after the producer process is gone.
#[test]
fn a_slow_consumer_reads_eos_after_the_producer_exited() {
    let dir = TempDir::new("robust", "eos-slow");
    let socket = dir.path("s.sock");
    let log = dir.path("producer.log");
    let producer = gst_launch(
        "producer",
        &format!(
            "videotestsrc is-live=true ! video/x-raw,format=GRAY8,width=128,height=96,framerate=200/1 ! bufsharesink socket={} inline-threshold=32768 client-timeout=0",
            socket.display()
        ),
        &log,
    );
    common::wait_for_path(&socket, Duration::from_secs(30));
    let (c, _) = scripted_consumer(&socket);
    // It does not read: its socket fills (200 frames/s of 12 KiB).
    std::thread::sleep(Duration::from_secs(3));
    producer.signal(Signal::INT);
    // Slow: it reads a little, now and then, while the producer ends.
    std::thread::sleep(Duration::from_millis(300));
    let mut before_exit = Vec::new();
    for _ in 0..20 {
        if let Some((m, _)) = recv_msg(&c) {
            before_exit.push(m);
        }
    }
    let status = producer.wait(Duration::from_secs(30));
    assert!(status.success(), "producer: {status}\n{}", read_log(&log));
    let after_exit = read_to_end(&c);
    println!(
        "read before the producer exited: {}; after: {}",
        names(&before_exit),
        names(&after_exit)
    );
    assert!(
        !before_exit.iter().any(|m| matches!(m, Message::Eos)),
        "EOS read before the producer exited: the test did not test the end"
    );
    assert!(
        matches!(after_exit.last(), Some(Message::Eos)),
        "the slow consumer did not get EOS: {}",
        names(&after_exit)
    );
}

/// MAX_INFLIGHT: the producer grants its default (max-inflight) first, before
/// CAPS; a request gets min(asked, max-inflight-limit), 0 the default; the
/// grant is in force (frames held) and in stats; changing the properties
/// while playing sends the new grant.
#[test]
fn consumers_are_granted_what_they_ask_within_the_limit() {
    common::init();
    let dir = TempDir::new("robust", "grant");
    let socket = dir.path("s.sock");
    let (pipeline, sink) =
        common::live_producer_with(&socket, "max-inflight=3 max-inflight-limit=5");
    let (c, before_caps) = scripted_consumer(&socket);
    assert_eq!(
        before_caps.first(),
        Some(&Message::MaxInflight { frames: 3 }),
        "first after HELLO: {before_caps:?}"
    );
    let ask = |frames: u32| {
        c.send(&protocol::encode(&Message::MaxInflight { frames }), &[])
            .unwrap();
    };
    // Frames it holds (never released) and grants it was sent, until `n` frames
    // are held and `quiet` passed with nothing new.
    let held = std::cell::Cell::new(0u32);
    let watch = |quiet: Duration| -> Vec<u32> {
        let mut grants = Vec::new();
        let mut last = Instant::now();
        let mut buf = vec![0u8; protocol::MAX_MESSAGE_LEN];
        while last.elapsed() < quiet {
            match c.recv(&mut buf) {
                Ok(Received::Message { len, fds }) => {
                    last = Instant::now();
                    match protocol::decode(&buf[..len], fds.len()).unwrap() {
                        Message::MaxInflight { frames } => grants.push(frames),
                        Message::Frame(f) if f.needs_release() => held.set(held.get() + 1),
                        _ => {}
                    }
                }
                Ok(Received::Closed) => panic!("dropped"),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        grants
    };
    let stats_grant = || -> u32 {
        let stats = sink.property::<gst::Structure>("stats");
        let clients = stats.get::<gst::Array>("clients").unwrap();
        clients.as_slice()[0]
            .get::<gst::Structure>()
            .unwrap()
            .get::<u32>("max-inflight")
            .unwrap()
    };
    assert!(watch(Duration::from_millis(500)).is_empty());
    assert_eq!(held.get(), 3, "holds the default grant");
    assert_eq!(stats_grant(), 3);

    ask(100);
    assert_eq!(
        watch(Duration::from_millis(500)),
        vec![5],
        "clamped to the limit"
    );
    assert_eq!(held.get(), 5);
    assert_eq!(stats_grant(), 5);

    ask(0);
    assert_eq!(watch(Duration::from_millis(300)), vec![3], "0: the default");

    ask(4);
    assert_eq!(watch(Duration::from_millis(300)), vec![4]);
    sink.set_property("max-inflight-limit", 2u32);
    assert_eq!(watch(Duration::from_millis(300)), vec![2], "new limit");
    sink.set_property("max-inflight-limit", 2u32);
    assert!(
        watch(Duration::from_millis(300)).is_empty(),
        "unchanged: nothing sent"
    );
    sink.set_property("max-inflight", 7u32);
    assert!(
        watch(Duration::from_millis(300)).is_empty(),
        "it asked: the default does not apply"
    );
    ask(0);
    assert_eq!(watch(Duration::from_millis(300)), vec![7]);
    assert_eq!(stats_grant(), 7);
    assert_eq!(held.get(), 7);
    pipeline.set_state(gst::State::Null).unwrap();
}
