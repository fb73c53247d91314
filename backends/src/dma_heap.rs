//! dma-heap backend: dma-bufs allocated from a Linux DMA heap
//! (`/dev/dma_heap/<name>`, kernel 5.6+).
//!
//! Boards name their heaps: `system` (any pages), `linux,cma` (contiguous,
//! what i.MX8 encoders want), `qcom,system` (QCS), `reserved` (a CMA region
//! from the device tree). One ioctl, DMA_HEAP_IOCTL_ALLOC, returns a dma-buf fd
//! of the requested size; hardware imports it and consumers mmap it.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::ioctl::{opcode, Opcode};

use crate::sys::{check_char_device, ioctl_rw, open_device, EXPORT_FLAGS};
use crate::{BackendError, Block, BlockRequest, MemoryBackend, MemoryKind};

/// Where heaps live.
pub const HEAP_DIR: &str = "/dev/dma_heap";

/// `struct dma_heap_allocation_data` from linux/dma-heap.h.
#[repr(C)]
#[derive(Debug, Default)]
struct AllocationData {
    len: u64,
    fd: u32,
    fd_flags: u32,
    heap_flags: u64,
}
const _: () = assert!(std::mem::size_of::<AllocationData>() == 24);

/// `DMA_HEAP_IOCTL_ALLOC`: `_IOWR('H', 0x0, struct dma_heap_allocation_data)`.
const DMA_HEAP_IOCTL_ALLOC: Opcode = opcode::read_write::<AllocationData>(b'H', 0);

/// The path of a heap given its name (`system`, `linux,cma`) or an absolute path.
pub fn heap_path(name_or_path: &str) -> PathBuf {
    if name_or_path.starts_with('/') {
        PathBuf::from(name_or_path)
    } else {
        Path::new(HEAP_DIR).join(name_or_path)
    }
}

/// Allocates dma-bufs from one heap.
#[derive(Debug)]
pub struct DmaHeapBackend {
    heap: OwnedFd,
    path: PathBuf,
}

impl DmaHeapBackend {
    /// Opens a heap by name (`system`, `linux,cma`, `qcom,system`, `reserved`)
    /// or absolute path. Fails naming the path if it is missing, not
    /// permitted, or not a heap.
    pub fn open(name_or_path: &str) -> Result<Self, BackendError> {
        let path = heap_path(name_or_path);
        let heap = open_device(&path)?;
        check_char_device(&path, &heap)?;
        Ok(DmaHeapBackend { heap, path })
    }

    /// The heap's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn page_align(size: usize) -> usize {
    size.div_ceil(4096).max(1) * 4096
}

impl MemoryBackend for DmaHeapBackend {
    fn name(&self) -> &str {
        "dma-heap"
    }

    fn kind(&self) -> MemoryKind {
        MemoryKind::DmaBuf
    }

    fn source(&self) -> Option<String> {
        Some(self.path.display().to_string())
    }

    fn allocate(&self, request: &BlockRequest) -> Result<Block, BackendError> {
        let (size, pitch) = match request.image {
            None => (page_align(request.size), None),
            Some(img) => {
                let pitch = (img.width as usize * img.bits_per_pixel as usize).div_ceil(8);
                (
                    page_align(request.size.max(pitch * img.height as usize)),
                    Some(pitch as u32),
                )
            }
        };
        let mut data = AllocationData {
            len: size as u64,
            fd_flags: EXPORT_FLAGS,
            ..Default::default()
        };
        // SAFETY: DMA_HEAP_IOCTL_ALLOC takes a `struct dma_heap_allocation_data`.
        unsafe { ioctl_rw::<DMA_HEAP_IOCTL_ALLOC, _>(&self.heap, &mut data) }.map_err(|e| {
            BackendError::Allocate {
                what: format!("allocating {size} bytes from {}", self.path.display()),
                source: e,
            }
        })?;
        // SAFETY: on success the kernel returned a new fd that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(data.fd as i32) };
        Ok(Block {
            fd,
            size,
            kind: MemoryKind::DmaBuf,
            pitch,
            index: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_names_map_to_dev_dma_heap() {
        assert_eq!(heap_path("linux,cma"), Path::new("/dev/dma_heap/linux,cma"));
        assert_eq!(heap_path("/dev/my_heap"), Path::new("/dev/my_heap"));
    }

    #[test]
    fn missing_heap_error_names_the_path() {
        let err = DmaHeapBackend::open("nope").unwrap_err().to_string();
        assert!(err.contains("/dev/dma_heap/nope"), "{err}");
        assert!(err.contains("No such file"), "{err}");
    }

    #[test]
    fn regular_file_is_not_a_heap() {
        let path = std::env::temp_dir().join(format!("bufshare-not-a-heap-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let err = DmaHeapBackend::open(path.to_str().unwrap())
            .unwrap_err()
            .to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains(path.to_str().unwrap()), "{err}");
        assert!(err.contains("not a character device"), "{err}");
    }
}
