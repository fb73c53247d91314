//! Small helpers the hardware backends share: opening a device with an error
//! that names it, and one read-write ioctl call that retries on EINTR.
//! Each backend declares its own kernel structs next to the code that uses them.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use rustix::ioctl::{Opcode, Updater};

use crate::BackendError;

/// Opens a device read-write, close-on-exec. The error names the path and the
/// reason (ENOENT, EACCES, ...).
pub(crate) fn open_device(path: &Path) -> Result<OwnedFd, BackendError> {
    rustix::fs::open(path, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()).map_err(|e| {
        BackendError::Open {
            path: path.display().to_string(),
            source: e.into(),
        }
    })
}

/// Checks that `path` is a character device (a regular file or directory is a
/// configuration mistake that ioctls would only report as ENOTTY).
pub(crate) fn check_char_device(path: &Path, fd: &OwnedFd) -> Result<(), BackendError> {
    let st = rustix::fs::fstat(fd).map_err(|e| BackendError::Open {
        path: path.display().to_string(),
        source: e.into(),
    })?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::CharacterDevice {
        return Err(BackendError::Device {
            path: path.display().to_string(),
            reason: "not a character device".into(),
        });
    }
    Ok(())
}

/// `ioctl(fd, OPCODE, &mut value)` for an `_IOWR` request, retried on EINTR.
///
/// # Safety
/// `OPCODE` must be a request whose argument is a `T` with the kernel's layout.
pub(crate) unsafe fn ioctl_rw<const OPCODE: Opcode, T>(
    fd: impl AsFd,
    value: &mut T,
) -> std::io::Result<()> {
    loop {
        // SAFETY: the caller guarantees OPCODE takes a `T`.
        match unsafe { rustix::ioctl::ioctl(fd.as_fd(), Updater::<OPCODE, T>::new(value)) } {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(Into::into),
        }
    }
}

/// O_RDWR | O_CLOEXEC as the flags dma-buf exporters take.
pub(crate) const EXPORT_FLAGS: u32 = OFlags::RDWR.bits() | OFlags::CLOEXEC.bits();

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
        return Err(BackendError::Device {
            path: path.display().to_string(),
            reason: "not a character device".into(),
        });
    }
    Ok(())
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
