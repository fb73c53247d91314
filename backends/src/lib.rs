//! Memory backends for bufshare: where shareable, fd-backed frame memory comes from.
//!
//! A backend hands out [`Block`]s: a file descriptor that another process can
//! map (a memfd) or hand to hardware (a dma-buf), plus its size and, for image
//! allocators, the row pitch the allocator chose. The GStreamer side
//! (`gstbufshare`'s buffer pool) wraps blocks as GstFdMemory/GstDmaBufMemory;
//! nothing here knows about GStreamer, so backends can be tested alone.
//!
//! One trait fits every allocator:
//! - memfd (this crate, always built): a size in bytes;
//! - dma-heap (feature `dma-heap`): a size in bytes, from `/dev/dma_heap/<name>`;
//! - DRM dumb buffers (feature `drm`): width x height x bpp in, a pitch out
//!   ([`BlockRequest::image`]), exported as dma-buf (PRIME);
//! - V4L2 exported buffers (feature `v4l2`): the backend owns a device queue set up
//!   with N buffers ([`MemoryBackend::set_video_format`]), and each block names its
//!   queue index ([`Block::index`]).
//!
//! The kernel interfaces come from maintained crates where one fits: `memfd`
//! (memfd_create, seals), `dma-heap` (heap allocation) and Smithay's `drm` /
//! `drm-ffi` (dumb buffers, PRIME export), all safe APIs on pre-generated
//! bindings. V4L2 stays hand-written (`v4l2.rs` says why: the V4L2 crates need
//! libclang at build time). So every backend builds without kernel headers or
//! libclang and cross-compiles to aarch64. `sys.rs` holds the safe helpers the
//! hardware backends share (device opening, errors naming the path, EINTR retries).

use std::os::fd::OwnedFd;

#[cfg(feature = "dma-heap")]
pub mod dma_heap;
#[cfg(feature = "drm")]
pub mod drm;
pub mod fdinfo;
pub mod memfd;
pub mod share;
#[cfg(any(feature = "dma-heap", feature = "drm", feature = "v4l2"))]
mod sys;
#[cfg(feature = "v4l2")]
pub mod v4l2;

pub use fdinfo::{fd_kind, fd_size};

/// What kind of memory a block's fd is. Consumers choose their importer from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemoryKind {
    /// A memfd (or any mmap-able file): CPU memory.
    Memfd,
    /// A dma-buf: device memory that hardware can import.
    DmaBuf,
}

/// Image geometry for allocators that lay out rows themselves (DRM dumb buffers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageRequest {
    pub width: u32,
    pub height: u32,
    pub bits_per_pixel: u32,
}

/// What the caller needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRequest {
    /// Minimum size in bytes.
    pub size: usize,
    /// Image geometry, when the allocator should choose the pitch.
    pub image: Option<ImageRequest>,
}

impl BlockRequest {
    pub fn bytes(size: usize) -> Self {
        BlockRequest { size, image: None }
    }
}

/// An allocated block of fd-backed memory.
#[derive(Debug)]
pub struct Block {
    pub fd: OwnedFd,
    /// Usable size in bytes (may be larger than requested).
    pub size: usize,
    pub kind: MemoryKind,
    /// Row pitch in bytes chosen by an image allocator.
    pub pitch: Option<u32>,
    /// Index in the owning device queue (V4L2).
    pub index: Option<u32>,
}

/// Why a backend could not allocate. Always names the device or path.
#[derive(Debug)]
pub enum BackendError {
    /// The device or heap could not be opened.
    Open {
        path: String,
        source: std::io::Error,
    },
    /// The allocation itself failed.
    Allocate {
        what: String,
        source: std::io::Error,
    },
    /// The request cannot be served by this backend.
    Unsupported(String),
    /// The device exists but cannot do what bufshare needs (e.g. export dma-bufs).
    Device { path: String, reason: String },
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::Open { path, source } => write!(f, "cannot open {path}: {source}"),
            BackendError::Allocate { what, source } => write!(f, "{what}: {source}"),
            BackendError::Unsupported(s) => write!(f, "unsupported request: {s}"),
            BackendError::Device { path, reason } => write!(f, "{path}: {reason}"),
        }
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BackendError::Open { source, .. } | BackendError::Allocate { source, .. } => {
                Some(source)
            }
            BackendError::Unsupported(_) | BackendError::Device { .. } => None,
        }
    }
}

/// A source of shareable memory. Implementations are cheap to share between
/// threads; `allocate` may be called from any streaming thread.
pub trait MemoryBackend: Send + Sync + std::fmt::Debug {
    /// Short name for logs and properties ("memfd", "dma-heap", ...).
    fn name(&self) -> &str;
    /// Kind of memory every block of this backend is.
    fn kind(&self) -> MemoryKind;
    /// Allocates one block of at least `request.size` bytes.
    fn allocate(&self, request: &BlockRequest) -> Result<Block, BackendError>;
    /// Where blocks come from, for logs and stats: the heap or device path
    /// (and driver), or `None` for anonymous memory.
    fn source(&self) -> Option<String> {
        None
    }
    /// Whether the allocator chooses the row pitch of image requests (DRM):
    /// then callers lay planes out from [`Block::pitch`].
    fn chooses_pitch(&self) -> bool {
        false
    }
    /// Whether [`MemoryBackend::set_video_format`] must be called before
    /// allocating (backends that own a device queue, i.e. V4L2).
    fn needs_video_format(&self) -> bool {
        false
    }
    /// Sets up the backend for frames of one format. Backends that own a
    /// device queue (V4L2) set the queue format, allocate a fixed number of
    /// buffers and return their layout; the others return `Ok(None)` and
    /// allocate per request.
    fn set_video_format(
        &self,
        _format: &VideoFormatRequest,
    ) -> Result<Option<QueueLayout>, BackendError> {
        Ok(None)
    }
}

/// A raw video format, for backends that must configure a device queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VideoFormatRequest {
    /// V4L2 pixel format fourcc (e.g. `*b"NV12"`, `*b"YU12"`), single buffer for all planes.
    pub fourcc: [u8; 4],
    pub width: u32,
    pub height: u32,
    /// Bytes the caller needs per frame at the least.
    pub size: usize,
    /// Buffers the caller needs at the least.
    pub min_buffers: u32,
}

/// What a device queue was set up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    /// Bytes per line of the first plane (the others follow the format's rules).
    pub pitch: u32,
    /// Rows of the first plane (the device may pad the height).
    pub height: u32,
    /// Bytes of each buffer.
    pub size: usize,
    /// Number of buffers: at most this many blocks are distinct at once.
    pub count: u32,
}
