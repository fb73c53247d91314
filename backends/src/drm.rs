//! DRM backend: GEM "dumb" buffers on a DRM device, exported as dma-bufs (PRIME).
//!
//! A dumb buffer is the simplest buffer every KMS driver (imx-drm, msm, vkms)
//! and vgem can make: width x height x bpp in, the driver's row pitch and the
//! size out. The pitch may be wider than width x bpp (display controllers align
//! rows), so it goes back to the caller in [`Block::pitch`] and from there into
//! the GstVideoMeta. Right after export the GEM handle is closed: the dma-buf
//! alone keeps the buffer alive, so nothing leaks when consumers drop it.

use std::ffi::c_char;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::ioctl::{opcode, Opcode};

use crate::sys::{check_char_device, ioctl_rw, open_device, EXPORT_FLAGS};
use crate::{BackendError, Block, BlockRequest, ImageRequest, MemoryBackend, MemoryKind};

/// Where DRM devices live.
pub const DRI_DIR: &str = "/dev/dri";

/// `struct drm_mode_create_dumb` from drm_mode.h.
#[repr(C)]
#[derive(Debug, Default)]
struct CreateDumb {
    height: u32,
    width: u32,
    bpp: u32,
    flags: u32,
    handle: u32,
    pitch: u32,
    size: u64,
}
const _: () = assert!(std::mem::size_of::<CreateDumb>() == 32);

/// `struct drm_mode_destroy_dumb`.
#[repr(C)]
struct DestroyDumb {
    handle: u32,
}
const _: () = assert!(std::mem::size_of::<DestroyDumb>() == 4);

/// `struct drm_prime_handle` from drm.h.
#[repr(C)]
#[derive(Debug, Default)]
struct PrimeHandle {
    handle: u32,
    flags: u32,
    fd: i32,
}
const _: () = assert!(std::mem::size_of::<PrimeHandle>() == 12);

/// `struct drm_version` from drm.h (only the name is asked for).
#[repr(C)]
struct Version {
    version_major: i32,
    version_minor: i32,
    version_patchlevel: i32,
    name_len: usize,
    name: *mut c_char,
    date_len: usize,
    date: *mut c_char,
    desc_len: usize,
    desc: *mut c_char,
}
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<Version>() == 64);

const DRM_IOCTL_VERSION: Opcode = opcode::read_write::<Version>(b'd', 0x00);
const DRM_IOCTL_PRIME_HANDLE_TO_FD: Opcode = opcode::read_write::<PrimeHandle>(b'd', 0x2d);
const DRM_IOCTL_MODE_CREATE_DUMB: Opcode = opcode::read_write::<CreateDumb>(b'd', 0xb2);
const DRM_IOCTL_MODE_DESTROY_DUMB: Opcode = opcode::read_write::<DestroyDumb>(b'd', 0xb4);

/// Width in pixels (at 32 bpp) of the dumb buffers that carry plain bytes.
const BYTES_WIDTH: u32 = 1024;

/// Allocates dumb buffers on one DRM device and exports them.
#[derive(Debug)]
pub struct DrmDumbBackend {
    card: OwnedFd,
    path: PathBuf,
    driver: String,
}

impl DrmDumbBackend {
    /// Opens `path` and checks, with a small test buffer, that it can create
    /// dumb buffers and export them. Errors name the path and the reason.
    pub fn open(path: &Path) -> Result<Self, BackendError> {
        let card = open_device(path)?;
        check_char_device(path, &card)?;
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
        let mut create = CreateDumb {
            width: img.width,
            height: img.height,
            bpp: img.bits_per_pixel,
            ..Default::default()
        };
        // SAFETY: the opcode takes a `struct drm_mode_create_dumb`.
        unsafe { ioctl_rw::<DRM_IOCTL_MODE_CREATE_DUMB, _>(&self.card, &mut create) }
            .map_err(|e| std::io::Error::new(e.kind(), format!("MODE_CREATE_DUMB: {e}")))?;
        let mut prime = PrimeHandle {
            handle: create.handle,
            flags: EXPORT_FLAGS,
            fd: -1,
        };
        // SAFETY: the opcode takes a `struct drm_prime_handle`.
        let exported =
            unsafe { ioctl_rw::<DRM_IOCTL_PRIME_HANDLE_TO_FD, _>(&self.card, &mut prime) };
        let mut destroy = DestroyDumb {
            handle: create.handle,
        };
        // The dma-buf (if any) holds its own reference; the handle is not needed any more.
        // SAFETY: the opcode takes a `struct drm_mode_destroy_dumb`.
        let _ = unsafe { ioctl_rw::<DRM_IOCTL_MODE_DESTROY_DUMB, _>(&self.card, &mut destroy) };
        exported.map_err(|e| {
            std::io::Error::new(e.kind(), format!("PRIME_HANDLE_TO_FD (cannot export): {e}"))
        })?;
        // SAFETY: on success the kernel returned a new fd that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(prime.fd) };
        Ok((fd, create.pitch, create.size))
    }
}

/// The driver name from DRM_IOCTL_VERSION.
fn driver_name(card: &OwnedFd) -> std::io::Result<String> {
    let mut name = [0u8; 64];
    let mut v = Version {
        version_major: 0,
        version_minor: 0,
        version_patchlevel: 0,
        name_len: name.len(),
        name: name.as_mut_ptr().cast(),
        date_len: 0,
        date: std::ptr::null_mut(),
        desc_len: 0,
        desc: std::ptr::null_mut(),
    };
    // SAFETY: the opcode takes a `struct drm_version`; `name` outlives the call
    // and the kernel writes at most `name_len` bytes into it.
    unsafe { ioctl_rw::<DRM_IOCTL_VERSION, _>(card, &mut v) }?;
    let len = v.name_len.min(name.len());
    Ok(String::from_utf8_lossy(&name[..len])
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
