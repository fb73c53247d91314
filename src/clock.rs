//! Carrying running time across processes.
//!
//! Two pipelines in two processes have different base times and maybe
//! different clocks, but CLOCK_MONOTONIC is the same for both. The sink sends
//! `running_time + base_time`, moved onto CLOCK_MONOTONIC; the src moves it
//! back onto its own clock and subtracts its own base time. When both
//! pipelines use the default system clock (which is CLOCK_MONOTONIC) the
//! conversion is exact; otherwise it is as good as one paired clock reading.

use gst::prelude::*;

/// Now on CLOCK_MONOTONIC, in ns.
///
/// Through libc, not rustix: rustix parses the vDSO itself, which crashes
/// the process under valgrind (docs/performance.md profiles with callgrind),
/// and rustix's libc backend does not build with the dma-heap crate.
pub fn monotonic_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`; CLOCK_MONOTONIC always exists on Linux.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(r, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `CLOCK_MONOTONIC - clock` in ns: 0 for a monotonic system clock.
pub fn monotonic_offset(clock: &gst::Clock) -> i128 {
    if let Some(sys) = clock.downcast_ref::<gst::SystemClock>() {
        if sys.clock_type() == gst::ClockType::Monotonic {
            return 0;
        }
    }
    let before = monotonic_now() as i128;
    let t = clock.time().nseconds() as i128;
    let after = monotonic_now() as i128;
    (before + after) / 2 - t
}

/// Maps between a pipeline's running time and CLOCK_MONOTONIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeMap {
    base_time: u64,
    offset: i128,
    /// The pipeline clock is CLOCK_MONOTONIC itself (the system clock): the
    /// map is exact. Otherwise each map pairs two clock readings, which
    /// jitters, and a clock that does not advance (a test clock) is no clock
    /// at all.
    pub exact: bool,
}

impl TimeMap {
    pub fn to_monotonic(&self, running_time: u64) -> u64 {
        (running_time as i128 + self.base_time as i128 + self.offset).clamp(0, u64::MAX as i128 - 1)
            as u64
    }

    /// Running time of a monotonic instant; instants before this pipeline's
    /// base time map to 0.
    pub fn to_running_time(&self, monotonic: u64) -> u64 {
        self.signed_running_time(monotonic)
            .clamp(0, u64::MAX as i128 - 1) as u64
    }

    /// Running time of a monotonic instant, negative before this pipeline's
    /// base time (for ordering frames; buffers get [`Self::to_running_time`]).
    pub fn signed_running_time(&self, monotonic: u64) -> i128 {
        monotonic as i128 - self.offset - self.base_time as i128
    }
}

/// A [`TimeMap`] source for one element that reads the clock's type once per
/// clock, not once per frame. A clock other than the monotonic system clock is
/// paired with CLOCK_MONOTONIC again on every call, since it may drift.
#[derive(Debug, Default)]
pub struct TimeMapCache {
    /// The clock last seen, and its offset when it is the monotonic system clock.
    clock: Option<(gst::Clock, Option<i128>)>,
}

impl TimeMapCache {
    pub fn get(&mut self, element: &gst::Element) -> Option<TimeMap> {
        let clock = element.clock()?;
        let base_time = element.base_time()?.nseconds();
        let fixed = match &self.clock {
            Some((c, fixed)) if *c == clock => *fixed,
            _ => {
                let monotonic = clock
                    .downcast_ref::<gst::SystemClock>()
                    .is_some_and(|s| s.clock_type() == gst::ClockType::Monotonic);
                let fixed = monotonic.then_some(0);
                self.clock = Some((clock.clone(), fixed));
                fixed
            }
        };
        let offset = fixed.unwrap_or_else(|| monotonic_offset(&clock));
        Some(TimeMap {
            base_time,
            offset,
            exact: fixed.is_some(),
        })
    }
}

/// A buffer time as it goes on the wire: its running time in `segment` moved onto
/// CLOCK_MONOTONIC by `map`; a time before the segment start (negative running time) becomes
/// an instant before the base time; NONE without a segment, map or time. (What bufsharesink
/// does inline; the UCX sink uses this.)
pub fn to_wire(
    segment: Option<&gst::FormattedSegment<gst::ClockTime>>,
    map: Option<TimeMap>,
    t: Option<gst::ClockTime>,
) -> u64 {
    let running = t.and_then(|t| segment?.to_running_time_full(t));
    match (running, map) {
        (Some(gst::Signed::Positive(rt)), Some(map)) => map.to_monotonic(rt.nseconds()),
        (Some(gst::Signed::Negative(before)), Some(map)) => {
            map.to_monotonic(0).saturating_sub(before.nseconds())
        }
        _ => crate::protocol::NONE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_across_two_pipelines() {
        let producer = TimeMap {
            exact: true,
            base_time: 5_000,
            offset: 0,
        };
        let consumer = TimeMap {
            exact: false,
            base_time: 3_000,
            offset: 100,
        };
        let mono = producer.to_monotonic(1_000);
        assert_eq!(mono, 6_000);
        // The consumer started 2000 ns earlier on a clock 100 ns behind.
        assert_eq!(consumer.to_running_time(mono), 2_900);
        assert_eq!(consumer.to_running_time(0), 0);
    }
}
