//! DRM backend: GEM "dumb" buffers on a DRM device, exported as dma-bufs (PRIME).
//!
//! A dumb buffer is the simplest buffer every KMS driver (imx-drm, msm, vkms)
//! and vgem can make: width x height x bpp in, the driver's row pitch and the
//! size out. The pitch may be wider than width x bpp (display controllers align
//! rows), so it goes back to the caller in [`Block::pitch`] and from there into
//! the GstVideoMeta. Right after export the GEM handle is closed: the dma-buf
//! alone keeps the buffer alive, so nothing leaks when consumers drop it.
//!
//! The ioctls come from Smithay's `drm` crate (driver name: `get_driver`,
//! PRIME export: `buffer_to_prime_fd`) and its ioctl layer `drm-ffi` (dumb
//! buffer create and destroy), both on pre-generated bindings: no libclang or
//! kernel headers at build time. `drm`'s own `create_dumb_buffer` is not used:
//! it wants a DRM fourcc where callers here only have bits per pixel (8 for
//! NV12's rows), and its `DumbBuffer` keeps the kernel's size to itself;
//! `drm_ffi::mode::dumbbuffer::create` returns the kernel's struct as is.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use drm::control::Device as _;
use drm::Device as _;

use crate::sys::{check_char_device, open_device, retry_on_eintr};
use crate::{BackendError, Block, BlockRequest, ImageRequest, MemoryBackend, MemoryKind};

/// Where DRM devices live.
pub const DRI_DIR: &str = "/dev/dri";

/// An open DRM device node, for the `drm` crate's device traits.
#[derive(Debug)]
struct Card(OwnedFd);

impl AsFd for Card {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl drm::Device for Card {}
impl drm::control::Device for Card {}

/// Width in pixels (at 32 bpp) of the dumb buffers that carry plain bytes.
const BYTES_WIDTH: u32 = 1024;

/// Allocates dumb buffers on one DRM device and exports them.
#[derive(Debug)]
pub struct DrmDumbBackend {
    card: Card,
    path: PathBuf,
    driver: String,
}

impl DrmDumbBackend {
    /// Opens `path` and checks, with a small test buffer, that it can create
    /// dumb buffers and export them. Errors name the path and the reason.
    pub fn open(path: &Path) -> Result<Self, BackendError> {
        let card = open_device(path)?;
        check_char_device(path, &card)?;
        let card = Card(card);
        let driver = driver_name(&card).map_err(|e| BackendError::Device {
            path: path.display().to_string(),
            reason: format!("not a DRM device (DRM_IOCTL_VERSION: {e})"),
        })?;
        let backend = DrmDumbBackend {
            card,
            path: path.to_path_buf(),
            driver,
        };
        backend
            .create_and_export(&ImageRequest {
                width: 64,
                height: 1,
                bits_per_pixel: 32,
            })
            .map_err(|e| BackendError::Device {
                path: path.display().to_string(),
                reason: format!(
                    "driver {} cannot create and export dumb buffers: {e}",
                    backend.driver
                ),
            })?;
        Ok(backend)
    }

    /// The first `/dev/dri/card*` (by number) that can create dumb buffers and
    /// export them. The error lists what was tried and why each failed.
    pub fn open_first() -> Result<Self, BackendError> {
        let mut cards: Vec<(u32, PathBuf)> = std::fs::read_dir(DRI_DIR)
            .map_err(|e| BackendError::Open {
                path: DRI_DIR.into(),
                source: e,
            })?
            .filter_map(|e| {
                let e = e.ok()?;
                let n = e.file_name().to_str()?.strip_prefix("card")?.parse().ok()?;
                Some((n, e.path()))
            })
            .collect();
        cards.sort();
        let mut why = Vec::new();
        for (_, path) in cards {
            match Self::open(&path) {
                Ok(b) => return Ok(b),
                Err(e) => why.push(e.to_string()),
            }
        }
        Err(BackendError::Device {
            path: format!("{DRI_DIR}/card*"),
            reason: if why.is_empty() {
                "no DRM card device".into()
            } else {
                format!("no card can export dumb buffers ({})", why.join("; "))
            },
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kernel driver's name (`vgem`, `vkms`, `imx-drm`, `msm`).
    pub fn driver(&self) -> &str {
        &self.driver
    }

    /// Creates a dumb buffer, exports it, and closes the handle.
    /// Returns (dma-buf, pitch, size).
    fn create_and_export(&self, img: &ImageRequest) -> std::io::Result<(OwnedFd, u32, u64)> {
        let fd = self.card.as_fd();
        let create = retry_on_eintr(|| {
            drm_ffi::mode::dumbbuffer::create(fd, img.width, img.height, img.bits_per_pixel, 0)
        })
        .map_err(|e| std::io::Error::new(e.kind(), format!("MODE_CREATE_DUMB: {e}")))?;
        let exported = match drm::control::from_u32(create.handle) {
            Some(handle) => retry_on_eintr(|| {
                self.card
                    .buffer_to_prime_fd(handle, drm::CLOEXEC | drm::RDWR)
            }),
            None => Err(std::io::Error::other("the driver returned GEM handle 0")),
        };
        // The dma-buf (if any) holds its own reference; the handle is not needed any more.
        let _ = retry_on_eintr(|| drm_ffi::mode::dumbbuffer::destroy(fd, create.handle));
        let exported = exported.map_err(|e| {
            std::io::Error::new(e.kind(), format!("PRIME_HANDLE_TO_FD (cannot export): {e}"))
        })?;
        Ok((exported, create.pitch, create.size))
    }
}

/// The driver name from DRM_IOCTL_VERSION.
fn driver_name(card: &Card) -> std::io::Result<String> {
    let driver = retry_on_eintr(|| card.get_driver())?;
    Ok(driver
        .name()
        .to_string_lossy()
        .trim_end_matches('\0')
        .to_string())
}

impl MemoryBackend for DrmDumbBackend {
    fn name(&self) -> &str {
        "drm"
    }

    fn kind(&self) -> MemoryKind {
        MemoryKind::DmaBuf
    }

    fn chooses_pitch(&self) -> bool {
        true
    }

    fn source(&self) -> Option<String> {
        Some(format!("{} ({})", self.path.display(), self.driver))
    }

    fn allocate(&self, request: &BlockRequest) -> Result<Block, BackendError> {
        let img = match request.image {
            Some(img) => {
                // Enough rows for `size` even if the driver does not pad the pitch.
                let min_pitch = (img.width as usize * img.bits_per_pixel as usize)
                    .div_ceil(8)
                    .max(1);
                let rows = request.size.div_ceil(min_pitch).max(img.height as usize);
                ImageRequest {
                    height: rows as u32,
                    ..img
                }
            }
            None => ImageRequest {
                width: BYTES_WIDTH,
                height: request.size.div_ceil(BYTES_WIDTH as usize * 4).max(1) as u32,
                bits_per_pixel: 32,
            },
        };
        let what = || {
            format!(
                "{}x{}x{}bpp dumb buffer on {} ({})",
                img.width,
                img.height,
                img.bits_per_pixel,
                self.path.display(),
                self.driver
            )
        };
        let (fd, pitch, size) =
            self.create_and_export(&img)
                .map_err(|e| BackendError::Allocate {
                    what: what(),
                    source: e,
                })?;
        let size = size as usize;
        if size < request.size {
            return Err(BackendError::Unsupported(format!(
                "{} has {size} bytes, {} needed",
                what(),
                request.size
            )));
        }
        Ok(Block {
            fd,
            size,
            kind: MemoryKind::DmaBuf,
            pitch: request.image.map(|_| pitch),
            index: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_error_names_the_path() {
        let err = DrmDumbBackend::open(Path::new("/dev/dri/card-nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/dev/dri/card-nope"), "{err}");
        assert!(err.contains("No such file"), "{err}");
    }

    #[test]
    fn regular_file_is_not_a_drm_device() {
        let path = std::env::temp_dir().join(format!("bufshare-not-drm-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let err = DrmDumbBackend::open(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains(path.to_str().unwrap()), "{err}");
        assert!(err.contains("not a character device"), "{err}");
    }

    #[test]
    fn char_device_that_is_not_drm_is_refused() {
        // /dev/null is a character device that knows no DRM ioctl.
        let err = DrmDumbBackend::open(Path::new("/dev/null"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/dev/null"), "{err}");
        assert!(err.contains("not a DRM device"), "{err}");
    }
}
