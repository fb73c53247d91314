//! Memory backends for bufshare: where shareable, fd-backed frame memory comes from.
//!
//! A backend hands out [`Block`]s: a file descriptor that another process can
//! map (a memfd) or hand to hardware (a dma-buf), plus its size and, for image
//! allocators, the row pitch the allocator chose. The GStreamer side
//! (`gstbufshare`'s buffer pool) wraps blocks as GstFdMemory/GstDmaBufMemory;
//! nothing here knows about GStreamer, so backends can be tested alone.
//!
//! One trait fits every allocator we plan for:
//! - memfd (this crate, always built): a size in bytes;
//! - dma-heap: a size in bytes, from `/dev/dma_heap/<name>`;
//! - DRM dumb buffers: width x height x bpp in, a pitch out ([`BlockRequest::image`]);
//! - V4L2 exported buffers: the backend owns a device queue set up with N buffers,
//!   and each block names its queue index ([`Block::index`]).

use std::os::fd::OwnedFd;

pub mod fdinfo;
pub mod memfd;
pub mod share;

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
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::Open { path, source } => write!(f, "cannot open {path}: {source}"),
            BackendError::Allocate { what, source } => write!(f, "{what}: {source}"),
            BackendError::Unsupported(s) => write!(f, "unsupported request: {s}"),
        }
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BackendError::Open { source, .. } | BackendError::Allocate { source, .. } => {
                Some(source)
            }
            BackendError::Unsupported(_) => None,
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
}
