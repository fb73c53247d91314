//! Small helpers the hardware backends share: opening a device with an error
//! that names it, refusing paths that are not character devices, and retrying
//! a kernel call that a signal interrupted. All safe code: the kernel
//! interfaces themselves come from the `dma-heap` and `drm` crates, and the
//! V4L2 ioctls (the one hand-written interface left) live in `v4l2.rs`.

use std::path::Path;

use crate::BackendError;

/// Opens a device read-write, close-on-exec (std sets `O_CLOEXEC`). The error
/// names the path and the reason (ENOENT, EACCES, ...).
#[cfg(any(feature = "drm", feature = "v4l2"))]
pub(crate) fn open_device(path: &Path) -> Result<std::os::fd::OwnedFd, BackendError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(std::os::fd::OwnedFd::from)
        .map_err(|source| BackendError::Open {
            path: path.display().to_string(),
            source,
        })
}

/// Checks that the open `fd` of `path` is a character device (a regular file
/// or directory is a configuration mistake that ioctls would only report as ENOTTY).
#[cfg(any(feature = "drm", feature = "v4l2"))]
pub(crate) fn check_char_device(
    path: &Path,
    fd: &std::os::fd::OwnedFd,
) -> Result<(), BackendError> {
    let file_type = rustix::fs::fstat(fd)
        .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode))
        .map_err(|e| BackendError::Open {
            path: path.display().to_string(),
            source: e.into(),
        })?;
    if file_type != rustix::fs::FileType::CharacterDevice {
        return Err(not_a_char_device(path));
    }
    Ok(())
}

/// The same check by path, before opening: for crates that open the device
/// themselves (`dma_heap::Heap`). A FIFO would block such an open, so it is
/// refused here first.
#[cfg(feature = "dma-heap")]
pub(crate) fn check_char_device_path(path: &Path) -> Result<(), BackendError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|source| BackendError::Open {
        path: path.display().to_string(),
        source,
    })?;
    if !meta.file_type().is_char_device() {
        return Err(not_a_char_device(path));
    }
    Ok(())
}

fn not_a_char_device(path: &Path) -> BackendError {
    BackendError::Device {
        path: path.display().to_string(),
        reason: "not a character device".into(),
    }
}

/// Calls `f` again while it fails with EINTR (a signal arrived during an
/// allocation or ioctl); any other result is returned.
pub(crate) fn retry_on_eintr<T>(mut f: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}
