//! Part 1, fan-out: transport CPU per frame per consumer, and latency, of
//! every transport at 320x240 (60 fps) and 1080p (30 fps), with 1, 3, (4 at
//! 1080p) and 8 consumers, against the targets of issue 9.
//!
//! Method:
//!
//! - Each run is one live producer and `n` consumer processes (scenarios.rs),
//!   measured inside the start/stop window after the warm-up, so the
//!   processes' start-up does not count.
//! - Transport CPU per frame per consumer = (CPU of all processes / frames
//!   produced - CPU of the producer alone / frames it produced) / n, where
//!   "the producer alone" is the same pipeline with the same sink element and
//!   no consumer (n = 0), measured in the same round. Each sink proposes its
//!   own memory to the source (bufsharesink and unixfdsink memfds, shmsink
//!   none), so a `source ! fakesink` baseline would credit the transport with
//!   how fast the source fills *its* memory; only the tee, whose memory is the
//!   source's own, has `source ! fakesink` as its baseline.
//! - Rounds are interleaved: round 1 runs every size x consumer count x
//!   transport once (the baselines first), then round 2, ..., so slow drifts
//!   of a shared machine hit all transports alike. A row shows the median
//!   over rounds and the min-max.
//! - Beside it, the consumer processes' own CPU per frame and consumer: the
//!   part that does not depend on the producer's baseline, whose CPU per
//!   frame (mostly the source filling frames, 1-5 ms at 1080p) varies
//!   between runs by more than a consumer costs when the machine is busy.
//! - Latency: from the producer's sink rendering a frame to a consumer's
//!   source pad pushing it (roles.rs), all samples of all consumers and
//!   rounds pooled, p50 and p99.
//! - Frames lost: a consumer that got notably fewer frames than were produced
//!   in its run (more than `LOSS_FRAMES` and `LOSS_FRACTION`) is flagged.
//!
//! Targets (printed as met/missed): bufshare at most 0.8x shm and 0.5x unixfd
//! at both sizes with 1, 3 and 8 consumers; bufshare p99 latency under 300 µs
//! at 1080p30 with 4 consumers.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::measure::{median, percentile};
use crate::scenarios::{self, Context, Outcome, Size, Transport, FANOUT_SIZES};
use crate::wakefloor;

/// Consumer counts the CPU targets are judged at.
const TARGET_COUNTS: [usize; 3] = [1, 3, 8];
/// bufshare transport CPU at most this times shm's ...
const SHM_LIMIT: f64 = 0.8;
/// ... and this times unixfd's.
const UNIXFD_LIMIT: f64 = 0.5;
/// The latency target: p99 under this at 1080p30 with `LATENCY_COUNT` consumers.
const LATENCY_LIMIT_US: f64 = 300.0;
pub const LATENCY_COUNT: usize = 4;
/// The frame rate of the latency target (1080p30), for the wake-up floor.
const FLOOR_FPS: u32 = 30;
/// A consumer that received fewer than produced minus both of these lost frames.
const LOSS_FRAMES: u64 = 3;
const LOSS_FRACTION: f64 = 0.01;

/// Consumer counts measured at `size` (besides the baseline, 0).
pub fn consumer_counts(size: Size, quick: bool) -> Vec<usize> {
    let large = size.height >= 1080;
    match (quick, large) {
        (false, false) => vec![1, 3, 8],
        (false, true) => vec![1, 3, LATENCY_COUNT, 8],
        (true, false) => vec![1, 3],
        (true, true) => vec![LATENCY_COUNT],
    }
}

/// What part 1 measures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub rounds: usize,
    pub quick: bool,
    /// Transports asked for, in table order.
    pub transports: Vec<Transport>,
    /// Transports that cannot be measured here, and why (shown in their rows).
    pub unavailable: BTreeMap<Transport, String>,
}

impl Settings {
    fn measured(&self) -> Vec<Transport> {
        self.transports
            .iter()
            .copied()
            .filter(|t| !self.unavailable.contains_key(t))
            .collect()
    }

    /// Number of runs (each `seconds` + warm-up + start/stop).
    pub fn runs(&self) -> usize {
        let per_round: usize = FANOUT_SIZES
            .iter()
            .map(|&s| 1 + consumer_counts(s, self.quick).len())
            .sum();
        per_round * self.measured().len() * self.rounds
    }
}

/// One clean run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    produced: u64,
    received: Vec<u64>,
    cpu_ns: u64,
    /// CPU of the consumer processes alone (0 for the tee: one process).
    consumers_cpu_ns: u64,
    window_ns: u64,
    latencies_ns: Vec<u64>,
}

impl Sample {
    fn from_outcome(outcome: &Outcome) -> Option<Sample> {
        let producer = outcome.reports.iter().find(|r| r.count("produced") > 0)?;
        let consumers_cpu_ns = outcome
            .reports
            .iter()
            .filter(|r| r.count("produced") == 0)
            .map(|r| r.cpu_ns)
            .sum();
        Some(Sample {
            produced: producer.count("produced"),
            received: outcome
                .reports
                .iter()
                .flat_map(|r| r.reader_counts())
                .collect(),
            cpu_ns: outcome.cpu_ns(),
            consumers_cpu_ns,
            window_ns: producer.window_ns,
            latencies_ns: outcome
                .reports
                .iter()
                .flat_map(|r| r.latencies_ns.iter().copied())
                .collect(),
        })
    }

    fn cpu_per_frame_ns(&self) -> f64 {
        self.cpu_ns as f64 / self.produced as f64
    }

    fn cpu_pct(&self) -> f64 {
        100.0 * self.cpu_ns as f64 / self.window_ns.max(1) as f64
    }

    /// Frames the worst consumer missed, if notably many.
    fn lost(&self) -> Option<u64> {
        let min = self.received.iter().min().copied()?;
        let lost = self.produced.saturating_sub(min);
        (lost > LOSS_FRAMES && lost as f64 > LOSS_FRACTION * self.produced as f64).then_some(lost)
    }
}

/// (index in `Results::sizes`, transport, consumers); consumers 0 = baseline.
type Key = (usize, Transport, usize);

/// All runs of part 1: per key, one entry per round (None: the run failed).
pub struct Results {
    rounds: usize,
    /// The sizes measured; keys index into it.
    sizes: Vec<Size>,
    samples: BTreeMap<Key, Vec<Option<Sample>>>,
    /// The machine's wake-up floor (wakefloor.rs), every round pooled, ns,
    /// ascending; empty when not measured.
    wake_floor_ns: Vec<u64>,
}

impl Results {
    pub fn rounds(&self) -> usize {
        self.rounds
    }

    pub fn sizes(&self) -> &[Size] {
        &self.sizes
    }

    /// Transports with runs (failed or not), in table order.
    pub fn transports(&self) -> Vec<Transport> {
        Transport::ALL
            .into_iter()
            .filter(|t| self.samples.keys().any(|k| k.1 == *t))
            .collect()
    }

    /// Consumer counts (not the baseline) run at size `si`, of any transport.
    pub fn consumer_counts(&self, si: usize) -> Vec<usize> {
        let mut counts: Vec<usize> = self
            .samples
            .keys()
            .filter(|k| k.0 == si && k.2 > 0)
            .map(|k| k.2)
            .collect();
        counts.sort_unstable();
        counts.dedup();
        counts
    }

    fn rounds_of(&self, key: Key) -> impl Iterator<Item = Option<&Sample>> + '_ {
        let v = self.samples.get(&key);
        (0..self.rounds).map(move |r| v.and_then(|v| v.get(r)).and_then(Option::as_ref))
    }

    /// Transport CPU per frame per consumer, ns, of round `round`.
    fn figure(&self, key: Key, round: usize) -> Option<f64> {
        let (size, transport, n) = key;
        let sample = self.rounds_of(key).nth(round)??;
        let base = self.rounds_of((size, transport, 0)).nth(round)??;
        (n > 0).then(|| (sample.cpu_per_frame_ns() - base.cpu_per_frame_ns()) / n as f64)
    }

    /// Figures of all rounds that have one.
    pub fn figures(&self, key: Key) -> Vec<f64> {
        (0..self.rounds)
            .filter_map(|r| self.figure(key, r))
            .collect()
    }

    /// Median over rounds of the transport CPU per frame per consumer, ns.
    pub fn median_figure(&self, key: Key) -> Option<f64> {
        median(&self.figures(key))
    }

    /// Pooled latency samples of all rounds, sorted.
    pub fn latencies(&self, key: Key) -> Vec<u64> {
        let mut lat: Vec<u64> = self
            .rounds_of(key)
            .flatten()
            .flat_map(|s| s.latencies_ns.iter().copied())
            .collect();
        lat.sort_unstable();
        lat
    }
}

/// Runs every round; errors of failed runs go to `errors`.
pub fn run(ctx: &Context, settings: &Settings, errors: &mut Vec<String>) -> Results {
    let transports = settings.measured();
    let mut results = Results {
        rounds: settings.rounds,
        sizes: FANOUT_SIZES.to_vec(),
        samples: BTreeMap::new(),
        wake_floor_ns: Vec::new(),
    };
    let total = settings.runs();
    let mut done = 0;
    for round in 0..settings.rounds {
        for (si, &size) in FANOUT_SIZES.iter().enumerate() {
            let counts = std::iter::once(0).chain(consumer_counts(size, settings.quick));
            for n in counts {
                for &transport in &transports {
                    done += 1;
                    let what = format!(
                        "round {}/{}: {} {} x{n}",
                        round + 1,
                        settings.rounds,
                        size.name(),
                        transport.name()
                    );
                    eprint!("part 1 [{done}/{total}] {what} ({} s)...", ctx.seconds);
                    let outcome = scenarios::fanout(ctx, transport, size, n, round);
                    let found = outcome.all_errors();
                    let sample = if found.is_empty() {
                        Sample::from_outcome(&outcome)
                    } else {
                        None
                    };
                    for e in &found {
                        errors.push(format!("{what}: {e}"));
                    }
                    let key = (si, transport, n);
                    results
                        .samples
                        .entry(key)
                        .or_insert_with(|| (0..settings.rounds).map(|_| None).collect())[round] =
                        sample;
                    eprintln!("{}", progress_note(&results, key, round));
                }
            }
        }
        eprint!(
            "part 1 round {}/{}: wake-up floor, {LATENCY_COUNT} processes at {FLOOR_FPS} fps ({} s)...",
            round + 1,
            settings.rounds,
            ctx.seconds
        );
        match wakefloor::measure(LATENCY_COUNT, FLOOR_FPS, ctx.seconds) {
            Ok(samples) => {
                eprintln!(
                    " p99 {} µs",
                    percentile(&samples, 99.0).map_or(0, |p| p / 1000)
                );
                results.wake_floor_ns.extend(samples);
            }
            Err(e) => {
                eprintln!(" failed");
                errors.push(format!("wake-up floor, round {}: {e}", round + 1));
            }
        }
    }
    results.wake_floor_ns.sort_unstable();
    results
}

/// What a run gave, for the progress lines on stderr.
fn progress_note(results: &Results, key: Key, round: usize) -> String {
    let Some(sample) = results.rounds_of(key).nth(round).flatten() else {
        return " failed".into();
    };
    let mut note = format!(
        " {} frames, {:.0} µs/frame all processes",
        sample.produced,
        sample.cpu_per_frame_ns() / 1e3
    );
    if let Some(f) = results.figure(key, round) {
        let _ = write!(note, ", transport {:.0} µs/frame/consumer", f / 1e3);
    }
    if let Some(lost) = sample.lost() {
        let _ = write!(note, ", a consumer lost {lost} frames");
    }
    note
}

fn fmt_us(ns: f64) -> String {
    format!("{:.0}", ns / 1e3)
}

/// The ratio of two transports' median figures at `key`'s size and count.
fn ratio(results: &Results, key: Key, other: Transport) -> Result<f64, &'static str> {
    let (size, _, n) = key;
    let mine = results.median_figure(key).ok_or("not measured")?;
    let theirs = results
        .median_figure((size, other, n))
        .ok_or("not measured")?;
    // A figure <= 0 is the baselines' noise, not a transport that costs nothing.
    if theirs <= 0.0 {
        return Err("denominator <= 0");
    }
    if mine <= 0.0 {
        return Err("numerator <= 0");
    }
    Ok(mine / theirs)
}

/// Part 1's tables and target lines, markdown.
pub fn report(results: &Results, settings: &Settings) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Part 1: fan-out, live NV12 producer, {} round(s)\n",
        results.rounds
    );
    for (si, &size) in results.sizes.iter().enumerate() {
        size_table(&mut out, results, settings, si, size);
    }
    let _ = writeln!(
        out,
        "Transport µs/frame/consumer = (CPU of all processes / frames produced - CPU of the \
         producer with the same sink and no consumer / frames it produced, same round) / \
         consumers; median of rounds (min-max over rounds). CPU %: all processes, of one CPU. \
         Latency: from the render (the frame leaving the producer's `identity sync=true` for \
         the sink, after its clock wait) to the consumer's source pad, all consumers and \
         rounds pooled. Ratios: of the medians. \"Of which the consumer \
         process\": CPU of the consumer processes alone per frame and consumer (median of \
         rounds); the rest is what the producer spends beyond its baseline. A consumer \
         process that wakes once a frame has a floor of its own whatever the transport \
         (docs/performance.md). The producer's own \
         CPU per frame (the baseline, mostly the source filling frames) can vary between runs \
         by more than one consumer costs on a loaded machine: compare the min-max over \
         rounds, and trust rows with more consumers more.\n"
    );
    let _ = writeln!(out, "### Targets (issue 9)\n");
    let _ = writeln!(
        out,
        "- {}",
        ratio_target(results, settings, Transport::Shm, SHM_LIMIT)
    );
    let _ = writeln!(
        out,
        "- {}",
        ratio_target(results, settings, Transport::Unixfd, UNIXFD_LIMIT)
    );
    let _ = writeln!(out, "- {}", latency_target(results, settings));
    let _ = writeln!(out, "- {}\n", wake_floor_line(results));
    out
}

/// The machine's wake-up floor next to the transports' p99 at the latency
/// target's count: what no transport can go below on this machine.
fn wake_floor_line(results: &Results) -> String {
    let head = format!(
        "wake-up floor of this machine, same run: {LATENCY_COUNT} bare processes woken \
         through a pipe at {FLOOR_FPS} fps (no GStreamer, no transport)"
    );
    let floor = &results.wake_floor_ns;
    let (Some(p50), Some(p99)) = (percentile(floor, 50.0), percentile(floor, 99.0)) else {
        return format!("{head}: not measured");
    };
    let mut line = format!(
        "{head}: p50 {} µs, p99 {} µs, {} wake-ups",
        p50 / 1000,
        p99 / 1000,
        floor.len()
    );
    let at_target: Vec<String> = results
        .sizes
        .iter()
        .position(|s| s.height == 1080)
        .map(|si| {
            Transport::ALL
                .into_iter()
                .filter_map(|t| {
                    let lat = results.latencies((si, t, LATENCY_COUNT));
                    percentile(&lat, 99.0).map(|p| format!("{} {} µs", t.name(), p / 1000))
                })
                .collect()
        })
        .unwrap_or_default();
    if !at_target.is_empty() {
        let _ = write!(
            line,
            "; p99 render -> push at 1080p30 x{LATENCY_COUNT}: {}",
            at_target.join(", ")
        );
    }
    line
}

fn size_table(out: &mut String, results: &Results, settings: &Settings, si: usize, size: Size) {
    let _ = writeln!(out, "### {} NV12 at {} fps\n", size.name(), size.fps);
    let mut bases = Vec::new();
    for &t in &settings.transports {
        if settings.unavailable.contains_key(&t) {
            continue;
        }
        let key = (si, t, 0);
        let per_frame: Vec<f64> = results
            .rounds_of(key)
            .flatten()
            .map(Sample::cpu_per_frame_ns)
            .collect();
        let pct: Vec<f64> = results
            .rounds_of(key)
            .flatten()
            .map(Sample::cpu_pct)
            .collect();
        bases.push(match (median(&per_frame), median(&pct)) {
            (Some(f), Some(p)) => format!("{} {} µs/frame ({p:.1} % CPU)", t.name(), fmt_us(f)),
            _ => format!("{} failed", t.name()),
        });
    }
    if !bases.is_empty() {
        let _ = writeln!(
            out,
            "Baselines, the producer with the same sink and no consumer (tee: `fakesink`), \
             median of rounds: {}.\n",
            bases.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "| transport | consumers | frames produced | frames per consumer (min-max) | CPU % \
         | transport µs/frame/consumer, median (min-max) | of which the consumer process \
         | latency p50 µs | p99 µs | ratio to shm | ratio to unixfd |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for &t in &settings.transports {
        if let Some(why) = settings.unavailable.get(&t) {
            let _ = writeln!(
                out,
                "| {} | - | {why} | - | - | - | - | - | - | - | n/a |",
                t.name()
            );
            continue;
        }
        for n in consumer_counts(size, settings.quick) {
            let _ = writeln!(out, "{}", row(results, settings, (si, t, n)));
        }
    }
    let _ = writeln!(out);
}

fn row(results: &Results, settings: &Settings, key: Key) -> String {
    let (_, transport, n) = key;
    let samples: Vec<&Sample> = results.rounds_of(key).flatten().collect();
    let failed = results.rounds - samples.len();
    let name = if failed > 0 {
        format!(
            "{} (failed in {failed} of {} rounds)",
            transport.name(),
            results.rounds
        )
    } else {
        transport.name().to_string()
    };
    if samples.is_empty() {
        return format!("| {name} | {n} | - | - | - | - | - | - | - | - | - |");
    }
    let produced: Vec<f64> = samples.iter().map(|s| s.produced as f64).collect();
    let produced = median(&produced).unwrap_or(0.0);
    let received = samples.iter().flat_map(|s| s.received.iter().copied());
    let (min, max) = (
        received.clone().min().unwrap_or(0),
        received.max().unwrap_or(0),
    );
    let mut per_consumer = format!("{min}-{max}");
    let lost: Vec<u64> = samples.iter().filter_map(|s| s.lost()).collect();
    if let Some(worst) = lost.iter().max() {
        let _ = write!(
            per_consumer,
            " **LOST up to {worst} ({} of {} runs)**",
            lost.len(),
            samples.len()
        );
    }
    let cpu: Vec<f64> = samples.iter().map(|s| s.cpu_pct()).collect();
    let cpu = median(&cpu).unwrap_or(0.0);
    let figures = results.figures(key);
    let figure = match median(&figures) {
        Some(m) if figures.len() > 1 => {
            let lo = figures.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = figures.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{} ({}-{})", fmt_us(m), fmt_us(lo), fmt_us(hi))
        }
        Some(m) => fmt_us(m),
        None => "- (no baseline)".into(),
    };
    // The consumer processes' own share: no source filling frames, so much less noisy.
    let own: Vec<f64> = samples
        .iter()
        .map(|s| s.consumers_cpu_ns as f64 / s.produced as f64 / n as f64)
        .collect();
    let own = match median(&own) {
        Some(m) if transport != Transport::Tee => fmt_us(m),
        _ => "-".into(),
    };
    let lat = results.latencies(key);
    let pct = |p| {
        percentile(&lat, p)
            .map(|v| fmt_us(v as f64))
            .unwrap_or_else(|| "-".into())
    };
    let ratio_to = |other: Transport| -> String {
        if transport == Transport::Tee {
            return "-".into();
        }
        if let Some(_why) = settings.unavailable.get(&other) {
            return "n/a".into();
        }
        if !settings.transports.contains(&other) {
            return "-".into();
        }
        match ratio(results, key, other) {
            Ok(r) => format!("{r:.2}"),
            Err(_) => "n/a".into(),
        }
    };
    format!(
        "| {name} | {n} | {produced:.0} | {per_consumer} | {cpu:.1} | {figure} | {own} | {} | {} | {} | {} |",
        pct(50.0),
        pct(99.0),
        ratio_to(Transport::Shm),
        ratio_to(Transport::Unixfd)
    )
}

/// "bufshare at most LIMITx OTHER at both sizes, 1/3/8 consumers: met/missed".
fn ratio_target(results: &Results, settings: &Settings, other: Transport, limit: f64) -> String {
    let sizes: Vec<String> = results.sizes.iter().map(|s| s.short()).collect();
    let counts: Vec<String> = TARGET_COUNTS.iter().map(usize::to_string).collect();
    let head = format!(
        "bufshare {limit}x {} at {}, {} consumers",
        other.name(),
        sizes.join("/"),
        counts.join("/")
    );
    let unmeasured = [Transport::Bufshare, other]
        .into_iter()
        .find(|t| !settings.transports.contains(t) || settings.unavailable.contains_key(t));
    if let Some(t) = unmeasured {
        let why = settings
            .unavailable
            .get(&t)
            .map(String::as_str)
            .unwrap_or("not asked for (--only)");
        return format!("{head}: n/a ({} {why})", t.name());
    }
    let mut worst: Option<(f64, String)> = None;
    let mut missing = Vec::new();
    let mut total = 0;
    for (si, size) in results.sizes.iter().enumerate() {
        for &n in &TARGET_COUNTS {
            total += 1;
            let at = format!("{} x{n}", size.short());
            match ratio(results, (si, Transport::Bufshare, n), other) {
                Ok(r) => {
                    if worst.as_ref().is_none_or(|(w, _)| r > *w) {
                        worst = Some((r, at));
                    }
                }
                Err(why) => missing.push(format!("{at} ({why})")),
            }
        }
    }
    let Some((w, at)) = worst else {
        return format!("{head}: not measured");
    };
    let verdict = if w > limit {
        "missed"
    } else if missing.is_empty() {
        "met"
    } else {
        "not determined"
    };
    let mut line = format!("{head}: {verdict} (worst ratio {w:.2}, at {at})");
    if !missing.is_empty() {
        let _ = write!(
            line,
            "; {} of {total} rows without a ratio: {}",
            missing.len(),
            missing.join(", ")
        );
    }
    line
}

/// "p99 latency 1080p30 4 consumers: N µs (target 300): met/missed".
fn latency_target(results: &Results, settings: &Settings) -> String {
    let head = format!("bufshare p99 latency 1080p30 {LATENCY_COUNT} consumers");
    let Some(si) = results.sizes.iter().position(|s| s.height == 1080) else {
        return format!("{head}: not measured");
    };
    if let Some(why) = settings.unavailable.get(&Transport::Bufshare) {
        return format!("{head}: n/a ({why})");
    }
    let lat = results.latencies((si, Transport::Bufshare, LATENCY_COUNT));
    match percentile(&lat, 99.0) {
        None => format!("{head}: not measured"),
        Some(p99) => {
            let us = p99 as f64 / 1e3;
            let verdict = if us < LATENCY_LIMIT_US {
                "met"
            } else {
                "missed"
            };
            format!("{head}: {us:.0} µs (target {LATENCY_LIMIT_US:.0}): {verdict}")
        }
    }
}

/// Part 1 as results.json keeps it: what was asked for and every run's
/// sample, so that the report and the charts can be made again without
/// measuring (`--plot-from`).
#[derive(Serialize, Deserialize)]
pub struct Saved {
    pub settings: Settings,
    pub rounds: usize,
    /// One entry per size, transport and consumer count (0: the baseline).
    pub runs: Vec<SavedRuns>,
    /// The wake-up floor's samples, ns (absent in older results).
    #[serde(default)]
    pub wake_floor_ns: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
pub struct SavedRuns {
    pub size: Size,
    pub transport: Transport,
    pub consumers: usize,
    /// One entry per round; null where the run failed.
    pub rounds: Vec<Option<Sample>>,
}

impl Saved {
    pub fn new(results: &Results, settings: &Settings) -> Saved {
        Saved {
            settings: settings.clone(),
            rounds: results.rounds,
            runs: results
                .samples
                .iter()
                .map(|(&(si, transport, consumers), rounds)| SavedRuns {
                    size: results.sizes[si],
                    transport,
                    consumers,
                    rounds: rounds.clone(),
                })
                .collect(),
            wake_floor_ns: results.wake_floor_ns.clone(),
        }
    }

    /// The results and settings again; sizes in order of first appearance.
    pub fn restore(&self) -> Result<(Results, Settings), String> {
        let mut results = Results {
            rounds: self.rounds,
            sizes: Vec::new(),
            samples: BTreeMap::new(),
            wake_floor_ns: self.wake_floor_ns.clone(),
        };
        for run in &self.runs {
            if run.rounds.len() != self.rounds {
                return Err(format!(
                    "part 1, {} {} x{}: {} rounds saved, {} expected",
                    run.size.name(),
                    run.transport.name(),
                    run.consumers,
                    run.rounds.len(),
                    self.rounds
                ));
            }
            let si = match results.sizes.iter().position(|s| *s == run.size) {
                Some(si) => si,
                None => {
                    results.sizes.push(run.size);
                    results.sizes.len() - 1
                }
            };
            results
                .samples
                .insert((si, run.transport, run.consumers), run.rounds.clone());
        }
        Ok((results, self.settings.clone()))
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    fn sample(produced: u64, consumers: usize, cpu_ns: u64, latency_us: u64) -> Sample {
        Sample {
            produced,
            received: vec![produced; consumers],
            cpu_ns,
            consumers_cpu_ns: cpu_ns / 3,
            window_ns: 2_000_000_000,
            latencies_ns: (0..produced * consumers as u64)
                .map(|i| latency_us * 1000 + (i % 97) * 7_000)
                .collect(),
        }
    }

    /// Results as a short run on this machine gives them: bufshare, shm and
    /// tee measured, unixfd not installed, one shm run failed.
    pub fn fake(rounds: usize) -> (Results, Settings) {
        let settings = Settings {
            rounds,
            quick: false,
            transports: Transport::ALL.to_vec(),
            unavailable: BTreeMap::from([(
                Transport::Unixfd,
                "not installed (GStreamer 1.22)".to_string(),
            )]),
        };
        let mut results = Results {
            rounds,
            sizes: FANOUT_SIZES.to_vec(),
            samples: BTreeMap::new(),
            wake_floor_ns: (0..120).map(|i| 20_000 + i * 3_000).collect(),
        };
        for (si, &size) in FANOUT_SIZES.iter().enumerate() {
            let frames = 2 * size.fps as u64;
            let per_pixel = (size.width * size.height) as u64 / 100;
            for (ti, t) in [Transport::Bufshare, Transport::Shm, Transport::Tee]
                .into_iter()
                .enumerate()
            {
                for n in std::iter::once(0).chain(consumer_counts(size, false)) {
                    let samples = (0..rounds)
                        .map(|r| {
                            if t == Transport::Shm && n == 3 && r == 0 {
                                return None;
                            }
                            let per_frame = 1_000 * per_pixel
                                + n as u64 * (40_000 + 10_000 * ti as u64)
                                + r as u64 * n as u64 * 12_000;
                            Some(sample(frames, n, per_frame * frames, 50 + 40 * ti as u64))
                        })
                        .collect();
                    results.samples.insert((si, t, n), samples);
                }
            }
        }
        (results, settings)
    }

    #[test]
    fn saved_results_give_the_same_report() {
        let (results, settings) = fake(3);
        let before = report(&results, &settings);
        let json = serde_json::to_string(&Saved::new(&results, &settings)).unwrap();
        let saved: Saved = serde_json::from_str(&json).unwrap();
        let (again, settings_again) = saved.restore().unwrap();
        assert_eq!(settings_again, settings);
        assert_eq!(again.sizes, results.sizes);
        assert_eq!(again.samples, results.samples);
        assert_eq!(report(&again, &settings_again), before);
        // The fake's figures: shm failed once at 3 consumers, unixfd is unavailable.
        assert!(before.contains("shm (failed in 1 of 3 rounds)"), "{before}");
        assert!(before.contains("| unixfd | - | not installed"), "{before}");
        // The fake floor: 120 wake-ups of 20..377 µs, nearest rank.
        assert!(
            before.contains("p50 197 µs, p99 374 µs, 120 wake-ups; p99 render -> push"),
            "{before}"
        );
    }

    #[test]
    fn a_run_with_missing_rounds_is_refused() {
        let (results, settings) = fake(2);
        let mut saved = Saved::new(&results, &settings);
        saved.runs[0].rounds.pop();
        let err = saved.restore().err().unwrap();
        assert!(err.contains("1 rounds saved, 2 expected"), "{err}");
    }

    #[test]
    fn counts_and_transports_come_from_the_runs() {
        let (results, _) = fake(1);
        assert_eq!(
            results.transports(),
            [Transport::Bufshare, Transport::Shm, Transport::Tee]
        );
        assert_eq!(results.consumer_counts(0), [1, 3, 8]);
        assert_eq!(results.consumer_counts(1), [1, 3, 4, 8]);
    }
}
