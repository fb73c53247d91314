//! The release ring in memory: the producer makes it (a sealed memfd, mapped
//! shared) and reads it, the consumer maps it and writes its releases there.
//! The layout and the index arithmetic are [`crate::protocol::release_ring`];
//! this module only maps the file and does the atomic loads and stores.
//!
//! Both processes change the mapping concurrently, so every access is an
//! atomic u64 load or store at an aligned offset checked against the mapping
//! (the other side may write anything at any time; nothing here is a Rust
//! reference to plain data in it). The memfd is sealed against shrinking,
//! growing and further seals before it is sent, so neither side can make the
//! other's mapping fault.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::protocol::release_ring::{
    self as layout, pending, room, RingFault, FLAG_RELEASE_ON_SOCKET,
};

/// A shared read-write mapping of a whole ring (also used by the frame ring,
/// [`super::frame_ring`]).
pub(super) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, accessed only through atomics.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(super) fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        use rustix::mm::{MapFlags, ProtFlags};
        // SAFETY: a new mapping of a file we checked is at least `len` bytes
        // and sealed against shrinking; it does not alias any Rust object.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )?
        };
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Mapping { ptr, len })
    }

    /// A new memfd of `len` bytes, sealed against shrinking, growing and
    /// further seals, mapped; and its fd, to send the other side.
    pub(super) fn create_sealed(name: &str, len: usize) -> io::Result<(Mapping, OwnedFd)> {
        let memfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .close_on_exec(true)
            .create(name)
            .map_err(|e| io::Error::other(format!("memfd_create: {e}")))?;
        memfd.as_file().set_len(len as u64)?;
        memfd
            .add_seals(&[
                memfd::FileSeal::SealShrink,
                memfd::FileSeal::SealGrow,
                memfd::FileSeal::SealSeal,
            ])
            .map_err(|e| io::Error::other(format!("sealing: {e}")))?;
        let fd = OwnedFd::from(memfd.into_file());
        let mapping = Mapping::map(fd.as_fd(), len)?;
        Ok((mapping, fd))
    }

    /// Maps `len` bytes of a file the other side sent, which must be sealed
    /// against shrinking and at least that large.
    pub(super) fn map_checked(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        if !bufshare_backends::share::is_sealed_against_shrink(fd) {
            return Err(io::Error::other(
                "ring memfd is not sealed against shrinking",
            ));
        }
        let size = bufshare_backends::fd_size(fd)?;
        if size < len as u64 {
            return Err(io::Error::other(format!(
                "ring memfd has {size} bytes, the ring needs {len}"
            )));
        }
        Mapping::map(fd, len)
    }

    /// Copies `bytes` into the mapping at `offset` (in bounds, or a panic).
    /// A plain copy, not atomics: used for a frame ring slot, which only its
    /// writer touches until it publishes it. A hostile peer writing the same
    /// bytes at once only garbles what it will read itself, as with the
    /// frames' own shared memory.
    pub(super) fn write_bytes(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len, "ring offset {offset}");
        // SAFETY: in bounds (checked); the mapping lives as long as `self`
        // and no Rust reference into it exists.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.as_ptr().add(offset),
                bytes.len(),
            )
        };
    }

    /// Copies `out.len()` bytes from the mapping at `offset` (in bounds, or a
    /// panic); see [`Self::write_bytes`]. What is read is checked after.
    pub(super) fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= self.len, "ring offset {offset}");
        // SAFETY: as in write_bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
    }

    /// The u64 at byte `offset`: in bounds and aligned, or a panic (offsets
    /// come from the layout module, which masks every index).
    pub(super) fn word(&self, offset: usize) -> &AtomicU64 {
        assert!(
            offset.is_multiple_of(8) && offset + 8 <= self.len,
            "ring offset {offset}"
        );
        // SAFETY: in bounds and aligned (the mapping is page aligned); the
        // memory lives as long as `self` and is only accessed atomically.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(offset).cast()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped; no reference into it outlives self.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The producer's end of one consumer's ring.
pub struct ProducerRing {
    mapping: Mapping,
    capacity: u32,
    /// Ids taken so far: the producer's own count, never read back from the ring.
    read: u64,
    release_on_socket: bool,
}

impl ProducerRing {
    /// A new ring of `capacity` slots (a valid capacity), and the fd to send
    /// the consumer with RELEASE_RING.
    pub fn create(capacity: u32, release_on_socket: bool) -> io::Result<(ProducerRing, OwnedFd)> {
        assert!(layout::valid_capacity(capacity));
        let len = layout::ring_len(capacity);
        let (mapping, fd) = Mapping::create_sealed("bufshare-release-ring", len)?;
        let ring = ProducerRing {
            mapping,
            capacity,
            read: 0,
            release_on_socket,
        };
        ring.write_flags();
        Ok((ring, fd))
    }

    /// Takes every release written since the last call, in order, handing
    /// each to `take` as (frame id, release time the consumer wrote), which
    /// answers whether the id was good. A bad write counter, or an id `take`
    /// refuses, ends it with the fault (the consumer is dropped for it).
    /// Answers how many were taken.
    pub fn drain(
        &mut self,
        mut take: impl FnMut(u64, u64) -> Result<(), String>,
    ) -> Result<u64, String> {
        let write = self
            .mapping
            .word(layout::WRITE_OFFSET)
            .load(Ordering::Acquire);
        if write == self.read {
            return Ok(0);
        }
        let n = pending(self.read, write, self.capacity).map_err(|e: RingFault| e.to_string())?;
        for i in 0..n {
            let slot = layout::slot_offset(self.read.wrapping_add(i), self.capacity);
            let id = self.mapping.word(slot).load(Ordering::Relaxed);
            let released = self.mapping.word(slot + 8).load(Ordering::Relaxed);
            if let Err(e) = take(id, released) {
                self.read = write;
                return Err(e);
            }
        }
        self.read = write;
        self.mapping
            .word(layout::READ_OFFSET)
            .store(write, Ordering::Release);
        Ok(n)
    }

    /// Publishes where releases go.
    fn write_flags(&self) {
        let flags = if self.release_on_socket {
            FLAG_RELEASE_ON_SOCKET
        } else {
            0
        };
        self.mapping
            .word(layout::FLAGS_OFFSET)
            .store(flags, Ordering::SeqCst);
    }

    /// Whether releases go on the socket, as last set through [`Self::switch`].
    pub fn release_on_socket(&self) -> bool {
        self.release_on_socket
    }

    /// Tells the consumer to send its releases on the socket (true) or to
    /// write them here (false); answers whether that changed.
    pub fn switch(&mut self, on_socket: bool) -> bool {
        if self.release_on_socket == on_socket {
            return false;
        }
        self.release_on_socket = on_socket;
        self.write_flags();
        true
    }
}

/// The consumer's end of its ring. Any thread may release through it.
pub struct ConsumerRing {
    mapping: Mapping,
    capacity: u32,
    /// Ids written so far (our own count, never read back from the ring).
    write: Mutex<u64>,
}

impl ConsumerRing {
    /// Maps the ring the producer sent. It must be a memfd sealed against
    /// shrinking and at least as large as `capacity` slots need.
    pub fn map(fd: BorrowedFd<'_>, capacity: u32) -> io::Result<ConsumerRing> {
        if !layout::valid_capacity(capacity) {
            return Err(io::Error::other(format!(
                "ring capacity {capacity} not allowed"
            )));
        }
        let len = layout::ring_len(capacity);
        Ok(ConsumerRing {
            mapping: Mapping::map_checked(fd, len)?,
            capacity,
            write: Mutex::new(0),
        })
    }

    /// Writes `frame_ids`, released at `now` (CLOCK_MONOTONIC ns), to the
    /// ring, all or none. False when they must go on the socket instead: the
    /// producer asks for that, or there is no room.
    pub fn push(&self, frame_ids: &[u64], now: u64) -> bool {
        let mut write = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let flags = self
            .mapping
            .word(layout::FLAGS_OFFSET)
            .load(Ordering::SeqCst);
        if flags & FLAG_RELEASE_ON_SOCKET != 0 {
            return false;
        }
        let read = self
            .mapping
            .word(layout::READ_OFFSET)
            .load(Ordering::Acquire);
        if room(*write, read, self.capacity) < frame_ids.len() as u64 {
            return false;
        }
        for (i, id) in frame_ids.iter().enumerate() {
            let slot = layout::slot_offset(write.wrapping_add(i as u64), self.capacity);
            self.mapping.word(slot).store(*id, Ordering::Relaxed);
            self.mapping.word(slot + 8).store(now, Ordering::Relaxed);
        }
        *write = write.wrapping_add(frame_ids.len() as u64);
        self.mapping
            .word(layout::WRITE_OFFSET)
            .store(*write, Ordering::Release);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_written_by_the_consumer_are_read_by_the_producer_in_order() {
        let (mut producer, fd) = ProducerRing::create(16, false).unwrap();
        let consumer = ConsumerRing::map(fd.as_fd(), 16).unwrap();
        let mut seen = Vec::new();
        for round in 0..5u64 {
            let ids: Vec<u64> = (0..7).map(|i| round * 100 + i).collect();
            assert!(consumer.push(&ids, 7));
            assert!(consumer.push(&[round * 100 + 50], 7));
            let n = producer.drain(|id, released| {
                assert_eq!(released, 7);
                seen.push(id);
                Ok(())
            });
            assert_eq!(n, Ok(8));
        }
        assert_eq!(seen.len(), 40);
        assert_eq!(&seen[8..16], &[100, 101, 102, 103, 104, 105, 106, 150]);
        assert_eq!(producer.drain(|_, _| Ok(())), Ok(0));
    }

    #[test]
    fn a_full_ring_or_the_producers_flag_sends_releases_to_the_socket() {
        let (mut producer, fd) = ProducerRing::create(16, false).unwrap();
        let consumer = ConsumerRing::map(fd.as_fd(), 16).unwrap();
        assert!(consumer.push(&[1; 10], 7));
        assert!(!consumer.push(&[2; 7], 7), "only 6 slots left");
        assert!(consumer.push(&[3; 6], 7));
        assert_eq!(producer.drain(|_, _| Ok(())), Ok(16));
        assert!(producer.switch(true));
        assert!(!producer.switch(true));
        assert!(!consumer.push(&[4], 7));
        producer.switch(false);
        assert!(consumer.push(&[4], 7));
    }

    #[test]
    fn the_producer_refuses_a_write_counter_out_of_range_and_bad_ids() {
        let (mut producer, fd) = ProducerRing::create(16, false).unwrap();
        // A hostile consumer maps the ring itself and writes what it likes.
        let hostile = Mapping::map(fd.as_fd(), layout::ring_len(16)).unwrap();
        hostile
            .word(layout::WRITE_OFFSET)
            .store(17, Ordering::SeqCst);
        let err = producer.drain(|_, _| Ok(())).unwrap_err();
        assert!(err.contains("write counter 17"), "{err}");
        // An id the producer does not accept ends the drain with its fault.
        let (mut producer, fd) = ProducerRing::create(16, false).unwrap();
        let hostile = Mapping::map(fd.as_fd(), layout::ring_len(16)).unwrap();
        hostile
            .word(layout::SLOTS_OFFSET)
            .store(99, Ordering::SeqCst);
        hostile
            .word(layout::WRITE_OFFSET)
            .store(1, Ordering::SeqCst);
        let err = producer
            .drain(|id, _| Err(format!("frame {id} is not held")))
            .unwrap_err();
        assert_eq!(err, "frame 99 is not held");
    }

    #[test]
    fn the_ring_cannot_be_resized_and_a_short_file_is_refused() {
        let (_producer, fd) = ProducerRing::create(16, false).unwrap();
        let file = std::fs::File::from(fd.try_clone().unwrap());
        assert!(file.set_len(0).is_err(), "sealed against shrinking");
        assert!(file.set_len(1 << 20).is_err(), "sealed against growing");
        assert!(
            ConsumerRing::map(fd.as_fd(), 32).is_err(),
            "too small for 32 slots"
        );
        let plain = memfd::MemfdOptions::default().create("x").unwrap();
        plain.as_file().set_len(4096).unwrap();
        assert!(
            ConsumerRing::map(plain.as_file().as_fd(), 16).is_err(),
            "not sealed"
        );
    }
}
