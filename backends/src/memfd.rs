//! The default backend: anonymous memory from `memfd_create`, sealed so that
//! no process can shrink or grow it under another's mapping. Works on every
//! Linux kernel since 3.17 and needs no device, so it is what desktops and CI use.
//!
//! Creation and sealing go through the `memfd` crate (safe API over
//! `memfd_create` and `F_ADD_SEALS`); checking and adding seals on fds that
//! come from elsewhere is `share.rs`'s job.

use std::os::fd::OwnedFd;

use memfd::{FileSeal, MemfdOptions};

use crate::{BackendError, Block, BlockRequest, MemoryBackend, MemoryKind};

/// Allocates sealed memfds.
#[derive(Debug, Default, Clone)]
pub struct MemfdBackend;

impl MemfdBackend {
    pub fn new() -> Self {
        MemfdBackend
    }
}

fn page_align(size: usize) -> usize {
    const PAGE: usize = 4096;
    size.div_ceil(PAGE).max(1) * PAGE
}

impl MemoryBackend for MemfdBackend {
    fn name(&self) -> &str {
        "memfd"
    }

    fn kind(&self) -> MemoryKind {
        MemoryKind::Memfd
    }

    fn allocate(&self, request: &BlockRequest) -> Result<Block, BackendError> {
        let err = |what: &str, source: std::io::Error| BackendError::Allocate {
            what: format!("memfd of {} bytes: {what}", request.size),
            source,
        };
        let (size, pitch) = match request.image {
            None => (page_align(request.size), None),
            Some(img) => {
                let pitch = (img.width as usize * img.bits_per_pixel as usize).div_ceil(8);
                let size = request.size.max(pitch * img.height as usize);
                (page_align(size), Some(pitch as u32))
            }
        };
        let memfd = MemfdOptions::new()
            .close_on_exec(true)
            .allow_sealing(true)
            .create("bufshare")
            .map_err(|e| err("memfd_create", memfd_io_error(e)))?;
        memfd
            .as_file()
            .set_len(size as u64)
            .map_err(|e| err("ftruncate", e))?;
        memfd
            .add_seals(&[FileSeal::SealShrink, FileSeal::SealGrow, FileSeal::SealSeal])
            .map_err(|e| err("adding seals", memfd_io_error(e)))?;
        Ok(Block {
            fd: OwnedFd::from(memfd.into_file()),
            size,
            kind: MemoryKind::Memfd,
            pitch,
            index: None,
        })
    }
}

/// The OS error inside a `memfd` crate error (each of its variants wraps one).
fn memfd_io_error(e: memfd::Error) -> std::io::Error {
    match e {
        memfd::Error::Create(e) | memfd::Error::AddSeals(e) | memfd::Error::GetSeals(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{fd_kind, fd_size, ImageRequest};
    use rustix::fs::SealFlags;
    use std::os::fd::AsFd;

    #[test]
    fn allocates_sealed_memfd_of_page_aligned_size() {
        let block = MemfdBackend::new()
            .allocate(&BlockRequest::bytes(1000))
            .unwrap();
        assert_eq!(block.size, 4096);
        assert_eq!(fd_size(block.fd.as_fd()).unwrap(), 4096);
        assert_eq!(fd_kind(block.fd.as_fd()).unwrap(), Some(MemoryKind::Memfd));
        let seals = rustix::fs::fcntl_get_seals(&block.fd).unwrap();
        assert!(seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL));
        // A sealed memfd cannot be resized by anyone.
        assert!(rustix::fs::ftruncate(&block.fd, 100).is_err());
        assert!(rustix::fs::ftruncate(&block.fd, 1 << 20).is_err());
    }

    #[test]
    fn image_request_reports_pitch() {
        let req = BlockRequest {
            size: 0,
            image: Some(ImageRequest {
                width: 641,
                height: 480,
                bits_per_pixel: 32,
            }),
        };
        let block = MemfdBackend::new().allocate(&req).unwrap();
        assert_eq!(block.pitch, Some(641 * 4));
        assert!(block.size >= 641 * 4 * 480);
    }

    #[test]
    fn pipe_is_not_memory() {
        let (r, _w) = rustix::pipe::pipe().unwrap();
        assert_eq!(fd_kind(r.as_fd()).unwrap(), None);
    }
}
