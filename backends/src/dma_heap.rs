//! dma-heap backend: dma-bufs allocated from a Linux DMA heap
//! (`/dev/dma_heap/<name>`, kernel 5.6+).
//!
//! Boards name their heaps: `system` (any pages), `linux,cma` (contiguous,
//! what i.MX8 encoders want), `qcom,system` (QCS), `reserved` (a CMA region
//! from the device tree). One ioctl, DMA_HEAP_IOCTL_ALLOC, returns a dma-buf fd
//! of the requested size; hardware imports it and consumers mmap it.
//!
//! The heap is opened and the ioctl made by the `dma-heap` crate
//! ([`dma_heap::Heap`], read-only open, dma-bufs `O_RDWR | O_CLOEXEC`). What
//! stays here: the heap path from a name, refusing paths that are not
//! character devices (before the crate's open, which a FIFO would block),
//! errors that name the path, EINTR retries and the page-aligned size.

use std::path::{Path, PathBuf};

use dma_heap::{Heap, HeapKind};

use crate::sys::{check_char_device_path, retry_on_eintr};
use crate::{BackendError, Block, BlockRequest, MemoryBackend, MemoryKind};

/// Where heaps live.
pub const HEAP_DIR: &str = "/dev/dma_heap";

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
    heap: Heap,
    path: PathBuf,
}

impl DmaHeapBackend {
    /// Opens a heap by name (`system`, `linux,cma`, `qcom,system`, `reserved`)
    /// or absolute path. Fails naming the path if it is missing, not
    /// permitted, or not a heap.
    pub fn open(name_or_path: &str) -> Result<Self, BackendError> {
        let path = heap_path(name_or_path);
        check_char_device_path(&path)?;
        let heap =
            Heap::new(HeapKind::Custom(path.clone())).map_err(|source| BackendError::Open {
                path: path.display().to_string(),
                source,
            })?;
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
        let fd = retry_on_eintr(|| self.heap.allocate(size)).map_err(|source| {
            BackendError::Allocate {
                what: format!("allocating {size} bytes from {}", self.path.display()),
                source,
            }
        })?;
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
