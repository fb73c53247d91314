//! Facts about an fd that a receiver must check before trusting it: what kind
//! of memory it is and how large it really is. Plain fstat/fstatfs/lseek
//! through rustix; the one kernel constant (`DMA_BUF_MAGIC`) is written out
//! below rather than taking `linux-raw-sys` as a direct dependency for it.

use std::os::fd::BorrowedFd;

use crate::MemoryKind;

/// `DMA_BUF_MAGIC` from linux/magic.h: the f_type of the dma-buf pseudo filesystem.
const DMA_BUF_MAGIC: i64 = 0x444d_4142;

/// Kind of memory behind `fd`, or `None` if it is neither a dma-buf nor a
/// regular (mmap-able) file, e.g. a pipe or a socket.
pub fn fd_kind(fd: BorrowedFd<'_>) -> std::io::Result<Option<MemoryKind>> {
    let fs = rustix::fs::fstatfs(fd)?;
    #[allow(clippy::unnecessary_cast)]
    if fs.f_type as i64 == DMA_BUF_MAGIC {
        return Ok(Some(MemoryKind::DmaBuf));
    }
    let st = rustix::fs::fstat(fd)?;
    let file_type = rustix::fs::FileType::from_raw_mode(st.st_mode);
    Ok((file_type == rustix::fs::FileType::RegularFile).then_some(MemoryKind::Memfd))
}

/// Real size of the memory behind `fd`: st_size for files, the seek end for dma-bufs.
pub fn fd_size(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    let st = rustix::fs::fstat(fd)?;
    if st.st_size > 0 {
        return Ok(st.st_size as u64);
    }
    // dma-bufs report st_size 0; their size is where SEEK_END lands.
    let end = rustix::fs::seek(fd, rustix::fs::SeekFrom::End(0))?;
    rustix::fs::seek(fd, rustix::fs::SeekFrom::Start(0))?;
    Ok(end)
}
