//! End-to-end tests of `bufshare rtsp` with real processes: a gst-launch-1.0 producer
//! (bufsharesink from the workspace's plugin), the `bufshare` binary, and gst-launch-1.0 /
//! ffprobe RTSP clients. They check one shared media per path (one consumer on the producer
//! however many clients, kept while no client is there), a key frame at once for a late
//! joiner, surviving a producer restart, and the error lines for a missing encoder and a
//! port in use.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::{gst_command, wait_for, Proc, TempDir};

/// Encoder for the tests: a 30 s GOP (900 frames at 30 fps), so that a client which got no
/// forced key frame would wait seconds for one.
const LONG_GOP_ENCODER: &str = "x264enc tune=zerolatency speed-preset=ultrafast key-int-max=900";

/// Inodes of the UNIX sockets bound to `path` (the listener and the accepted connections),
/// from /proc/net/unix.
fn unix_socket_inodes(path: &Path) -> std::collections::BTreeSet<u64> {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    let path = path.to_str().unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            // Num RefCount Protocol Flags Type St Inode [Path]
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 7 && f[7..].join(" ") == path).then(|| f[6].parse().ok())?
        })
        .collect()
}

/// Consumers connected to the producer socket `path` (its connections besides the listener).
fn consumers(path: &Path) -> usize {
    unix_socket_inodes(path).len().saturating_sub(1)
}

fn wait_until(what: &str, limit: Duration, cond: impl FnMut() -> bool) {
    assert!(
        wait_for(limit, cond),
        "timed out after {limit:?} waiting for {what}"
    );
}

/// A live 320x240 NV12 test producer on `socket`, listening once this returns.
fn producer(socket: &Path) -> Proc {
    let _ = std::fs::remove_file(socket);
    let mut cmd = gst_command("gst-launch-1.0");
    cmd.args([
        "-q",
        "videotestsrc",
        "is-live=true",
        "!",
        "video/x-raw,format=NV12,width=320,height=240,framerate=30/1",
        "!",
        "bufsharesink",
    ])
    .arg(format!("socket={}", socket.display()));
    let p = Proc(cmd.spawn().unwrap());
    wait_until("the producer to listen", Duration::from_secs(20), || {
        !unix_socket_inodes(socket).is_empty()
    });
    p
}

/// A TCP port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `bufshare rtsp` serving `socket` at /cam on a free port; returns once it printed its URL.
fn server(socket: &Path, encoder: &str) -> (Proc, String) {
    let port = free_port();
    let mut cmd = gst_command(env!("CARGO_BIN_EXE_bufshare"));
    cmd.args(["rtsp", "--socket"])
        .arg(socket)
        .args(["--path", "/cam", "--address", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(["--encoder", encoder])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = format!("rtsp://127.0.0.1:{port}/cam");
    assert_eq!(
        line.trim(),
        format!("serving {url} from {}", socket.display())
    );
    (Proc(child), url)
}

/// What a gst-launch-1.0 RTSP client saw, as its -v output arrived.
#[derive(Default)]
struct Seen {
    started: Option<Instant>,
    /// when the first depayloaded access unit and the first key frame came, and how many
    /// delta units came before that
    first_unit: Option<Instant>,
    first_key: Option<Instant>,
    units_before_key: usize,
    /// decoded frames, and when the first one came
    frames: usize,
    first_frame: Option<Instant>,
}

struct Client {
    _proc: Proc,
    seen: Arc<Mutex<Seen>>,
}

impl Client {
    /// `rtspsrc ! rtph264depay ! identity name=mark ! avdec_h264 ! fakesink name=sink`,
    /// over `protocols` (tcp or udp).
    fn start(url: &str, protocols: &str) -> Client {
        let mut cmd = gst_command("gst-launch-1.0");
        cmd.args(["-v", "rtspsrc"])
            .arg(format!("location={url}"))
            .arg(format!("protocols={protocols}"))
            .args([
                "latency=100",
                "!",
                "rtph264depay",
                "!",
                "identity",
                "name=mark",
                "silent=false",
                "!",
                "avdec_h264",
                "!",
                "fakesink",
                "name=sink",
                "silent=false",
                "sync=false",
            ])
            .stdout(Stdio::piped());
        let seen = Arc::new(Mutex::new(Seen {
            started: Some(Instant::now()),
            ..Seen::default()
        }));
        let mut child = cmd.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let s = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let now = Instant::now();
                let mut s = s.lock().unwrap();
                if line.contains(":mark: last-message = chain") {
                    s.first_unit.get_or_insert(now);
                    if s.first_key.is_none() {
                        if line.contains("delta-unit") {
                            s.units_before_key += 1;
                        } else {
                            s.first_key = Some(now);
                        }
                    }
                } else if line.contains(":sink: last-message = chain") {
                    s.frames += 1;
                    s.first_frame.get_or_insert(now);
                }
            }
        });
        Client {
            _proc: Proc(child),
            seen,
        }
    }

    fn frames(&self) -> usize {
        self.seen.lock().unwrap().frames
    }

    fn wait_frames(&self, name: &str, n: usize, limit: Duration) {
        wait_until(&format!("{n} frames at {name}"), limit, || {
            self.frames() >= n
        });
    }
}

/// ffprobe's count of the frames it decoded in 3 s of the stream, over TCP.
fn ffprobe_frames(url: &str) -> usize {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-rtsp_transport", "tcp", "-count_frames"])
        .args([
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=nb_read_frames",
        ])
        .args(["-of", "csv=p=0", "-read_intervals", "%+3", url])
        .stdin(Stdio::null())
        .output()
        .expect("ffprobe (Debian package ffmpeg) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    match text.trim() {
        // No frame decoded (no key frame in those 3 s).
        "" | "N/A" => 0,
        t => t.parse().unwrap_or_else(|_| {
            panic!(
                "ffprobe printed {text:?}, stderr {:?}",
                String::from_utf8_lossy(&out.stderr)
            )
        }),
    }
}

/// Samples the producer's consumer count every 20 ms until dropped; remembers the largest.
struct ConsumerWatch {
    max: Arc<AtomicUsize>,
    stop: Arc<AtomicUsize>,
}

impl ConsumerWatch {
    fn start(socket: &Path) -> ConsumerWatch {
        let max = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicUsize::new(0));
        let (m, s, socket) = (max.clone(), stop.clone(), socket.to_path_buf());
        std::thread::spawn(move || {
            while s.load(Ordering::SeqCst) == 0 {
                m.fetch_max(consumers(&socket), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        ConsumerWatch { max, stop }
    }
    fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

impl Drop for ConsumerWatch {
    fn drop(&mut self) {
        self.stop.store(1, Ordering::SeqCst);
    }
}

#[test]
fn one_shared_media_for_overlapping_clients_and_a_late_joiner_gets_a_key_frame_at_once() {
    let dir = TempDir::new("shared");
    let socket = dir.0.join("cam.sock");
    let _producer = producer(&socket);
    let (mut server, url) = server(&socket, LONG_GOP_ENCODER);
    let watch = ConsumerWatch::start(&socket);

    // Two overlapping clients, TCP and UDP, then ffprobe while they play.
    let tcp = Client::start(&url, "tcp");
    let udp = Client::start(&url, "udp");
    tcp.wait_frames("the TCP client", 15, Duration::from_secs(30));
    udp.wait_frames("the UDP client", 15, Duration::from_secs(30));
    let probed = ffprobe_frames(&url);
    eprintln!("ffprobe decoded {probed} frames in 3 s");

    // The late joiner comes well into the GOP that ffprobe's play started (30 s long).
    std::thread::sleep(Duration::from_millis(1500));
    let late = Client::start(&url, "tcp");
    wait_until(
        "the late joiner's first frame",
        Duration::from_secs(30),
        || late.seen.lock().unwrap().first_unit.is_some(),
    );
    // A key frame well within the 30 s GOP: 3 s at most (it comes within ~0.1 s when forced).
    let key_wait = Duration::from_secs(3);
    wait_for(key_wait, || late.seen.lock().unwrap().first_key.is_some());
    late.wait_frames("the late joiner", 30, Duration::from_secs(30));
    let (started, first_unit, key, units_before_key, first_frame) = {
        let s = late.seen.lock().unwrap();
        let started = s.started.unwrap();
        (
            started,
            s.first_unit.unwrap(),
            s.first_key,
            s.units_before_key,
            s.first_frame.unwrap(),
        )
    };
    eprintln!(
        "late joiner: first access unit {:?} after start, first key frame {:?} after it \
         ({units_before_key} delta units before it), first decoded frame {:?} after start",
        first_unit - started,
        key.map(|k| k - first_unit),
        first_frame - started
    );
    let key = key.unwrap_or_else(|| {
        panic!("the late joiner got no key frame in {key_wait:?} ({units_before_key} delta units)")
    });
    assert!(
        key - first_unit < Duration::from_millis(1500),
        "the late joiner waited {:?} for a key frame (GOP 30 s)",
        key - first_unit
    );
    // ffprobe joined mid-stream too: without a key frame at once it decodes nothing in 3 s.
    assert!(probed >= 30, "ffprobe decoded only {probed} frames in 3 s");
    let (tcp_frames, udp_frames, late_frames) = (tcp.frames(), udp.frames(), late.frames());
    eprintln!("frames: TCP {tcp_frames}, UDP {udp_frames}, late joiner {late_frames}");
    assert!(
        tcp_frames >= 90 && udp_frames >= 90,
        "TCP {tcp_frames}, UDP {udp_frames}"
    );

    assert_eq!(
        watch.max(),
        1,
        "the producer saw more than one consumer at a time"
    );
    // Clients gone: the media stays prepared, still one consumer on the producer.
    drop((tcp, udp, late));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        consumers(&socket),
        1,
        "the media went down with its clients"
    );
    assert_eq!(
        watch.max(),
        1,
        "the producer saw more than one consumer at a time"
    );
    // ... and a new client is served by it.
    let again = Client::start(&url, "tcp");
    again.wait_frames(
        "a client after the others left",
        15,
        Duration::from_secs(30),
    );
    assert_eq!(
        watch.max(),
        1,
        "the producer saw more than one consumer at a time"
    );
    assert!(server.alive(), "the server exited");
}

#[test]
fn a_producer_restart_does_not_stop_the_server() {
    let dir = TempDir::new("restart");
    let socket = dir.0.join("cam.sock");
    let producer1 = producer(&socket);
    let (mut server, url) = server(&socket, LONG_GOP_ENCODER);
    let before = Client::start(&url, "tcp");
    before.wait_frames("the client before the restart", 15, Duration::from_secs(30));

    drop(producer1); // killed
    std::thread::sleep(Duration::from_millis(500));
    let _producer2 = producer(&socket);
    // The shared media's bufsharesrc reconnects by itself, before any new client asks.
    wait_until(
        "the media to reconnect to the new producer",
        Duration::from_secs(20),
        || consumers(&socket) == 1,
    );
    let after = Client::start(&url, "udp");
    after.wait_frames("a client after the restart", 30, Duration::from_secs(30));
    // The client from before the restart is still served too.
    let n = before.frames();
    wait_until(
        "frames at the client from before the restart",
        Duration::from_secs(10),
        || before.frames() >= n + 15,
    );
    eprintln!(
        "client from before the restart: {n} frames, then {}; client after: {}",
        before.frames(),
        after.frames()
    );
    assert!(server.alive(), "the server exited");
    assert_eq!(consumers(&socket), 1);
}

/// Runs `bufshare ARGS` to its end (at most 20 s): exit code, stdout, stderr.
fn run_bufshare(args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = gst_command(env!("CARGO_BIN_EXE_bufshare"));
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = Proc(cmd.spawn().unwrap());
    wait_until("bufshare to exit", Duration::from_secs(20), || {
        !child.alive()
    });
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read;
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (child.0.wait().unwrap().code(), out, err)
}

#[test]
fn a_missing_encoder_is_one_error_line_before_serving() {
    let port = free_port().to_string();
    let (code, out, err) = run_bufshare(&[
        "rtsp",
        "--socket",
        "/nonexistent/cam.sock",
        "--path",
        "/cam",
        "--port",
        &port,
        "--encoder",
        "nosuchh264enc bitrate=500",
    ]);
    assert_eq!(code, Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    assert!(err.contains("'nosuchh264enc' not found"), "stderr: {err}");
    assert!(out.is_empty(), "stdout: {out}");
}

#[test]
fn a_port_in_use_is_one_error_line_naming_it() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, out, err) = run_bufshare(&[
        "rtsp",
        "--socket",
        "/nonexistent/cam.sock",
        "--path",
        "/cam",
        "--address",
        "127.0.0.1",
        "--port",
        &port,
    ]);
    assert_eq!(code, Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "stderr: {err}");
    assert!(out.is_empty(), "stdout: {out}");
}

#[test]
fn usage_errors_are_one_line_and_exit_code_2() {
    for args in [
        &[
            "rtsp",
            "--socket",
            "/a.sock",
            "--path",
            "/a",
            "--frobnicate",
        ][..],
        &["rtsp", "--path", "/a"],
        &[
            "rtsp", "--socket", "/a.sock", "--socket", "/b.sock", "--path", "/a",
        ],
        &[
            "rtsp", "--socket", "/a.sock", "--path", "/a", "--port", "http",
        ],
    ] {
        let (code, out, err) = run_bufshare(args);
        assert_eq!(code, Some(2), "{args:?}: stderr {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: stderr {err}");
        assert!(out.is_empty(), "{args:?}: stdout {out}");
    }
}
