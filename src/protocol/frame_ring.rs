//! The frame ring's layout, index arithmetic, sleep flag and ordering rule
//! (pure: no mapping, no I/O).
//!
//! The release ring ([`super::release_ring`]) took RELEASE off the socket;
//! the frame ring does the same for FRAME, in the other direction. A consumer
//! that says [`FEATURE_FRAME_RING`] in its HELLO gets, from a producer that
//! offers it, a ring of frame descriptors in shared memory (FRAME_RING, one
//! sealed memfd) and a doorbell (DOORBELL, one end of a socket pair). The
//! producer writes each encoded FRAME into the ring instead of sending it,
//! and rings the doorbell only when the consumer said it is going to sleep
//! (PipeWire's model). A consumer that keeps up reads frames with no system
//! call; one that sleeps between frames makes one (its wait), the producer
//! one (the doorbell) instead of `sendmsg` + `ppoll` + `recvmsg`.
//!
//! Layout (little endian; the three counters are aligned u64s on their own
//! cache lines):
//!
//! ```text
//! offset   0  written   entries published so far; only the producer writes it
//! offset  64  read      entries taken so far;     only the consumer writes it
//! offset 128  sleeping  SLEEPING (1) or AWAKE (0); the consumer sets it, the
//!                       producer swaps it back to AWAKE when it rings
//! offset 192  slots     `capacity` slots of `slot_len` bytes; entry n is in
//!                       slot n % capacity: u64 `seq` (the socket messages the
//!                       producer sent before this entry), u32 `len`, u32
//!                       reserved, then `len` bytes: one FRAME message,
//!                       header included, as it would go on the socket
//! ```
//!
//! **Order.** Everything else (REGISTER with its fd, CAPS, EOS, FORGET,
//! FRAMEs too large for a slot...) still goes on the socket. Each entry
//! carries how many socket messages were sent before it, so the consumer
//! sees every message in the order sent ([`next`]): an entry whose `seq` is
//! more than the socket messages it has taken waits for those. Compared with
//! marker entries, a socket message never needs room in the ring.
//!
//! **No lost wake-up.** The consumer stores SLEEPING (SeqCst), loads
//! `written` again (SeqCst) and waits only if nothing came; the producer
//! stores `written` (SeqCst), then swaps `sleeping` to AWAKE (SeqCst) and
//! rings only if it was SLEEPING. Either the consumer's load sees the entry
//! or the producer's swap sees the flag.
//!
//! **Trust.** The producer never trusts what the consumer writes: it keeps
//! its own count of entries written, checks `read` on every look
//! ([`room`]: never ahead of `written`, never more than `capacity` behind),
//! and takes `sleeping` to be 0 or 1 ([`sleeping`]); anything else drops the
//! consumer. The consumer checks `written` and every `len` ([`available`],
//! [`entry_len`]) against a producer it otherwise trusts, as it trusts its
//! socket messages. `docs/protocol.md` (5.13, 5.14, 9.12) is the specification.

/// HELLO feature bit: the consumer wants its frames through a ring; from the
/// producer, it offers them.
pub const FEATURE_FRAME_RING: u32 = 0x4;

/// Byte offset of the producer's count of entries written.
pub const WRITTEN_OFFSET: usize = 0;
/// Byte offset of the consumer's count of entries read.
pub const READ_OFFSET: usize = 64;
/// Byte offset of the consumer's sleep flag.
pub const SLEEPING_OFFSET: usize = 128;
/// Byte offset of the first slot.
pub const SLOTS_OFFSET: usize = 192;
/// Bytes in front of an entry's message: u64 seq, u32 len, u32 reserved.
pub const ENTRY_HEADER_LEN: usize = 16;

/// Values of `sleeping`.
pub const AWAKE: u64 = 0;
pub const SLEEPING: u64 = 1;

/// Fewest and most slots a ring may have (a power of two in between).
pub const MIN_CAPACITY: u32 = 4;
pub const MAX_CAPACITY: u32 = 4096;
/// Smallest and largest slot (a multiple of 64 in between).
pub const MIN_SLOT_LEN: u32 = 128;
pub const MAX_SLOT_LEN: u32 = 65536;
/// The rings this producer makes: as many slots as the largest grant
/// (MAX_INFLIGHT is at most 64), each large enough for a FRAME of one or
/// two memories with a video meta and a few small metas; 64 KiB in all.
pub const DEFAULT_CAPACITY: u32 = 64;
pub const DEFAULT_SLOT_LEN: u32 = 1024;

/// Whether a ring of `capacity` slots of `slot_len` bytes is allowed.
pub fn valid_geometry(capacity: u32, slot_len: u32) -> bool {
    capacity.is_power_of_two()
        && (MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity)
        && slot_len.is_multiple_of(64)
        && (MIN_SLOT_LEN..=MAX_SLOT_LEN).contains(&slot_len)
}

/// Bytes a ring needs.
pub fn ring_len(capacity: u32, slot_len: u32) -> usize {
    SLOTS_OFFSET + capacity as usize * slot_len as usize
}

/// Byte offset of the slot of entry number `index` (masked: never outside
/// the ring, whatever the index).
pub fn slot_offset(index: u64, capacity: u32, slot_len: u32) -> usize {
    SLOTS_OFFSET + (index & (u64::from(capacity) - 1)) as usize * slot_len as usize
}

/// Whether a message of `len` bytes fits in a slot; a FRAME that does not
/// goes on the socket.
pub fn fits(len: usize, slot_len: u32) -> bool {
    len + ENTRY_HEADER_LEN <= slot_len as usize
}

/// What is wrong in a ring. Found by the producer, the consumer wrote it and
/// is dropped for it; found by the consumer, the producer is faulty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingFault {
    /// The consumer's read count is ahead of what was written, or more than
    /// `capacity` behind.
    BadReadCount {
        read: u64,
        written: u64,
        capacity: u32,
    },
    /// The consumer's sleep flag is neither 0 nor 1.
    BadSleepFlag(u64),
    /// The producer's written count went back or more than `capacity` ahead.
    BadWrittenCount {
        read: u64,
        written: u64,
        capacity: u32,
    },
    /// An entry's length does not fit in its slot (or is shorter than a header).
    BadEntryLength { len: u64, slot_len: u32 },
}

impl std::fmt::Display for RingFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingFault::BadReadCount {
                read,
                written,
                capacity,
            } => write!(
                f,
                "frame ring read count {read} is not within {capacity} entries before the {written} written"
            ),
            RingFault::BadSleepFlag(v) => {
                write!(f, "frame ring sleep flag is {v}, neither 0 nor 1")
            }
            RingFault::BadWrittenCount {
                read,
                written,
                capacity,
            } => write!(
                f,
                "frame ring written count {written} is not within {capacity} entries after the {read} read"
            ),
            RingFault::BadEntryLength { len, slot_len } => write!(
                f,
                "frame ring entry of {len} bytes does not fit a slot of {slot_len}"
            ),
        }
    }
}

/// Producer side: how many more entries fit, given its own count of entries
/// written and the read count the consumer published (untrusted).
pub fn room(written: u64, read: u64, capacity: u32) -> Result<u64, RingFault> {
    match written.checked_sub(read) {
        Some(used) if used <= u64::from(capacity) => Ok(u64::from(capacity) - used),
        _ => Err(RingFault::BadReadCount {
            read,
            written,
            capacity,
        }),
    }
}

/// Producer side: whether the consumer sleeps, from the flag it published
/// (untrusted).
pub fn sleeping(flag: u64) -> Result<bool, RingFault> {
    match flag {
        AWAKE => Ok(false),
        SLEEPING => Ok(true),
        other => Err(RingFault::BadSleepFlag(other)),
    }
}

/// Consumer side: how many entries wait, given its own read count and the
/// written count the producer published.
pub fn available(read: u64, written: u64, capacity: u32) -> Result<u64, RingFault> {
    match written.checked_sub(read) {
        Some(n) if n <= u64::from(capacity) => Ok(n),
        _ => Err(RingFault::BadWrittenCount {
            read,
            written,
            capacity,
        }),
    }
}

/// Consumer side: an entry's message length as the producer wrote it, if it
/// fits its slot and can be a message at all.
pub fn entry_len(len: u64, slot_len: u32) -> Result<usize, RingFault> {
    if len >= super::HEADER_LEN as u64 && len <= u64::from(slot_len) - ENTRY_HEADER_LEN as u64 {
        Ok(len as usize)
    } else {
        Err(RingFault::BadEntryLength { len, slot_len })
    }
}

/// What the consumer takes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The oldest ring entry.
    Entry,
    /// The socket message it has already read (and kept back).
    Held,
    /// A socket message must come first: wait for the socket.
    Socket,
    /// Nothing to take: sleep until the socket, the doorbell or a wake-up.
    Sleep,
}

/// The ordering rule. `entry_seq`: the `seq` of the oldest ring entry, if
/// any; `taken`: socket messages the consumer has taken (handed on) so far;
/// `held`: whether it has read one more that it has not handed on yet (that
/// one is socket message number `taken + 1`). An entry comes before socket
/// message `taken + 1` exactly when the producer had sent at most `taken`
/// socket messages when it wrote the entry.
pub fn next(entry_seq: Option<u64>, taken: u64, held: bool) -> Next {
    match (entry_seq, held) {
        (Some(seq), _) if seq <= taken => Next::Entry,
        (_, true) => Next::Held,
        (Some(_), false) => Next::Socket,
        (None, false) => Next::Sleep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometries_are_checked_and_slots_never_leave_the_ring() {
        assert!(valid_geometry(DEFAULT_CAPACITY, DEFAULT_SLOT_LEN));
        assert!(valid_geometry(MIN_CAPACITY, MIN_SLOT_LEN));
        assert!(valid_geometry(MAX_CAPACITY, MAX_SLOT_LEN));
        for (c, s) in [
            (0, 1024),
            (3, 1024),
            (8192, 1024),
            (64, 100),
            (64, 64),
            (64, 1 << 17),
        ] {
            assert!(!valid_geometry(c, s), "{c} {s}");
        }
        assert_eq!(ring_len(64, 1024), 192 + 65536);
        assert_eq!(slot_offset(0, 64, 1024), SLOTS_OFFSET);
        assert_eq!(slot_offset(65, 64, 1024), SLOTS_OFFSET + 1024);
        for index in [u64::MAX, 1 << 63, 12345678901] {
            let off = slot_offset(index, 64, 1024);
            assert!(off >= SLOTS_OFFSET && off + 1024 <= ring_len(64, 1024));
        }
        assert!(fits(1008, 1024) && !fits(1009, 1024));
    }

    #[test]
    fn the_producer_checks_the_consumers_read_count() {
        assert_eq!(room(0, 0, 64), Ok(64));
        assert_eq!(room(70, 10, 64), Ok(4));
        assert_eq!(room(74, 10, 64), Ok(0), "full");
        // Ahead of what was written, too far behind, absurd: a fault.
        assert!(room(10, 11, 64).is_err());
        assert!(room(100, 10, 64).is_err());
        assert!(room(5, u64::MAX, 64).is_err());
        // Counters far into their range still work.
        assert_eq!(room(u64::MAX, u64::MAX - 3, 64), Ok(61));
    }

    #[test]
    fn the_sleep_flag_is_zero_or_one() {
        assert_eq!(sleeping(0), Ok(false));
        assert_eq!(sleeping(1), Ok(true));
        assert_eq!(sleeping(2), Err(RingFault::BadSleepFlag(2)));
        assert!(sleeping(u64::MAX).is_err());
    }

    #[test]
    fn the_consumer_checks_the_producers_counts_and_lengths() {
        assert_eq!(available(0, 0, 64), Ok(0));
        assert_eq!(available(10, 74, 64), Ok(64));
        assert!(available(10, 75, 64).is_err());
        assert!(available(10, 9, 64).is_err());
        assert_eq!(entry_len(8, 1024), Ok(8));
        assert_eq!(entry_len(1008, 1024), Ok(1008));
        assert!(entry_len(1009, 1024).is_err());
        assert!(entry_len(7, 1024).is_err());
        assert!(entry_len(u64::MAX, 1024).is_err());
    }

    /// The producer's order: S1 (socket), E(seq 1), E(seq 1), S2, S3, E(seq 3).
    #[test]
    fn entries_and_socket_messages_come_in_the_order_sent() {
        // Nothing read from the socket yet: the first entry (seq 1) waits.
        assert_eq!(next(Some(1), 0, false), Next::Socket);
        // S1 read and held: it comes first.
        assert_eq!(next(Some(1), 0, true), Next::Held);
        // S1 taken: both entries with seq 1.
        assert_eq!(next(Some(1), 1, false), Next::Entry);
        // The ring is empty now; S2 arrives before E(seq 3) is written.
        assert_eq!(next(None, 1, true), Next::Held);
        assert_eq!(next(None, 2, false), Next::Sleep);
        // E(seq 3) is visible before S3 was read: S3 first.
        assert_eq!(next(Some(3), 2, false), Next::Socket);
        assert_eq!(next(Some(3), 2, true), Next::Held);
        assert_eq!(next(Some(3), 3, false), Next::Entry);
        // An entry written before the held message was sent comes first.
        assert_eq!(next(Some(3), 3, true), Next::Entry);
    }
}
