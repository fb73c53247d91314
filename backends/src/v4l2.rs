//! V4L2 backend: the buffers of a V4L2 device queue, exported as dma-bufs.
//!
//! Unlike the other backends, V4L2 memory belongs to a queue that must know the
//! frame format first: [`MemoryBackend::set_video_format`] sets the format
//! (S_FMT), asks for a fixed number of MMAP buffers (REQBUFS) and exports each
//! one (EXPBUF). [`MemoryBackend::allocate`] then hands those buffers out in
//! turn, so the caller (a buffer pool) must keep at most [`QueueLayout::count`]
//! blocks alive at once.
//!
//! Which queue: a mem2mem device (encoder, scaler) uses its OUTPUT queue, the
//! one the device reads from, so a producer writing these buffers writes what
//! an encoder reads; a capture-only device uses its CAPTURE queue; an
//! output-only device its OUTPUT queue. Both the single- and the multi-planar
//! APIs are supported, with formats that keep all planes in one buffer (NV12,
//! not NV12M).
//!
//! With no device given, the backend tries every mem2mem device
//! (`/dev/video*` by number) and keeps the first whose OUTPUT queue takes the
//! format as asked.
//!
//! Hand-written on purpose: the ioctls (QUERYCAP, S_FMT, REQBUFS, EXPBUF) and
//! their structs are declared below against the kernel's UAPI layout (sizes
//! checked at compile time) and called through rustix. The two V4L2 crates
//! were tried (2026-11, in a scratch crate on this Debian 12 host) and neither fits:
//! - `v4l` 0.14: its kernel binding (default feature `v4l2` -> `v4l2-sys-mit`
//!   0.3; the other feature, `libv4l`, binds libv4l2 the same way) runs bindgen
//!   at build time. Without libclang `cargo build` fails with `Unable to find
//!   libclang: "couldn't find any valid shared libraries matching:
//!   ['libclang.so', 'libclang-*.so', 'libclang.so.*', 'libclang-*.so.*'], set
//!   the LIBCLANG_PATH environment variable ..."`. With a libclang (unpacked
//!   from Debian's libclang1-14, `LIBCLANG_PATH`) it builds, also for aarch64.
//!   Its API has no multi-planar formats and no EXPBUF call (only the opcode
//!   constant), both of which this backend needs.
//! - `v4l2r` 0.0.8 (latest 0.0.x): has EXPBUF and multi-planar queues, but its
//!   build script always runs bindgen over the build host's
//!   `/usr/include/linux/videodev2.h` (`V4L2R_VIDEODEV2_H_PATH`): the same
//!   "Unable to find libclang" panic without libclang, and with it 24 errors
//!   such as ``unresolved import `crate::bindings::v4l2_ctrl_av1_frame` ``,
//!   as Debian 12's kernel headers (6.1) lack the AV1 controls it uses. It
//!   brings `nix` 0.28 next to the workspace's rustix too.
//!
//! So either would make libclang (and for v4l2r, new kernel headers) a build
//! requirement of the plugin and of `scripts/check-aarch64.sh`, which today need neither.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::OFlags;
use rustix::ioctl::{opcode, Opcode, Updater};

use crate::sys::{check_char_device, open_device, retry_on_eintr};
use crate::{
    BackendError, Block, BlockRequest, MemoryBackend, MemoryKind, QueueLayout, VideoFormatRequest,
};

/// `struct v4l2_capability`.
#[repr(C)]
struct Capability {
    driver: [u8; 16],
    card: [u8; 32],
    bus_info: [u8; 32],
    version: u32,
    capabilities: u32,
    device_caps: u32,
    reserved: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<Capability>() == 104);

/// The union inside `struct v4l2_format`: 200 bytes, aligned like a pointer
/// (the kernel's union holds `struct v4l2_window`, which has pointers).
#[repr(C)]
struct FormatData {
    _align: [usize; 0],
    raw: [u8; 200],
}

/// `struct v4l2_format`.
#[repr(C)]
struct Format {
    type_: u32,
    fmt: FormatData,
}
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<Format>() == 208);

impl Format {
    fn u32_at(&self, offset: usize) -> u32 {
        u32::from_ne_bytes(self.fmt.raw[offset..offset + 4].try_into().unwrap())
    }
    fn set_u32(&mut self, offset: usize, v: u32) {
        self.fmt.raw[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
    }
}

// Offsets in `struct v4l2_pix_format` (single-planar).
const PIX_WIDTH: usize = 0;
const PIX_HEIGHT: usize = 4;
const PIX_PIXELFORMAT: usize = 8;
const PIX_FIELD: usize = 12;
const PIX_BYTESPERLINE: usize = 16;
const PIX_SIZEIMAGE: usize = 20;
// Offsets in `struct v4l2_pix_format_mplane` (packed): width, height,
// pixelformat, field, colorspace, then 8 x {sizeimage, bytesperline, reserved[6] u16}.
const MP_PLANE0_SIZEIMAGE: usize = 20;
const MP_PLANE0_BYTESPERLINE: usize = 24;
const MP_NUM_PLANES: usize = 20 + 8 * 20;

/// `struct v4l2_requestbuffers`.
#[repr(C)]
#[derive(Default)]
struct RequestBuffers {
    count: u32,
    type_: u32,
    memory: u32,
    capabilities: u32,
    flags: u8,
    reserved: [u8; 3],
}
const _: () = assert!(std::mem::size_of::<RequestBuffers>() == 20);

/// `struct v4l2_exportbuffer`.
#[repr(C)]
#[derive(Default)]
struct ExportBuffer {
    type_: u32,
    index: u32,
    plane: u32,
    flags: u32,
    fd: i32,
    reserved: [u32; 11],
}
const _: () = assert!(std::mem::size_of::<ExportBuffer>() == 64);

const VIDIOC_QUERYCAP: Opcode = opcode::read::<Capability>(b'V', 0);
const VIDIOC_S_FMT: Opcode = opcode::read_write::<Format>(b'V', 5);
const VIDIOC_REQBUFS: Opcode = opcode::read_write::<RequestBuffers>(b'V', 8);
const VIDIOC_EXPBUF: Opcode = opcode::read_write::<ExportBuffer>(b'V', 16);

const CAP_VIDEO_CAPTURE: u32 = 0x0000_0001;
const CAP_VIDEO_OUTPUT: u32 = 0x0000_0002;
const CAP_VIDEO_CAPTURE_MPLANE: u32 = 0x0000_1000;
const CAP_VIDEO_OUTPUT_MPLANE: u32 = 0x0000_2000;
const CAP_VIDEO_M2M_MPLANE: u32 = 0x0000_4000;
const CAP_VIDEO_M2M: u32 = 0x0000_8000;
const CAP_STREAMING: u32 = 0x0400_0000;
const CAP_DEVICE_CAPS: u32 = 0x8000_0000;

const BUF_TYPE_VIDEO_CAPTURE: u32 = 1;
const BUF_TYPE_VIDEO_OUTPUT: u32 = 2;
const BUF_TYPE_VIDEO_CAPTURE_MPLANE: u32 = 9;
const BUF_TYPE_VIDEO_OUTPUT_MPLANE: u32 = 10;
const MEMORY_MMAP: u32 = 1;
const FIELD_NONE: u32 = 1;

/// O_RDWR | O_CLOEXEC, the flags of the exported dma-bufs.
const EXPORT_FLAGS: u32 = OFlags::RDWR.bits() | OFlags::CLOEXEC.bits();

/// `ioctl(fd, OPCODE, &mut value)` for an `_IOWR`/`_IOR` request, retried on EINTR.
///
/// # Safety
/// `OPCODE` must be a request whose argument is a `T` with the kernel's layout.
unsafe fn ioctl_rw<const OPCODE: Opcode, T>(fd: impl AsFd, value: &mut T) -> std::io::Result<()> {
    retry_on_eintr(|| {
        // SAFETY: the caller guarantees OPCODE takes a `T`.
        unsafe { rustix::ioctl::ioctl(fd.as_fd(), Updater::<OPCODE, T>::new(&mut *value)) }
            .map_err(Into::into)
    })
}

/// Buffers asked for when the caller needs fewer.
pub const DEFAULT_BUFFERS: u32 = 16;

/// The queue of a device that bufshare uses, from its capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueChoice {
    pub buf_type: u32,
    pub mem2mem: bool,
}

impl QueueChoice {
    pub fn is_multiplanar(&self) -> bool {
        matches!(
            self.buf_type,
            BUF_TYPE_VIDEO_CAPTURE_MPLANE | BUF_TYPE_VIDEO_OUTPUT_MPLANE
        )
    }
    /// "OUTPUT", "CAPTURE", "OUTPUT_MPLANE" or "CAPTURE_MPLANE", for messages.
    pub fn queue_name(&self) -> &'static str {
        match self.buf_type {
            BUF_TYPE_VIDEO_OUTPUT => "OUTPUT",
            BUF_TYPE_VIDEO_OUTPUT_MPLANE => "OUTPUT_MPLANE",
            BUF_TYPE_VIDEO_CAPTURE_MPLANE => "CAPTURE_MPLANE",
            _ => "CAPTURE",
        }
    }
}

/// Device identity and the queue chosen on it.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub path: PathBuf,
    pub driver: String,
    pub card: String,
    pub queue: QueueChoice,
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// What VIDIOC_QUERYCAP says about an open V4L2 device.
#[derive(Debug, Clone)]
pub struct Capabilities {
    pub driver: String,
    pub card: String,
    /// The node's own capabilities (`device_caps` where the driver reports
    /// them, else the whole device's), `V4L2_CAP_*` bits.
    pub device_caps: u32,
}

/// Asks an open device what it is (VIDIOC_QUERYCAP).
pub fn query_capabilities(fd: impl AsFd) -> std::io::Result<Capabilities> {
    // SAFETY: all-zero is a valid `struct v4l2_capability`.
    let mut cap: Capability = unsafe { std::mem::zeroed() };
    // SAFETY: VIDIOC_QUERYCAP takes a `struct v4l2_capability`.
    unsafe { ioctl_rw::<VIDIOC_QUERYCAP, _>(fd, &mut cap) }?;
    let device_caps = if cap.capabilities & CAP_DEVICE_CAPS != 0 {
        cap.device_caps
    } else {
        cap.capabilities
    };
    Ok(Capabilities {
        driver: c_string(&cap.driver),
        card: c_string(&cap.card),
        device_caps,
    })
}

/// Opens `path` and picks its queue; errors name the path and the reason.
fn probe(path: &Path) -> Result<(OwnedFd, DeviceInfo), BackendError> {
    let fd = open_device(path)?;
    check_char_device(path, &fd)?;
    let device_err = |reason: String| BackendError::Device {
        path: path.display().to_string(),
        reason,
    };
    let cap = query_capabilities(&fd)
        .map_err(|e| device_err(format!("not a V4L2 device (VIDIOC_QUERYCAP: {e})")))?;
    let caps = cap.device_caps;
    if caps & CAP_STREAMING == 0 {
        return Err(device_err(
            "V4L2 device without streaming I/O (no MMAP buffers)".into(),
        ));
    }
    let queue = if caps & CAP_VIDEO_M2M_MPLANE != 0 {
        QueueChoice {
            buf_type: BUF_TYPE_VIDEO_OUTPUT_MPLANE,
            mem2mem: true,
        }
    } else if caps & CAP_VIDEO_M2M != 0 {
        QueueChoice {
            buf_type: BUF_TYPE_VIDEO_OUTPUT,
            mem2mem: true,
        }
    } else if caps & CAP_VIDEO_CAPTURE_MPLANE != 0 {
        QueueChoice {
            buf_type: BUF_TYPE_VIDEO_CAPTURE_MPLANE,
            mem2mem: false,
        }
    } else if caps & CAP_VIDEO_CAPTURE != 0 {
        QueueChoice {
            buf_type: BUF_TYPE_VIDEO_CAPTURE,
            mem2mem: false,
        }
    } else if caps & CAP_VIDEO_OUTPUT_MPLANE != 0 {
        QueueChoice {
            buf_type: BUF_TYPE_VIDEO_OUTPUT_MPLANE,
            mem2mem: false,
        }
    } else if caps & CAP_VIDEO_OUTPUT != 0 {
        QueueChoice {
            buf_type: BUF_TYPE_VIDEO_OUTPUT,
            mem2mem: false,
        }
    } else {
        return Err(device_err(format!(
            "V4L2 device {} has no video capture, output or mem2mem queue",
            cap.card
        )));
    };
    let info = DeviceInfo {
        path: path.to_path_buf(),
        driver: cap.driver,
        card: cap.card,
        queue,
    };
    Ok((fd, info))
}

/// Every `/dev/video*` path, by number.
pub fn video_devices() -> Vec<PathBuf> {
    let mut nodes: Vec<(u32, PathBuf)> = std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(|e| {
                let e = e.ok()?;
                let n = e
                    .file_name()
                    .to_str()?
                    .strip_prefix("video")?
                    .parse()
                    .ok()?;
                Some((n, e.path()))
            })
            .collect()
        })
        .unwrap_or_default();
    nodes.sort();
    nodes.into_iter().map(|(_, p)| p).collect()
}

/// A queue set up with exported buffers.
#[derive(Debug)]
struct Queue {
    /// Keeps the queue (and so its buffers) owned by us.
    _device: OwnedFd,
    info: DeviceInfo,
    layout: QueueLayout,
    format: VideoFormatRequest,
    exported: Vec<OwnedFd>,
    next: usize,
}

/// Hands out the exported buffers of one V4L2 device queue.
#[derive(Debug)]
pub struct V4l2Backend {
    /// Devices to try, in order: one given by the user, or every mem2mem device.
    candidates: Vec<DeviceInfo>,
    queue: Mutex<Option<Queue>>,
}

impl V4l2Backend {
    /// Uses the device at `path`. Errors name the path: missing, not
    /// permitted, not a V4L2 device, or without streaming I/O.
    pub fn open(path: &Path) -> Result<Self, BackendError> {
        let (_, info) = probe(path)?;
        Ok(V4l2Backend {
            candidates: vec![info],
            queue: Mutex::new(None),
        })
    }

    /// Uses the first mem2mem device (by /dev/video number) whose OUTPUT queue
    /// takes the format given later; fails now if there is no mem2mem device.
    pub fn open_first_mem2mem() -> Result<Self, BackendError> {
        let mut why = Vec::new();
        let mut candidates = Vec::new();
        for path in video_devices() {
            match probe(&path) {
                Ok((_, info)) if info.queue.mem2mem => candidates.push(info),
                Ok((_, info)) => {
                    why.push(format!("{}: not mem2mem ({})", path.display(), info.card))
                }
                Err(e) => why.push(e.to_string()),
            }
        }
        if candidates.is_empty() {
            return Err(BackendError::Device {
                path: "/dev/video*".into(),
                reason: if why.is_empty() {
                    "no V4L2 device".into()
                } else {
                    format!("no V4L2 mem2mem device ({})", why.join("; "))
                },
            });
        }
        Ok(V4l2Backend {
            candidates,
            queue: Mutex::new(None),
        })
    }

    /// Devices this backend may use.
    pub fn candidates(&self) -> &[DeviceInfo] {
        &self.candidates
    }

    /// The device whose queue is set up, once [`MemoryBackend::set_video_format`] succeeded.
    pub fn device(&self) -> Option<DeviceInfo> {
        self.queue.lock().unwrap().as_ref().map(|q| q.info.clone())
    }
}

/// S_FMT, REQBUFS and EXPBUF on one device. Reopens it so that any queue a
/// previous format set up is released (its exported buffers live on while used).
fn setup_queue(info: &DeviceInfo, req: &VideoFormatRequest) -> Result<Queue, BackendError> {
    let (fd, info) = probe(&info.path)?;
    let fourcc = u32::from_le_bytes(req.fourcc);
    let fourcc_name = String::from_utf8_lossy(&req.fourcc).into_owned();
    let q = info.queue;
    let err = |what: String, e: std::io::Error| BackendError::Allocate {
        what: format!(
            "{} on {} queue of {} ({})",
            what,
            q.queue_name(),
            info.path.display(),
            info.card
        ),
        source: e,
    };
    let device_err = |reason: String| BackendError::Device {
        path: info.path.display().to_string(),
        reason: format!("{} queue ({}): {reason}", q.queue_name(), info.card),
    };

    // SAFETY: all-zero is a valid `struct v4l2_format`.
    let mut fmt: Format = unsafe { std::mem::zeroed() };
    fmt.type_ = q.buf_type;
    fmt.set_u32(PIX_WIDTH, req.width);
    fmt.set_u32(PIX_HEIGHT, req.height);
    fmt.set_u32(PIX_PIXELFORMAT, fourcc);
    fmt.set_u32(PIX_FIELD, FIELD_NONE);
    if q.is_multiplanar() {
        fmt.fmt.raw[MP_NUM_PLANES] = 1;
    }
    // SAFETY: VIDIOC_S_FMT takes a `struct v4l2_format`.
    unsafe { ioctl_rw::<VIDIOC_S_FMT, _>(&fd, &mut fmt) }.map_err(|e| {
        err(
            format!("VIDIOC_S_FMT {fourcc_name} {}x{}", req.width, req.height),
            e,
        )
    })?;
    let got = fmt.u32_at(PIX_PIXELFORMAT);
    if got != fourcc {
        return Err(device_err(format!(
            "does not take {fourcc_name} (it offered {})",
            String::from_utf8_lossy(&got.to_le_bytes())
        )));
    }
    let (width, height) = (fmt.u32_at(PIX_WIDTH), fmt.u32_at(PIX_HEIGHT));
    if width < req.width || height < req.height {
        return Err(device_err(format!(
            "cannot hold {}x{} frames (it offered {width}x{height})",
            req.width, req.height
        )));
    }
    let (pitch, size) = if q.is_multiplanar() {
        let planes = fmt.fmt.raw[MP_NUM_PLANES];
        if planes != 1 {
            return Err(device_err(format!(
                "{fourcc_name} needs {planes} memory planes; only single-buffer formats are supported"
            )));
        }
        (
            fmt.u32_at(MP_PLANE0_BYTESPERLINE),
            fmt.u32_at(MP_PLANE0_SIZEIMAGE),
        )
    } else {
        (fmt.u32_at(PIX_BYTESPERLINE), fmt.u32_at(PIX_SIZEIMAGE))
    };
    if (size as usize) < req.size {
        return Err(device_err(format!(
            "buffers of {size} bytes are smaller than the {} bytes needed",
            req.size
        )));
    }

    let mut reqbufs = RequestBuffers {
        count: req.min_buffers.max(DEFAULT_BUFFERS),
        type_: q.buf_type,
        memory: MEMORY_MMAP,
        ..Default::default()
    };
    // SAFETY: VIDIOC_REQBUFS takes a `struct v4l2_requestbuffers`.
    unsafe { ioctl_rw::<VIDIOC_REQBUFS, _>(&fd, &mut reqbufs) }
        .map_err(|e| err(format!("VIDIOC_REQBUFS {} MMAP buffers", reqbufs.count), e))?;
    if reqbufs.count < req.min_buffers.max(1) {
        return Err(device_err(format!(
            "gave {} buffers, {} needed",
            reqbufs.count, req.min_buffers
        )));
    }
    let mut exported = Vec::with_capacity(reqbufs.count as usize);
    for index in 0..reqbufs.count {
        let mut exp = ExportBuffer {
            type_: q.buf_type,
            index,
            plane: 0,
            flags: EXPORT_FLAGS,
            fd: -1,
            ..Default::default()
        };
        // SAFETY: VIDIOC_EXPBUF takes a `struct v4l2_exportbuffer`.
        unsafe { ioctl_rw::<VIDIOC_EXPBUF, _>(&fd, &mut exp) }.map_err(|e| {
            err(
                format!("VIDIOC_EXPBUF of buffer {index} (cannot export)"),
                e,
            )
        })?;
        // SAFETY: on success the kernel returned a new fd that we now own.
        exported.push(unsafe { OwnedFd::from_raw_fd(exp.fd) });
    }
    Ok(Queue {
        _device: fd,
        info,
        layout: QueueLayout {
            pitch,
            height,
            size: size as usize,
            count: reqbufs.count,
        },
        format: *req,
        exported,
        next: 0,
    })
}

impl MemoryBackend for V4l2Backend {
    fn name(&self) -> &str {
        "v4l2"
    }

    fn kind(&self) -> MemoryKind {
        MemoryKind::DmaBuf
    }

    fn needs_video_format(&self) -> bool {
        true
    }

    fn source(&self) -> Option<String> {
        let describe = |i: &DeviceInfo| {
            format!(
                "{} ({}, {} queue)",
                i.path.display(),
                i.card,
                i.queue.queue_name()
            )
        };
        Some(match self.device() {
            Some(info) => describe(&info),
            None => self
                .candidates
                .iter()
                .map(describe)
                .collect::<Vec<_>>()
                .join(" or "),
        })
    }

    fn set_video_format(
        &self,
        format: &VideoFormatRequest,
    ) -> Result<Option<QueueLayout>, BackendError> {
        let mut queue = self.queue.lock().unwrap();
        if let Some(q) = queue.as_mut() {
            if q.format == *format {
                q.next = 0;
                return Ok(Some(q.layout));
            }
        }
        // Release the old queue before a new one is set up on the same device.
        *queue = None;
        let mut errors = Vec::new();
        for info in &self.candidates {
            match setup_queue(info, format) {
                Ok(q) => {
                    let layout = q.layout;
                    *queue = Some(q);
                    return Ok(Some(layout));
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.len() == 1 {
            return Err(errors.pop().unwrap());
        }
        Err(BackendError::Device {
            path: "/dev/video*".into(),
            reason: format!(
                "no mem2mem device takes {} {}x{}: {}",
                String::from_utf8_lossy(&format.fourcc),
                format.width,
                format.height,
                errors
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        })
    }

    fn allocate(&self, request: &BlockRequest) -> Result<Block, BackendError> {
        let mut queue = self.queue.lock().unwrap();
        let Some(q) = queue.as_mut() else {
            return Err(BackendError::Unsupported(format!(
                "V4L2 buffers of {} need a video format first (set_video_format)",
                self.candidates[0].path.display()
            )));
        };
        if request.size > q.layout.size {
            return Err(BackendError::Unsupported(format!(
                "{} bytes asked from {} whose buffers have {}",
                request.size,
                q.info.path.display(),
                q.layout.size
            )));
        }
        let index = q.next % q.exported.len();
        q.next += 1;
        let fd = q.exported[index]
            .try_clone()
            .map_err(|e| BackendError::Allocate {
                what: format!(
                    "dup of exported buffer {index} of {}",
                    q.info.path.display()
                ),
                source: e,
            })?;
        Ok(Block {
            fd,
            size: q.layout.size,
            kind: MemoryKind::DmaBuf,
            pitch: Some(q.layout.pitch),
            index: Some(index as u32),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_error_names_the_path() {
        let err = V4l2Backend::open(Path::new("/dev/video-nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/dev/video-nope"), "{err}");
        assert!(err.contains("No such file"), "{err}");
    }

    #[test]
    fn char_device_that_is_not_v4l2_is_refused() {
        let err = V4l2Backend::open(Path::new("/dev/null"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/dev/null"), "{err}");
        assert!(err.contains("not a V4L2 device"), "{err}");
    }

    #[test]
    fn allocate_before_format_is_an_error() {
        // No device is touched: a backend with a candidate but no queue.
        let b = V4l2Backend {
            candidates: vec![DeviceInfo {
                path: "/dev/video9".into(),
                driver: String::new(),
                card: String::new(),
                queue: QueueChoice {
                    buf_type: BUF_TYPE_VIDEO_OUTPUT,
                    mem2mem: true,
                },
            }],
            queue: Mutex::new(None),
        };
        let err = b
            .allocate(&BlockRequest::bytes(10))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/dev/video9") && err.contains("video format"),
            "{err}"
        );
    }
}
