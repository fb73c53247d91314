//! Helpers for the hardware tests in `hwtests/tests/`: find kernel devices by driver name, run
//! `bufshare-peer` and `gst-launch-1.0` as separate processes, read their reports, compare frames.
//!
//! The tests run unchanged on a real board (`cargo build --bins --features <preset>` then
//! `cargo test -p bufshare-hwtests`) and on the virtual board (`hwtests/run-vm.sh`). A test whose
//! device or element is missing prints `skipped: ...` naming it and passes, so a plain
//! `cargo test --workspace` on a machine without the drivers stays green.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Hardware tests run one at a time: they share devices and, in the VM, two emulated cores.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the serial lock, surviving a test that panicked while holding it.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Prints why a test does not run and returns from it.
#[macro_export]
macro_rules! skip_unless {
    ($found:expr) => {
        match $found {
            Ok(v) => v,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// V4L2 devices

/// A V4L2 device node and what VIDIOC_QUERYCAP says about it.
#[derive(Debug, Clone)]
pub struct V4l2Node {
    pub path: PathBuf,
    pub driver: String,
    pub card: String,
    pub device_caps: u32,
}

pub const CAP_VIDEO_CAPTURE: u32 = 0x0000_0001;
pub const CAP_VIDEO_OUTPUT: u32 = 0x0000_0002;
pub const CAP_VIDEO_CAPTURE_MPLANE: u32 = 0x0000_1000;
pub const CAP_VIDEO_OUTPUT_MPLANE: u32 = 0x0000_2000;
pub const CAP_VIDEO_M2M_MPLANE: u32 = 0x0000_4000;
pub const CAP_VIDEO_M2M: u32 = 0x0000_8000;

impl V4l2Node {
    /// A plain capture device (a camera), not a mem2mem one.
    pub fn is_capture(&self) -> bool {
        self.device_caps & (CAP_VIDEO_CAPTURE | CAP_VIDEO_CAPTURE_MPLANE) != 0 && !self.is_m2m()
    }
    pub fn is_m2m(&self) -> bool {
        self.device_caps & (CAP_VIDEO_M2M | CAP_VIDEO_M2M_MPLANE) != 0
            || self.device_caps & (CAP_VIDEO_CAPTURE | CAP_VIDEO_CAPTURE_MPLANE) != 0
                && self.device_caps & (CAP_VIDEO_OUTPUT | CAP_VIDEO_OUTPUT_MPLANE) != 0
    }
}

fn query_cap(path: &Path) -> Option<V4l2Node> {
    let fd = rustix::fs::open(
        path,
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()?;
    let cap = bufshare_backends::v4l2::query_capabilities(&fd).ok()?;
    Some(V4l2Node {
        path: path.to_path_buf(),
        driver: cap.driver,
        card: cap.card,
        device_caps: cap.device_caps,
    })
}

/// Every V4L2 video node that answers VIDIOC_QUERYCAP, by /dev/videoN number.
pub fn v4l2_nodes() -> Vec<V4l2Node> {
    let mut numbers: Vec<u32> = std::fs::read_dir("/sys/class/video4linux")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("video")?.parse().ok())
        .collect();
    numbers.sort();
    numbers
        .into_iter()
        .filter_map(|n| query_cap(Path::new(&format!("/dev/video{n}"))))
        .collect()
}

/// The first node of `driver` that `pick` accepts, or why there is none.
pub fn v4l2_node(
    driver: &str,
    what: &str,
    pick: impl Fn(&V4l2Node) -> bool,
) -> Result<V4l2Node, String> {
    let nodes = v4l2_nodes();
    let of_driver: Vec<&V4l2Node> = nodes.iter().filter(|n| n.driver == driver).collect();
    if of_driver.is_empty() {
        return Err(format!("no V4L2 device with driver {driver}"));
    }
    of_driver
        .iter()
        .find(|n| pick(n))
        .map(|n| (*n).clone())
        .ok_or_else(|| {
            format!(
                "no {what} among the {driver} V4L2 nodes ({})",
                of_driver
                    .iter()
                    .map(|n| format!("{} {}", n.path.display(), n.card))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

// ---------------------------------------------------------------------------------------------
// DRM devices and dma-heaps

/// The DRM primary nodes (/dev/dri/cardN).
pub fn drm_cards() -> Vec<PathBuf> {
    let mut cards: Vec<PathBuf> = std::fs::read_dir("/dev/dri")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("card"))
        })
        .collect();
    cards.sort();
    cards
}

/// /dev/dma_heap/<name>, or why it cannot be used.
pub fn dma_heap(name: &str) -> Result<PathBuf, String> {
    let path = Path::new("/dev/dma_heap").join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!("no dma-heap {}", path.display()))
    }
}

// ---------------------------------------------------------------------------------------------
// GStreamer and the project's binaries

/// The directory holding bufshare-peer and libgstbufshare.so: $BUFSHARE_BIN_DIR, else the cargo
/// target directory this test binary was built in (target/<profile>/deps/.. ).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BUFSHARE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("test executable in target/<profile>/deps")
        .to_path_buf()
}

/// The bufshare-peer binary; it registers the plugin statically.
pub fn peer() -> Result<PathBuf, String> {
    let path = bin_dir().join("bufshare-peer");
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: build it first (cargo build --bins [--features all-backends])",
            path.display()
        ))
    }
}

/// Whether GStreamer has an element factory `name` (hardware elements such as v4l2fwhtenc exist
/// only when the registry found their device).
pub fn gst_element(name: &str) -> Result<(), String> {
    let status = Command::new("gst-inspect-1.0")
        .args(["--exists", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run gst-inspect-1.0: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("GStreamer has no element {name}"))
    }
}

/// Whether the built plugin's bufsharesink has property `name` (asked of libgstbufshare.so in
/// bin_dir(), built from the same sources and features as bufshare-peer).
pub fn sink_has_property(name: &str) -> Result<(), String> {
    let out = Command::new("gst-inspect-1.0")
        .arg("bufsharesink")
        .env("GST_PLUGIN_PATH", bin_dir())
        .output()
        .map_err(|e| format!("cannot run gst-inspect-1.0: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "gst-inspect-1.0 finds no bufsharesink in {}",
            bin_dir().display()
        ));
    }
    if text
        .lines()
        .any(|l| l.trim_start().starts_with(&format!("{name} ")))
    {
        Ok(())
    } else {
        Err(format!(
            "the built bufsharesink ({}) has no property '{name}'",
            bin_dir().join("libgstbufshare.so").display()
        ))
    }
}

/// Runs `gst-launch-1.0 -q DESC` to the end; panics with its output if it fails.
pub fn gst_launch(desc: &str) {
    let out = Command::new("gst-launch-1.0")
        .arg("-q")
        .args(desc.split_whitespace())
        .output()
        .expect("run gst-launch-1.0");
    assert!(
        out.status.success(),
        "gst-launch-1.0 {desc} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A scratch directory, removed at the end unless BUFSHARE_KEEP_TEST_DIRS is set.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("bufshare-hw-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("BUFSHARE_KEEP_TEST_DIRS").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process, killed if the test ends before waiting on it. Its stderr goes to a file.
pub struct Proc {
    child: Option<Child>,
    name: String,
    stderr: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, stderr: PathBuf) -> Proc {
        let err = std::fs::File::create(&stderr).unwrap();
        let child = cmd
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child: Some(child),
            name: name.into(),
            stderr,
        }
    }

    /// Waits (generously: emulated machines are slow) and returns the exit status and stderr.
    pub fn wait(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
                return (status, err);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not finish in 300 s", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits and panics with its stderr if it failed.
    pub fn wait_ok(self) {
        let name = self.name.clone();
        let (status, err) = self.wait();
        assert!(status.success(), "{name} exited with {status}:\n{err}");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for a producer's socket to appear.
pub fn wait_for_socket(socket: &Path, producer: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !socket.exists() {
        if let Some(status) = producer.child.as_mut().unwrap().try_wait().unwrap() {
            let err = std::fs::read_to_string(&producer.stderr).unwrap_or_default();
            panic!("producer exited with {status} before serving:\n{err}");
        }
        assert!(
            Instant::now() < deadline,
            "producer never served {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `bufshare-peer produce` (report in `dir/producer.txt`, stderr in `dir/producer.err`)
/// serving `frames` frames of `camera` (a V4L2 capture node, `io-mode=dmabuf`) as
/// `format` at `width`x`height` on `socket`, with a copy of every captured frame written to
/// `raw`; returns once it serves, after one consumer connects it streams.
#[allow(clippy::too_many_arguments)]
pub fn spawn_camera_producer(
    peer: &Path,
    dir: &TempDir,
    socket: &Path,
    camera: &Path,
    format: &str,
    (width, height): (usize, usize),
    frames: usize,
    raw: &Path,
) -> Proc {
    let mut producer = Command::new(peer);
    producer
        .args(["produce", "--socket"])
        .arg(socket)
        .args(["--source", "pipeline", "--pipeline"])
        .arg(format!(
            "v4l2src device={} io-mode=dmabuf num-buffers={frames} \
             extra-controls=c,horizontal_movement=6 \
             ! video/x-raw,format={format},width={width},height={height} \
             ! tee name=t ! queue ! filesink location={} t. ! queue",
            camera.display(),
            raw.display()
        ))
        .args(["--wait-clients", "1", "--report"])
        .arg(dir.path("producer.txt"));
    let mut producer = Proc::spawn("producer", producer, dir.path("producer.err"));
    wait_for_socket(socket, &mut producer);
    producer
}

/// Starts `bufshare-peer consume` on `socket` running `bufsharesrc ! pipeline` (report in
/// `dir/consumer.txt`, stderr in `dir/consumer.err`), with the V4L2 allocator's debug log
/// (which names the dma-buf fds it imports) written to `gst_log`.
pub fn spawn_v4l2_consumer(
    peer: &Path,
    dir: &TempDir,
    socket: &Path,
    pipeline: &str,
    gst_log: &Path,
) -> Proc {
    let mut consumer = Command::new(peer);
    consumer
        .args(["consume", "--socket"])
        .arg(socket)
        .args(["--timeout", "60000", "--pipeline"])
        .arg(pipeline)
        .arg("--report")
        .arg(dir.path("consumer.txt"))
        .env("GST_DEBUG", "v4l2allocator:6")
        .env("GST_DEBUG_NO_COLOR", "1")
        .env("GST_DEBUG_FILE", gst_log);
    Proc::spawn("consumer", consumer, dir.path("consumer.err"))
}

/// Runs a command to the end and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run command")
}

// ---------------------------------------------------------------------------------------------
// Reports written by bufshare-peer

#[derive(Debug, Clone)]
pub struct FrameRec {
    pub offset: u64,
    pub sum: String,
    pub size: u64,
    pub ino: u64,
    pub kind: String,
    pub ro: bool,
    pub fd: i32,
}

#[derive(Debug, Default)]
pub struct Report {
    pub caps: Vec<String>,
    /// Frames in the order the process saw them.
    pub frames: Vec<FrameRec>,
    pub summary: BTreeMap<String, String>,
    /// The `backend <name>` line, if the peer wrote one.
    pub backend: Option<String>,
}

impl Report {
    pub fn read(path: &Path) -> Report {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut r = Report::default();
        for line in text.lines() {
            if let Some(c) = line.strip_prefix("caps ") {
                r.caps.push(c.to_string());
            } else if let Some(rest) = line.strip_prefix("frame ") {
                let kv: BTreeMap<&str, &str> =
                    rest.split(' ').filter_map(|p| p.split_once('=')).collect();
                r.frames.push(FrameRec {
                    offset: kv["offset"].parse().unwrap(),
                    sum: kv["sum"].into(),
                    size: kv["size"].parse().unwrap(),
                    ino: kv["ino"].parse().unwrap(),
                    kind: kv["kind"].into(),
                    ro: kv["ro"] == "1",
                    fd: kv.get("fd").and_then(|v| v.parse().ok()).unwrap_or(-1),
                });
            } else if let Some(rest) = line.strip_prefix("summary ") {
                for (k, v) in rest.split(' ').filter_map(|p| p.split_once('=')) {
                    r.summary.insert(k.into(), v.into());
                }
            } else if let Some(b) = line.strip_prefix("backend ") {
                r.backend = Some(b.trim().to_string());
            }
        }
        r
    }

    pub fn inodes(&self) -> BTreeSet<u64> {
        self.frames.iter().map(|f| f.ino).collect()
    }

    /// The producer's frame at `offset` and its index in push order.
    pub fn frame_at(&self, offset: u64) -> Option<(usize, &FrameRec)> {
        self.frames
            .iter()
            .enumerate()
            .find(|(_, f)| f.offset == offset)
    }

    /// A caps field's value as written in the caps string, e.g. `framerate` -> `25/1`.
    pub fn caps_field(&self, field: &str) -> Option<String> {
        let caps = self.caps.first()?;
        let start = caps.find(&format!("{field}="))? + field.len() + 1;
        let rest = &caps[start..];
        let rest = rest
            .strip_prefix('(')
            .and_then(|r| r.split_once(')'))
            .map_or(rest, |(_, v)| v);
        Some(rest.split([',', ';']).next()?.trim().to_string())
    }
}

/// Every consumer frame is the producer's frame at the same offset, byte for byte, in order.
pub fn assert_identical(name: &str, prod: &Report, cons: &Report) {
    assert!(!cons.frames.is_empty(), "{name} received no frames");
    for f in &cons.frames {
        let (_, p) = prod
            .frame_at(f.offset)
            .unwrap_or_else(|| panic!("{name} got frame {} the producer never rendered", f.offset));
        assert_eq!(
            f.sum, p.sum,
            "{name}: frame {} differs from the producer's",
            f.offset
        );
        assert_eq!(f.size, p.size, "{name}: frame {} size", f.offset);
    }
    assert!(
        cons.frames.windows(2).all(|w| w[0].offset < w[1].offset),
        "{name}: frames out of order"
    );
}

/// The fd numbers a GStreamer V4L2 element queued as dma-buf (V4L2_MEMORY_DMABUF import), from
/// its `v4l2allocator` LOG lines ("imported DMABUF as fd N plane P") in a GST_DEBUG_FILE.
pub fn imported_dmabuf_fds(log: &Path) -> Vec<i32> {
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    text.lines()
        .filter_map(|l| {
            let rest = l.split("imported DMABUF as fd ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// Checks that the fds an element imported are the consumer's frames' dma-bufs, whose inodes
/// are the producer's; returns how many imports were seen.
pub fn assert_imports_are_producer_dmabufs(
    element: &str,
    log: &Path,
    prod: &Report,
    cons: &Report,
) -> usize {
    let imported = imported_dmabuf_fds(log);
    assert!(
        !imported.is_empty(),
        "{element} imported no dma-buf (no 'imported DMABUF' lines in {})",
        log.display()
    );
    // fd number -> inode in the consumer. bufsharesrc keeps each fd for the whole connection, so
    // a number always names the same file; check it rather than assume it.
    let mut fd_ino: BTreeMap<i32, u64> = BTreeMap::new();
    for f in &cons.frames {
        let prev = fd_ino.insert(f.fd, f.ino);
        assert!(
            prev.is_none() || prev == Some(f.ino),
            "fd {} named two files (inodes {:?} and {}) in the consumer",
            f.fd,
            prev,
            f.ino
        );
    }
    let prod_inodes = prod.inodes();
    for fd in &imported {
        let ino = fd_ino.get(fd).unwrap_or_else(|| {
            panic!("{element} queued fd {fd}, which is not the memory of any frame bufsharesrc output (fds {fd_ino:?})")
        });
        assert!(
            prod_inodes.contains(ino),
            "{element} queued fd {fd} = inode {ino}, not one of the producer's dma-bufs {prod_inodes:?}"
        );
    }
    // Every frame that reached the element went to the device by import.
    let imported: BTreeSet<i32> = imported.iter().copied().collect();
    for f in &cons.frames {
        assert!(
            imported.contains(&f.fd),
            "frame {} (fd {}, inode {}) was never imported by {element}",
            f.offset,
            f.fd,
            f.ino
        );
    }
    imported.len()
}

// ---------------------------------------------------------------------------------------------
// Pictures

/// FNV-1a, the checksum bufshare-peer writes as `sum=`.
pub fn fnv1a(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Peak signal-to-noise ratio of two 8-bit planes, in dB (99 when identical).
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let se: u64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            let d = *x as i64 - *y as i64;
            (d * d) as u64
        })
        .sum();
    if se == 0 {
        return 99.0;
    }
    10.0 * (255.0f64 * 255.0 * a.len() as f64 / se as f64).log10()
}

/// Frame `index` of a file of back-to-back frames of `size` bytes.
pub fn frame_of(data: &[u8], size: usize, index: usize) -> &[u8] {
    &data[index * size..(index + 1) * size]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(frames: &[(u64, u64, i32)]) -> Report {
        Report {
            frames: frames
                .iter()
                .map(|(offset, ino, fd)| FrameRec {
                    offset: *offset,
                    sum: "0".into(),
                    size: 1,
                    ino: *ino,
                    kind: "dmabuf".into(),
                    ro: true,
                    fd: *fd,
                })
                .collect(),
            ..Report::default()
        }
    }

    fn log(dir: &TempDir, fds: &[i32]) -> PathBuf {
        let path = dir.path("gst.log");
        let text: String = fds
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                format!("0:00:01.0 86 0x1 LOG v4l2allocator gstv4l2allocator.c:1115:gst_v4l2_allocator_import_dmabuf:<enc:pool0:sink:allocator> [{i}] imported DMABUF as fd {fd} plane 0\n")
            })
            .collect();
        std::fs::write(&path, text).unwrap();
        path
    }

    fn check(prod: &[(u64, u64, i32)], cons: &[(u64, u64, i32)], imported: &[i32]) {
        // One directory per check: the unit tests run in parallel.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = TempDir::new(&format!("unit-{n}"));
        let log = log(&dir, imported);
        assert_imports_are_producer_dmabufs("enc", &log, &report(prod), &report(cons));
    }

    const PROD: &[(u64, u64, i32)] = &[(0, 7, 16), (1, 8, 17)];

    #[test]
    fn imports_of_the_producers_dmabufs_pass() {
        check(PROD, &[(0, 7, 25), (1, 8, 26)], &[25, 26]);
    }

    #[test]
    #[should_panic(expected = "not one of the producer's dma-bufs")]
    fn an_import_of_another_file_fails() {
        check(PROD, &[(0, 7, 25), (1, 9, 26)], &[25, 26]);
    }

    #[test]
    #[should_panic(expected = "not the memory of any frame")]
    fn an_import_of_an_unknown_fd_fails() {
        check(PROD, &[(0, 7, 25), (1, 8, 26)], &[25, 30]);
    }

    #[test]
    #[should_panic(expected = "was never imported")]
    fn a_frame_that_was_not_imported_fails() {
        check(PROD, &[(0, 7, 25), (1, 8, 26)], &[25]);
    }

    #[test]
    #[should_panic(expected = "imported no dma-buf")]
    fn no_imports_fail() {
        check(PROD, &[(0, 7, 25)], &[]);
    }

    #[test]
    #[should_panic(expected = "named two files")]
    fn an_fd_number_naming_two_files_fails() {
        check(PROD, &[(0, 7, 25), (1, 8, 25)], &[25]);
    }

    #[test]
    fn psnr_and_checksum() {
        assert_eq!(psnr(&[1, 2, 3], &[1, 2, 3]), 99.0);
        let db = psnr(&[0; 100], &[1; 100]);
        assert!((db - 48.13).abs() < 0.01, "{db}");
        assert_eq!(fnv1a(b""), "cbf29ce484222325");
    }
}
