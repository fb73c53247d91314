//! The pipelines people actually run, each element in its own
//! `gst-launch-1.0` process (or a plain in-process pipeline where the test
//! must read timestamps or stats): recorders with default encoders, deep
//! queues, consumers that lag, pause or stall, producers stopped with `-e`,
//! reconnecting consumers, producers that negotiate late.
//!
//! Counts, not timing: every assertion leaves room for a busy 2-core machine.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{gst_launch, init, plugin_dir, wait_for_path, Proc, TempDir};
use gst::prelude::*;
use rustix::process::Signal;

const TAG: &str = "pipes";

/// A live test producer: 320x240 I420 at 30 fps into `socket`.
fn camera(dir: &TempDir, socket: &Path, extra_sink_props: &str) -> Proc {
    gst_launch(
        "producer",
        &format!(
            "videotestsrc is-live=true ! video/x-raw,format=I420,width=320,height=240,framerate=30/1 ! bufsharesink socket={} {extra_sink_props}",
            socket.display()
        ),
        &dir.path("producer.log"),
    )
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The log without the per-buffer lines of `fakesink silent=false`, for messages.
fn log_summary(path: &Path) -> String {
    log_of(path)
        .lines()
        .filter(|l| !l.contains("last-message"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Buffers a `gst-launch-1.0 -v ... ! fakesink silent=false` printed.
fn chain_lines(log: &str) -> usize {
    log.lines().filter(|l| l.contains("chain   ******")).count()
}

/// The PTS (ns) of the buffers a `gst-launch-1.0 -v ... ! fakesink silent=false` printed.
fn chain_pts(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("chain   ******"))
        .filter_map(|l| {
            let t = l.split("pts: ").nth(1)?.split(',').next()?;
            let mut parts = t.split(':');
            let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
            let (secs, nanos) = s.split_once('.')?;
            let whole = h.parse::<u64>().ok()? * 3600
                + m.parse::<u64>().ok()? * 60
                + secs.parse::<u64>().ok()?;
            Some(whole * 1_000_000_000 + nanos.parse::<u64>().ok()?)
        })
        .collect()
}

/// Waits until `pred(log)` holds for the log at `path`, up to `limit`.
fn wait_for_log(path: &Path, limit: Duration, what: &str, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        let log = log_of(path);
        if pred(&log) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen in {limit:?}; log {}:\n{log}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A consumer that cannot keep up (an encoder at 50 ms a frame, behind a
/// 33 ms camera) records into an MP4. The producer is stopped with Ctrl-C
/// (`-e`: EOS). Every frame it was sent, and the EOS, were already in its
/// socket: it must read them to the end, finalize a playable file and exit 0,
/// not fail with "the producer went away".
#[test]
fn lagging_recorder_finishes_its_file_when_the_producer_stops_with_eos() {
    init();
    let dir = TempDir::new(TAG, "lagging");
    let socket = dir.path("cam.sock");
    let producer = camera(&dir, &socket, "");
    wait_for_path(&socket, Duration::from_secs(30));
    let mp4 = dir.path("lagging.mp4");
    let recorder_log = dir.path("recorder.log");
    let recorder = gst_launch(
        "recorder",
        &format!(
            "bufsharesrc socket={} ! identity sleep-time=50000 ! videoconvert ! x264enc tune=zerolatency speed-preset=ultrafast ! h264parse ! mp4mux ! filesink location={}",
            socket.display(),
            mp4.display()
        ),
        &recorder_log,
    );
    // Let it fall behind by a few frames, then stop the producer as a user would.
    wait_for_log(
        &recorder_log,
        Duration::from_secs(30),
        "recorder playing",
        |l| l.contains("Setting pipeline to PLAYING"),
    );
    std::thread::sleep(Duration::from_secs(4));
    producer.signal(Signal::INT);
    producer.wait_ok(Duration::from_secs(30));
    let status = recorder.wait(Duration::from_secs(60));
    let log = log_of(&recorder_log);
    assert!(status.success(), "recorder exited with {status}:\n{log}");
    assert!(!log.contains("went away"), "{log}");
    assert!(log.contains("Got EOS from element"), "{log}");
    let (frames, last_pts) = common::decode_file(&mp4);
    println!("lagging recorder: {frames} frames, last pts {last_pts:?}");
    assert!(frames >= 20, "only {frames} frames in {}", mp4.display());
}

/// A playing consumer pipeline in this process, `bufsharesrc ! appsink` (with
/// `appsink_props`), for tests that read timestamps, flags and stats.
fn consumer_in_this_process(
    socket: &Path,
    appsink_props: &str,
) -> (gst::Pipeline, gst::Element, gst_app::AppSink) {
    let (consumer, appsink) = common::playing_into_appsink(
        &format!(
            "bufsharesrc name=src socket={} timeout=10000",
            socket.display()
        ),
        appsink_props,
    );
    let src = consumer.by_name("src").unwrap();
    (consumer, src, appsink)
}

/// A consumer pipeline in this process, PAUSED for a second and PLAYING
/// again: the frames that waited in its socket meanwhile belong before the
/// pause; the PTS it pushes must never go backwards.
#[test]
fn timestamps_keep_increasing_across_paused_and_playing() {
    init();
    let dir = TempDir::new(TAG, "paused");
    let socket = dir.path("cam.sock");
    let _producer = camera(&dir, &socket, "");
    wait_for_path(&socket, Duration::from_secs(30));
    let (consumer, src, appsink) = consumer_in_this_process(&socket, "");
    let mut pts = Vec::new();
    let pull = |pts: &mut Vec<gst::ClockTime>, n: usize| {
        for _ in 0..n {
            let sample = appsink
                .try_pull_sample(gst::ClockTime::from_seconds(20))
                .expect("a frame");
            pts.push(sample.buffer().unwrap().pts().expect("a pts"));
        }
    };
    pull(&mut pts, 20);
    for _ in 0..2 {
        consumer.set_state(gst::State::Paused).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        consumer.set_state(gst::State::Playing).unwrap();
        pull(&mut pts, 20);
    }
    let stats = src.property::<gst::Structure>("stats");
    consumer.set_state(gst::State::Null).unwrap();
    let backwards: Vec<_> = pts
        .windows(2)
        .filter(|w| w[1] < w[0])
        .map(|w| (w[0], w[1]))
        .collect();
    println!("consumer stats after two pauses: {stats}");
    assert!(backwards.is_empty(), "PTS went backwards: {backwards:?}");
    assert!(
        stats.get::<u64>("frames-dropped-late").unwrap() > 0,
        "nothing was left from the pauses? {stats}"
    );
}

/// A text producer whose first line comes 3 s after it starts (past the
/// consumer's 1 s `timeout`): the consumer reaches PLAYING, waits, and prints
/// the lines when they come; it ends with the producer's EOS.
#[test]
fn consumer_waits_in_playing_for_a_producer_that_negotiates_late() {
    init();
    let dir = TempDir::new(TAG, "late-caps");
    let socket = dir.path("text.sock");
    let producer_log = std::fs::File::create(dir.path("producer.log")).unwrap();
    let mut cmd = Command::new("gst-launch-1.0");
    cmd.args(
        format!(
            "-e fdsrc do-timestamp=true ! text/x-raw,format=utf8 ! bufsharesink socket={}",
            socket.display()
        )
        .split_whitespace(),
    )
    .env("GST_PLUGIN_PATH", plugin_dir())
    .stdin(Stdio::piped())
    .stdout(producer_log.try_clone().unwrap())
    .stderr(producer_log);
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let producer = Proc::new("text producer", child);
    wait_for_path(&socket, Duration::from_secs(30));
    let consumer_log = dir.path("consumer.log");
    let consumer = gst_launch(
        "text consumer",
        &format!("bufsharesrc socket={} ! fdsink fd=1", socket.display()),
        &consumer_log,
    );
    wait_for_log(
        &consumer_log,
        Duration::from_secs(30),
        "consumer playing",
        |l| l.contains("Setting pipeline to PLAYING"),
    );
    std::thread::sleep(Duration::from_secs(3));
    let log = log_of(&consumer_log);
    assert!(
        !log.contains("ERROR"),
        "the consumer gave up waiting:\n{log}"
    );
    writeln!(stdin, "first line, 3 s late").unwrap();
    wait_for_log(
        &consumer_log,
        Duration::from_secs(30),
        "the first line",
        |l| l.contains("first line, 3 s late"),
    );
    writeln!(stdin, "second line").unwrap();
    wait_for_log(
        &consumer_log,
        Duration::from_secs(30),
        "the second line",
        |l| l.contains("second line"),
    );
    drop(stdin); // fdsrc reads EOF: the producer sends EOS
    producer.wait_ok(Duration::from_secs(30));
    let status = consumer.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "consumer: {status}\n{}",
        log_of(&consumer_log)
    );
}

/// `on-disconnect=reconnect` consumers outlive a producer stopped with `-e`
/// (its EOS ends only its stream) and go on with the next producer; with
/// `on-eos=forward` the same EOS ends the consumer cleanly.
#[test]
fn reconnecting_consumer_waits_through_a_producers_eos_for_the_next_one() {
    init();
    let dir = TempDir::new(TAG, "reconnect-eos");
    let socket = dir.path("cam.sock");
    let first = camera(&dir, &socket, "");
    wait_for_path(&socket, Duration::from_secs(30));
    let waiting_log = dir.path("waiting.log");
    let waiting = gst_launch(
        "waiting consumer",
        &format!(
            "-v bufsharesrc socket={} on-disconnect=reconnect ! fakesink silent=false",
            socket.display()
        ),
        &waiting_log,
    );
    let ending_log = dir.path("ending.log");
    let ending = gst_launch(
        "ending consumer",
        &format!(
            "bufsharesrc socket={} on-disconnect=reconnect on-eos=forward ! fakesink",
            socket.display()
        ),
        &ending_log,
    );
    wait_for_log(&waiting_log, Duration::from_secs(30), "frames", |l| {
        chain_lines(l) >= 10
    });
    first.signal(Signal::INT);
    first.wait_ok(Duration::from_secs(30));
    let status = ending.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "on-eos=forward: {status}\n{}",
        log_of(&ending_log)
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut waiting = waiting;
    assert!(
        waiting.running(),
        "the reconnecting consumer ended with the first producer:\n{}",
        log_summary(&waiting_log)
    );
    let before = chain_lines(&log_of(&waiting_log));
    let second = camera(&dir, &socket, "");
    wait_for_log(
        &waiting_log,
        Duration::from_secs(30),
        "the second producer's frames",
        |l| chain_lines(l) >= before + 10,
    );
    second.kill9();
    waiting.signal(Signal::INT);
    waiting.wait(Duration::from_secs(30));
    // Time went on across the two producers: no PTS went backwards.
    let pts = chain_pts(&log_of(&waiting_log));
    assert!(pts.len() >= before + 10, "{} PTS read", pts.len());
    let backwards = pts.windows(2).filter(|w| w[1] < w[0]).count();
    assert_eq!(
        backwards, 0,
        "PTS went backwards {backwards} times across the reconnect"
    );
}

/// A consumer whose streaming thread is blocked (an appsink nobody pulls)
/// stops reading; the producer skips frames for it. When it reads again, the
/// first buffer after the gap is DISCONT and stats count the skipped frames.
#[test]
fn frames_skipped_for_a_blocked_consumer_are_counted_and_marked_discont() {
    init();
    let dir = TempDir::new(TAG, "discont");
    let socket = dir.path("cam.sock");
    let _producer = camera(&dir, &socket, "");
    wait_for_path(&socket, Duration::from_secs(30));
    let (consumer, src, appsink) = consumer_in_this_process(&socket, "max-buffers=1");
    let pull = || {
        appsink
            .try_pull_sample(gst::ClockTime::from_seconds(20))
            .expect("a frame")
            .buffer_owned()
            .unwrap()
    };
    for _ in 0..5 {
        pull();
    }
    // Nobody pulls for a second: 30 frames are rendered, few fit.
    std::thread::sleep(Duration::from_secs(1));
    let mut discont = 0;
    for _ in 0..30 {
        if pull().flags().contains(gst::BufferFlags::DISCONT) {
            discont += 1;
        }
    }
    let stats = src.property::<gst::Structure>("stats");
    consumer.set_state(gst::State::Null).unwrap();
    println!("{stats}");
    let skipped = stats.get::<u64>("frames-skipped").unwrap();
    assert!(skipped >= 5, "{stats}");
    assert!(discont >= 1, "no DISCONT after {skipped} skipped frames");
    assert!(
        stats.get::<u64>("frames-received").unwrap() >= 35,
        "{stats}"
    );
}

/// The most common consumer there is: a recorder with x264enc's default
/// settings, whose lookahead keeps dozens of frames, far more than a
/// consumer's default share of the producer's frames. It must record the
/// whole run (the producer's frames are copied once the share is used up,
/// with one warning naming the property), and a recorder that asks for a
/// larger share (`max-inflight=64`) records it without that warning. A plain
/// consumer next to them is not affected.
#[test]
fn default_x264_recorders_record_the_whole_run() {
    init();
    let dir = TempDir::new(TAG, "x264");
    let socket = dir.path("cam.sock");
    let producer = camera(&dir, &socket, "");
    wait_for_path(&socket, Duration::from_secs(30));
    let recorder = |name: &str, props: &str| {
        let mp4 = dir.path(&format!("{name}.mp4"));
        let log = dir.path(&format!("{name}.log"));
        let p = gst_launch(
            name,
            &format!(
                "bufsharesrc socket={} {props} ! videoconvert ! x264enc ! mp4mux ! filesink location={}",
                socket.display(),
                mp4.display()
            ),
            &log,
        );
        (p, mp4, log)
    };
    let (copying, copying_mp4, copying_log) = recorder("default", "");
    let (holding, holding_mp4, holding_log) = recorder("holding", "max-inflight=64");
    let plain_log = dir.path("plain.log");
    let plain = gst_launch(
        "plain",
        &format!(
            "-v bufsharesrc socket={} ! fakesink silent=false",
            socket.display()
        ),
        &plain_log,
    );
    for log in [&copying_log, &holding_log] {
        wait_for_log(log, Duration::from_secs(30), "recorder playing", |l| {
            l.contains("Setting pipeline to PLAYING")
        });
    }
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    for p in [&copying, &holding, &plain] {
        p.signal(Signal::INT);
    }
    let ran = started.elapsed();
    for (p, log) in [
        (copying, &copying_log),
        (holding, &holding_log),
        (plain, &plain_log),
    ] {
        let status = p.wait(Duration::from_secs(60));
        assert!(status.success(), "{status}:\n{}", log_of(log));
    }
    producer.signal(Signal::INT);
    producer.wait_ok(Duration::from_secs(30));
    // At least 6 of the 8 s at 30 fps, whatever start-up and a busy machine took.
    let expected = 6 * 30;
    let (copied_frames, _) = common::decode_file(&copying_mp4);
    let (held_frames, _) = common::decode_file(&holding_mp4);
    let plain_frames = chain_lines(&log_of(&plain_log));
    println!(
        "over {ran:?}: default recorder {copied_frames} frames, max-inflight=64 recorder {held_frames}, plain consumer {plain_frames}"
    );
    assert!(
        copied_frames >= expected,
        "default x264enc recorder: {copied_frames} frames"
    );
    assert!(
        held_frames >= expected,
        "max-inflight=64 recorder: {held_frames} frames"
    );
    assert!(
        plain_frames >= expected as usize,
        "plain consumer: {plain_frames} frames"
    );
    let warned = log_of(&copying_log);
    assert!(
        warned.contains("copying newer frames") && warned.contains("Set max-inflight"),
        "no warning naming the property:\n{warned}"
    );
    assert!(
        !log_of(&holding_log).contains("copying newer frames"),
        "a recorder granted 64 frames still copied:\n{}",
        log_of(&holding_log)
    );
}

/// A deep queue that keeps 100 frames before it lets any through: every
/// frame still arrives.
#[test]
fn a_deep_queue_gets_every_frame() {
    init();
    let dir = TempDir::new(TAG, "deep-queue");
    let socket = dir.path("cam.sock");
    let producer = camera(&dir, &socket, "");
    wait_for_path(&socket, Duration::from_secs(30));
    let deep_log = dir.path("deep.log");
    let deep = gst_launch(
        "deep queue",
        &format!(
            "-v bufsharesrc socket={} ! queue max-size-buffers=1000 max-size-bytes=0 max-size-time=0 min-threshold-buffers=100 ! fakesink silent=false",
            socket.display()
        ),
        &deep_log,
    );
    wait_for_log(
        &deep_log,
        Duration::from_secs(60),
        "frames past the queue",
        |l| chain_lines(l) >= 60,
    );
    producer.signal(Signal::INT);
    producer.wait_ok(Duration::from_secs(30));
    let status = deep.wait(Duration::from_secs(60));
    let log = log_of(&deep_log);
    assert!(status.success(), "{status}:\n{log}");
    // The queue held 100 frames when the first 60 came out: 160 at least
    // were received, and at EOS the queue let all of them through.
    let frames = chain_lines(&log);
    println!("deep queue: {frames} frames");
    assert!(frames >= 160, "{frames} frames");
}

/// A consumer process stopped (SIGSTOP) for longer than the producer's
/// `client-timeout` is dropped; when it runs again it fails with the reason
/// the producer gave, not "the producer went away".
#[test]
fn a_stalled_consumer_is_told_why_it_was_dropped() {
    init();
    let dir = TempDir::new(TAG, "stalled");
    let socket = dir.path("cam.sock");
    let _producer = camera(&dir, &socket, "client-timeout=1000");
    wait_for_path(&socket, Duration::from_secs(30));
    let log = dir.path("consumer.log");
    let consumer = gst_launch(
        "stalled consumer",
        &format!(
            "-v bufsharesrc socket={} ! fakesink silent=false",
            socket.display()
        ),
        &log,
    );
    wait_for_log(&log, Duration::from_secs(30), "frames", |l| {
        chain_lines(l) >= 10
    });
    consumer.signal(Signal::STOP);
    std::thread::sleep(Duration::from_secs(3));
    consumer.signal(Signal::CONT);
    let status = consumer.wait(Duration::from_secs(60));
    let summary = log_summary(&log);
    assert!(!status.success(), "it was not dropped:\n{summary}");
    assert!(
        summary.contains("disconnected by the producer") && summary.contains("client-timeout"),
        "{summary}"
    );
    println!(
        "{}",
        summary
            .lines()
            .find(|l| l.contains("disconnected by the producer"))
            .unwrap_or_default()
    );
}

/// A consumer that connects, then takes a second to reach PLAYING (a busy
/// machine, a slow element): the frames that waited in its socket were
/// rendered before its base time. Its recorder must still write a playable
/// file.
#[test]
fn a_recorder_slow_to_reach_playing_writes_a_playable_file() {
    init();
    let dir = TempDir::new(TAG, "slow-start");
    let socket = dir.path("cam.sock");
    let _producer = camera(&dir, &socket, "");
    wait_for_path(&socket, Duration::from_secs(30));
    let mp4 = dir.path("slow-start.mp4");
    let consumer = gst::parse::launch(&format!(
        "bufsharesrc socket={} timeout=10000 ! identity sleep-time=50000 ! videoconvert ! x264enc tune=zerolatency speed-preset=ultrafast ! h264parse ! mp4mux ! filesink location={}",
        socket.display(),
        mp4.display()
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    consumer.set_state(gst::State::Paused).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    consumer.set_state(gst::State::Playing).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    consumer.send_event(gst::event::Eos::new());
    let bus = consumer.bus().unwrap();
    let msg = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(30),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("EOS or an error");
    consumer.set_state(gst::State::Null).unwrap();
    if let gst::MessageView::Error(e) = msg.view() {
        panic!("recorder failed: {} ({:?})", e.error(), e.debug());
    }
    let (frames, _) = common::decode_file(&mp4);
    println!("slow-start recorder: {frames} frames");
    assert!(frames >= 20, "{frames} frames");
}
