//! The monitor role on the producer's socket (`docs/protocol.md` 9.11), with a
//! bufsharesink in this process and scripted peers: a monitor gets HELLO (with
//! the monitor feature) and STATS at once, then one each second with rates and
//! release latencies; it is not a consumer (`num-clients`, the signals and the
//! `stats` property ignore it); it is refused for a wrong version or past the
//! monitor cap, and dropped when it sends anything after its HELLO.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gst::prelude::*;
use gstbufshare::protocol::{self, Message, Role, Stats};
use gstbufshare::transport::unix::UnixChannel;
use gstbufshare::transport::Channel;

mod common;

use common::{hello, init, live_producer_with, recv_msg, temp_socket};

fn send(c: &UnixChannel, m: &Message) {
    c.send(&protocol::encode(m), &[]).unwrap();
}

/// A consumer that releases every frame as soon as it comes, until `stop`.
fn releasing_consumer(
    path: &std::path::Path,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let c = UnixChannel::connect(path).unwrap();
    send(&c, &hello(protocol::VERSION, Role::Consumer));
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match recv_msg(&c) {
                Some((Message::Frame(f), _)) if f.needs_release() => send(
                    &c,
                    &Message::Release {
                        frame_ids: vec![f.frame_id],
                    },
                ),
                Some(_) => {}
                None => return,
            }
        }
    })
}

/// Connects a monitor: reads the producer's HELLO, says its own.
fn monitor(path: &std::path::Path) -> UnixChannel {
    let c = UnixChannel::connect(path).unwrap();
    match recv_msg(&c) {
        Some((Message::Hello(h), _)) => {
            assert_eq!(h.role, Role::Producer);
            assert_ne!(
                h.features & protocol::FEATURE_MONITOR,
                0,
                "no monitor feature"
            );
        }
        other => panic!("expected HELLO, got {other:?}"),
    }
    send(&c, &hello(protocol::VERSION, Role::Monitor));
    c
}

fn next_stats(c: &UnixChannel) -> Stats {
    match recv_msg(c) {
        Some((Message::Stats(s), _)) => s,
        other => panic!("expected STATS, got {other:?}"),
    }
}

#[test]
fn monitor_gets_stats_and_is_not_a_consumer() {
    init();
    let path = temp_socket("monitor", "stats.sock");
    let (pipeline, sink) = live_producer_with(&path, "");
    let connected = Arc::new(AtomicUsize::new(0));
    let n = connected.clone();
    sink.connect("client-connected", false, move |_| {
        n.fetch_add(1, Ordering::SeqCst);
        None
    });
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = releasing_consumer(&path, stop.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.property::<u32>("num-clients") < 1 {
        assert!(Instant::now() < deadline, "the consumer did not connect");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let the producer measure a whole interval with the consumer in it.
    std::thread::sleep(Duration::from_millis(2200));

    let asked = Instant::now();
    let m = monitor(&path);
    let first = next_stats(&m);
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "first STATS took {:?}",
        asked.elapsed()
    );
    let second = next_stats(&m);
    let gap = Duration::from_nanos(second.time - first.time);
    assert!(
        gap > Duration::from_millis(600) && gap < Duration::from_millis(2500),
        "snapshots {gap:?} apart"
    );
    for s in [&first, &second] {
        assert!(
            s.interval >= 900_000_000 && s.interval < 2_000_000_000,
            "interval {}",
            s.interval
        );
        assert!(s.caps.starts_with("video/x-raw"), "caps {}", s.caps);
        assert!(s.caps.contains("width=(int)64"), "caps {}", s.caps);
        assert_eq!(s.backend, "memfd");
        assert!(s.frames > 30, "frames {}", s.frames);
        // 30 fps nominal; wide bounds for a busy machine.
        assert!(
            (10_000..=45_000).contains(&s.fps_milli),
            "fps {}",
            s.fps_milli
        );
        assert_eq!(s.copies, 0, "videotestsrc writes into the sink's pool");
        assert_eq!(s.num_consumers, 1, "the monitor counted as a consumer");
        assert_eq!(s.consumers.len(), 1);
        let c = &s.consumers[0];
        assert_eq!(c.pid, std::process::id());
        assert_eq!(c.uid, rustix::process::getuid().as_raw());
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(c.name, comm.trim_end());
        assert!(
            c.frames > 30 && c.frames <= s.frames,
            "frames {} of {}",
            c.frames,
            s.frames
        );
        assert!(
            (10_000..=45_000).contains(&c.fps_milli),
            "consumer fps {}",
            c.fps_milli
        );
        assert!(
            c.held <= c.granted && c.granted == 8,
            "held {} of {}",
            c.held,
            c.granted
        );
        assert!(c.releases >= 10, "releases {}", c.releases);
        assert_ne!(c.release_p50, protocol::NONE);
        assert!(
            c.release_p50 <= c.release_p99,
            "p50 {} p99 {}",
            c.release_p50,
            c.release_p99
        );
        assert!(c.release_p99 < 1_000_000_000, "p99 {} ns", c.release_p99);
    }
    // Not a consumer: not counted, no signal, not in the stats property.
    assert_eq!(sink.property::<u32>("num-clients"), 1);
    assert_eq!(connected.load(Ordering::SeqCst), 1);
    let stats = sink.property::<gst::Structure>("stats");
    assert_eq!(stats.get::<u32>("num-clients").unwrap(), 1);

    // A monitor that sends anything after its HELLO is dropped.
    send(&m, &Message::MaxInflight { frames: 1 });
    loop {
        match recv_msg(&m) {
            Some((Message::Stats(_), _)) => {}
            None => break,
            Some((other, _)) => panic!("monitor got {}", other.name()),
        }
    }
    assert_eq!(sink.property::<u32>("num-clients"), 1);
    stop.store(true, Ordering::SeqCst);
    let _ = consumer.join();
    pipeline.set_state(gst::State::Null).unwrap();
}

#[test]
fn monitors_of_another_version_or_past_the_cap_are_refused() {
    init();
    let path = temp_socket("monitor", "refused.sock");
    let (pipeline, sink) = live_producer_with(&path, "");
    // Another version: REFUSE naming both.
    let c = UnixChannel::connect(&path).unwrap();
    assert!(matches!(recv_msg(&c), Some((Message::Hello(_), _))));
    send(&c, &hello(1, Role::Monitor));
    match recv_msg(&c) {
        Some((Message::Refuse { reason }, _)) => assert!(
            reason.contains("monitor speaks version 1, producer speaks version 2"),
            "{reason}"
        ),
        other => panic!("expected REFUSE, got {other:?}"),
    }
    // 16 monitors are served; the 17th is refused instead of its first STATS.
    let mut served = Vec::new();
    for _ in 0..16 {
        let m = monitor(&path);
        next_stats(&m);
        served.push(m);
    }
    let extra = monitor(&path);
    match recv_msg(&extra) {
        Some((Message::Refuse { reason }, _)) => {
            assert!(reason.contains("too many monitors"), "{reason}")
        }
        other => panic!("expected REFUSE, got {other:?}"),
    }
    assert_eq!(sink.property::<u32>("num-clients"), 0);
    pipeline.set_state(gst::State::Null).unwrap();
}
