//! The frame ring in memory, and its doorbell: the producer makes both (a
//! sealed memfd mapped shared; a stream socket pair), writes encoded FRAME
//! messages into the ring and rings the doorbell when the consumer sleeps;
//! the consumer maps the ring, takes the entries and waits on the doorbell.
//! The layout, the checks and the ordering rule are
//! [`crate::protocol::frame_ring`]; this module only does the atomic loads
//! and stores and the doorbell's one-byte sends. It sits next to the release
//! ring ([`super::ring`]) and shares its mapping code.
//!
//! The other process changes the mapping at any time, so the counters and
//! entry headers are atomic u64 loads and stores at offsets checked against
//! the mapping; an entry's message is a plain copy (bounds checked) into or
//! out of a slot that only the writer touches until it is published and only
//! the reader until it is freed. What the consumer copies out is checked
//! (length, then decoded) before use.
//!
//! **Why a socket pair and not an eventfd.** An eventfd's write blocks when
//! its counter is full, and whether it blocks is a flag of the open file,
//! which the consumer shares and may clear (`fcntl`): a hostile consumer
//! could fill the counter, clear the flag and stop the producer's streaming
//! thread. The producer's `send(MSG_DONTWAIT)` on its own end of a socket
//! pair never blocks, whatever the consumer does with its end. The consumer
//! waits for it with `EPOLLET` (each send is an edge), so it need not read
//! the byte on each wake-up; it empties its end once every
//! [`DRAIN_EVERY`] sleeps, long before the pair's buffer (hundreds of
//! one-byte sends) could fill. The producer rings at most once per sleep.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;

use super::ring::Mapping;
use crate::protocol::frame_ring::{
    self as layout, available, entry_len, room, sleeping, RingFault, AWAKE, SLEEPING,
};

/// The consumer empties its end of the doorbell once per this many sleeps.
pub const DRAIN_EVERY: u32 = 32;

/// The producer's end of one consumer's frame ring.
pub struct ProducerFrameRing {
    mapping: Mapping,
    capacity: u32,
    slot_len: u32,
    /// Entries written so far: the producer's own count, never read back.
    written: u64,
    /// Our end of the doorbell.
    bell: OwnedFd,
    /// Times the doorbell was rung (for tests and statistics).
    rung: u64,
}

/// The fds the consumer gets: the ring's memfd (FRAME_RING) and its end of
/// the doorbell (DOORBELL).
pub struct ConsumerFds {
    pub ring: OwnedFd,
    pub bell: OwnedFd,
}

impl ProducerFrameRing {
    /// A new ring (a valid geometry) and its doorbell, with the fds for the consumer.
    pub fn create(capacity: u32, slot_len: u32) -> io::Result<(ProducerFrameRing, ConsumerFds)> {
        assert!(layout::valid_geometry(capacity, slot_len));
        let len = layout::ring_len(capacity, slot_len);
        let (mapping, ring) = Mapping::create_sealed("bufshare-frame-ring", len)?;
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        let (bell, theirs) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        // We never read our end; only the consumer could write to it. Close
        // that direction so that nothing it writes can pile up here.
        let _ = rustix::net::shutdown(&bell, rustix::net::Shutdown::Read);
        Ok((
            ProducerFrameRing {
                mapping,
                capacity,
                slot_len,
                written: 0,
                bell,
                rung: 0,
            },
            ConsumerFds { ring, bell: theirs },
        ))
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn slot_len(&self) -> u32 {
        self.slot_len
    }

    /// Whether a message of `len` bytes fits in a slot.
    pub fn fits(&self, len: usize) -> bool {
        layout::fits(len, self.slot_len)
    }

    /// Writes `msg` (one encoded FRAME that [`Self::fits`]) as the next
    /// entry, `seq` socket messages after the start, and rings the doorbell
    /// if the consumer sleeps. False: the ring is full (nothing written).
    /// A fault in what the consumer wrote (its read count, its sleep flag)
    /// is an error: drop it.
    pub fn push(&mut self, msg: &[u8], seq: u64) -> Result<bool, RingFault> {
        debug_assert!(self.fits(msg.len()));
        let read = self
            .mapping
            .word(layout::READ_OFFSET)
            .load(Ordering::Acquire);
        if room(self.written, read, self.capacity)? == 0 {
            return Ok(false);
        }
        let slot = layout::slot_offset(self.written, self.capacity, self.slot_len);
        self.mapping.word(slot).store(seq, Ordering::Relaxed);
        self.mapping
            .word(slot + 8)
            .store(msg.len() as u64, Ordering::Relaxed);
        self.mapping
            .write_bytes(slot + layout::ENTRY_HEADER_LEN, msg);
        self.written = self.written.wrapping_add(1);
        // Publish, then look at the flag (both SeqCst: either the consumer's
        // re-check sees this entry, or this load sees its flag).
        self.mapping
            .word(layout::WRITTEN_OFFSET)
            .store(self.written, Ordering::SeqCst);
        let flag = self.mapping.word(layout::SLEEPING_OFFSET);
        if sleeping(flag.load(Ordering::SeqCst))? && sleeping(flag.swap(AWAKE, Ordering::SeqCst))? {
            self.ring();
        }
        Ok(true)
    }

    /// Rings the doorbell. Never blocks: a full or closed doorbell is the
    /// consumer's own loss.
    fn ring(&mut self) {
        self.rung += 1;
        let _ = rustix::net::send(
            &self.bell,
            &[1],
            rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
        );
    }

    /// Times the doorbell was rung.
    pub fn rung(&self) -> u64 {
        self.rung
    }

    /// The consumer's read count and the entries it has not taken yet (for
    /// stall detection), checked like [`Self::push`] checks them.
    pub fn backlog(&self) -> Result<(u64, u64), RingFault> {
        let read = self
            .mapping
            .word(layout::READ_OFFSET)
            .load(Ordering::Acquire);
        let free = room(self.written, read, self.capacity)?;
        Ok((read, u64::from(self.capacity) - free))
    }
}

/// The consumer's end of its frame ring.
pub struct ConsumerFrameRing {
    mapping: Mapping,
    capacity: u32,
    slot_len: u32,
    /// Entries taken so far (our own count, never read back).
    read: u64,
    bell: OwnedFd,
    sleeps: u32,
}

impl ConsumerFrameRing {
    /// Maps the ring the producer sent (sealed against shrinking, large
    /// enough) and keeps its doorbell.
    pub fn map(
        ring: BorrowedFd<'_>,
        capacity: u32,
        slot_len: u32,
        bell: OwnedFd,
    ) -> io::Result<ConsumerFrameRing> {
        if !layout::valid_geometry(capacity, slot_len) {
            return Err(io::Error::other(format!(
                "frame ring of {capacity} slots of {slot_len} bytes not allowed"
            )));
        }
        let mapping = Mapping::map_checked(ring, layout::ring_len(capacity, slot_len))?;
        Ok(ConsumerFrameRing {
            mapping,
            capacity,
            slot_len,
            read: 0,
            bell,
            sleeps: 0,
        })
    }

    /// The doorbell, to wait on (with `EPOLLET`).
    pub fn bell(&self) -> BorrowedFd<'_> {
        self.bell.as_fd()
    }

    fn available(&self, order: Ordering) -> Result<u64, RingFault> {
        let written = self.mapping.word(layout::WRITTEN_OFFSET).load(order);
        available(self.read, written, self.capacity)
    }

    /// The `seq` of the oldest entry, if one waits.
    pub fn peek(&self) -> Result<Option<u64>, RingFault> {
        if self.available(Ordering::Acquire)? == 0 {
            return Ok(None);
        }
        let slot = layout::slot_offset(self.read, self.capacity, self.slot_len);
        Ok(Some(self.mapping.word(slot).load(Ordering::Relaxed)))
    }

    /// Copies the oldest entry's message (there must be one: [`Self::peek`])
    /// into `buf` and frees its slot. Answers its length.
    pub fn take(&mut self, buf: &mut [u8]) -> Result<usize, RingFault> {
        let slot = layout::slot_offset(self.read, self.capacity, self.slot_len);
        let len = entry_len(
            self.mapping.word(slot + 8).load(Ordering::Relaxed),
            self.slot_len,
        )?;
        self.mapping
            .read_bytes(slot + layout::ENTRY_HEADER_LEN, &mut buf[..len]);
        self.read = self.read.wrapping_add(1);
        self.mapping
            .word(layout::READ_OFFSET)
            .store(self.read, Ordering::Release);
        Ok(len)
    }

    /// Says we are going to sleep, then looks again: true if the ring is
    /// still empty (sleep now; the producer will ring), false if an entry
    /// came meanwhile (the flag is cleared again; do not sleep).
    pub fn prepare_sleep(&mut self) -> Result<bool, RingFault> {
        let flag = self.mapping.word(layout::SLEEPING_OFFSET);
        flag.store(SLEEPING, Ordering::SeqCst);
        if self.available(Ordering::SeqCst)? > 0 {
            flag.store(AWAKE, Ordering::Relaxed);
            return Ok(false);
        }
        Ok(true)
    }

    /// After a sleep: clears the flag (the producer cleared it if it rang)
    /// and now and then empties the doorbell.
    pub fn woke(&mut self) {
        self.mapping
            .word(layout::SLEEPING_OFFSET)
            .store(AWAKE, Ordering::Relaxed);
        self.sleeps = self.sleeps.wrapping_add(1);
        if self.sleeps.is_multiple_of(DRAIN_EVERY) {
            let mut buf = [0u8; 256];
            while let Ok(n) =
                rustix::net::recv(&self.bell, &mut buf, rustix::net::RecvFlags::DONTWAIT)
            {
                if n.0 < buf.len() {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame_ring::{RingFault, READ_OFFSET, SLEEPING_OFFSET};
    use rustix::event::{poll, PollFd, PollFlags};

    fn bell_rang(fd: BorrowedFd<'_>) -> bool {
        let mut pfd = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
        poll(&mut pfd, Some(&rustix::event::Timespec::default())).unwrap() == 1
    }

    fn pair(capacity: u32) -> (ProducerFrameRing, ConsumerFrameRing) {
        let (producer, fds) = ProducerFrameRing::create(capacity, 128).unwrap();
        let consumer = ConsumerFrameRing::map(fds.ring.as_fd(), capacity, 128, fds.bell).unwrap();
        (producer, consumer)
    }

    #[test]
    fn entries_arrive_whole_and_in_order_with_their_seq() {
        let (mut producer, mut consumer) = pair(4);
        let mut buf = vec![0u8; 256];
        // Lengths from a header's 8 bytes to a full slot, odd ones included.
        for (n, len) in (8..=112).step_by(3).enumerate() {
            let msg: Vec<u8> = (0..len).map(|b| (b + n) as u8).collect();
            assert_eq!(producer.push(&msg, n as u64), Ok(true));
            if n % 2 == 0 {
                continue;
            }
            // Two waiting: both come out, oldest first.
            let prev: Vec<u8> = (0..len - 3).map(|b| (b + n - 1) as u8).collect();
            assert_eq!(consumer.peek(), Ok(Some(n as u64 - 1)));
            let l = consumer.take(&mut buf).unwrap();
            assert_eq!(&buf[..l], &prev[..]);
            assert_eq!(consumer.peek(), Ok(Some(n as u64)));
            let l = consumer.take(&mut buf).unwrap();
            assert_eq!(&buf[..l], &msg[..]);
        }
    }

    #[test]
    fn a_full_ring_refuses_and_frees_as_the_consumer_reads() {
        let (mut producer, mut consumer) = pair(4);
        let msg = [7u8; 40];
        for _ in 0..4 {
            assert_eq!(producer.push(&msg, 0), Ok(true));
        }
        assert_eq!(producer.push(&msg, 0), Ok(false), "full: skip");
        assert_eq!(producer.backlog(), Ok((0, 4)));
        let mut buf = [0u8; 128];
        consumer.take(&mut buf).unwrap();
        assert_eq!(producer.backlog(), Ok((1, 3)));
        assert_eq!(producer.push(&msg, 0), Ok(true));
    }

    #[test]
    fn the_doorbell_rings_only_for_a_sleeping_consumer_and_is_never_lost() {
        let (mut producer, mut consumer) = pair(8);
        let msg = [1u8; 16];
        // Awake: no doorbell.
        producer.push(&msg, 0).unwrap();
        assert!(!bell_rang(consumer.bell()));
        assert_eq!(producer.rung(), 0);
        // Going to sleep with an entry waiting: do not sleep.
        assert_eq!(consumer.prepare_sleep(), Ok(false));
        let mut buf = [0u8; 128];
        consumer.take(&mut buf).unwrap();
        // Asleep: the next entry rings, once.
        assert_eq!(consumer.prepare_sleep(), Ok(true));
        producer.push(&msg, 0).unwrap();
        producer.push(&msg, 0).unwrap();
        assert!(bell_rang(consumer.bell()));
        assert_eq!(producer.rung(), 1);
        consumer.woke();
        assert_eq!(consumer.peek(), Ok(Some(0)));
    }

    #[test]
    fn the_producer_refuses_a_bad_read_count_or_sleep_flag() {
        let (mut producer, fds) = ProducerFrameRing::create(8, 128).unwrap();
        // A hostile consumer maps the ring itself and writes what it likes.
        let len = layout::ring_len(8, 128);
        let hostile = Mapping::map(fds.ring.as_fd(), len).unwrap();
        hostile.word(READ_OFFSET).store(5, Ordering::SeqCst);
        let err = producer.push(&[0; 16], 0).unwrap_err();
        assert!(
            matches!(
                err,
                RingFault::BadReadCount {
                    read: 5,
                    written: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert!(producer.backlog().is_err());
        hostile.word(READ_OFFSET).store(0, Ordering::SeqCst);
        hostile.word(SLEEPING_OFFSET).store(7, Ordering::SeqCst);
        assert_eq!(producer.push(&[0; 16], 0), Err(RingFault::BadSleepFlag(7)));
    }

    #[test]
    fn the_consumer_refuses_a_bad_written_count_or_length() {
        let (producer, fds) = ProducerFrameRing::create(8, 128).unwrap();
        let hostile = Mapping::map(fds.ring.as_fd(), layout::ring_len(8, 128)).unwrap();
        let mut consumer = ConsumerFrameRing::map(fds.ring.as_fd(), 8, 128, fds.bell).unwrap();
        drop(producer);
        hostile
            .word(layout::WRITTEN_OFFSET)
            .store(9, Ordering::SeqCst);
        assert!(consumer.peek().is_err());
        hostile
            .word(layout::WRITTEN_OFFSET)
            .store(1, Ordering::SeqCst);
        hostile
            .word(layout::SLOTS_OFFSET + 8)
            .store(500, Ordering::SeqCst);
        let mut buf = [0u8; 1024];
        assert!(consumer.take(&mut buf).is_err());
    }

    #[test]
    fn a_ring_that_is_too_small_or_not_sealed_is_refused() {
        let (_producer, fds) = ProducerFrameRing::create(8, 128).unwrap();
        let bell = fds.bell.try_clone().unwrap();
        assert!(ConsumerFrameRing::map(fds.ring.as_fd(), 16, 128, bell).is_err());
        let plain = memfd::MemfdOptions::default().create("x").unwrap();
        plain.as_file().set_len(1 << 16).unwrap();
        assert!(ConsumerFrameRing::map(plain.as_file().as_fd(), 8, 128, fds.bell).is_err());
    }
}
