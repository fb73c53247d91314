//! What a frame costs the producer beyond sending it, counted rather than
//! timed so that it holds on a busy machine (docs/performance.md has the
//! figures): the producer's I/O thread must not wake up for every RELEASE.
//! The streaming thread reads releases after each frame; the I/O thread only
//! takes over when frames stop, or under a bound on held frames. Consumers
//! release through a ring in shared memory, not in messages, except while
//! the producer needs to see releases at once.
//!
//! The producer runs in this process (its I/O thread is counted through
//! /proc/self/task), its consumers are `gst-launch-1.0` processes.
//! Run `cargo build` first: the processes load the plugin from target/debug.

use std::path::Path;
use std::time::{Duration, Instant};

use gst::prelude::*;

mod common;

use common::{gst_launch, init, live_producer_of, wait_for_consumers, TempDir};

/// The thread id of this process's thread named `name`.
fn thread_named(name: &str) -> Option<String> {
    std::fs::read_dir("/proc/self/task").ok()?.find_map(|t| {
        let t = t.ok()?;
        let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
        (comm.trim() == name).then(|| t.file_name().to_string_lossy().into_owned())
    })
}

/// Voluntary and involuntary context switches of thread `tid` so far.
fn context_switches(tid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    status
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

/// Frames rendered, and the frames sent to each consumer.
fn sent(sink: &gst::Element) -> (u64, Vec<u64>) {
    let stats = sink.property::<gst::Structure>("stats");
    let clients = stats.get::<gst::Array>("clients").unwrap();
    let per_client = clients
        .iter()
        .map(|c| {
            c.get::<gst::Structure>()
                .unwrap()
                .get::<u64>("frames-sent")
                .unwrap()
        })
        .collect();
    (stats.get::<u64>("frames-rendered").unwrap(), per_client)
}

/// The tests here run one at a time: the first finds the sink's I/O thread
/// by name, which another test's producer would share.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_io_thread_does_not_wake_for_each_release() {
    init();
    let _serial = serial();
    let dir = TempDir::new("cost", "io-wakeups");
    let socket = dir.path("cam.sock");
    let (pipeline, sink) = live_producer_of(
        &socket,
        "video/x-raw,format=NV12,width=64,height=48,framerate=60/1",
        "",
    );
    wait_until(Duration::from_secs(10), "producer socket", || {
        Path::new(&socket).exists()
    });
    let consumers: Vec<_> = (0..3)
        .map(|i| {
            gst_launch(
                &format!("consumer{i}"),
                &format!(
                    "bufsharesrc socket={} ! fakesink sync=false",
                    socket.display()
                ),
                &dir.path(&format!("consumer{i}.log")),
            )
        })
        .collect();
    wait_for_consumers(&socket, 3, Duration::from_secs(60));
    // All three past their start: each has been sent frames (and so releases them).
    wait_until(Duration::from_secs(60), "3 consumers receiving", || {
        let (_, per_client) = sent(&sink);
        per_client.len() == 3 && per_client.iter().all(|n| *n >= 10)
    });
    let io = thread_named("bufsharesink-io").expect("the sink's I/O thread");

    let (frames_before, sent_before) = sent(&sink);
    let wakes_before = context_switches(&io);
    std::thread::sleep(Duration::from_secs(3));
    let (frames_after, sent_after) = sent(&sink);
    let wakes = context_switches(&io) - wakes_before;
    let frames = frames_after - frames_before;
    let delivered: u64 = sent_after.iter().sum::<u64>() - sent_before.iter().sum::<u64>();
    println!(
        "{frames} frames rendered, {delivered} sent to 3 consumers (each released), \
         I/O thread context switches: {wakes}"
    );
    assert!(frames >= 60, "only {frames} frames in 3 s");
    assert!(
        delivered >= frames,
        "consumers got {delivered} of {frames} x 3 frames: not a steady state"
    );
    // Waking per RELEASE would be at least one switch per frame (all three
    // releases of a frame at once, at best); leaving them to the streaming
    // thread leaves a wake-up every 100 ms (DRAIN_HANDOFF) and stall checks.
    assert!(
        wakes * 2 < frames,
        "the I/O thread switched {wakes} times for {frames} frames: it wakes for RELEASEs"
    );
    drop(consumers);
    pipeline.set_state(gst::State::Null).unwrap();
}

/// Frames each consumer (by pid) released through its ring and in messages.
fn released(sink: &gst::Element) -> Vec<(i32, u64, u64)> {
    let stats = sink.property::<gst::Structure>("stats");
    let clients = stats.get::<gst::Array>("clients").unwrap();
    clients
        .iter()
        .map(|c| {
            let c = c.get::<gst::Structure>().unwrap();
            (
                c.get::<i32>("pid").unwrap(),
                c.get::<u64>("released-by-ring").unwrap(),
                c.get::<u64>("released-by-message").unwrap(),
            )
        })
        .collect()
}

#[test]
fn consumers_release_through_the_ring_unless_the_producer_must_see_releases_at_once() {
    init();
    let _serial = serial();
    // No bound: the ring. A bound on held frames: RELEASE messages, which
    // wake the I/O thread, so that frames go back upstream at once.
    for (sink_props, ring_expected) in [("", true), ("max-held=6", false)] {
        let dir = TempDir::new("cost", "ring");
        let socket = dir.path("cam.sock");
        let (pipeline, sink) = live_producer_of(
            &socket,
            "video/x-raw,format=NV12,width=64,height=48,framerate=60/1",
            sink_props,
        );
        wait_until(Duration::from_secs(10), "producer socket", || {
            Path::new(&socket).exists()
        });
        let launch = |name: &str, props: &str| {
            gst_launch(
                name,
                &format!(
                    "bufsharesrc socket={} {props} ! fakesink sync=false",
                    socket.display()
                ),
                &dir.path(&format!("{name}.log")),
            )
        };
        let with_ring = launch("with-ring", "");
        let without = launch("without", "release-ring=false");
        wait_for_consumers(&socket, 2, Duration::from_secs(60));
        wait_until(Duration::from_secs(60), "both consumers releasing", || {
            let r = released(&sink);
            r.len() == 2 && r.iter().all(|(_, ring, msg)| ring + msg >= 20)
        });
        let before = released(&sink);
        std::thread::sleep(Duration::from_secs(2));
        let after = released(&sink);
        let delta = |pid: i32| {
            let find = |v: &[(i32, u64, u64)]| *v.iter().find(|c| c.0 == pid).unwrap();
            let (a, b) = (find(&after), find(&before));
            (a.1 - b.1, a.2 - b.2)
        };
        let (ring, messages) = delta(with_ring.pid());
        let (ring_off, messages_off) = delta(without.pid());
        println!(
            "sink '{sink_props}': consumer with a ring released {ring} through it and {messages} \
             in messages; with release-ring=false {ring_off} and {messages_off}"
        );
        assert!(
            ring + messages >= 60,
            "only {} releases in 2 s",
            ring + messages
        );
        assert_eq!(ring_off, 0, "release-ring=false used a ring");
        assert!(
            messages_off >= 60,
            "release-ring=false: {messages_off} messages"
        );
        if ring_expected {
            // A streaming thread late by 100 ms on a loaded machine hands
            // releases to the I/O thread for a moment: most, not all.
            assert!(
                ring * 10 >= (ring + messages) * 8,
                "{ring} of {} releases went through the ring",
                ring + messages
            );
        } else {
            assert_eq!(ring, 0, "under a held bound releases must be messages");
        }
        drop((with_ring, without));
        pipeline.set_state(gst::State::Null).unwrap();
    }
}
