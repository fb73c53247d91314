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

/// Allocates one block for `request` from `backend` and wraps it as
/// `request.size` bytes.
pub fn allocate_memory(
    backend: &dyn MemoryBackend,
    request: &BlockRequest,
) -> Result<gst::Memory, gst::FlowError> {
    let size = request.size;
    let block = backend.allocate(request).map_err(|e| {
        gst::error!(CAT, "{} backend failed to allocate: {e}", backend.name());
        gst::FlowError::Error
    })?;
    wrap_block(block, size).map_err(|e| {
        gst::error!(CAT, "wrapping {} memory failed: {e}", backend.name());
        gst::FlowError::Error
    })
}

/// The V4L2 pixel format (single buffer for all planes) of a GStreamer video format.
pub fn v4l2_fourcc(format: gst_video::VideoFormat) -> Option<[u8; 4]> {
    use gst_video::VideoFormat as F;
    Some(*match format {
        F::Nv12 => b"NV12",
        F::Nv21 => b"NV21",
        F::Nv16 => b"NV16",
        F::I420 => b"YU12",
        F::Yv12 => b"YV12",
        F::Yuy2 => b"YUYV",
        F::Uyvy => b"UYVY",
        F::Rgb => b"RGB3",
        F::Bgr => b"BGR3",
        F::Bgrx => b"XR24",
        F::Bgra => b"AR24",
        F::Rgbx => b"XB24",
        F::Rgba => b"AB24",
        F::Gray8 => b"GREY",
        _ => return None,
    })
}

/// Plane strides and offsets of a frame whose first plane has `pitch` bytes
/// per line and `rows` lines, the other planes extrapolated from it and
/// following each other, as DRM dumb buffers and single-buffer V4L2 formats
/// lay them out. Returns (offsets, strides, total size).
pub fn layout_from_pitch(
    info: &gst_video::VideoInfo,
    pitch: u32,
    rows: u32,
) -> (Vec<usize>, Vec<i32>, usize) {
    let finfo = info.format_info();
    let mut offsets = Vec::new();
    let mut strides = Vec::new();
    let mut offset = 0usize;
    for plane in 0..finfo.n_planes() {
        let stride = finfo.extrapolate_stride(plane, pitch);
        let component = (0..finfo.n_components())
            .find(|c| finfo.plane()[*c as usize] == plane)
            .unwrap_or(0);
        let height = finfo.scale_height(component as u8, rows);
        offsets.push(offset);
        strides.push(stride as i32);
        offset += stride as usize * height as usize;
    }
    (offsets, strides, offset)
}

mod imp {
    use super::*;
    use bufshare_backends::{ImageRequest, VideoFormatRequest};

    #[derive(Default)]
    struct Layout {
        size: usize,
        video: Option<gst_video::VideoInfo>,
        add_video_meta: bool,
        /// Plane offsets and strides of every buffer (the backend's pitch applied).
        offsets: Vec<usize>,
        strides: Vec<i32>,
        /// What to ask an allocator that chooses the pitch (DRM).
        image: Option<ImageRequest>,
        /// Bytes every block has at most (V4L2 queue buffers).
        capacity: Option<usize>,
    }

    #[derive(Default)]
    pub struct BackendBufferPool {
        pub(super) backend: Mutex<Option<Arc<dyn MemoryBackend>>>,
        layout: Mutex<Layout>,
        /// Why the last set_config failed, for errors that say so.
        pub(super) config_error: Mutex<Option<String>>,
    }

    #[glib::object_subclass]
    impl ObjectSubclass for BackendBufferPool {
        const NAME: &'static str = "GstBufShareBufferPool";
        type Type = super::BackendBufferPool;
        type ParentType = gst::BufferPool;
    }

    impl ObjectImpl for BackendBufferPool {}
    impl GstObjectImpl for BackendBufferPool {}

    impl BackendBufferPool {
        /// Logs and records why a config is refused; returns false.
        fn refuse(&self, reason: String) -> bool {
            gst::error!(CAT, imp = self, "refusing config: {reason}");
            *self.config_error.lock().unwrap() = Some(reason);
            false
        }

        /// The frame layout a backend with device constraints imposes on
        /// `info`: (layout, size, max buffers). `Ok(None)` when the backend
        /// allocates plain bytes and GStreamer's default layout applies.
        fn device_layout(
            &self,
            backend: &dyn MemoryBackend,
            info: &gst_video::VideoInfo,
            min: u32,
        ) -> Result<Option<(Layout, u32)>, String> {
            let finfo = info.format_info();
            if backend.needs_video_format() {
                let fourcc = v4l2_fourcc(info.format()).ok_or_else(|| {
                    format!(
                        "the {} backend has no V4L2 pixel format for {:?}",
                        backend.name(),
                        info.format()
                    )
                })?;
                let request = VideoFormatRequest {
                    fourcc,
                    width: info.width(),
                    height: info.height(),
                    size: info.size(),
                    min_buffers: min,
                };
                let queue = backend
                    .set_video_format(&request)
                    .map_err(|e| e.to_string())?
                    .ok_or("the backend set up no queue")?;
                let (offsets, strides, size) = layout_from_pitch(info, queue.pitch, queue.height);
                if size > queue.size {
                    return Err(format!(
                        "{size} byte frames do not fit the device's {} byte buffers",
                        queue.size
                    ));
                }
                let layout = Layout {
                    size,
                    capacity: Some(queue.size),
                    offsets,
                    strides,
                    ..Default::default()
                };
                return Ok(Some((layout, queue.count)));
            }
            if !backend.chooses_pitch() {
                return Ok(None);
            }
            let bits_per_pixel = finfo.pixel_stride()[0] as u32 * 8;
            if bits_per_pixel == 0 || finfo.n_planes() == 0 {
                return Ok(None);
            }
            // Ask for one frame to learn the pitch the driver picks. The width asked
            // covers GStreamer's own first-plane stride, so that the other planes,
            // extrapolated from the pitch, hold their rows too (odd widths: NV12 321
            // pixels wide needs 322-byte chroma rows, so 324, not 321).
            let pixel_bytes = finfo.pixel_stride()[0] as u32;
            let probe = ImageRequest {
                width: info
                    .width()
                    .max((info.stride()[0] as u32).div_ceil(pixel_bytes)),
                height: info.height(),
                bits_per_pixel,
            };
            let block = backend
                .allocate(&BlockRequest {
                    size: 0,
                    image: Some(probe),
                })
                .map_err(|e| e.to_string())?;
            let Some(pitch) = block.pitch else {
                return Ok(None);
            };
            let (offsets, strides, size) = if pitch as i32 == info.stride()[0] {
                (info.offset().to_vec(), info.stride().to_vec(), info.size())
            } else {
                layout_from_pitch(info, pitch, info.height())
            };
            let rows = size.div_ceil(pitch as usize) as u32;
            Ok(Some((
                Layout {
                    size,
                    offsets,
                    strides,
                    image: Some(ImageRequest {
                        height: rows.max(info.height()),
                        ..probe
                    }),
                    ..Default::default()
                },
                0,
            )))
        }
    }

    impl BufferPoolImpl for BackendBufferPool {
        fn options() -> &'static [&'static str] {
            static OPTIONS: [&str; 1] = ["GstBufferPoolOptionVideoMeta"];
            &OPTIONS
        }

        fn set_config(&self, config: &mut gst::BufferPoolConfigRef) -> bool {
            let Some((caps, size, min, mut max)) = config.params() else {
                return false;
            };
            let Some(backend) = self.backend.lock().unwrap().clone() else {
                return false;
            };
            let video = caps
                .as_ref()
                .and_then(|c| gst_video::VideoInfo::from_caps(c).ok());
            let add_video_meta =
                video.is_some() && config.has_option(gst_video::BUFFER_POOL_OPTION_VIDEO_META);
            let mut layout = match &video {
                Some(info) => match self.device_layout(backend.as_ref(), info, min) {
                    Err(e) => {
                        return self.refuse(format!("{} backend: {e}", backend.name()));
                    }
                    Ok(Some((layout, count))) => {
                        if count > 0 {
                            if min > count {
                                return self.refuse(format!(
                                    "{min} buffers asked for, the {} device queue has {count}",
                                    backend.name()
                                ));
                            }
                            // A device queue has exactly this many buffers.
                            max = count;
                        }
                        let default_layout = layout.offsets[..]
                            == info.offset()[..layout.offsets.len()]
                            && layout.strides[..] == info.stride()[..layout.strides.len()];
                        if !default_layout && !add_video_meta {
                            return self.refuse(format!(
                                "the {} backend pads rows (strides {:?}) but the pool has no video meta option",
                                backend.name(),
                                layout.strides
                            ));
                        }
                        Layout {
                            video: Some(info.clone()),
                            add_video_meta,
                            ..layout
                        }
                    }
                    Ok(None) => Layout {
                        size: info.size(),
                        video: Some(info.clone()),
                        add_video_meta,
                        offsets: info.offset().to_vec(),
                        strides: info.stride().to_vec(),
                        image: None,
                        capacity: None,
                    },
                },
                None => {
                    if backend.needs_video_format() {
                        return self.refuse(format!(
                            "the {} backend only holds raw video, not {}",
                            backend.name(),
                            caps.as_ref()
                                .map_or("bytes without caps".into(), |c| c.to_string())
                        ));
                    }
                    Layout::default()
                }
            };
            layout.size = layout.size.max(size as usize);
            if let Some(capacity) = layout.capacity {
                layout.size = layout.size.min(capacity);
            }
            if layout.size == 0 {
                gst::warning!(CAT, imp = self, "refusing a config with buffer size 0");
                return false;
            }
            config.set_params(caps.as_ref(), layout.size as u32, min, max);
            gst::debug!(
                CAT,
                imp = self,
                "{} buffers of {} bytes, strides {:?}, offsets {:?}, max {}",
                backend.name(),
                layout.size,
                layout.strides,
                layout.offsets,
                max
            );
            *self.layout.lock().unwrap() = layout;
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
            let request = BlockRequest {
                size: layout.size,
                image: layout.image,
            };
            let mem = allocate_memory(backend.as_ref(), &request)?;
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
                        &layout.offsets,
                        &layout.strides,
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

    /// Name of the backend behind this pool ("memfd", "dma-heap", ...).
    pub fn backend_name(&self) -> String {
        self.imp()
            .backend
            .lock()
            .unwrap()
            .as_ref()
            .map_or_else(String::new, |b| b.name().to_string())
    }

    /// A pool configured for `caps` (or raw bytes when `caps` is None) with
    /// buffers of at least `size` bytes, with video metas when `caps` are video.
    pub fn configured(
        backend: Arc<dyn MemoryBackend>,
        caps: Option<&gst::Caps>,
        size: u32,
        min: u32,
        max: u32,
    ) -> Result<Self, String> {
        let pool = Self::new(backend);
        let mut config = pool.config();
        config.set_params(caps, size, min, max);
        config.add_option(gst_video::BUFFER_POOL_OPTION_VIDEO_META);
        pool.set_config(config).map_err(|e| {
            pool.imp()
                .config_error
                .lock()
                .unwrap()
                .take()
                .unwrap_or_else(|| e.to_string())
        })?;
        Ok(pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(format: gst_video::VideoFormat, w: u32, h: u32) -> gst_video::VideoInfo {
        gst::init().unwrap();
        gst_video::VideoInfo::builder(format, w, h).build().unwrap()
    }

    #[test]
    fn padded_pitch_spreads_to_every_plane() {
        // A driver that pads 320-pixel rows to 384 bytes.
        let (offsets, strides, size) =
            layout_from_pitch(&info(gst_video::VideoFormat::Nv12, 320, 240), 384, 240);
        assert_eq!(strides, [384, 384]);
        assert_eq!(offsets, [0, 384 * 240]);
        assert_eq!(size, 384 * 240 * 3 / 2);
        let (offsets, strides, size) =
            layout_from_pitch(&info(gst_video::VideoFormat::I420, 320, 240), 384, 240);
        assert_eq!(strides, [384, 192, 192]);
        assert_eq!(offsets, [0, 384 * 240, 384 * 240 + 192 * 120]);
        assert_eq!(size, 384 * 240 + 2 * 192 * 120);
    }

    #[test]
    fn padded_height_moves_the_chroma_plane() {
        // vicodec sets up 640x368 for a 320x240 request: chroma follows 368 rows.
        let (offsets, strides, _) =
            layout_from_pitch(&info(gst_video::VideoFormat::Nv12, 320, 240), 640, 368);
        assert_eq!(strides, [640, 640]);
        assert_eq!(offsets, [0, 640 * 368]);
    }

    #[test]
    fn formats_map_to_single_buffer_v4l2_fourccs() {
        assert_eq!(v4l2_fourcc(gst_video::VideoFormat::Nv12), Some(*b"NV12"));
        assert_eq!(v4l2_fourcc(gst_video::VideoFormat::I420), Some(*b"YU12"));
        assert_eq!(v4l2_fourcc(gst_video::VideoFormat::V210), None);
    }
}
