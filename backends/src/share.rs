//! What happens to a memfd before it crosses to another process, and what the
//! receiving side checks: seals against resizing (so that no process can
//! shrink memory under another's mapping and make it SIGBUS), and a read-only
//! reopen of the same file (so that a consumer cannot map a producer's frames
//! for writing). dma-bufs are not handled here: their size is fixed by the
//! exporter and they cannot be reopened through /proc.
//!
//! These work on fds that came from elsewhere (an upstream allocator, a peer)
//! and that this crate only borrows, so they call rustix's safe
//! `fcntl_get_seals`/`fcntl_add_seals` directly: the `memfd` crate's seal API
//! needs an owned `Memfd` (taking the fd over, or a dup of it per check).

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags, SealFlags};

/// Whether `fd` is a memfd whose size nobody can change any more: sealed
/// against shrinking and growing. Files that cannot carry seals (files on
/// disk, pipes) answer false.
pub fn is_sealed_against_resize(fd: BorrowedFd<'_>) -> bool {
    rustix::fs::fcntl_get_seals(fd).is_ok_and(|s| s.contains(SealFlags::SHRINK | SealFlags::GROW))
}

/// Whether `fd` is sealed at least against shrinking, which is what a reader
/// needs: a file that can only grow never takes pages away from a mapping.
pub fn is_sealed_against_shrink(fd: BorrowedFd<'_>) -> bool {
    rustix::fs::fcntl_get_seals(fd).is_ok_and(|s| s.contains(SealFlags::SHRINK))
}

/// Seals a memfd against shrinking and growing if it is not already, for
/// memory that came from elsewhere (an upstream allocator). Fails for files
/// that cannot be sealed (created without `MFD_ALLOW_SEALING`, `F_SEAL_SEAL`
/// set, files on disk).
pub fn seal_against_resize(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    if is_sealed_against_resize(fd) {
        return Ok(());
    }
    rustix::fs::fcntl_add_seals(fd, SealFlags::SHRINK | SealFlags::GROW)?;
    Ok(())
}

/// A read-only fd of the same memfd, for a consumer: it can map it for
/// reading only (`PROT_WRITE` with `MAP_SHARED` fails with EACCES) and cannot
/// `write(2)` to it. The file's mode becomes 0400 first, so that a consumer of
/// another uid (or the same uid, without CAP_DAC_OVERRIDE) cannot reopen it
/// read-write through `/proc/<pid>/fd`; the producer's own fds are unaffected.
pub fn reopen_read_only(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    rustix::fs::fchmod(fd, Mode::RUSR)?;
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(rustix::fs::open(
        path.as_str(),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memfd::MemfdBackend;
    use crate::{BlockRequest, MemoryBackend};
    use rustix::mm::{MapFlags, ProtFlags};
    use std::os::fd::AsFd;

    #[test]
    fn read_only_reopen_cannot_be_mapped_or_written_for_writing() {
        let block = MemfdBackend::new()
            .allocate(&BlockRequest::bytes(4096))
            .unwrap();
        let ro = reopen_read_only(block.fd.as_fd()).unwrap();
        let flags = rustix::fs::fcntl_getfl(&ro).unwrap();
        assert_eq!(flags & OFlags::ACCMODE, OFlags::RDONLY);
        // SAFETY: mapping a fresh fd at an address of the kernel's choice; unmapped below.
        let writable = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                4096,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &ro,
                0,
            )
        };
        assert_eq!(writable.err(), Some(rustix::io::Errno::ACCESS));
        assert_eq!(
            rustix::io::write(&ro, b"x").err(),
            Some(rustix::io::Errno::BADF)
        );
        // Reading works, and sees what the producer wrote.
        rustix::io::pwrite(&block.fd, b"frame", 0).unwrap();
        let mut buf = [0u8; 5];
        rustix::io::pread(&ro, &mut buf, 0).unwrap();
        assert_eq!(&buf, b"frame");
        // The seals are the file's, so the reopened fd carries them too.
        assert!(is_sealed_against_resize(ro.as_fd()));
        let st = rustix::fs::fstat(&ro).unwrap();
        assert_eq!(st.st_mode & 0o777, 0o400);
    }

    #[test]
    fn unsealed_memfd_is_seen_and_can_be_sealed() {
        let fd = rustix::fs::memfd_create(
            "test",
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )
        .unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        assert!(!is_sealed_against_shrink(fd.as_fd()));
        seal_against_resize(fd.as_fd()).unwrap();
        assert!(is_sealed_against_shrink(fd.as_fd()));
        assert_eq!(
            rustix::fs::ftruncate(&fd, 0).err(),
            Some(rustix::io::Errno::PERM)
        );
        assert_eq!(
            rustix::fs::ftruncate(&fd, 8192).err(),
            Some(rustix::io::Errno::PERM)
        );
        // A memfd made without MFD_ALLOW_SEALING cannot be sealed.
        let plain = rustix::fs::memfd_create("plain", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        assert!(seal_against_resize(plain.as_fd()).is_err());
        let (r, _w) = rustix::pipe::pipe().unwrap();
        assert!(!is_sealed_against_shrink(r.as_fd()));
    }
}
