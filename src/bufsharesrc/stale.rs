//! Recognizes frames that waited in the socket while this consumer did not
//! read (its process was stopped, starved of CPU, or its pipeline blocked),
//! so that after such a stall it goes on with the producer's newest frames
//! instead of pushing a backlog of old ones.
//!
//! The producer caps what a consumer holds (`max-inflight`), so a stalled
//! consumer finds at most that many frames waiting, all from the moment it
//! stopped. Their age cannot be read from the timestamps alone: a producer's
//! timestamps may lag its clock and drift. So the filter follows how late
//! frames arrive relative to their timestamps (arrival minus pts, on
//! CLOCK_MONOTONIC, which the wire uses) and calls a frame stale when it
//! arrives more than [`STALE_JUMP`] (or 4 frame durations, if longer) later
//! than the last frame it let through. Drifting timestamps move that
//! reference with them. If frames keep looking stale for [`STALE_JUMP`] of
//! wall time, the shift is permanent (the producer's timestamps jumped), and
//! the filter takes the new lateness as its reference.

use std::time::{Duration, Instant};

use crate::protocol;

/// How much later than the previous frame a frame may arrive before it counts as stale.
pub const STALE_JUMP: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub struct StaleFilter {
    /// Arrival minus pts of the last frame let through, in ns.
    reference: Option<i64>,
    /// Since when frames have been dropped in a row.
    dropping_since: Option<Instant>,
}

fn monotonic_ns() -> i64 {
    crate::clock::monotonic_now() as i64
}

impl StaleFilter {
    /// Whether the frame stamped `pts` (with `duration`; both wire values,
    /// `protocol::NONE` when unknown), arriving now, is stale.
    pub fn is_stale(&mut self, pts: u64, duration: u64) -> bool {
        if pts == protocol::NONE || pts > i64::MAX as u64 {
            return false;
        }
        let lateness = monotonic_ns() - pts as i64;
        let mut jump = STALE_JUMP.as_nanos() as i64;
        if duration != protocol::NONE && duration < i64::MAX as u64 / 4 {
            jump = jump.max(4 * duration as i64);
        }
        let stale = self.reference.is_some_and(|r| lateness > r + jump);
        if stale {
            let since = *self.dropping_since.get_or_insert_with(Instant::now);
            if since.elapsed() < STALE_JUMP {
                return true;
            }
        }
        self.reference = Some(lateness);
        self.dropping_since = None;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_is_stale_and_fresh_frames_are_not() {
        let mut f = StaleFilter::default();
        let now = monotonic_ns() as u64;
        let frame = 33_333_333;
        // Frames arriving 20 ms after their time.
        assert!(!f.is_stale(now - 20_000_000, frame));
        // A frame from 10 s ago (the consumer was stopped) is stale.
        assert!(f.is_stale(now - 10_000_000_000, frame));
        assert!(f.is_stale(now - 9_990_000_000, frame));
        // A fresh frame after it is not.
        assert!(!f.is_stale(monotonic_ns() as u64 - 25_000_000, frame));
        // Unknown timestamps are never stale.
        assert!(!f.is_stale(protocol::NONE, frame));
    }

    #[test]
    fn drifting_timestamps_are_not_stale() {
        let mut f = StaleFilter::default();
        // Each frame arrives 50 ms later than the one before, relative to its pts.
        for i in 0..100u64 {
            let pts = monotonic_ns() as u64 - i * 50_000_000;
            assert!(!f.is_stale(pts, 33_333_333), "frame {i}");
        }
    }
}
