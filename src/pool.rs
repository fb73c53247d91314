//! A GstBufferPool whose memory comes from a [`MemoryBackend`].
//!
//! bufsharesink proposes this pool upstream, so videotestsrc, videoconvert
//! and decoders write straight into memory that can be shared by fd. The sink
//! also uses one for its copy path (memory that arrives without an fd).
//! Memory is wrapped as GstFdMemory (memfd) or GstDmaBufMemory (dma-buf),
//! kept mapped for its lifetime so that a producer writing every frame does
//! not pay an mmap/munmap per frame.

use gst::glib;
use std::os::fd::IntoRawFd;
use std::sync::{Arc, LazyLock, Mutex};

use bufshare_backends::{Block, BlockRequest, MemoryBackend, MemoryKind};
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_allocators::prelude::*;

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "bufsharepool",
        gst::DebugColorFlags::empty(),
        Some("bufshare buffer pool"),
    )
});

static FD_ALLOCATOR: LazyLock<gst_allocators::FdAllocator> =
    LazyLock::new(gst_allocators::FdAllocator::new);
static DMABUF_ALLOCATOR: LazyLock<gst_allocators::DmaBufAllocator> =
    LazyLock::new(gst_allocators::DmaBufAllocator::new);

/// Wraps an fd as GstFdMemory (memfd) or GstDmaBufMemory (dma-buf) of
/// `maxsize` bytes, kept mapped once first mapped. Takes ownership of `fd`.
pub fn wrap_fd(
    fd: std::os::fd::OwnedFd,
    kind: MemoryKind,
    maxsize: usize,
) -> Result<gst::Memory, glib::BoolError> {
    let flags = gst_allocators::FdMemoryFlags::KEEP_MAPPED;
    let fd = fd.into_raw_fd();
    // SAFETY: the allocator takes ownership of `fd`, which we own and give up here.
    unsafe {
        match kind {
            MemoryKind::Memfd => FD_ALLOCATOR.alloc_fd(fd, maxsize, flags),
            MemoryKind::DmaBuf => DMABUF_ALLOCATOR.alloc_dmabuf_with_flags(fd, maxsize, flags),
        }
    }
}

/// Wraps a backend block as GStreamer memory of `size` bytes (the block may be larger).
pub fn wrap_block(block: Block, size: usize) -> Result<gst::Memory, glib::BoolError> {
    let mut mem = wrap_fd(block.fd, block.kind, block.size)?;
    mem.get_mut()
        .expect("fresh memory is writable")
        .resize(0..size);
    Ok(mem)
}

/// Allocates one block of `size` bytes from `backend` and wraps it.
pub fn allocate_memory(
    backend: &dyn MemoryBackend,
    size: usize,
) -> Result<gst::Memory, gst::FlowError> {
    let block = backend.allocate(&BlockRequest::bytes(size)).map_err(|e| {
        gst::error!(CAT, "{} backend failed to allocate: {e}", backend.name());
        gst::FlowError::Error
    })?;
    wrap_block(block, size).map_err(|e| {
        gst::error!(CAT, "wrapping {} memory failed: {e}", backend.name());
        gst::FlowError::Error
    })
}

mod imp {
    use super::*;

    #[derive(Default)]
    struct Layout {
        size: usize,
        video: Option<gst_video::VideoInfo>,
        add_video_meta: bool,
    }

    #[derive(Default)]
    pub struct BackendBufferPool {
        pub(super) backend: Mutex<Option<Arc<dyn MemoryBackend>>>,
        layout: Mutex<Layout>,
    }

    #[glib::object_subclass]
    impl ObjectSubclass for BackendBufferPool {
        const NAME: &'static str = "GstBufShareBufferPool";
        type Type = super::BackendBufferPool;
        type ParentType = gst::BufferPool;
    }

    impl ObjectImpl for BackendBufferPool {}
    impl GstObjectImpl for BackendBufferPool {}

    impl BufferPoolImpl for BackendBufferPool {
        fn options() -> &'static [&'static str] {
            static OPTIONS: [&str; 1] = ["GstBufferPoolOptionVideoMeta"];
            &OPTIONS
        }

        fn set_config(&self, config: &mut gst::BufferPoolConfigRef) -> bool {
            let Some((caps, size, min, max)) = config.params() else {
                return false;
            };
            let video = caps
                .as_ref()
                .and_then(|c| gst_video::VideoInfo::from_caps(c).ok());
            let size = match &video {
                Some(info) => (size as usize).max(info.size()),
                None => size as usize,
            };
            if size == 0 {
                gst::warning!(CAT, imp = self, "refusing a config with buffer size 0");
                return false;
            }
            let add_video_meta =
                video.is_some() && config.has_option(gst_video::BUFFER_POOL_OPTION_VIDEO_META);
            config.set_params(caps.as_ref(), size as u32, min, max);
            *self.layout.lock().unwrap() = Layout {
                size,
                video,
                add_video_meta,
            };
            self.parent_set_config(config)
        }

        fn alloc_buffer(
            &self,
            _params: Option<&gst::BufferPoolAcquireParams>,
        ) -> Result<gst::Buffer, gst::FlowError> {
            let backend = self
                .backend
                .lock()
                .unwrap()
                .clone()
                .ok_or(gst::FlowError::NotNegotiated)?;
            let layout = self.layout.lock().unwrap();
            let mem = allocate_memory(backend.as_ref(), layout.size)?;
            let mut buffer = gst::Buffer::new();
            {
                let b = buffer.get_mut().unwrap();
                b.append_memory(mem);
                if let (Some(info), true) = (&layout.video, layout.add_video_meta) {
                    gst_video::VideoMeta::add_full(
                        b,
                        gst_video::VideoFrameFlags::empty(),
                        info.format(),
                        info.width(),
                        info.height(),
                        info.offset(),
                        info.stride(),
                    )
                    .map_err(|_| gst::FlowError::Error)?;
                }
            }
            gst::trace!(
                CAT,
                imp = self,
                "allocated a {} byte {} buffer",
                layout.size,
                backend.name()
            );
            Ok(buffer)
        }
    }
}

glib::wrapper! {
    /// A buffer pool backed by a [`MemoryBackend`].
    pub struct BackendBufferPool(ObjectSubclass<imp::BackendBufferPool>)
        @extends gst::BufferPool, gst::Object;
}

impl BackendBufferPool {
    pub fn new(backend: Arc<dyn MemoryBackend>) -> Self {
        let pool: Self = glib::Object::new();
        *pool.imp().backend.lock().unwrap() = Some(backend);
        pool
    }

    /// A pool configured for `caps` (or raw bytes when `caps` is None) with
    /// buffers of at least `size` bytes, with video metas when `caps` are video.
    pub fn configured(
        backend: Arc<dyn MemoryBackend>,
        caps: Option<&gst::Caps>,
        size: u32,
        min: u32,
        max: u32,
    ) -> Result<Self, glib::BoolError> {
        let pool = Self::new(backend);
        let mut config = pool.config();
        config.set_params(caps, size, min, max);
        config.add_option(gst_video::BUFFER_POOL_OPTION_VIDEO_META);
        pool.set_config(config)?;
        Ok(pool)
    }
}
