//! Helpers shared by the integration test files (`mod common;` in each):
//! plugin registration, socket paths in throwaway directories, and reading
//! whole messages from a scripted peer's channel. Not every test binary uses
//! every helper, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use gst::prelude::*;
use gstbufshare::protocol::{self, Hello, Message, Role};
use gstbufshare::transport::unix::UnixChannel;
use gstbufshare::transport::{Channel, Received};

/// Initialises GStreamer and registers the bufshare elements, once per process.
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        gst::init().unwrap();
        gstbufshare::plugin_register_static().unwrap();
    });
}

/// A socket path in a directory of its own, removed with everything in it when dropped.
pub struct TempSocket(PathBuf);

impl std::ops::Deref for TempSocket {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempSocket {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempSocket {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `name` in a fresh directory `bufshare-<tag>-<pid>-<name>` under the temp dir;
/// `tag` tells the test files' directories apart.
pub fn temp_socket(tag: &str, name: &str) -> TempSocket {
    TempSocket(fresh_dir(tag, name).join(name))
}

/// An empty directory `bufshare-<tag>-<pid>-<name>` under the temp dir.
fn fresh_dir(tag: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bufshare-{tag}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fresh directory for a test's files (`bufshare-<tag>-<pid>-<name>`), removed
/// when dropped unless `BUFSHARE_KEEP_TEST_DIRS` is set.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str, name: &str) -> TempDir {
        TempDir(fresh_dir(tag, name))
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("BUFSHARE_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The next datagram with its fds, or None once the peer closed; waits up to 10 s.
pub fn recv_datagram(c: &UnixChannel) -> Option<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; protocol::MAX_MESSAGE_LEN];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match c.recv(&mut buf) {
            Ok(Received::Message { len, fds }) => {
                buf.truncate(len);
                return Some((buf, fds));
            }
            Ok(Received::Closed) => return None,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => return None,
        }
    }
    panic!("nothing received in 10 s");
}

/// The next message, decoded, with its fds, or None once the peer closed.
pub fn recv_msg(c: &UnixChannel) -> Option<(Message, Vec<OwnedFd>)> {
    recv_datagram(c).map(|(bytes, fds)| (protocol::decode(&bytes, fds.len()).unwrap(), fds))
}

/// A HELLO without optional features.
pub fn hello(version: u16, role: Role) -> Message {
    Message::Hello(Hello {
        version,
        role,
        features: 0,
    })
}

/// A playing producer pipeline: a live 64x48 NV12 test source into a
/// bufsharesink named `sink` on `path`, with `sink_props` (`name=value ...`).
pub fn live_producer_with(path: &Path, sink_props: &str) -> (gst::Pipeline, gst::Element) {
    live_producer_of(
        path,
        "video/x-raw,format=NV12,width=64,height=48,framerate=30/1",
        sink_props,
    )
}

/// A playing producer pipeline: a live test source with `caps` into a
/// bufsharesink named `sink` on `path`, with `sink_props`.
pub fn live_producer_of(
    path: &Path,
    caps: &str,
    sink_props: &str,
) -> (gst::Pipeline, gst::Element) {
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc is-live=true ! {caps} ! bufsharesink name=sink socket={} {sink_props}",
        path.display()
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let sink = pipeline.by_name("sink").unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    (pipeline, sink)
}

/// An appsrc ! bufsharesink producer on `path` (caps optional), not started yet.
pub fn appsrc_producer(
    path: &Path,
    caps: Option<&str>,
) -> (gst::Pipeline, gst_app::AppSrc, gst::Element) {
    let caps = caps.map(|c| format!("caps={c} ")).unwrap_or_default();
    let prod = gst::parse::launch(&format!(
        "appsrc name=src {caps}format=time ! bufsharesink name=sink socket={}",
        path.display()
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let appsrc = prod
        .by_name("src")
        .unwrap()
        .downcast::<gst_app::AppSrc>()
        .unwrap();
    let sink = prod.by_name("sink").unwrap();
    (prod, appsrc, sink)
}

/// A peer process; killed if the test fails before waiting on it.
pub struct Proc {
    child: Option<Child>,
    name: String,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        Proc::new(name, cmd.spawn().unwrap())
    }
    /// Takes charge of `child`, already started.
    pub fn new(name: &str, child: Child) -> Proc {
        Proc {
            child: Some(child),
            name: name.to_string(),
        }
    }
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }
    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid()).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }
    /// Waits for the exit; returns whether it succeeded.
    pub fn wait(mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not finish in {limit:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    pub fn wait_ok(self, limit: Duration) {
        let name = self.name.clone();
        let status = self.wait(limit);
        assert!(status.success(), "{name} exited with {status}");
    }
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
    pub fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(c),
                rustix::process::Signal::CONT,
            );
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The directory holding the built plugin (`libgstbufshare.so`), next to the
/// test harness binary `bufshare-peer`.
pub fn plugin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_bufshare-peer"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A user's pipeline: `gst-launch-1.0 -e DESC` in its own process, with the
/// built plugin on GST_PLUGIN_PATH and its output in `log`. Stop it as a user
/// would: [`Proc::signal`] SIGINT (EOS first, thanks to `-e`) or SIGKILL.
pub fn gst_launch(name: &str, desc: &str, log: &Path) -> Proc {
    let out = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new("gst-launch-1.0");
    cmd.arg("-e")
        .args(desc.split_whitespace())
        .env("GST_PLUGIN_PATH", plugin_dir())
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    Proc::spawn(name, cmd)
}

/// Waits up to `limit` for `path` to exist (a producer's socket, a file).
pub fn wait_for_path(path: &Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear in {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `HEAD ! appsink name=out sync=false APPSINK_PROPS`, playing, with its appsink.
pub fn playing_into_appsink(head: &str, appsink_props: &str) -> (gst::Pipeline, gst_app::AppSink) {
    let pipeline = gst::parse::launch(&format!(
        "{head} ! appsink name=out sync=false {appsink_props}"
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let sink = pipeline
        .by_name("out")
        .unwrap()
        .downcast::<gst_app::AppSink>()
        .unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    (pipeline, sink)
}

/// Decodes the media file `path` to the end in this process (filesrc !
/// decodebin) and returns how many buffers came out of its first stream, with
/// the PTS of the last one. Panics, with GStreamer's message, when the file
/// cannot be decoded (e.g. an MP4 whose muxer was never finalized).
pub fn decode_file(path: &Path) -> (u64, Option<gst::ClockTime>) {
    init();
    let (pipeline, sink) = playing_into_appsink(
        &format!("filesrc location={} ! decodebin", path.display()),
        "",
    );
    let mut count = 0;
    let mut last_pts = None;
    while let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_seconds(20)) {
        count += 1;
        last_pts = sample.buffer().and_then(|b| b.pts()).or(last_pts);
    }
    let bus = pipeline.bus().unwrap();
    let error = bus.pop_filtered(&[gst::MessageType::Error]);
    pipeline.set_state(gst::State::Null).unwrap();
    if let Some(msg) = error {
        if let gst::MessageView::Error(e) = msg.view() {
            panic!(
                "decoding {} failed: {} ({:?})",
                path.display(),
                e.error(),
                e.debug()
            );
        }
    }
    (count, last_pts)
}

/// Inodes of the AF_UNIX sockets bound to `path`, from /proc/net/unix: the
/// listener and, server side, every connection it accepted (they carry the
/// listener's address). Match them against /proc/PID/fd (`socket:[INODE]`)
/// to count one process's connections.
pub fn unix_socket_inodes(path: &Path) -> std::collections::BTreeSet<u64> {
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

/// Waits up to `limit` until `consumers` connections are open on the
/// producer socket `path` (besides its listener): on a loaded machine a
/// consumer process can take seconds to start, so tests wait for it rather
/// than sleep a fixed time.
pub fn wait_for_consumers(path: &Path, consumers: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let open = unix_socket_inodes(path).len().saturating_sub(1);
        if open >= consumers {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{open} of {consumers} consumers connected to {} in {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP port free on 127.0.0.1 right now, below the kernel's ephemeral range
/// (32768-60999 by default). A port from `bind(0)` comes from that range, and
/// once released it can be taken at any moment as the source port of some
/// other connection (UCX opens several), so that a server then fails to bind
/// it; ports below the range are only ever taken on purpose.
pub fn free_port() -> u16 {
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    (0..COUNT)
        .map(|i| (FIRST + seed.wrapping_add(i) % COUNT) as u16)
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("no free TCP port in 20000-31999")
}

/// The first connection to `listener` (non-blocking), polled every 5 ms;
/// panics naming `who` if none came within `limit`.
pub fn accept_within(
    listener: &gstbufshare::transport::unix::Listener,
    limit: Duration,
    who: &str,
) -> UnixChannel {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(c) = listener.accept().unwrap() {
            return c;
        }
        assert!(Instant::now() < deadline, "{who} never connected");
        std::thread::sleep(Duration::from_millis(5));
    }
}
