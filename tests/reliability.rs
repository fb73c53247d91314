//! Reliability with real processes (`bufshare-peer`) on a real socket: a
//! consumer frozen with SIGSTOP, a fixed upstream pool with greedy consumers,
//! 100 consumers killed with SIGKILL, and a soak run with consumers joining
//! and leaving at random.
//!
//! What is checked is measured outside the elements: frames each process saw
//! (report files, with CLOCK_MONOTONIC times), the producer's stats sampled by
//! the producer itself, buffers counted back through weak references, and the
//! producer's fds and memory read from /proc. Timing is only used with wide
//! margins; the figures are printed (run with `--nocapture` to see them).
//!
//! The soak test's duration is `BUFSHARE_SOAK_SECS` (default 60):
//! `BUFSHARE_SOAK_SECS=1800 cargo test --release --test reliability soak -- --nocapture`.

mod common;
use common::{unix_socket_inodes, Proc, TempDir};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const PEER: &str = env!("CARGO_BIN_EXE_bufshare-peer");

/// These tests run one at a time: they share two cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// `bufshare-peer produce` with `args`, serving `s.sock` in `dir`, writing its
/// report to `p.txt` and its stderr to `producer.err` there; returns once it
/// serves the socket.
fn producer(dir: &TempDir, args: &[&str]) -> Proc {
    let socket = dir.path("s.sock");
    let mut cmd = Command::new(PEER);
    cmd.args(["produce", "--socket"])
        .arg(&socket)
        .arg("--report")
        .arg(dir.path("p.txt"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(producer_stderr(dir)).unwrap());
    let proc = Proc::spawn("producer", cmd);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "producer never served");
        std::thread::sleep(Duration::from_millis(10));
    }
    proc
}

/// What `producer` wrote to its stderr.
fn producer_stderr(dir: &TempDir) -> PathBuf {
    dir.path("producer.err")
}

fn consumer(name: &str, socket: &Path, report: &Path, args: &[&str]) -> Proc {
    let mut cmd = Command::new(PEER);
    cmd.args(["consume", "--socket"])
        .arg(socket)
        .arg("--report")
        .arg(report)
        .args(["--timeout", "20000"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Proc::spawn(name, cmd)
}

/// `who` received at least 99 % of the `sent` frames.
fn assert_nearly_all(who: &str, received: usize, sent: usize) {
    assert!(
        received * 100 >= sent * 99,
        "{who} received only {received} of {sent} frames"
    );
}

/// One frame line: its offset and the CLOCK_MONOTONIC time it was seen.
#[derive(Debug, Clone, Copy)]
struct Seen {
    offset: u64,
    wall: u64,
}

/// One `client` line: the sink's stats for one consumer at one moment.
#[derive(Debug, Clone)]
struct ClientSample {
    wall: u64,
    pid: i32,
    in_flight: u32,
    peak: u32,
    held: u32,
}

#[derive(Debug, Default)]
struct Report {
    frames: Vec<Seen>,
    clients: Vec<ClientSample>,
    summary: BTreeMap<String, String>,
    stats: String,
}

fn read_report(path: &Path) -> Report {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut r = Report::default();
    let kv = |rest: &str| -> BTreeMap<String, String> {
        rest.split(' ')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("frame ") {
            let f = kv(rest);
            r.frames.push(Seen {
                offset: f["offset"].parse().unwrap(),
                wall: f["wall"].parse().unwrap(),
            });
        } else if let Some(rest) = line.strip_prefix("client ") {
            let f = kv(rest);
            r.clients.push(ClientSample {
                wall: f["wall"].parse().unwrap(),
                pid: f["pid"].parse().unwrap(),
                in_flight: f["in-flight"].parse().unwrap(),
                peak: f["peak"].parse().unwrap(),
                held: f["held"].parse().unwrap(),
            });
        } else if let Some(rest) = line.strip_prefix("summary ") {
            r.summary = kv(rest);
        } else if let Some(rest) = line.strip_prefix("stats ") {
            r.stats = rest.to_string();
        }
    }
    r
}

fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// A process's open fds, by what they are (read from /proc/PID/fd), so that
/// the tests compare what matters: consumer connections and frame memory,
/// not fds a library opens lazily.
#[derive(Debug, Default, Clone)]
struct Fds {
    /// Sockets bound to the producer's socket path: its listener and one per
    /// connected consumer (/proc/net/unix names the path for accepted
    /// connections too). Exact: a consumer socket kept open is one too many.
    on_socket: usize,
    /// memfd inode -> fds open on it. The producer has the one its upstream
    /// (pool or allocator) keeps and the sink's read-only reopen, made once per
    /// memory: a third fd on one memfd is a leaked dup (e.g. of a message
    /// queued for a consumer that died).
    memfds: BTreeMap<u64, usize>,
    /// Everything else by kind: other sockets (GLib/GStreamer wake-up pairs),
    /// pipes, anon inodes (eventfd), files.
    others: BTreeMap<String, usize>,
}

/// Other fds a library may open lazily during a run (a wake-up pipe or
/// eventfd on first use): a per-consumer leak after tens of consumers is far
/// beyond it.
const LAZY_FDS_MARGIN: usize = 4;

impl Fds {
    fn memfd_fds(&self) -> usize {
        self.memfds.values().sum()
    }
    /// The most fds open on one memfd.
    fn most_on_one_memfd(&self) -> usize {
        self.memfds.values().copied().max().unwrap_or(0)
    }
    fn others_total(&self) -> usize {
        self.others.values().sum()
    }
    fn others_text(&self) -> String {
        self.others
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
    /// One line: `on the socket S, memfds M on I memories (at most K on one), others O (...)`.
    fn describe(&self) -> String {
        format!(
            "{} on the socket, {} memfd fds on {} memories (at most {} on one), {} others ({})",
            self.on_socket,
            self.memfd_fds(),
            self.memfds.len(),
            self.most_on_one_memfd(),
            self.others_total(),
            self.others_text()
        )
    }
}

/// The open fds of process `pid`, serving `socket`.
fn fds_of(pid: i32, socket: &Path) -> Fds {
    let bound = unix_socket_inodes(socket);
    let mut fds = Fds::default();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        // An fd closed since read_dir listed it is not counted.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        let kind = if let Some(ino) = target
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
        {
            if ino.parse().is_ok_and(|ino: u64| bound.contains(&ino)) {
                fds.on_socket += 1;
                continue;
            }
            "socket".to_string()
        } else if target.starts_with("/memfd:") {
            // metadata() follows the link: the memfd's own inode.
            if let Ok(meta) = std::fs::metadata(entry.path()) {
                use std::os::unix::fs::MetadataExt;
                *fds.memfds.entry(meta.ino()).or_default() += 1;
            }
            continue;
        } else if target.starts_with("pipe:") {
            "pipe".to_string()
        } else if target.starts_with("anon_inode:") || target.starts_with("/dev/") {
            target.to_string()
        } else {
            "file".to_string()
        };
        *fds.others.entry(kind).or_default() += 1;
    }
    fds
}

/// A process's memory, in KiB, from /proc/PID/status. Compared between two
/// moments on the same basis, in signed arithmetic.
#[derive(Debug, Clone, Copy)]
struct Mem {
    vm_rss: i64,
    rss_anon: i64,
    rss_file: i64,
    /// Shared memory mapped: here, the memfd frames the producer maps.
    rss_shmem: i64,
    vm_swap: i64,
}

impl Mem {
    /// Anonymous memory, resident or swapped out: the heap, thread stacks.
    /// Swap is counted so that the machine paging the producer out between
    /// the two readings does not look like the heap shrinking, nor the
    /// reverse like growth.
    fn heap(&self) -> i64 {
        self.rss_anon + self.vm_swap
    }
    /// Resident memory apart from the memfd frames: VmRSS - RssShmem, that
    /// is RssAnon + RssFile, the same sum at both ends.
    fn apart_from_frames(&self) -> i64 {
        self.vm_rss - self.rss_shmem
    }
}

fn mem_of(pid: i32) -> Mem {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> i64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in /proc/{pid}/status"))
    };
    Mem {
        vm_rss: field("VmRSS:"),
        rss_anon: field("RssAnon:"),
        rss_file: field("RssFile:"),
        rss_shmem: field("RssShmem:"),
        vm_swap: field("VmSwap:"),
    }
}

/// A small xorshift generator; the seed is printed so a run can be repeated
/// with BUFSHARE_TEST_SEED.
struct Rng(u64);

impl Rng {
    fn new(test: &str) -> Rng {
        let seed = std::env::var("BUFSHARE_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| monotonic_ns() | 1);
        println!("{test}: seed {seed} (BUFSHARE_TEST_SEED={seed} repeats it)");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Samples every 50 ms, up to `limit`, until a sample satisfies `ok`; returns
/// whether one did, and the last sample (the one that did, if any).
fn settle<T>(limit: Duration, mut sample: impl FnMut() -> T, ok: impl Fn(&T) -> bool) -> (bool, T) {
    let deadline = Instant::now() + limit;
    loop {
        let s = sample();
        if ok(&s) {
            return (true, s);
        }
        if Instant::now() > deadline {
            return (false, s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

const FPS: u64 = 30;

#[test]
fn a_stopped_consumer_does_not_disturb_the_others_and_resumes_with_new_frames() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("rel", "stall");
    let socket = dir.path("s.sock");
    let frames = 20 * FPS; // 20 s: 4 s before the stall, 10 s stopped, 6 s after
                           // Half a second of frames: a consumer the loaded machine does not
                           // schedule for that long still loses nothing.
    let max_inflight = 16u32;
    let prod = producer(
        &dir,
        &[
            "--source",
            "test",
            "--frames",
            &frames.to_string(),
            "--wait-clients",
            "4",
            "--max-inflight",
            &max_inflight.to_string(),
            // Longer than the stall: this consumer must stay connected.
            "--client-timeout",
            "30000",
            "--stats-every",
            "200",
        ],
    );
    let mut consumers: Vec<Proc> = (0..4)
        .map(|i| {
            consumer(
                &format!("consumer {i}"),
                &socket,
                &dir.path(&format!("c{i}.txt")),
                &[],
            )
        })
        .collect();
    // Let the stream run before the stall (the producer starts when all 4 joined).
    let p_report = dir.path("p.txt");
    std::thread::sleep(Duration::from_secs(4));
    let frozen_pid = consumers[0].pid();
    consumers[0].signal(rustix::process::Signal::STOP);
    let t_stop = monotonic_ns();
    std::thread::sleep(Duration::from_secs(10));
    let t_cont = monotonic_ns();
    consumers[0].signal(rustix::process::Signal::CONT);
    prod.wait_ok(Duration::from_secs(120));
    for c in consumers.drain(..) {
        c.wait_ok(Duration::from_secs(60));
    }

    let p = read_report(&p_report);
    assert_eq!(
        p.frames.len() as u64,
        frames,
        "producer rendered every frame"
    );
    // The producer kept its rate: frames rendered per second while the
    // consumer was stopped, against the whole run (generous: at least 80 %).
    let during: Vec<&Seen> = p
        .frames
        .iter()
        .filter(|f| f.wall >= t_stop && f.wall < t_cont)
        .collect();
    let stall_rate = during.len() as f64 / ((t_cont - t_stop) as f64 / 1e9);
    let first = p.frames.first().unwrap().wall;
    let last = p.frames.last().unwrap().wall;
    let overall_rate = (p.frames.len() - 1) as f64 / ((last - first) as f64 / 1e9);
    println!(
        "stall: producer rendered {} frames in the 10 s stall ({stall_rate:.1}/s; {overall_rate:.1}/s over the run)",
        during.len()
    );
    assert!(
        stall_rate >= 0.8 * overall_rate,
        "producer slowed down: {stall_rate:.1}/s while a consumer was stopped, {overall_rate:.1}/s overall"
    );
    // The other three received at least 99 % of the frames.
    for i in 1..4 {
        let c = read_report(&dir.path(&format!("c{i}.txt")));
        let lost = p.frames.len() - c.frames.len();
        let lost_in_stall = during
            .iter()
            .filter(|f| !c.frames.iter().any(|g| g.offset == f.offset))
            .count();
        println!(
            "stall: consumer {i} received {} of {} frames ({lost} lost, {lost_in_stall} of them during the stall)",
            c.frames.len(),
            p.frames.len()
        );
        assert_nearly_all(&format!("consumer {i}"), c.frames.len(), p.frames.len());
    }
    // The stopped one never held more than max-inflight, and did hold frames.
    let samples: Vec<&ClientSample> = p.clients.iter().filter(|c| c.pid == frozen_pid).collect();
    assert!(
        !samples.is_empty(),
        "no stats sampled for the stopped consumer"
    );
    let peak = samples.iter().map(|c| c.peak).max().unwrap();
    let held_in_stall = samples
        .iter()
        .filter(|c| c.wall >= t_stop && c.wall < t_cont)
        .map(|c| c.in_flight)
        .max()
        .unwrap_or(0);
    println!("stall: stopped consumer held at most {peak} frames (max-inflight {max_inflight}), {held_in_stall} while stopped");
    assert!(
        peak <= max_inflight,
        "stopped consumer held {peak} frames, max-inflight is {max_inflight}"
    );
    assert!(
        held_in_stall >= 1,
        "stopped consumer held nothing while stopped"
    );
    // It stayed connected (timeout 30 s) and, once continued, went on with
    // the newest frames, not the backlog of the stall: at most one frame from
    // before SIGSTOP (one that was already inside its pipeline when it
    // stopped), and the first frame that came through the socket after
    // SIGCONT was rendered at most 1 s before SIGCONT.
    let frozen = read_report(&dir.path("c0.txt"));
    let rendered_at = |offset: u64| p.frames.iter().find(|f| f.offset == offset).unwrap().wall;
    let after: Vec<&Seen> = frozen.frames.iter().filter(|f| f.wall > t_cont).collect();
    let stale = after
        .iter()
        .take_while(|f| rendered_at(f.offset) < t_stop)
        .count();
    let first_after = after
        .get(stale)
        .unwrap_or_else(|| panic!("stopped consumer got nothing new after SIGCONT"));
    let age_ms = (t_cont as i64 - rendered_at(first_after.offset) as i64) / 1_000_000;
    println!(
        "stall: after SIGCONT: {stale} frame(s) from before SIGSTOP, then offset {} (rendered {age_ms} ms before SIGCONT); {} frames after SIGCONT",
        first_after.offset,
        after.len()
    );
    assert!(
        stale <= 1,
        "{stale} frames from before the stall were delivered after it"
    );
    assert!(
        age_ms < 1000,
        "first frame after SIGCONT was rendered {age_ms} ms before SIGCONT (a stale frame)"
    );
    let warnings = std::fs::read_to_string(producer_stderr(&dir)).unwrap();
    assert!(!warnings.contains("stalled"), "{warnings}");
}

#[test]
fn a_consumer_stopped_longer_than_client_timeout_is_disconnected_with_a_warning() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("rel", "stall-timeout");
    let socket = dir.path("s.sock");
    let frames = 8 * FPS;
    let prod = producer(
        &dir,
        &[
            "--source",
            "slots",
            // A second of frames in flight, and slots enough that the frozen
            // consumer pinning that many does not hold up the producer: the
            // healthy consumer then loses nothing even when the loaded
            // machine does not run it for up to a second.
            "--slots",
            "48",
            "--max-inflight",
            "30",
            "--frames",
            &frames.to_string(),
            "--wait-clients",
            "2",
            "--client-timeout",
            "1000",
            "--stats-every",
            "100",
        ],
    );
    let healthy = consumer("healthy", &socket, &dir.path("h.txt"), &[]);
    let frozen = consumer("frozen", &socket, &dir.path("f.txt"), &[]);
    std::thread::sleep(Duration::from_secs(2));
    let frozen_pid = frozen.pid();
    frozen.signal(rustix::process::Signal::STOP);
    let t_stop = monotonic_ns();
    std::thread::sleep(Duration::from_secs(4));
    frozen.signal(rustix::process::Signal::CONT);
    prod.wait_ok(Duration::from_secs(60));
    healthy.wait_ok(Duration::from_secs(60));
    // Disconnected by the producer, it fails: "the producer went away".
    let status = frozen.wait(Duration::from_secs(60));
    assert!(!status.success(), "the disconnected consumer should fail");

    let warnings = std::fs::read_to_string(producer_stderr(&dir)).unwrap();
    println!("timeout: producer stderr: {}", warnings.trim());
    let line = warnings
        .lines()
        .find(|l| l.contains("stalled"))
        .unwrap_or_else(|| panic!("no stall warning from the producer: {warnings}"));
    assert!(line.starts_with("warning:"), "{line}");
    assert!(line.contains(&format!("pid {frozen_pid}")), "{line}");
    assert!(line.contains("client-timeout 1000 ms"), "{line}");
    let p = read_report(&dir.path("p.txt"));
    // It was dropped within the timeout plus a margin, and what it held went
    // back at once: the producer got every buffer back.
    let gone_at = p
        .clients
        .iter()
        .filter(|c| c.pid == frozen_pid)
        .map(|c| c.wall)
        .max()
        .unwrap();
    let after_ms = (gone_at as i64 - t_stop as i64) / 1_000_000;
    println!("timeout: stopped consumer last seen in stats {after_ms} ms after SIGSTOP");
    assert!(
        after_ms < 3500,
        "still connected {after_ms} ms after SIGSTOP"
    );
    assert!(after_ms >= 500, "dropped after only {after_ms} ms");
    assert_eq!(p.summary["pushed"], frames.to_string());
    assert_eq!(p.summary["returned"], frames.to_string());
    assert!(
        p.stats.contains("clients-timed-out=(guint64)1"),
        "{}",
        p.stats
    );
    let h = read_report(&dir.path("h.txt"));
    println!(
        "timeout: healthy consumer received {} of {frames} frames",
        h.frames.len()
    );
    assert_nearly_all("healthy consumer", h.frames.len(), frames as usize);
}

/// Runs a producer whose upstream pool has exactly `pool_max` buffers, with
/// `greedy` consumers that keep the last 8 frames they get (as many as
/// max-inflight allows) and `healthy` ones that keep up. Returns the producer's
/// report and the frames each consumer received (greedy first).
fn fixed_pool_run(
    name: &str,
    pool_max: u32,
    greedy: usize,
    healthy: usize,
) -> (Report, Vec<usize>) {
    let dir = TempDir::new("rel", name);
    let socket = dir.path("s.sock");
    let frames = 6 * FPS;
    let prod = producer(
        &dir,
        &[
            "--source",
            "pool",
            "--pool-max",
            &pool_max.to_string(),
            "--frames",
            &frames.to_string(),
            "--wait-clients",
            &(greedy + healthy).to_string(),
            "--max-inflight",
            "8",
            "--stats-every",
            "50",
        ],
    );
    let consumers: Vec<Proc> = (0..greedy + healthy)
        .map(|i| {
            let args: &[&str] = if i < greedy { &["--hold", "8"] } else { &[] };
            consumer(
                &format!("{name} consumer {i}"),
                &socket,
                &dir.path(&format!("c{i}.txt")),
                args,
            )
        })
        .collect();
    // The producer exits 3 if its pool gives it no buffer for 10 s.
    let status = prod.wait(Duration::from_secs(120));
    let warnings = std::fs::read_to_string(producer_stderr(&dir)).unwrap();
    assert!(
        status.success(),
        "{name}: producer starved or failed: {status}: {warnings}"
    );
    for c in consumers {
        c.wait_ok(Duration::from_secs(60));
    }
    let p = read_report(&dir.path("p.txt"));
    assert_eq!(
        p.frames.len() as u64,
        frames,
        "{name}: producer pushed every frame"
    );
    let got = (0..greedy + healthy)
        .map(|i| read_report(&dir.path(&format!("c{i}.txt"))).frames.len())
        .collect();
    (p, got)
}

#[test]
fn a_fixed_upstream_pool_never_starves_with_greedy_consumers() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let frames = (6 * FPS) as usize;
    // 4 buffers upstream, as v4l2src has, and 3 consumers that each keep as
    // many frames as they may: the sink derives max-held = 4 - 2 from the
    // pool and never lets consumers pin more, so the producer goes on.
    let (p, got) = fixed_pool_run("pool4", 4, 3, 0);
    let held_peak = p.clients.iter().map(|c| c.held).max().unwrap();
    println!(
        "pool of 4: producer pushed {} frames, 3 greedy consumers received {got:?}, at most {held_peak} pool buffers held by consumers at once (max-held 2)",
        p.frames.len()
    );
    assert!(p.stats.contains("max-held=(uint)2"), "{}", p.stats);
    assert!(
        held_peak <= 2,
        "consumers held {held_peak} of the 4 pool buffers"
    );
    assert!(got.iter().all(|n| *n >= 1 && *n < frames), "{got:?}");

    // 8 buffers (max-held 6), a greedy consumer and one that keeps up: the
    // greedy one is held to 6 - 3 frames, the other gets its frames.
    let (p, got) = fixed_pool_run("pool8", 8, 1, 1);
    let held_peak = p.clients.iter().map(|c| c.held).max().unwrap();
    println!(
        "pool of 8: producer pushed {} frames, greedy consumer received {}, the one that keeps up {}, at most {held_peak} pool buffers held at once (max-held 6)",
        p.frames.len(),
        got[0],
        got[1]
    );
    assert!(p.stats.contains("max-held=(uint)6"), "{}", p.stats);
    assert!(
        held_peak <= 6,
        "consumers held {held_peak} of the 8 pool buffers"
    );
    assert!(got[0] <= 3, "the greedy consumer got {} frames", got[0]);
    assert!(
        got[1] * 100 >= frames * 90,
        "the consumer that keeps up got {} of {frames} frames",
        got[1]
    );
}

#[test]
fn a_hundred_consumers_killed_at_random_leak_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("rel", "kill");
    let socket = dir.path("s.sock");
    let eos = dir.path("eos");
    let prod = producer(
        &dir,
        &[
            "--source",
            "slots",
            "--slots",
            "48",
            // A second of frames: watchers the loaded machine does not
            // schedule for that long (100 process starts) lose nothing.
            "--max-inflight",
            "30",
            "--frames",
            "1000000",
            "--wait-clients",
            "2",
            "--eos-file",
            eos.to_str().unwrap(),
        ],
    );
    let pid = prod.pid();
    let watchers = [
        consumer("watcher 0", &socket, &dir.path("w0.txt"), &[]),
        consumer("watcher 1", &socket, &dir.path("w1.txt"), &[]),
    ];
    // Both watchers are in and frames flow; the fds open now are the baseline:
    // on the socket, the listener and the two watchers' connections.
    let on_socket = 1 + watchers.len();
    std::thread::sleep(Duration::from_secs(2));
    let (connected, before) = settle(
        Duration::from_secs(20),
        || fds_of(pid, &socket),
        |f| f.on_socket == on_socket,
    );
    assert!(
        connected,
        "watchers not connected: producer fds {}",
        before.describe()
    );
    let mut rng = Rng::new("kill");
    let started = Instant::now();
    for i in 0..100 {
        let victim = consumer(&format!("victim {i}"), &socket, &dir.path("v.txt"), &[]);
        // Anywhere from before the handshake to well into streaming.
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        victim.kill9();
    }
    let loop_secs = started.elapsed().as_secs_f64();
    // The producer notices each death on its I/O thread; allow it to settle:
    // only the listener and the watchers left on the socket, and on each
    // memfd at most the slot's own fd and the sink's read-only reopen (a
    // message queued for a consumer holds a dup until it is sent or the
    // consumer is gone).
    let (settled, after) = settle(
        Duration::from_secs(20),
        || fds_of(pid, &socket),
        |f| f.on_socket == on_socket && f.most_on_one_memfd() <= 2,
    );
    std::fs::write(&eos, b"").unwrap();
    prod.wait_ok(Duration::from_secs(60));
    for w in watchers {
        w.wait_ok(Duration::from_secs(60));
    }

    let warnings = std::fs::read_to_string(producer_stderr(&dir)).unwrap();
    let p = read_report(&dir.path("p.txt"));
    let pushed: u64 = p.summary["pushed"].parse().unwrap();
    let returned: u64 = p.summary["returned"].parse().unwrap();
    let made: u64 = p.summary["made"].parse().unwrap();
    let freed: u64 = p.summary["freed"].parse().unwrap();
    println!(
        "kill: 100 SIGKILLs in {loop_secs:.1} s; buffers made {made}, rendered {pushed}, back before stop {returned}, back in all {freed} (leaked {})",
        made as i64 - freed as i64
    );
    println!("kill: producer fds before: {}", before.describe());
    println!("kill: producer fds after:  {}", after.describe());
    assert!(
        settled,
        "consumer sockets or frame fds left after the kills: {} on the socket (expected {on_socket}), at most {} fds on one memfd (expected at most 2)",
        after.on_socket,
        after.most_on_one_memfd()
    );
    assert!(
        after.others_total() <= before.others_total() + LAZY_FDS_MARGIN,
        "other fds grew by more than {LAZY_FDS_MARGIN}: {} before, {} after",
        before.others_text(),
        after.others_text()
    );
    // Every buffer rendered came back while the pipeline still ran, and every
    // buffer made came back in the end (the last few may have been queued
    // in appsrc when the stream was ended).
    assert!(returned >= pushed, "rendered {pushed}, back {returned}");
    assert_eq!(made, freed, "buffers did not come back");
    let kept: usize = p.summary["memfds-after-stop"].parse().unwrap();
    assert_eq!(kept, 0, "{kept} memfds still open in the stopped producer");
    assert!(
        !warnings.contains("error") && !warnings.contains("warning"),
        "producer complained: {warnings}"
    );
    // The watchers got their frames: at least 99 % (all, unless the machine
    // did not run a watcher for over a second).
    for i in 0..2 {
        let w = read_report(&dir.path(&format!("w{i}.txt")));
        println!(
            "kill: watcher {i} received {} of {} frames",
            w.frames.len(),
            p.frames.len()
        );
        assert_nearly_all(&format!("watcher {i}"), w.frames.len(), p.frames.len());
    }
}

/// The producer's fds and memory once only the listener and the two healthy
/// consumers are on the socket and no memfd has a dup beyond the sink's
/// read-only reopen (waited for, up to 20 s); whether that happened first.
fn measure_settled(pid: i32, socket: &Path) -> (bool, Fds, Mem) {
    let (ok, fds) = settle(
        Duration::from_secs(20),
        || fds_of(pid, socket),
        |f| f.on_socket == 3 && f.most_on_one_memfd() <= 2,
    );
    (ok, fds, mem_of(pid))
}

/// Frames a soak consumer may hold: 1 s at 30 fps, so that a healthy consumer
/// that the loaded machine does not schedule for up to a second loses nothing.
const MAX_INFLIGHT_SOAK: u32 = 30;

#[test]
fn soak_1080p30_with_consumers_joining_and_leaving_at_random() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let secs: u64 = std::env::var("BUFSHARE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let dir = TempDir::new("rel", "soak");
    let socket = dir.path("s.sock");
    let eos = dir.path("eos");
    // Frames are 3 MiB: checksum their first 4 KiB only (debug builds are slow).
    let sum = ["--sum-bytes", "4096"];
    let max_inflight = MAX_INFLIGHT_SOAK.to_string();
    let prod = producer(
        &dir,
        &[
            "--source",
            "test",
            "--width",
            "1920",
            "--height",
            "1080",
            "--fps",
            "30",
            "--frames",
            "100000000",
            "--wait-clients",
            "2",
            "--eos-file",
            eos.to_str().unwrap(),
            "--max-inflight",
            &max_inflight,
            // No report line per frame: they would grow the producer's heap.
            "--frame-lines",
            "0",
            sum[0],
            sum[1],
        ],
    );
    let pid = prod.pid();
    let healthy = [
        consumer("healthy 0", &socket, &dir.path("h0.txt"), &sum),
        consumer("healthy 1", &socket, &dir.path("h1.txt"), &sum),
    ];
    let mut rng = Rng::new("soak");
    let warm_up = Duration::from_secs((secs / 5).clamp(10, 120));
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut churn: Vec<Proc> = Vec::new();
    let (mut joined, mut killed, mut exited) = (0u32, 0u32, 0u32);
    let mut before = None;
    while Instant::now() < end {
        if before.is_none() && start.elapsed() >= warm_up {
            // Measure with only the healthy consumers connected, as at the end.
            for c in churn.drain(..) {
                c.kill9();
                killed += 1;
            }
            std::thread::sleep(Duration::from_secs(1));
            before = Some(measure_settled(pid, &socket));
        }
        churn.retain_mut(|c| {
            let alive = c.running();
            if !alive {
                exited += 1;
            }
            alive
        });
        match rng.below(3) {
            0 if churn.len() < 4 => {
                // Some leave by themselves after a few frames, others stay until killed.
                let frames = (5 + rng.below(60)).to_string();
                let args: Vec<&str> = if rng.below(2) == 0 {
                    vec![sum[0], sum[1], "--max-frames", &frames]
                } else {
                    vec![sum[0], sum[1]]
                };
                churn.push(consumer("churn", &socket, &dir.path("churn.txt"), &args));
                joined += 1;
            }
            1 if !churn.is_empty() => {
                let i = rng.below(churn.len() as u64) as usize;
                churn.swap_remove(i).kill9();
                killed += 1;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(100 + rng.below(700)));
    }
    for c in churn.drain(..) {
        c.kill9();
        killed += 1;
    }
    let (settled_before, fds_before, mem_before) =
        before.expect("the run is longer than its warm-up");
    // Let the producer notice the last departures.
    std::thread::sleep(Duration::from_secs(1));
    let (settled_after, fds_after, mem_after) = measure_settled(pid, &socket);
    std::fs::write(&eos, b"").unwrap();
    prod.wait_ok(Duration::from_secs(60));
    for h in healthy {
        h.wait_ok(Duration::from_secs(60));
    }

    let p = read_report(&dir.path("p.txt"));
    let rendered: usize = p.summary["pushed"].parse().unwrap();
    println!(
        "soak: {secs} s at 1920x1080 NV12 30 fps, {} frames; consumers joined {joined}, killed {killed}, left by themselves {exited}",
        rendered
    );
    println!(
        "soak: producer after {} s warm-up / at the end, KiB: VmRSS {} / {}, RssAnon {} / {}, RssFile {} / {}, RssShmem {} / {}, VmSwap {} / {}",
        warm_up.as_secs(),
        mem_before.vm_rss,
        mem_after.vm_rss,
        mem_before.rss_anon,
        mem_after.rss_anon,
        mem_before.rss_file,
        mem_after.rss_file,
        mem_before.rss_shmem,
        mem_after.rss_shmem,
        mem_before.vm_swap,
        mem_after.vm_swap
    );
    println!(
        "soak: producer fds after the warm-up: {}",
        fds_before.describe()
    );
    println!(
        "soak: producer fds at the end:        {}",
        fds_after.describe()
    );
    for i in 0..2 {
        let h = read_report(&dir.path(&format!("h{i}.txt")));
        println!(
            "soak: healthy consumer {i} received {} of {} frames",
            h.frames.len(),
            rendered
        );
        // All of them unless the machine did not run it for over a second.
        assert_nearly_all(&format!("healthy consumer {i}"), h.frames.len(), rendered);
    }
    // Every frame came back: once stopped, the producer has no memfd open
    // (a frame a departed consumer's entry kept would keep its memory).
    let kept: usize = p.summary["memfds-after-stop"].parse().unwrap();
    println!("soak: memfds still open in the stopped producer: {kept}");
    assert_eq!(
        kept, 0,
        "{kept} frames never came back to the stopped producer"
    );
    // Only the healthy consumers' connections and the listener are left on
    // the socket, at both ends (waited for), and no memfd has an fd beyond
    // the pool's own and the sink's read-only reopen.
    assert!(
        settled_before && settled_after,
        "consumer sockets or frame fds left: after the warm-up {}; at the end {}",
        fds_before.describe(),
        fds_after.describe()
    );
    assert!(
        fds_after.others_total() <= fds_before.others_total() + LAZY_FDS_MARGIN,
        "other fds grew by more than {LAZY_FDS_MARGIN}: {} after the warm-up, {} at the end",
        fds_before.others_text(),
        fds_after.others_text()
    );
    // The memfd pool videotestsrc draws from is a cache: it grows to the most
    // frames ever out at once (each consumer holds up to max-inflight) and is
    // then reused, so its size is bounded rather than compared.
    let most_out = 6 * MAX_INFLIGHT_SOAK as usize + 4;
    assert!(
        fds_after.memfds.len() <= most_out,
        "{} pool memories, more than {most_out} consumers could hold",
        fds_after.memfds.len()
    );
    // Memory, in KiB, each figure from the same basis at both ends and
    // compared in signed arithmetic. 8 MiB of slack (under 3 frames) covers
    // allocator arenas and code paged in late; a leaked frame copy per
    // consumer (3 MiB each, tens of consumers) is far beyond it.
    let slack = 8 * 1024;
    let heap_growth = mem_after.heap() - mem_before.heap();
    let rest_growth = mem_after.apart_from_frames() - mem_before.apart_from_frames();
    // The frames the producer maps are pool memories, each a memfd it holds
    // an fd on: a mapping kept after its memory was freed is shared memory
    // beyond the pool's size.
    let frame_kib = (1920 * 1080 * 3 / 2_u64).div_ceil(4096) as i64 * 4;
    let pool_kib = fds_after.memfds.len() as i64 * frame_kib;
    println!(
        "soak: heap (RssAnon + VmSwap) {} / {} KiB ({heap_growth:+}); VmRSS - RssShmem {} / {} KiB ({rest_growth:+}); RssShmem {} KiB for {} pool memories of {frame_kib} KiB ({pool_kib} KiB)",
        mem_before.heap(),
        mem_after.heap(),
        mem_before.apart_from_frames(),
        mem_after.apart_from_frames(),
        mem_after.rss_shmem,
        fds_after.memfds.len()
    );
    assert!(
        heap_growth <= slack,
        "heap (RssAnon + VmSwap) grew from {} to {} KiB",
        mem_before.heap(),
        mem_after.heap()
    );
    assert!(
        rest_growth <= slack,
        "resident memory apart from frames (VmRSS - RssShmem) grew from {} to {} KiB",
        mem_before.apart_from_frames(),
        mem_after.apart_from_frames()
    );
    assert!(
        mem_after.rss_shmem <= pool_kib + slack,
        "{} KiB of shared memory mapped, the pool's {} memories are {pool_kib} KiB",
        mem_after.rss_shmem,
        fds_after.memfds.len()
    );
}
