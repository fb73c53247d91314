//! The release ring's layout and index arithmetic (pure: no mapping, no I/O).
//!
//! A consumer that says [`FEATURE_RELEASE_RING`] in its HELLO gets a ring in
//! shared memory from the producer (RELEASE_RING, one sealed memfd) and
//! writes the ids of the frames it releases there instead of sending RELEASE
//! messages: the producer's streaming thread reads the ring before each
//! frame, so a release costs neither side a system call. The socket stays
//! for everything else, and for releases whenever the producer sets
//! [`FLAG_RELEASE_ON_SOCKET`] (it must see them at once: a bound on held
//! frames, or frames stopped) or the ring is full.
//!
//! Layout (little endian, every field an aligned u64 on its own cache line):
//!
//! ```text
//! offset   0  write   ids written so far; only the consumer writes it
//! offset  64  read    ids taken so far;   only the producer writes it
//! offset 128  flags   bit 0: FLAG_RELEASE_ON_SOCKET; only the producer writes it
//! offset 192  slots   `capacity` slots of 16 bytes: u64 frame id, u64 when
//!                     the consumer released it (CLOCK_MONOTONIC ns, for the
//!                     release-latency statistics only); release n is at slot
//!                     n % capacity
//! ```
//!
//! The producer never trusts what the consumer wrote: it keeps its own read
//! cursor, takes at most `capacity` ids per look ([`pending`]), masks every
//! slot index ([`slot_offset`]) and checks each id against the frames that
//! consumer holds. `docs/protocol.md` (5.12, 9.6) is the specification.

/// HELLO feature bit: the consumer can release through a ring; from the
/// producer, it offers rings.
pub const FEATURE_RELEASE_RING: u32 = 1;

/// Byte offset of the consumer's write counter.
pub const WRITE_OFFSET: usize = 0;
/// Byte offset of the producer's read counter.
pub const READ_OFFSET: usize = 64;
/// Byte offset of the producer's flags.
pub const FLAGS_OFFSET: usize = 128;
/// Byte offset of the first slot.
pub const SLOTS_OFFSET: usize = 192;
/// Bytes of a slot: the frame id, then the release time.
pub const SLOT_LEN: usize = 16;

/// Flag: send RELEASE messages on the socket, do not write the ring.
pub const FLAG_RELEASE_ON_SOCKET: u64 = 1;

/// Fewest and most slots a ring may have (a power of two in between).
pub const MIN_CAPACITY: u32 = 16;
pub const MAX_CAPACITY: u32 = 65536;
/// Slots in the rings this producer makes: more than any consumer may hold.
pub const DEFAULT_CAPACITY: u32 = 1024;

/// Whether a ring of `capacity` slots is allowed.
pub fn valid_capacity(capacity: u32) -> bool {
    capacity.is_power_of_two() && (MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity)
}

/// Bytes a ring of `capacity` slots needs.
pub fn ring_len(capacity: u32) -> usize {
    SLOTS_OFFSET + capacity as usize * SLOT_LEN
}

/// Byte offset of the slot that release number `index` goes to (its frame
/// id; the release time follows at + 8).
pub fn slot_offset(index: u64, capacity: u32) -> usize {
    SLOTS_OFFSET + (index & (u64::from(capacity) - 1)) as usize * SLOT_LEN
}

/// The release latency the producer records for a release the consumer
/// says it made at `released` (untrusted), of a frame sent at `sent`, read
/// at `now`: the consumer's time, kept within what is possible.
pub fn release_latency(sent: u64, released: u64, now: u64) -> u64 {
    released.clamp(sent, now.max(sent)) - sent
}

/// What the producer found wrong in a ring. The consumer wrote it; it is
/// dropped for it, as for a bad message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingFault {
    /// The write counter went back, or more than `capacity` ahead of what
    /// the producer has read.
    BadWriteCounter {
        read: u64,
        write: u64,
        capacity: u32,
    },
}

impl std::fmt::Display for RingFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingFault::BadWriteCounter {
                read,
                write,
                capacity,
            } => write!(
                f,
                "release ring write counter {write} is not within {capacity} slots after the producer's read counter {read}"
            ),
        }
    }
}

/// Producer side: how many ids wait, given its own read counter and the
/// write counter the consumer published.
pub fn pending(read: u64, write: u64, capacity: u32) -> Result<u64, RingFault> {
    match write.checked_sub(read) {
        Some(n) if n <= u64::from(capacity) => Ok(n),
        _ => Err(RingFault::BadWriteCounter {
            read,
            write,
            capacity,
        }),
    }
}

/// Consumer side: how many more ids fit, given its own write counter and the
/// read counter the producer published. A read counter that makes no sense
/// (ahead of what was written, or too far behind) leaves no room: the
/// consumer then sends its releases on the socket.
pub fn room(write: u64, read: u64, capacity: u32) -> u64 {
    match write.checked_sub(read) {
        Some(used) if used <= u64::from(capacity) => u64::from(capacity) - used,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_are_powers_of_two_within_the_limits() {
        assert!(valid_capacity(DEFAULT_CAPACITY));
        assert!(valid_capacity(MIN_CAPACITY) && valid_capacity(MAX_CAPACITY));
        for bad in [0, 1, 8, 1000, MAX_CAPACITY * 2, u32::MAX] {
            assert!(!valid_capacity(bad), "{bad}");
        }
        assert_eq!(ring_len(16), 192 + 256);
    }

    #[test]
    fn slots_wrap_and_never_leave_the_ring() {
        let cap = 16;
        assert_eq!(slot_offset(0, cap), SLOTS_OFFSET);
        assert_eq!(slot_offset(15, cap), SLOTS_OFFSET + 15 * 16);
        assert_eq!(slot_offset(16, cap), SLOTS_OFFSET);
        for index in [u64::MAX, u64::MAX - 1, 1 << 63, 12345678901] {
            let off = slot_offset(index, cap);
            assert!(
                off >= SLOTS_OFFSET && off + SLOT_LEN <= ring_len(cap),
                "{index}"
            );
        }
    }

    #[test]
    fn a_release_time_from_the_consumer_stays_within_what_is_possible() {
        assert_eq!(release_latency(1000, 1500, 2000), 500);
        // Before the frame was sent, or after the producer read it: clamped.
        assert_eq!(release_latency(1000, 10, 2000), 0);
        assert_eq!(release_latency(1000, u64::MAX, 2000), 1000);
        // A clock that went back on the producer's side never underflows.
        assert_eq!(release_latency(1000, 1500, 900), 0);
    }

    #[test]
    fn the_producer_takes_at_most_a_ring_of_ids() {
        assert_eq!(pending(10, 10, 16), Ok(0));
        assert_eq!(pending(10, 26, 16), Ok(16));
        assert!(pending(10, 27, 16).is_err());
        // The counter went back, or wrapped to a huge value.
        assert!(pending(10, 9, 16).is_err());
        assert!(pending(10, u64::MAX, 16).is_err());
        // Counters far into their range still work.
        assert_eq!(pending(u64::MAX - 3, u64::MAX, 16), Ok(3));
    }

    #[test]
    fn the_consumer_sees_room_only_where_the_producer_has_read() {
        assert_eq!(room(0, 0, 16), 16);
        assert_eq!(room(10, 4, 16), 10);
        assert_eq!(room(20, 4, 16), 0);
        // A read counter ahead of what was written, or absurd: no room.
        assert_eq!(room(4, 10, 16), 0);
        assert_eq!(room(100, 0, 16), 0);
    }
}
