//! End-to-end tests of `bufshare ls`, `top` and `dump` with real processes: gst-launch-1.0
//! producers (bufsharesink from the workspace's plugin) and consumers (bufsharesrc), the
//! `bufshare` binary, and small fake producers in this process for what a real one of this
//! build never does (an older protocol, silence). They check the snapshot's figures (pids,
//! counts, plausible rates on a busy machine), that a monitor is not counted as a consumer,
//! `ls` with live and stale sockets, `top` in a terminal (tmux), and one error line with exit
//! status 1 for each bad input.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gstbufshare::protocol::{self, Hello, Message, Role};
use gstbufshare::transport::unix::Listener;
use gstbufshare::transport::{Channel, Received};

mod common;

use common::{gst_command, wait_for, Proc, TempDir};

fn gst_launch(args: &[&str]) -> Proc {
    let mut cmd = gst_command("gst-launch-1.0");
    cmd.arg("-q").args(args);
    Proc(cmd.spawn().unwrap())
}

/// A live 320x240 NV12 test producer on `socket` (`props`: more bufsharesink properties),
/// listening once this returns.
fn producer(socket: &Path, props: &[&str]) -> Proc {
    let sock = format!("socket={}", socket.display());
    let mut args = vec![
        "videotestsrc",
        "is-live=true",
        "!",
        "video/x-raw,format=NV12,width=320,height=240,framerate=30/1",
        "!",
        "bufsharesink",
        &sock,
    ];
    args.extend_from_slice(props);
    let p = gst_launch(&args);
    assert!(
        wait_for(Duration::from_secs(20), || { connectable(socket) }),
        "the producer on {} did not start listening",
        socket.display()
    );
    p
}

/// Whether a SEQPACKET connect to `path` succeeds (the connection is closed at once).
fn connectable(path: &Path) -> bool {
    gstbufshare::transport::unix::UnixChannel::try_connect(path).is_ok()
}

/// A consumer process: `bufsharesrc ! fakesink` (sync, so it holds each frame until its
/// time, as a real sink does).
fn consumer(socket: &Path) -> Proc {
    let sock = format!("socket={}", socket.display());
    gst_launch(&["bufsharesrc", &sock, "!", "fakesink"])
}

fn bufshare(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bufshare"));
    cmd.args(args).stdin(Stdio::null());
    cmd
}

/// Runs `bufshare` and returns its output; fails the test if it takes more than `limit`.
fn run(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "bufshare ran longer than {limit:?}: stdout {} stderr {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn dump_json(socket: &Path) -> serde_json::Value {
    let out = run(
        bufshare(&["dump", "--json", socket.to_str().unwrap()]),
        Duration::from_secs(15),
    );
    assert!(
        out.status.success(),
        "dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn dump_json_shows_the_consumers_and_does_not_count_monitors() {
    let dir = TempDir::new("dump");
    let socket = dir.path("cam.sock");
    let _producer = producer(&socket, &[]);
    let consumers = [consumer(&socket), consumer(&socket)];
    assert!(
        wait_for(Duration::from_secs(30), || dump_json(&socket)
            ["num_clients"]
            == 2),
        "the two consumers did not connect"
    );
    // A long-lived monitor (top, its output thrown away) and another dump at the same time.
    let _top = Proc(
        bufshare(&["top", socket.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Whole intervals with both consumers in them.
    std::thread::sleep(Duration::from_millis(2500));
    let j = dump_json(&socket);
    assert_eq!(j["num_clients"], 2, "monitors counted as consumers: {j}");
    assert_eq!(j["socket"], socket.to_str().unwrap());
    assert_eq!(j["protocol_version"], 2);
    assert_eq!(j["backend"], "memfd");
    assert_eq!(j["eos"], false);
    assert_eq!(j["copies"], 0, "videotestsrc writes into the sink's pool");
    assert_eq!(j["max_held"], 0);
    let caps = j["caps"].as_str().unwrap();
    assert!(
        caps.starts_with("video/x-raw, format=(string)NV12, width=(int)320"),
        "{caps}"
    );
    let interval = j["interval_ns"].as_u64().unwrap();
    assert!(
        (900_000_000..2_000_000_000).contains(&interval),
        "interval {interval}"
    );
    // 30 fps nominal: wide bounds that hold on a busy 2-core machine.
    let fps = j["fps"].as_f64().unwrap();
    assert!((10.0..=40.0).contains(&fps), "producer at {fps} fps");
    let frames = j["frames"].as_u64().unwrap();
    assert!(frames >= 30, "{frames} frames");
    let list = j["consumers"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{j}");
    let mut pids: Vec<u64> = list.iter().map(|c| c["pid"].as_u64().unwrap()).collect();
    pids.sort();
    let mut want: Vec<u64> = consumers.iter().map(|c| c.pid() as u64).collect();
    want.sort();
    assert_eq!(pids, want, "consumer pids");
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() } as u64;
    for c in list {
        assert_eq!(c["name"], "gst-launch-1.0", "{c}");
        assert_eq!(c["uid"].as_u64(), Some(uid), "{c}");
        let cf = c["frames"].as_u64().unwrap();
        assert!(
            cf >= 20 && cf <= frames,
            "consumer got {cf} of {frames} frames"
        );
        let fps = c["fps"].as_f64().unwrap();
        assert!((5.0..=40.0).contains(&fps), "consumer at {fps} fps: {c}");
        let (held, max) = (
            c["held"].as_u64().unwrap(),
            c["max_inflight"].as_u64().unwrap(),
        );
        assert!(held <= max && max == 8, "held {held} of {max}");
        assert!(c["releases"].as_u64().unwrap() >= 5, "{c}");
        let p50 = c["release_p50_ns"].as_u64().expect("no p50");
        let p99 = c["release_p99_ns"].as_u64().expect("no p99");
        assert!(p50 <= p99 && p99 < 2_000_000_000, "p50 {p50} p99 {p99}");
        assert!(c["skipped"].as_u64().is_some() && c["client_id"].as_u64().is_some());
    }
    // The text form says the same.
    let out = run(
        bufshare(&["dump", socket.to_str().unwrap()]),
        Duration::from_secs(15),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("consumers:  2"), "{text}");
    for c in &consumers {
        assert!(
            text.contains(&format!(" {}  gst-launch-1.0", c.pid())),
            "{text}"
        );
    }
}

#[test]
fn ls_lists_live_and_stale_sockets() {
    let dir = TempDir::new("ls");
    let live = dir.path("live.sock");
    let stale = dir.path("stale.sock");
    let _producer = producer(&live, &[]);
    let _consumer = consumer(&live);
    // A socket file nobody serves: bound, then its socket closed.
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    std::fs::write(dir.path("notes.txt"), "not a socket").unwrap();
    assert!(wait_for(Duration::from_secs(30), || {
        dump_json(&live)["num_clients"] == 1
    }));
    std::thread::sleep(Duration::from_millis(1500));
    for by_env in [false, true] {
        let mut cmd = if by_env {
            bufshare(&["ls"])
        } else {
            bufshare(&["ls", dir.0.to_str().unwrap()])
        };
        cmd.env(
            "BUFSHARE_DIR",
            if by_env {
                dir.0.to_str().unwrap()
            } else {
                "/nonexistent"
            },
        );
        let out = run(cmd, Duration::from_secs(15));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "header, live, stale: {text}");
        let cols = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            cols(lines[0])[..5],
            ["SOCKET", "STATE", "FPS", "CONSUMERS", "CAPS"]
        );
        let l = cols(lines[1]);
        assert_eq!(
            (l[0].as_str(), l[1].as_str()),
            (live.to_str().unwrap(), "live"),
            "{text}"
        );
        let fps: f64 = l[2].parse().unwrap();
        assert!((10.0..=40.0).contains(&fps), "{text}");
        assert_eq!(l[3], "1", "{text}");
        assert!(l[4].starts_with("video/x-raw"), "{text}");
        let s = cols(lines[2]);
        assert_eq!(
            (s[0].as_str(), s[1].as_str()),
            (stale.to_str().unwrap(), "stale"),
            "{text}"
        );
        assert!(lines[2].contains("connection refused"), "{text}");
    }
    // A directory that does not exist: one line, status 1.
    let out = run(
        bufshare(&["ls", "/nonexistent-bufshare-dir"]),
        Duration::from_secs(5),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("bufshare ls: /nonexistent-bufshare-dir: No such file"),
        "{err}"
    );
}

/// `top` with its output not on a terminal (a pipe, as in `bufshare top > log`): plain
/// snapshots one after the other, no screen control codes, and `-n` ends it.
#[test]
fn top_without_a_terminal_prints_plain_snapshots() {
    let dir = TempDir::new("top-batch");
    let socket = dir.path("cam.sock");
    let _producer = producer(&socket, &[]);
    let consumer = consumer(&socket);
    assert!(wait_for(Duration::from_secs(30), || {
        dump_json(&socket)["num_clients"] == 1
    }));
    let out = run(
        bufshare(&["top", "-n", "2", dir.0.to_str().unwrap()]),
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains('\x1b'), "screen control codes in {text:?}");
    let heads: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("bufshare top: "))
        .collect();
    assert_eq!(heads.len(), 2, "two snapshots: {text}");
    assert!(
        heads
            .iter()
            .all(|h| *h == "bufshare top: 1 producers, 1 live; refreshed every second"),
        "{text}"
    );
    // The first snapshot already has the producer's figures and its consumer.
    let first = text.split("\n\n\n").next().unwrap();
    assert!(
        first.contains(&format!("{}  live", socket.display())),
        "{text}"
    );
    assert!(
        first.contains(&format!(" {}  gst-launch-1.0", consumer.pid())),
        "{text}"
    );
}

/// A fake producer on `path` that answers every connection with HELLO(`version`,
/// `features`) and closes it when the peer says anything (as a producer that does not know
/// role 3 does); counts what peers sent it. `silent`: it never accepts nor answers.
struct FakeProducer {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeProducer {
    fn start(path: &Path, version: u16, features: u32, silent: bool) -> FakeProducer {
        let listener = Listener::bind(path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let (s, r) = (stop.clone(), received.clone());
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            let mut buf = vec![0u8; protocol::MAX_MESSAGE_LEN];
            while !s.load(Ordering::SeqCst) {
                if !silent {
                    while let Ok(Some(c)) = listener.accept() {
                        let hello = Message::Hello(Hello {
                            version,
                            role: Role::Producer,
                            features,
                        });
                        c.send(&protocol::encode(&hello), &[]).unwrap();
                        conns.push(c);
                    }
                }
                conns.retain(|c| match c.recv(&mut buf) {
                    Ok(Received::Message { .. }) => {
                        r.fetch_add(1, Ordering::SeqCst);
                        false
                    }
                    Ok(Received::Closed) => false,
                    Err(_) => true,
                });
                std::thread::sleep(Duration::from_millis(10));
            }
            drop(listener);
        });
        FakeProducer {
            stop,
            received,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeProducer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `bufshare dump SOCKET` (as `uid` if given) and checks that it fails with status 1
/// and one line `bufshare dump: SOCKET: ...` containing `cause`.
fn dump_fails(socket: &Path, cause: &str, uid: Option<u32>) -> Duration {
    let mut cmd = bufshare(&["dump", socket.to_str().unwrap()]);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let start = Instant::now();
    let out = run(cmd, Duration::from_secs(10));
    let took = start.elapsed();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}: {err}", socket.display());
    assert!(out.stdout.is_empty());
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    let prefix = format!("bufshare dump: {}: ", socket.display());
    assert!(err.starts_with(&prefix), "{err}");
    assert!(err.contains(cause), "expected '{cause}' in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    took
}

#[test]
fn bad_inputs_get_one_line_and_status_1() {
    let dir = TempDir::new("errors");
    dump_fails(&dir.path("missing.sock"), "no such socket", None);
    std::fs::write(dir.path("file"), "x").unwrap();
    dump_fails(&dir.path("file"), "not a socket (a regular file)", None);
    dump_fails(&dir.0, "not a socket (a directory)", None);
    let stale = dir.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    dump_fails(&stale, "stale socket: connection refused", None);
    // top stops at start on a path that is no socket.
    for (path, cause) in [
        (dir.path("missing.sock"), "no such socket"),
        (dir.path("file"), "not a socket"),
    ] {
        let out = run(
            bufshare(&["top", path.to_str().unwrap()]),
            Duration::from_secs(5),
        );
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with(&format!("bufshare top: {}: {cause}", path.display())),
            "{err}"
        );
    }

    // Older producers: a version-1 HELLO, and a version-2 HELLO without the monitor
    // feature (a producer built before monitors). The monitor sends them nothing.
    let v1 = dir.path("v1.sock");
    let fake_v1 = FakeProducer::start(&v1, 1, 0, false);
    dump_fails(&v1, "producer speaks an older protocol (version 1;", None);
    let v2 = dir.path("v2-old.sock");
    let fake_v2 = FakeProducer::start(&v2, 2, 0, false);
    dump_fails(
        &v2,
        "producer speaks an older protocol (version 2 without the monitor role",
        None,
    );
    assert_eq!(fake_v1.received.load(Ordering::SeqCst), 0);
    assert_eq!(
        fake_v2.received.load(Ordering::SeqCst),
        0,
        "HELLO sent to an older producer"
    );
    // One that knows monitors but drops ours after its HELLO (as an older producer would
    // have on role 3): no snapshot, and a line that says so.
    let closing = dir.path("closing.sock");
    let fake_closing = FakeProducer::start(&closing, 2, protocol::FEATURE_MONITOR, false);
    dump_fails(&closing, "closed the connection", None);
    assert_eq!(fake_closing.received.load(Ordering::SeqCst), 1);
    // A producer that never answers: the timeout, not a hang.
    let silent = dir.path("silent.sock");
    let _fake_silent = FakeProducer::start(&silent, 2, protocol::FEATURE_MONITOR, true);
    let took = dump_fails(&silent, "no answer from the producer within 3 s", None);
    assert!(took < Duration::from_secs(8), "took {took:?}");

    // A producer that serves only uid 0, with a socket anyone may open: a monitor of
    // another user is refused with the producer's reason.
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        println!("skipping the allowed-uid case: it needs root to run bufshare as another user");
        return;
    }
    let guarded = dir.path("guarded.sock");
    let _producer = producer(&guarded, &["allowed-uid=0", "socket-mode=0666"]);
    dump_fails(
        &guarded,
        "refused by the producer: uid 65534 is not allowed (allowed-uid=0)",
        Some(65534),
    );
    // Without socket-mode, the same user cannot even connect.
    let private = dir.path("private.sock");
    let _private = producer(&private, &[]);
    dump_fails(&private, "permission denied", Some(65534));
    // And root is served.
    assert_eq!(dump_json(&guarded)["num_clients"], 0);
}

/// tmux on its own server socket, killed when dropped.
struct Tmux {
    server: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.server])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "top"]).stdout).into()
    }
    /// Waits until the pane shows what `cond` looks for; fails with the screen otherwise.
    fn wait(&self, what: &str, limit: Duration, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.screen();
            if cond(&s) {
                return s;
            }
            if Instant::now() >= deadline {
                panic!("timed out waiting for {what}; the screen:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

#[test]
fn top_in_a_terminal() {
    if Command::new("tmux").arg("-V").output().is_err() {
        println!("skipping: tmux is not installed (scripts/install-deps.sh installs it)");
        return;
    }
    let dir = TempDir::new("top");
    let a = dir.path("a.sock");
    let b = dir.path("b.sock");
    let mut producer_a = producer(&a, &[]);
    let consumer_a = consumer(&a);
    let script = format!(
        "stty -g > {d}/stty.before; BUFSHARE_DIR={d} {bin} top; echo \"top exited $?\"; \
         stty -g > {d}/stty.after1; read line; {bin} top {d}; echo \"top again exited $?\"; \
         stty -g > {d}/stty.after2; sleep 600",
        d = dir.0.display(),
        bin = env!("CARGO_BIN_EXE_bufshare")
    );
    let tmux = Tmux {
        server: format!("bufshare-test-{}", std::process::id()),
    };
    let out = tmux.cmd(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "160",
        "-y",
        "40",
        "sh",
        "-c",
        &script,
    ]);
    assert!(
        out.status.success(),
        "tmux: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let a_line = format!("{}  live", a.display());
    let pid = format!(" {}  gst-launch-1.0", consumer_a.pid());
    let screen = tmux.wait(
        "producer a with its consumer",
        Duration::from_secs(30),
        |s| s.contains(&a_line) && s.contains(&pid),
    );
    assert!(
        screen.contains("bufshare top: 1 producers, 1 live"),
        "{screen}"
    );
    assert!(
        screen.contains("caps: video/x-raw, format=(string)NV12"),
        "{screen}"
    );
    for col in [
        "PID", "NAME", "UID", "FPS", "HELD", "SKIPPED", "REL-P50", "REL-P99",
    ] {
        assert!(screen.contains(col), "no {col} column:\n{screen}");
    }
    // A new producer is picked up.
    let _producer_b = producer(&b, &[]);
    let b_line = format!("{}  live", b.display());
    tmux.wait("producer b", Duration::from_secs(15), |s| {
        s.contains(&b_line)
    });
    // A producer killed (its socket file stays behind) is shown as gone.
    let _ = producer_a.0.kill();
    let _ = producer_a.0.wait();
    let gone = format!("{}  gone", a.display());
    tmux.wait("producer a gone", Duration::from_secs(15), |s| {
        s.contains(&gone)
    });
    // q quits and restores the terminal (the alternate screen is left, stty as before).
    tmux.cmd(&["send-keys", "-t", "top", "q"]);
    let screen = tmux.wait("top to quit on q", Duration::from_secs(10), |s| {
        s.contains("top exited")
    });
    assert!(screen.contains("top exited 0"), "{screen}");
    assert!(
        !screen.contains("bufshare top:"),
        "the view stayed on screen:\n{screen}"
    );
    // The shell reads a line (the terminal is back in its normal mode), then runs top
    // again, given the directory this time: Ctrl-C quits too.
    tmux.cmd(&["send-keys", "-t", "top", "Enter"]);
    tmux.wait("top again", Duration::from_secs(15), |s| {
        s.contains(&b_line)
    });
    tmux.cmd(&["send-keys", "-t", "top", "C-c"]);
    let screen = tmux.wait("top to quit on Ctrl-C", Duration::from_secs(10), |s| {
        s.contains("top again exited")
    });
    assert!(screen.contains("top again exited 0"), "{screen}");
    let read = |name: &str| {
        let mut s = String::new();
        std::fs::File::open(dir.path(name))
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s
    };
    tmux.wait("stty after", Duration::from_secs(5), |_| {
        dir.path("stty.after2").exists()
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        read("stty.before"),
        read("stty.after1"),
        "q left the terminal changed"
    );
    assert_eq!(
        read("stty.before"),
        read("stty.after2"),
        "Ctrl-C left the terminal changed"
    );
}
