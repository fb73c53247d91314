//! What a frame costs the producer beyond sending it, counted rather than
//! timed so that it holds on a busy machine (docs/performance.md has the
//! figures): the producer's I/O thread must not wake up for every RELEASE.
//! The streaming thread reads releases after each frame; the I/O thread only
//! takes over when frames stop, or under a bound on held frames.
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
