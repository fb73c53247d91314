//! The frame ring (docs/protocol.md 5.13, 5.14, 9.12): FRAMEs through shared
//! memory with a doorbell, everything else on the socket, in order.
//!
//! In separate processes (`bufshare-peer`): frames arrive byte-identical
//! through the ring, with a caps change and EOS in the right place among
//! them; a consumer with the ring turned off (as an older consumer) gets the
//! same stream on the socket next to one with the ring; a consumer frozen
//! with SIGSTOP is found stalled through its ring. In this process: unlock
//! (going to NULL) wakes a consumer waiting on its ring at once, and a
//! scripted producer that offers no ring (an older producer) still feeds a
//! bufsharesrc that asks for one. Hostile consumers writing bad read counts
//! or sleep flags are in `tests/hostile.rs`.

mod common;
use common::{Proc, TempDir};

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gst::prelude::*;

const PEER: &str = env!("CARGO_BIN_EXE_bufshare-peer");

/// These tests run one at a time: they share two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn producer(dir: &TempDir, args: &[&str]) -> Proc {
    let socket = dir.path("s.sock");
    let stderr = std::fs::File::create(dir.path("producer.err")).unwrap();
    let child = Command::new(PEER)
        .args(["produce", "--socket"])
        .arg(&socket)
        .arg("--report")
        .arg(dir.path("p.txt"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    common::wait_for_path(&socket, Duration::from_secs(20));
    Proc::new("producer", child)
}

fn consumer(dir: &TempDir, name: &str, args: &[&str]) -> Proc {
    let child = Command::new(PEER)
        .args(["consume", "--socket"])
        .arg(dir.path("s.sock"))
        .arg("--report")
        .arg(dir.path(&format!("{name}.txt")))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proc::new(name, child)
}

/// One line of a report: its first word and its `key=value` fields.
fn fields(line: &str) -> (&str, BTreeMap<&str, &str>) {
    let (head, rest) = line.split_once(' ').unwrap_or((line, ""));
    let map = rest
        .split(' ')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    (head, map)
}

/// A report's `caps` and `frame` lines in order: `None` for caps, the frame's
/// (offset, sum, size) otherwise.
fn events(path: &Path) -> Vec<Option<(u64, String, u64)>> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter_map(|l| match fields(l) {
            ("caps", _) => Some(None),
            ("frame", f) => Some(Some((
                f["offset"].parse().unwrap(),
                f["sum"].to_string(),
                f["size"].parse().unwrap(),
            ))),
            _ => None,
        })
        .collect()
}

/// The largest `by-frame-ring` (and `sent`) the producer sampled for each
/// consumer pid.
fn by_frame_ring(path: &Path) -> BTreeMap<i32, (u64, u64)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out: BTreeMap<i32, (u64, u64)> = BTreeMap::new();
    for l in text.lines() {
        if let ("client", f) = fields(l) {
            let e = out.entry(f["pid"].parse().unwrap()).or_default();
            e.0 = e.0.max(f["by-frame-ring"].parse().unwrap());
            e.1 = e.1.max(f["sent"].parse().unwrap());
        }
    }
    out
}

#[test]
fn frames_come_through_the_ring_identical_with_caps_and_eos_in_order() {
    let _serial = serial();
    let dir = TempDir::new("fring", "order");
    let frames = 60;
    let prod = producer(
        &dir,
        &[
            "--source",
            "caps-change",
            "--frames",
            &frames.to_string(),
            "--fps",
            "60",
            "--wait-clients",
            "1",
            "--stats-every",
            "20",
        ],
    );
    let cons = consumer(&dir, "c", &[]);
    let pid = cons.pid();
    prod.wait_ok(Duration::from_secs(60));
    // It ends on the producer's EOS: only after every frame before it.
    cons.wait_ok(Duration::from_secs(60));

    let p = events(&dir.path("p.txt"));
    let c = events(&dir.path("c.txt"));
    assert_eq!(c.len(), p.len(), "every caps and frame, no more");
    assert_eq!(
        c, p,
        "the consumer saw the caps and frames in the producer's order, byte-identical"
    );
    // The caps changed in mid-stream and the frames after it are smaller:
    // the CAPS on the socket came between the right ring entries.
    let caps_at: Vec<usize> = c
        .iter()
        .enumerate()
        .filter(|(_, e)| e.is_none())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(caps_at.len(), 2, "{c:?}");
    let sizes = |r: std::ops::Range<usize>| -> Vec<u64> {
        c[r].iter().map(|e| e.as_ref().unwrap().2).collect()
    };
    let (before, after) = (sizes(1..caps_at[1]), sizes(caps_at[1] + 1..c.len()));
    assert!(before.iter().all(|s| *s == before[0]) && after.iter().all(|s| *s == after[0]));
    assert_eq!(before[0], 4 * after[0], "{before:?} {after:?}");
    // And they came through the ring.
    let (ring, sent) = by_frame_ring(&dir.path("p.txt"))[&pid];
    println!("frame ring: {ring} of {sent} frames through the ring");
    assert!(
        ring > 0 && ring == sent,
        "{ring} of {sent} through the ring"
    );
}

#[test]
fn a_consumer_without_the_ring_gets_the_same_stream_on_the_socket() {
    let _serial = serial();
    let dir = TempDir::new("fring", "mixed");
    let prod = producer(
        &dir,
        &[
            "--source",
            "caps-change",
            "--frames",
            "60",
            "--fps",
            "60",
            "--wait-clients",
            "2",
            "--stats-every",
            "20",
        ],
    );
    let ring = consumer(&dir, "ring", &[]);
    let old = consumer(&dir, "old", &["--frame-ring", "0"]);
    let (ring_pid, old_pid) = (ring.pid(), old.pid());
    prod.wait_ok(Duration::from_secs(60));
    ring.wait_ok(Duration::from_secs(60));
    old.wait_ok(Duration::from_secs(60));
    let p = events(&dir.path("p.txt"));
    assert_eq!(events(&dir.path("ring.txt")), p);
    assert_eq!(events(&dir.path("old.txt")), p);
    let counts = by_frame_ring(&dir.path("p.txt"));
    println!("by frame ring: {counts:?}");
    assert!(counts[&ring_pid].0 > 0, "{counts:?}");
    assert_eq!(counts[&old_pid].0, 0, "frame-ring=false used a ring");
    assert!(counts[&old_pid].1 > 0);
}

#[test]
fn a_consumer_that_stops_reading_its_ring_is_dropped_as_stalled() {
    let _serial = serial();
    let dir = TempDir::new("fring", "stall");
    let prod = producer(
        &dir,
        &[
            // The sink's own pool: its memories are registered once, at the
            // start, so nothing more goes on the socket and the stall can
            // only be seen in the ring.
            "--source",
            "test",
            "--frames",
            "300",
            "--fps",
            "60",
            "--wait-clients",
            "1",
            "--client-timeout",
            "500",
            "--stats-every",
            "50",
        ],
    );
    let frozen = consumer(&dir, "frozen", &[]);
    let pid = frozen.pid();
    std::thread::sleep(Duration::from_millis(1500));
    frozen.signal(rustix::process::Signal::STOP);
    prod.wait_ok(Duration::from_secs(60));
    frozen.signal(rustix::process::Signal::CONT);
    let _ = frozen.wait(Duration::from_secs(60));
    let warnings = std::fs::read_to_string(dir.path("producer.err")).unwrap();
    println!("stall: {}", warnings.trim());
    let line = warnings
        .lines()
        .find(|l| l.contains("stalled"))
        .unwrap_or_else(|| panic!("no stall warning: {warnings}"));
    assert!(line.contains(&format!("pid {pid}")), "{line}");
    assert!(line.contains("unread in its frame ring"), "{line}");
    assert!(by_frame_ring(&dir.path("p.txt"))[&pid].0 > 0);
}

/// A consumer waiting on its ring (no frame comes) leaves its wait as soon
/// as it is told to stop, although its timeout is a minute away.
#[test]
fn unlock_wakes_a_consumer_waiting_on_its_ring() {
    common::init();
    let _serial = serial();
    let path = common::temp_socket("fring", "unlock.sock");
    let (prod, appsrc, sink) = common::appsrc_producer(
        &path,
        Some("video/x-raw,format=GRAY8,width=16,height=16,framerate=30/1"),
    );
    prod.set_state(gst::State::Playing).unwrap();
    let (cons, out) = common::playing_into_appsink(
        &format!("bufsharesrc socket={} timeout=60000", path.display()),
        "",
    );
    common::wait_for_consumers(&path, 1, Duration::from_secs(10));
    let mut buffer = gst::Buffer::with_size(256).unwrap();
    buffer.get_mut().unwrap().set_pts(gst::ClockTime::ZERO);
    appsrc.push_buffer(buffer).unwrap();
    assert!(out
        .try_pull_sample(gst::ClockTime::from_seconds(10))
        .is_some());
    let stats = sink.property::<gst::Structure>("stats");
    let clients = stats.get::<gst::Array>("clients").unwrap();
    let client = clients.first().unwrap().get::<gst::Structure>().unwrap();
    assert_eq!(client.get::<u64>("frames-by-ring").unwrap(), 1, "{client}");
    // Now it waits in epoll_wait for the next frame, which never comes.
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    cons.set_state(gst::State::Null).unwrap();
    let took = t.elapsed();
    println!("unlock: the waiting consumer stopped in {took:?}");
    assert!(took < Duration::from_secs(2), "stopping took {took:?}");
    prod.set_state(gst::State::Null).unwrap();
}

/// An older producer (scripted here: its HELLO does not offer the frame
/// ring, and it never sends FRAME_RING) feeds a bufsharesrc that asks for
/// one: every FRAME on the socket, as before.
#[test]
fn a_producer_without_the_ring_still_feeds_a_consumer_that_asks_for_it() {
    use gstbufshare::protocol::{self, frame_ring, Frame, Hello, MemoryRef, Message, Role, NONE};
    use gstbufshare::transport::unix::Listener;
    use gstbufshare::transport::Channel;
    common::init();
    let _serial = serial();
    let path = common::temp_socket("fring", "old-producer.sock");
    let listener = Listener::bind(&path).unwrap();
    // The script runs beside the consumer: bufsharesrc waits for the
    // handshake as it starts.
    let script = std::thread::spawn(move || {
        let c = common::accept_within(&listener, Duration::from_secs(10), "bufsharesrc");
        let send = |m: &Message| c.send(&protocol::encode(m), &[]).unwrap();
        send(&Message::Hello(Hello {
            version: protocol::VERSION,
            role: Role::Producer,
            features: protocol::release_ring::FEATURE_RELEASE_RING | protocol::FEATURE_MONITOR,
        }));
        match common::recv_msg(&c) {
            Some((Message::Hello(h), _)) => {
                assert_ne!(h.features & frame_ring::FEATURE_FRAME_RING, 0)
            }
            other => panic!("expected the consumer's HELLO, got {other:?}"),
        }
        send(&Message::MaxInflight { frames: 8 });
        send(&Message::Caps {
            caps: "application/x-test".into(),
            latency: 0,
        });
        for id in 1..=3u8 {
            send(&Message::Frame(Frame {
                frame_id: id.into(),
                pts: NONE,
                dts: NONE,
                duration: NONE,
                offset: NONE,
                offset_end: NONE,
                flags: 0,
                memories: vec![MemoryRef::Inline(vec![id; 16])],
                metas: vec![],
            }));
        }
        send(&Message::Eos);
        c
    });
    let (cons, out) = common::playing_into_appsink(
        &format!("bufsharesrc socket={} timeout=10000", path.display()),
        "",
    );
    let _c = script.join().unwrap();
    for id in 1..=3u8 {
        let sample = out
            .try_pull_sample(gst::ClockTime::from_seconds(10))
            .expect("a frame from the old producer");
        let map = sample.buffer().unwrap().map_readable().unwrap();
        assert_eq!(map.as_slice(), &[id; 16][..]);
    }
    assert!(out
        .try_pull_sample(gst::ClockTime::from_seconds(10))
        .is_none());
    assert!(out.is_eos());
    cons.set_state(gst::State::Null).unwrap();
}

/// A consumer that keeps reading its socket but stops taking entries from
/// its ring: nothing is left unread in its socket, and the producer still
/// finds it stalled, from the ring.
#[test]
fn a_consumer_that_stops_taking_entries_is_found_stalled_by_its_ring() {
    use gstbufshare::protocol::{self, frame_ring as fr, Hello, MemoryRef, Message, Role};
    use gstbufshare::transport::unix::UnixChannel;
    use gstbufshare::transport::{Channel, Received};
    common::init();
    let _serial = serial();
    let path = common::temp_socket("fring", "ring-stall.sock");
    let (prod, _sink) = common::live_producer_with(&path, "client-timeout=500");
    let c = UnixChannel::connect(&path).unwrap();
    let send = |m: &Message| c.send(&protocol::encode(m), &[]).unwrap();
    send(&Message::Hello(Hello {
        version: protocol::VERSION,
        role: Role::Consumer,
        features: fr::FEATURE_FRAME_RING,
    }));
    let mut ring = None;
    let ring = loop {
        match common::recv_msg(&c) {
            Some((Message::FrameRing { .. }, mut fds)) => ring = fds.pop(),
            Some((Message::Doorbell, _)) => break ring.unwrap(),
            Some(_) => continue,
            None => panic!("no frame ring"),
        }
    };
    let word = |offset: usize| {
        let mut w = [0u8; 8];
        rustix::io::pread(&ring, &mut w, offset as u64).unwrap();
        u64::from_le_bytes(w)
    };
    // Take the first entry and release its frame, as a live consumer does.
    let deadline = Instant::now() + Duration::from_secs(10);
    while word(fr::WRITTEN_OFFSET) == 0 {
        assert!(Instant::now() < deadline, "no entry in the ring");
        std::thread::sleep(Duration::from_millis(5));
    }
    let slot = fr::slot_offset(0, fr::DEFAULT_CAPACITY, fr::DEFAULT_SLOT_LEN);
    let len = word(slot + 8) as usize;
    let mut bytes = vec![0u8; len];
    rustix::io::pread(&ring, &mut bytes, (slot + fr::ENTRY_HEADER_LEN) as u64).unwrap();
    let Ok(Message::Frame(frame)) = protocol::decode(&bytes, 0) else {
        panic!("entry is not a FRAME");
    };
    assert!(matches!(frame.memories[0], MemoryRef::Registered { .. }));
    rustix::io::pwrite(&ring, &1u64.to_le_bytes(), fr::READ_OFFSET as u64).unwrap();
    send(&Message::Release {
        frame_ids: vec![frame.frame_id],
    });
    // Now read only the socket, to its end.
    let mut buf = vec![0u8; protocol::MAX_MESSAGE_LEN];
    let deadline = Instant::now() + Duration::from_secs(10);
    let reason = loop {
        assert!(Instant::now() < deadline, "not dropped for its stall");
        match c.recv(&mut buf) {
            Ok(Received::Message { len, fds }) => {
                if let Ok(Message::Disconnect { reason }) = protocol::decode(&buf[..len], fds.len())
                {
                    break reason;
                }
            }
            Ok(Received::Closed) => panic!("closed without DISCONNECT"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    println!("ring stall: {reason}");
    assert!(reason.contains("stalled"), "{reason}");
    assert!(
        reason.contains("left 0 bytes unread in its socket"),
        "{reason}"
    );
    assert!(
        reason.contains("frames unread in its frame ring"),
        "{reason}"
    );
    prod.set_state(gst::State::Null).unwrap();
}
