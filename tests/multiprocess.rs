//! Real pipelines in separate processes: a producer and consumers made by the
//! `bufshare-peer` binary, talking over a real UNIX socket.
//!
//! What is checked comes from outside the elements: frame checksums computed
//! by each process, the inode behind each memory (fstat on its fd), the fds
//! that crossed the socket as counted by strace, and buffers counted back by
//! the producer through weak references. No timing thresholds.

mod common;
use common::{wait_for_consumers, Proc, TempDir};

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const PEER: &str = env!("CARGO_BIN_EXE_bufshare-peer");

/// Multi-process tests run one at a time: they share two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn producer(socket: &Path, report: &Path, source: &str, frames: u32, wait_clients: u32) -> Proc {
    producer_with(socket, report, source, frames, wait_clients, &[])
}

/// `producer` with more `bufshare-peer produce` options (`--format`, `--width`, ...).
fn producer_with(
    socket: &Path,
    report: &Path,
    source: &str,
    frames: u32,
    wait_clients: u32,
    extra: &[&str],
) -> Proc {
    let child = Command::new(PEER)
        .args(["produce", "--socket"])
        .arg(socket)
        .args(["--source", source, "--frames", &frames.to_string()])
        .args(["--wait-clients", &wait_clients.to_string(), "--report"])
        .arg(report)
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // The socket appears once the producer serves.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "producer never served {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Proc::new("producer", child)
}

fn consumer_cmd(socket: &Path, report: &Path) -> Command {
    let mut cmd = Command::new(PEER);
    cmd.args(["consume", "--socket"])
        .arg(socket)
        .arg("--report")
        .arg(report);
    cmd
}

fn consumer(socket: &Path, report: &Path) -> Proc {
    Proc::new("consumer", consumer_cmd(socket, report).spawn().unwrap())
}

#[derive(Debug, Clone)]
struct FrameRec {
    sum: String,
    size: u64,
    ino: u64,
    kind: String,
    ro: bool,
    strides: String,
    clock: Option<u64>,
}

#[derive(Debug, Default)]
struct Report {
    caps: Vec<String>,
    frames: BTreeMap<u64, FrameRec>,
    order: Vec<u64>,
    summary: BTreeMap<String, String>,
}

fn read_report(path: &Path) -> Report {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut r = Report::default();
    for line in text.lines() {
        if let Some(c) = line.strip_prefix("caps ") {
            r.caps.push(c.to_string());
        } else if let Some(rest) = line.strip_prefix("frame ") {
            let kv: BTreeMap<&str, &str> =
                rest.split(' ').filter_map(|p| p.split_once('=')).collect();
            let offset: u64 = kv["offset"].parse().unwrap();
            r.order.push(offset);
            r.frames.insert(
                offset,
                FrameRec {
                    sum: kv["sum"].into(),
                    size: kv["size"].parse().unwrap(),
                    ino: kv["ino"].parse().unwrap(),
                    kind: kv["kind"].into(),
                    ro: kv["ro"] == "1",
                    strides: kv["strides"].into(),
                    clock: kv["clock"].parse().ok(),
                },
            );
        } else if let Some(rest) = line.strip_prefix("summary ") {
            for (k, v) in rest.split(' ').filter_map(|p| p.split_once('=')) {
                r.summary.insert(k.into(), v.into());
            }
        }
    }
    r
}

fn inodes(r: &Report) -> BTreeSet<u64> {
    r.summary["inodes"]
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect()
}

/// Every frame the consumer got is the producer's frame, byte for byte, in order.
fn assert_identical(name: &str, prod: &Report, cons: &Report) {
    assert!(!cons.frames.is_empty(), "{name} received no frames");
    for (offset, f) in &cons.frames {
        let p = prod
            .frames
            .get(offset)
            .unwrap_or_else(|| panic!("{name} got frame {offset} the producer never rendered"));
        assert_eq!(
            f.sum, p.sum,
            "{name}: frame {offset} differs from the producer's"
        );
        assert_eq!(f.size, p.size, "{name}: frame {offset} size");
    }
    assert!(
        cons.order.windows(2).all(|w| w[0] < w[1]),
        "{name}: frames out of order"
    );
}

/// Zero copy: the consumer's memory is read-only fd memory over the producer's own files.
fn assert_same_memory(name: &str, prod: &Report, cons: &Report) {
    let prod_inodes = inodes(prod);
    assert!(!prod_inodes.is_empty());
    for (offset, f) in &cons.frames {
        assert_eq!(f.kind, "fd", "{name}: frame {offset} is not fd memory");
        assert!(f.ro, "{name}: frame {offset} is writable downstream");
        assert!(
            prod_inodes.contains(&f.ino),
            "{name}: frame {offset} is in inode {}, not one of the producer's {prod_inodes:?}",
            f.ino
        );
    }
}

#[test]
fn fan_out_to_consumers_that_join_late_and_die() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("mp", "fanout");
    let socket = dir.path("cam.sock");
    let frames = 90; // 3 s at 30 fps
                     // A second of frames in flight: the steady consumer loses none even if
                     // the loaded machine does not run it for that long.
    let prod = producer_with(
        &socket,
        &dir.path("producer.txt"),
        "test",
        frames,
        2,
        &["--max-inflight", "30"],
    );
    let steady = consumer(&socket, &dir.path("steady.txt"));
    let victim = consumer(&socket, &dir.path("victim.txt"));
    // The stream starts when both are in; the late one joins a second later
    // (not a second after they were started: on a loaded machine starting
    // them can take longer than that).
    wait_for_consumers(&socket, 2, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1000));
    let late = consumer(&socket, &dir.path("late.txt"));
    std::thread::sleep(Duration::from_millis(500));
    victim.kill9();
    prod.wait_ok(Duration::from_secs(60));
    steady.wait_ok(Duration::from_secs(60));
    late.wait_ok(Duration::from_secs(60));

    let p = read_report(&dir.path("producer.txt"));
    let steady = read_report(&dir.path("steady.txt"));
    let late = read_report(&dir.path("late.txt"));
    assert_eq!(
        p.frames.len(),
        frames as usize,
        "producer rendered every frame"
    );
    // The healthy consumer saw every frame, though one consumer died under
    // it, except any rendered before its own pipeline reached PLAYING (the
    // producer starts half a second after both consumers connected, which a
    // loaded machine may not honour): a live source drops what comes before
    // its base time. Those can only be a leading run.
    let first_seen = *steady.frames.keys().next().unwrap() as usize;
    assert_eq!(
        steady.frames.len(),
        frames as usize - first_seen,
        "steady consumer lost frames after its first"
    );
    assert!(
        first_seen < frames as usize / 2,
        "{first_seen} of {frames} frames before the consumer was PLAYING"
    );
    assert_identical("steady", &p, &steady);
    assert_identical("late", &p, &late);
    assert_same_memory("steady", &p, &steady);
    assert_same_memory("late", &p, &late);
    // The late joiner got caps before its first frame and started mid-stream.
    assert_eq!(late.caps.len(), 1);
    assert!(late.caps[0].starts_with("video/x-raw"), "{}", late.caps[0]);
    assert!(*late.frames.keys().next().unwrap() > 0);
    // GstVideoMeta travelled (NV12: two planes).
    let (first, frame) = steady.frames.iter().next().unwrap();
    assert_eq!(frame.strides, p.frames[first].strides);
    assert_eq!(frame.strides.split(':').count(), 2);
    // Running time lines up: the same frame is at the same clock time in both
    // processes.
    for (offset, f) in &steady.frames {
        assert!(f.clock.is_some());
        assert_eq!(
            f.clock, p.frames[offset].clock,
            "frame {offset}: clock time differs"
        );
    }
    println!(
        "fan-out: {first_seen} frame(s) rendered before the steady consumer was PLAYING (dropped); the other {} at the same clock time in both processes",
        steady.frames.len()
    );
}

/// The fds that arrived with SCM_RIGHTS, as numbers, in an strace log.
fn scm_rights_fds(strace_log: &str) -> Vec<String> {
    strace_log
        .lines()
        .filter(|l| l.contains("recvmsg("))
        .flat_map(|l| {
            l.match_indices("SCM_RIGHTS, cmsg_data=[")
                .map(move |(i, m)| &l[i + m.len()..])
        })
        .flat_map(|rest| {
            rest[..rest.find(']').unwrap()]
                .split(',')
                .map(|fd| fd.trim().to_string())
        })
        .collect()
}

#[test]
fn fds_cross_once_per_memory_and_every_buffer_comes_back() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        Command::new("strace")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success()),
        "strace is needed to count the fds that cross the socket: apt-get install strace"
    );
    let dir = TempDir::new("mp", "fdonce");
    let socket = dir.path("slots.sock");
    let frames = 60;
    let prod = producer(&socket, &dir.path("producer.txt"), "slots", frames, 2);
    let plain = consumer(&socket, &dir.path("plain.txt"));
    let strace_log = dir.path("strace.txt");
    let traced = Proc::new(
        "traced consumer",
        Command::new("strace")
            .args(["-f", "-e", "trace=recvmsg,mmap", "-o"])
            .arg(&strace_log)
            .arg(PEER)
            .args(consumer_cmd(&socket, &dir.path("traced.txt")).get_args())
            .spawn()
            .unwrap(),
    );
    prod.wait_ok(Duration::from_secs(60));
    plain.wait_ok(Duration::from_secs(60));
    traced.wait_ok(Duration::from_secs(60));

    let p = read_report(&dir.path("producer.txt"));
    let traced = read_report(&dir.path("traced.txt"));
    let plain = read_report(&dir.path("plain.txt"));
    assert_eq!(p.frames.len(), frames as usize);
    // Every buffer pushed came back to the producer before it stopped.
    assert_eq!(p.summary["pushed"], frames.to_string());
    assert_eq!(
        p.summary["returned"],
        frames.to_string(),
        "buffers did not come back"
    );
    for (name, c) in [("traced", &traced), ("plain", &plain)] {
        assert_identical(name, &p, c);
        assert_same_memory(name, &p, c);
    }
    // One fd per distinct producer memory, not one per frame, and the
    // release ring's, the frame ring's and its doorbell's (one each per
    // connection).
    let log = std::fs::read_to_string(&strace_log).unwrap();
    let fds = scm_rights_fds(&log).len();
    let distinct: BTreeSet<u64> = traced.frames.values().map(|f| f.ino).collect();
    assert_eq!(
        fds,
        distinct.len() + 3,
        "fds received vs distinct memories, the release ring, the frame ring and its doorbell"
    );
    assert!(
        fds < traced.frames.len(),
        "{fds} fds for {} frames",
        traced.frames.len()
    );
    // And each is mapped once, not once a frame, although the consumer read
    // every byte of every frame: count the shared mappings of received fds
    // (the two rings are mapped too; the doorbell is not).
    let received: BTreeSet<String> = scm_rights_fds(&log).into_iter().collect();
    let shared_maps = log
        .lines()
        .filter_map(|l| {
            l.split_once("mmap(")?
                .1
                .split_once(')')
                .map(|(args, _)| args.to_string())
        })
        .filter(|args| {
            let a: Vec<&str> = args.split(", ").collect();
            a.len() == 6 && a[3].contains("MAP_SHARED") && received.contains(a[4])
        })
        .count();
    assert_eq!(
        shared_maps,
        distinct.len() + 2,
        "shared mappings vs distinct memories and the two rings"
    );
}

fn one_to_one(source: &str, frames: u32) -> (Report, Report) {
    let dir = TempDir::new("mp", source);
    let socket = dir.path("s.sock");
    let prod = producer(&socket, &dir.path("p.txt"), source, frames, 1);
    let cons = consumer(&socket, &dir.path("c.txt"));
    prod.wait_ok(Duration::from_secs(60));
    cons.wait_ok(Duration::from_secs(60));
    let p = read_report(&dir.path("p.txt"));
    let c = read_report(&dir.path("c.txt"));
    assert_eq!(c.frames.len(), frames as usize, "{source}: consumer frames");
    assert_identical(source, &p, &c);
    assert_eq!(p.caps, c.caps, "{source}: caps differ");
    (p, c)
}

#[test]
fn every_kind_of_stream_arrives_byte_identical() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // RGBA with padded strides, from memory without fds: copied once, strides kept.
    let (p, c) = one_to_one("rgba-padded", 20);
    assert_eq!(c.frames[&0].strides, p.frames[&0].strides);
    assert_eq!(p.frames[&0].strides, "1344");
    assert_eq!(c.frames[&0].kind, "fd");

    let (_, c) = one_to_one("tensors", 20);
    assert!(c.caps[0].starts_with("neural-network/tensors"));
    assert_eq!(c.frames[&0].size, 3 * 64 * 64 * 4);

    // Text lines are small: they travel inline, with no fd.
    let (_, c) = one_to_one("text", 20);
    assert!(c.caps[0].starts_with("text/x-raw"));
    assert_eq!(c.frames[&0].kind, "system");

    let (_, c) = one_to_one("audio", 20);
    assert!(c.caps[0].starts_with("audio/x-raw"));

    // New caps in mid-stream renegotiate the consumer.
    let (_, c) = one_to_one("caps-change", 20);
    assert_eq!(c.caps.len(), 2, "{:?}", c.caps);
    assert!(c.caps[1].contains("width=(int)160"));
}

#[test]
fn consumer_reports_a_producer_that_dies() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("mp", "prodgone");
    let socket = dir.path("gone.sock");
    let prod = producer(&socket, &dir.path("p.txt"), "test", 3000, 1);
    let cons = consumer_cmd(&socket, &dir.path("c.txt"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Frames flow for a second once it is in (it may take longer than that
    // to start on a loaded machine).
    wait_for_consumers(&socket, 1, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1000));
    prod.kill9();
    let out = cons.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "consumer must fail when its producer dies"
    );
    assert!(stderr.contains("the producer went away"), "{stderr}");
    assert!(stderr.contains(socket.to_str().unwrap()), "{stderr}");
    // It had received frames before that.
    assert!(!read_report(&dir.path("c.txt")).frames.is_empty());
}

// Producer restarts (bufsharesrc `on-disconnect`) and consumers that start first.

/// A consumer's report read in order, cut into one run per caps line: with
/// `on-disconnect=reconnect` each producer's frames follow its caps, and the
/// frame offsets start again with each producer.
/// (offset, checksum, size) of one received frame.
type RunFrame = (u64, String, u64);

#[derive(Debug, Default)]
struct Runs {
    /// Caps, then the frames that followed them.
    runs: Vec<(String, Vec<RunFrame>)>,
    /// `at=` of the first frame of each run: CLOCK_MONOTONIC ns when it was pulled.
    first_at: Vec<u64>,
    warnings: Vec<String>,
    summary: BTreeMap<String, String>,
}

fn read_runs(path: &Path) -> Runs {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut r = Runs::default();
    for line in text.lines() {
        if let Some(c) = line.strip_prefix("caps ") {
            r.runs.push((c.to_string(), Vec::new()));
        } else if let Some(rest) = line.strip_prefix("frame ") {
            let kv: BTreeMap<&str, &str> =
                rest.split(' ').filter_map(|p| p.split_once('=')).collect();
            let run = &mut r.runs.last_mut().expect("a frame before any caps").1;
            if run.is_empty() {
                r.first_at.push(kv["at"].parse().unwrap());
            }
            run.push((
                kv["offset"].parse().unwrap(),
                kv["sum"].to_string(),
                kv["size"].parse().unwrap(),
            ));
        } else if let Some(w) = line.strip_prefix("warning ") {
            r.warnings.push(w.to_string());
        } else if let Some(rest) = line.strip_prefix("summary ") {
            for (k, v) in rest.split(' ').filter_map(|p| p.split_once('=')) {
                r.summary.insert(k.into(), v.into());
            }
        }
    }
    r
}

/// Every frame of `run` is the producer's, byte for byte, and it got all of them, in order.
fn assert_run_is_whole(name: &str, prod: &Report, run: &[RunFrame]) {
    let offsets: Vec<u64> = run.iter().map(|f| f.0).collect();
    let expected: Vec<u64> = prod.frames.keys().copied().collect();
    assert_eq!(offsets, expected, "{name}: frames received vs rendered");
    for (offset, sum, size) in run {
        assert_eq!(
            *sum, prod.frames[offset].sum,
            "{name}: frame {offset} differs"
        );
        assert_eq!(
            *size, prod.frames[offset].size,
            "{name}: frame {offset} size"
        );
    }
}

fn reconnecting_consumer(socket: &Path, report: &Path, extra: &[&str]) -> Proc {
    let mut cmd = consumer_cmd(socket, report);
    cmd.args(["--on-disconnect", "reconnect"]).args(extra);
    Proc::new("reconnecting consumer", cmd.spawn().unwrap())
}

#[test]
fn consumer_follows_a_restarted_producer_to_its_new_caps() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("mp", "restart");
    let socket = dir.path("cam.sock");
    // --hold 4: the consumer still holds producer A's last frames when B
    // arrives, and frees them while B's first frames come in. Their releases
    // must not reach B (which would drop the consumer for releasing frames it
    // never sent, and so cost it frames and a second reconnect).
    let cons = reconnecting_consumer(&socket, &dir.path("c.txt"), &["--hold", "4"]);
    let a = producer_with(
        &socket,
        &dir.path("a.txt"),
        "test",
        3000,
        1,
        &["--format", "RGBA", "--width", "320", "--height", "240"],
    );
    // The consumer finds A (it retries every 100 ms) and gets its frames for a while.
    wait_for_consumers(&socket, 1, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(2000));
    a.kill9();
    std::thread::sleep(Duration::from_millis(500));
    // 10 fps: the consumer checksums every byte of every frame (a debug
    // build, on a loaded machine) and must not fall behind and be skipped.
    let b = producer_with(
        &socket,
        &dir.path("b.txt"),
        "test",
        30,
        1,
        &[
            "--format", "NV12", "--width", "640", "--height", "480", "--fps", "10",
        ],
    );
    let b_served_at = gstbufshare::clock::monotonic_now();
    b.wait_ok(Duration::from_secs(60));
    // B's EOS ends the consumer's stream: it exits by itself, and without error.
    cons.wait_ok(Duration::from_secs(60));

    let b_report = read_report(&dir.path("b.txt"));
    let c = read_runs(&dir.path("c.txt"));
    assert_eq!(
        c.runs.len(),
        2,
        "caps runs: {:?}",
        c.runs.iter().map(|r| &r.0).collect::<Vec<_>>()
    );
    let (a_caps, a_frames) = &c.runs[0];
    assert!(
        a_caps.starts_with("video/x-raw, format=(string)RGBA, width=(int)320, height=(int)240"),
        "{a_caps}"
    );
    assert!(!a_frames.is_empty(), "no frames from the first producer");
    assert!(a_frames.iter().all(|f| f.2 == 320 * 240 * 4));
    // The same pipeline renegotiated to B's caps, exactly as B sent them, and got all of B's frames.
    let (b_caps, b_frames) = &c.runs[1];
    assert_eq!(
        b_report.caps,
        vec![b_caps.clone()],
        "caps after the restart"
    );
    assert_run_is_whole("after the restart", &b_report, b_frames);
    assert_eq!(c.summary["reconnects"], "1");
    assert!(
        c.warnings.len() == 1
            && c.warnings[0].contains("the producer went away")
            && c.warnings[0].contains(socket.to_str().unwrap()),
        "{:?}",
        c.warnings
    );
    eprintln!(
        "restart: first frame from the new producer {:.1} ms after its socket appeared",
        (c.first_at[1] as f64 - b_served_at as f64) / 1e6
    );
}

#[test]
fn consumer_started_before_the_producer_gets_every_frame() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("mp", "first");
    let socket = dir.path("late.sock");
    // It waits past its start timeout: only reconnect mode lets it.
    let cons = reconnecting_consumer(&socket, &dir.path("c.txt"), &["--timeout", "1000"]);
    std::thread::sleep(Duration::from_millis(2500));
    let prod = producer_with(&socket, &dir.path("p.txt"), "test", 30, 1, &["--fps", "10"]);
    prod.wait_ok(Duration::from_secs(60));
    // The producer's EOS is a real EOS in reconnect mode too: the consumer ends.
    cons.wait_ok(Duration::from_secs(60));
    let p = read_report(&dir.path("p.txt"));
    let c = read_runs(&dir.path("c.txt"));
    assert_eq!(c.runs.len(), 1);
    assert_eq!(vec![c.runs[0].0.clone()], p.caps);
    assert_run_is_whole("consumer started first", &p, &c.runs[0].1);
    assert_eq!(c.summary["reconnects"], "0");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn on_disconnect_eos_ends_the_consumer_cleanly() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("mp", "eosmode");
    let socket = dir.path("eos.sock");
    let prod = producer(&socket, &dir.path("p.txt"), "test", 3000, 1);
    let mut cmd = consumer_cmd(&socket, &dir.path("c.txt"));
    cmd.args(["--on-disconnect", "eos"]);
    let cons = Proc::new("consumer with on-disconnect=eos", cmd.spawn().unwrap());
    wait_for_consumers(&socket, 1, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1000));
    prod.kill9();
    cons.wait_ok(Duration::from_secs(60));
    let c = read_runs(&dir.path("c.txt"));
    assert_eq!(c.runs.len(), 1);
    assert!(
        !c.runs[0].1.is_empty(),
        "no frames before the producer died"
    );
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0].contains("ending the stream"),
        "{:?}",
        c.warnings
    );
}
