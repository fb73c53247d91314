//! The bookkeeping behind the monitor's STATS snapshots: frame rates over an
//! interval and release latencies (time from sending a frame to its RELEASE).
//!
//! Pure: no GStreamer, no I/O, no clock of its own (callers pass times in ns).
//! The server calls it on its hot paths, so what it does per frame or per
//! release is a few integer operations on memory allocated up front:
//! [`SendTimes::note`] once per frame sent, [`SendTimes::sent_at`] and
//! [`LatencyHistogram::record`] once per frame released. Everything else
//! ([`ConsumerMeter::roll`], percentiles) runs once per interval on the I/O
//! thread.

/// How many recent frames' send times are kept. A frame released after this
/// many newer frames were sent has no latency measured (at 30 fps, 34 s).
pub const SEND_TIMES: usize = 1024;

/// Send times of the most recent frames, by frame id, in a fixed ring.
#[derive(Debug)]
pub struct SendTimes {
    /// (frame id, send time in ns); slot `id % SEND_TIMES`. Id 0 is never a
    /// frame id (bufsharesink counts from 1), so a zeroed slot is empty.
    slots: Box<[(u64, u64)]>,
}

impl Default for SendTimes {
    fn default() -> Self {
        SendTimes {
            slots: vec![(0, 0); SEND_TIMES].into_boxed_slice(),
        }
    }
}

impl SendTimes {
    /// Frame `id` went out at `now` (ns).
    pub fn note(&mut self, id: u64, now: u64) {
        self.slots[(id % SEND_TIMES as u64) as usize] = (id, now);
    }

    /// When frame `id` went out, if it is still in the ring.
    pub fn sent_at(&self, id: u64) -> Option<u64> {
        let (slot_id, t) = self.slots[(id % SEND_TIMES as u64) as usize];
        (slot_id == id && id != 0).then_some(t)
    }
}

/// Linear buckets for the smallest values (one per ns below this).
const LINEAR: usize = 16;
/// Sub-buckets per power of two above the linear range: 8, so a bucket is at
/// most 1/8 of its lower bound wide (a reported value is within 6.25%).
const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
/// Values of 2^MAX_EXP ns (about 18 minutes) and more share the last bucket.
const MAX_EXP: u32 = 40;
const BUCKETS: usize = LINEAR + (MAX_EXP as usize - 4) * SUB;

/// A fixed log-scale histogram of latencies in ns, for percentiles over an
/// interval. Recording is O(1) and never allocates; clearing is a memset.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    counts: Box<[u32]>,
    total: u32,
    min: u64,
    max: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

/// The bucket of `v` ns.
fn bucket(v: u64) -> usize {
    if v < LINEAR as u64 {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= 4
    if exp >= MAX_EXP {
        return BUCKETS - 1;
    }
    let sub = ((v >> (exp - SUB_BITS)) as usize) & (SUB - 1);
    LINEAR + (exp as usize - 4) * SUB + sub
}

/// The smallest value of bucket `b`, and its width.
fn bucket_range(b: usize) -> (u64, u64) {
    if b < LINEAR {
        return (b as u64, 1);
    }
    let exp = ((b - LINEAR) / SUB) as u32 + 4;
    let sub = ((b - LINEAR) % SUB) as u64;
    let width = 1u64 << (exp - SUB_BITS);
    ((1u64 << exp) + sub * width, width)
}

impl LatencyHistogram {
    pub fn record(&mut self, ns: u64) {
        self.counts[bucket(ns)] += 1;
        self.total = self.total.saturating_add(1);
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    /// Samples recorded since the last clear.
    pub fn count(&self) -> u32 {
        self.total
    }

    /// The `permille`/1000 quantile (nearest rank: the smallest recorded value
    /// with at least that share of samples at or below it), as the middle of
    /// its bucket, kept within the smallest and largest values recorded; the
    /// first and last ranks are the exact smallest and largest values.
    /// None when nothing was recorded.
    pub fn quantile(&self, permille: u32) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let total = self.total as u64;
        let rank = (total * permille.min(1000) as u64).div_ceil(1000).max(1);
        // The extremes are known exactly.
        if rank == 1 {
            return Some(self.min);
        }
        if rank >= total {
            return Some(self.max);
        }
        let mut seen = 0u64;
        for (b, &n) in self.counts.iter().enumerate() {
            seen += n as u64;
            if seen >= rank {
                let (low, width) = bucket_range(b);
                return Some((low + width / 2).clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    pub fn clear(&mut self) {
        if self.total > 0 {
            self.counts.fill(0);
        }
        self.total = 0;
        self.min = u64::MAX;
        self.max = 0;
    }
}

/// Frames per second times 1000, from `frames` in `interval_ns`.
pub fn rate_milli(frames: u64, interval_ns: u64) -> u32 {
    if interval_ns == 0 {
        return 0;
    }
    let r = frames as u128 * 1_000_000_000_000 / interval_ns as u128;
    r.min(u32::MAX as u128) as u32
}

/// What one interval measured for a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConsumerWindow {
    pub fps_milli: u32,
    pub releases: u32,
    /// ns, or None without releases.
    pub p50: Option<u64>,
    pub p99: Option<u64>,
}

/// A consumer's measurements: the interval being measured and the last one
/// completed (what snapshots report).
#[derive(Debug, Default)]
pub struct ConsumerMeter {
    latencies: LatencyHistogram,
    /// Its frames-sent counter when the current interval started; None
    /// before its first interval (it connected during this one).
    frames_at_start: Option<u64>,
    pub last: ConsumerWindow,
}

impl ConsumerMeter {
    /// A frame it held was released `latency_ns` after it was sent.
    pub fn released(&mut self, latency_ns: u64) {
        self.latencies.record(latency_ns);
    }

    /// Ends the interval of `interval_ns` in which its frames-sent counter
    /// reached `frames_sent`, and starts the next one. A consumer that
    /// connected during the interval is measured from the next one on.
    pub fn roll(&mut self, frames_sent: u64, interval_ns: u64) {
        let fps_milli = match self.frames_at_start {
            Some(start) => rate_milli(frames_sent.saturating_sub(start), interval_ns),
            None => 0,
        };
        self.last = ConsumerWindow {
            fps_milli,
            releases: self.latencies.count(),
            p50: self.latencies.quantile(500),
            p99: self.latencies.quantile(990),
        };
        self.latencies.clear();
        self.frames_at_start = Some(frames_sent);
    }
}

/// The producer's frame rate, measured in intervals of at least `period`.
#[derive(Debug)]
pub struct ProducerMeter {
    period: u64,
    /// When the current interval started (ns) and the frame count then.
    start: Option<(u64, u64)>,
    /// Length of the last completed interval (ns); 0: none yet.
    pub last_interval: u64,
    pub last_fps_milli: u32,
}

impl ProducerMeter {
    pub fn new(period_ns: u64) -> Self {
        ProducerMeter {
            period: period_ns.max(1),
            start: None,
            last_interval: 0,
            last_fps_milli: 0,
        }
    }

    /// ns until the current interval is due to end (0: now).
    pub fn until_due(&self, now: u64) -> u64 {
        match self.start {
            Some((t, _)) => (t + self.period).saturating_sub(now),
            None => 0,
        }
    }

    /// At `now`, with `frames` rendered so far: Some(interval length) when an
    /// interval just ended (the caller then rolls its consumers with it),
    /// None when it is not due yet. The first call only starts an interval.
    pub fn tick(&mut self, now: u64, frames: u64) -> Option<u64> {
        let Some((start, start_frames)) = self.start else {
            self.start = Some((now, frames));
            return None;
        };
        let interval = now.saturating_sub(start);
        if interval < self.period {
            return None;
        }
        self.last_interval = interval;
        self.last_fps_milli = rate_milli(frames.saturating_sub(start_frames), interval);
        self.start = Some((now, frames));
        Some(interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn buckets_are_ordered_and_cover_every_value() {
        let mut last = 0;
        for v in (0..5000u64)
            .chain((13..64).map(|e| 1u64 << e))
            .chain([u64::MAX])
        {
            let b = bucket(v);
            assert!(b >= last, "bucket of {v} goes back");
            assert!(b < BUCKETS);
            last = b;
            let (low, width) = bucket_range(b);
            if b < BUCKETS - 1 {
                assert!(
                    low <= v && v < low + width,
                    "{v} not in bucket {b} [{low}, +{width})"
                );
                // At most 1/8 of the value wide: quantiles within 6.25%.
                assert!(width <= (low / 8).max(1));
            }
        }
    }

    #[test]
    fn quantiles_of_known_samples() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile(500), None);
        // One sample: exact, whatever its bucket.
        h.record(3 * MS + 12_345);
        assert_eq!(h.quantile(500), Some(3 * MS + 12_345));
        assert_eq!(h.quantile(990), Some(3 * MS + 12_345));
        h.clear();
        // 1..=100 ms: the median near 50 ms, the 99th percentile near 99 ms.
        for i in 1..=100 {
            h.record(i * MS);
        }
        assert_eq!(h.count(), 100);
        let near = |got: Option<u64>, want: u64| {
            let got = got.unwrap();
            assert!(
                got.abs_diff(want) * 16 <= want,
                "{got} not within 6.25% of {want}"
            );
        };
        near(h.quantile(500), 50 * MS);
        near(h.quantile(990), 99 * MS);
        assert_eq!(h.quantile(1000), Some(100 * MS));
        assert_eq!(h.quantile(0), Some(MS));
        // 99 fast releases and one slow: p50 fast, p99 still fast, max slow.
        h.clear();
        for _ in 0..99 {
            h.record(2 * MS);
        }
        h.record(900 * MS);
        near(h.quantile(500), 2 * MS);
        near(h.quantile(990), 2 * MS);
        near(h.quantile(1000), 900 * MS);
        // 98 fast and two slow: the 99th percentile is slow.
        h.clear();
        for _ in 0..98 {
            h.record(2 * MS);
        }
        h.record(900 * MS);
        h.record(900 * MS);
        near(h.quantile(990), 900 * MS);
    }

    #[test]
    fn extreme_latencies_do_not_overflow() {
        let mut h = LatencyHistogram::default();
        h.record(0);
        h.record(u64::MAX);
        assert_eq!(h.quantile(0), Some(0));
        assert_eq!(h.quantile(1000), Some(u64::MAX));
        h.clear();
        assert_eq!((h.count(), h.quantile(500)), (0, None));
    }

    #[test]
    fn send_times_keep_the_recent_frames() {
        let mut t = SendTimes::default();
        assert_eq!(t.sent_at(0), None, "id 0 is never a frame");
        assert_eq!(t.sent_at(5), None);
        for id in 1..=2000u64 {
            t.note(id, id * 10);
        }
        assert_eq!(t.sent_at(2000), Some(20_000));
        assert_eq!(
            t.sent_at(2000 - SEND_TIMES as u64 + 1),
            Some((2001 - SEND_TIMES as u64) * 10)
        );
        // Overwritten by a newer frame in the same slot.
        assert_eq!(t.sent_at(2000 - SEND_TIMES as u64), None);
        assert_eq!(t.sent_at(3000), None);
    }

    #[test]
    fn rates() {
        assert_eq!(rate_milli(30, 1_000_000_000), 30_000);
        assert_eq!(rate_milli(45, 1_500_000_000), 30_000);
        assert_eq!(rate_milli(1, 3_000_000_000), 333);
        assert_eq!(rate_milli(5, 0), 0);
        assert_eq!(rate_milli(u64::MAX, 1), u32::MAX);
    }

    #[test]
    fn consumer_meter_rolls_intervals() {
        let mut m = ConsumerMeter::default();
        // Joined mid-interval: no rate for that one.
        m.released(5 * MS);
        m.roll(10, 1_000_000_000);
        assert_eq!(m.last.fps_milli, 0);
        assert_eq!((m.last.releases, m.last.p50), (1, Some(5 * MS)));
        // A full interval: 30 frames, 3 releases.
        for l in [1, 2, 3] {
            m.released(l * MS);
        }
        m.roll(40, 1_000_000_000);
        assert_eq!(m.last.fps_milli, 30_000);
        assert_eq!(m.last.releases, 3);
        let p50 = m.last.p50.unwrap();
        assert!(p50.abs_diff(2 * MS) * 16 <= 2 * MS, "{p50}");
        assert_eq!(m.last.p99, Some(3 * MS));
        // Nothing released: no latencies.
        m.roll(40, 2_000_000_000);
        assert_eq!(m.last, ConsumerWindow::default());
    }

    #[test]
    fn producer_meter_measures_whole_intervals() {
        let s = 1_000_000_000;
        let mut p = ProducerMeter::new(s);
        assert_eq!(p.until_due(0), 0);
        assert_eq!(p.tick(100, 0), None, "the first tick starts an interval");
        assert_eq!(p.until_due(100 + s / 2), s / 2);
        assert_eq!(p.tick(100 + s / 2, 15), None);
        assert_eq!((p.last_interval, p.last_fps_milli), (0, 0));
        // Late by half a period: the rate uses the real length.
        assert_eq!(p.tick(100 + 3 * s / 2, 45), Some(3 * s / 2));
        assert_eq!(p.last_fps_milli, 30_000);
        assert_eq!(p.until_due(100 + 3 * s / 2), s);
    }
}
