//! PNG charts of a run (or of a saved results.json), with plotters' bitmap
//! backend. Text is drawn with DejaVu Sans, read at run time (Debian package
//! fonts-dejavu-core; `BUFSHARE_BENCH_FONT` names another TTF file).
//!
//! Charts, each written only when its part was measured; a transport, size
//! or consumer count that was not measured (unixfd where it is not
//! installed, a run that failed in every round) is simply absent:
//!
//! - `cpu-vs-consumers.png` (part 1): transport CPU per frame and consumer
//!   against the number of consumers, one panel per frame size, one line per
//!   transport; median of rounds, bars from the lowest to the highest round.
//! - `cpu-vs-size.png` (part 1): the same figure against the frame size, one
//!   panel per consumer count measured at every size.
//! - `latency-cdf.png` (part 1): the share of frames delivered within a
//!   latency, every sample of every consumer and round, per frame size at the
//!   consumer count nearest to 4 (the latency target's).
//! - `latency-percentiles.png` (part 1): p50 and p99 latency against the
//!   number of consumers, per frame size.
//! - `link-rate.png` (part 2): CPU per frame of producer and consumer, and
//!   frames per second, against the frame size.
//! - `cross-host.png` (part 3): the same for one link between two network
//!   namespaces (ucx, tcp+gdp, rtp): median of rounds, bars from the lowest to
//!   the highest round.

use std::fmt::Display;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::chart::MeshStyle;
use plotters::coord::combinators::WithKeyPoints;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::part1::{Results, LATENCY_COUNT};
use crate::part2::LinkRow;
use crate::part3::{self, Link};
use crate::results::{date, Meta, Saved};
use crate::scenarios::Transport;

/// Font files tried in order, unless `BUFSHARE_BENCH_FONT` names one: regular, bold.
const FONT_FILES: [(&str, &str); 1] = [(
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
)];
const FONT: &str = "sans-serif";
const WIDTH: u32 = 1500;
const HEIGHT: u32 = 640;

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
/// A part 1 chart: draws `results` with a footnote into a file.
type Part1Chart = fn(&Results, &str, &Path) -> Result<(), String>;
/// Per consumer count: (consumers, p50 µs, p99 µs).
type PercentilePoints = Vec<(f64, f64, f64)>;

fn text<E: Display>(e: E) -> String {
    e.to_string()
}

/// A linear axis with the ticks (and grid lines) given: consumer counts, or
/// the index of a frame size. (plotters' `with_key_points` on an f64 range
/// loses the value formatter the mesh needs.)
struct Ticked {
    range: RangedCoordf64,
    ticks: Vec<f64>,
}

fn ticked(range: Range<f64>, ticks: Vec<f64>) -> Ticked {
    Ticked {
        range: range.into(),
        ticks,
    }
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.range.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.range.range()
    }
}

/// Registers the font once; the error names what to install.
fn load_font() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            // BUFSHARE_BENCH_FONT, when set, is the only candidate.
            let candidates: Vec<(PathBuf, Option<PathBuf>)> =
                match std::env::var_os("BUFSHARE_BENCH_FONT").filter(|f| !f.is_empty()) {
                    Some(f) => vec![(PathBuf::from(f), None)],
                    None => FONT_FILES
                        .iter()
                        .map(|(r, b)| (PathBuf::from(r), Some(PathBuf::from(b))))
                        .collect(),
                };
            let Some((regular, bold)) = candidates.iter().find(|(r, _)| r.is_file()) else {
                return Err(format!(
                    "no font for the charts: none of {} exists (install Debian's \
                     fonts-dejavu-core, e.g. with scripts/install-deps.sh, or set \
                     BUFSHARE_BENCH_FONT to a .ttf file)",
                    candidates
                        .iter()
                        .map(|(r, _)| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            };
            let register = |path: &Path, style: FontStyle| -> Result<(), String> {
                let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                register_font(FONT, style, bytes)
                    .map_err(|_| format!("{}: not a TrueType/OpenType font", path.display()))
            };
            register(regular, FontStyle::Normal)?;
            if let Some(bold) = bold.as_deref().filter(|b| b.is_file()) {
                register(bold, FontStyle::Bold)?;
            }
            Ok(())
        })
        .clone()
}

/// Draws every chart that `saved` has data for into `dir`; returns the files.
pub fn draw_all(saved: &Saved, dir: &Path) -> Result<Vec<PathBuf>, String> {
    load_font()?;
    let mut written = Vec::new();
    if let Some(p1) = &saved.part1 {
        let (results, _) = p1.restore()?;
        let note = part1_note(&saved.meta, &results);
        if !results.sizes().is_empty() {
            let charts: [(&str, Part1Chart); 4] = [
                ("cpu-vs-consumers.png", cpu_vs_consumers),
                ("cpu-vs-size.png", cpu_vs_size),
                ("latency-cdf.png", latency_cdf),
                ("latency-percentiles.png", latency_percentiles),
            ];
            for (name, draw) in charts {
                let path = dir.join(name);
                draw(&results, &note, &path).map_err(|e| format!("{}: {e}", path.display()))?;
                written.push(path);
            }
        }
    }
    if let Some(rows) = saved.part2.as_deref().filter(|r| !r.is_empty()) {
        let path = dir.join("link-rate.png");
        link_rate(rows, &part2_note(&saved.meta), &path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    if let Some(p3) = saved
        .part3
        .as_ref()
        .filter(|p| p.rows.iter().any(|r| !r.live))
    {
        let path = dir.join("cross-host.png");
        cross_host(p3, &part3_note(&saved.meta, p3), &path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

fn machine(meta: &Meta) -> String {
    format!(
        "{}, {} CPUs ({}), {}, load average {} at start, {} at end",
        date(meta.started_unix_s),
        meta.cpus,
        meta.cpu_model,
        meta.gstreamer,
        meta.load_start.split(' ').next().unwrap_or("?"),
        meta.load_end.split(' ').next().unwrap_or("?"),
    )
}

fn part1_note(meta: &Meta, results: &Results) -> String {
    let rounds = results.rounds();
    format!(
        "bufshare-bench part 1: {rounds} round{} of {} s per point; {}",
        if rounds == 1 { "" } else { "s" },
        meta.seconds,
        machine(meta)
    )
}

fn part2_note(meta: &Meta) -> String {
    format!(
        "bufshare-bench part 2: {} s per point; {}",
        meta.rate_seconds,
        machine(meta)
    )
}

fn part3_note(meta: &Meta, p3: &part3::Saved) -> String {
    let rounds = p3.rows.iter().map(|r| r.round + 1).max().unwrap_or(1);
    format!(
        "bufshare-bench part 3: {rounds} round{} of {} s per point; {}",
        if rounds == 1 { "" } else { "s" },
        meta.rate_seconds,
        machine(meta)
    )
}

fn link_color(l: Link) -> RGBColor {
    match l {
        Link::Ucx => RGBColor(31, 119, 180),
        Link::TcpGdp => RGBColor(230, 115, 0),
        Link::Rtp => RGBColor(44, 160, 44),
    }
}

fn link_label(l: Link) -> &'static str {
    match l {
        Link::Ucx => "ucxsink/ucxsrc (UCX over TCP)",
        Link::TcpGdp => "gdppay+tcpserversink / tcpclientsrc+gdpdepay",
        Link::Rtp => "rtpvrawpay+udpsink / udpsrc+rtpvrawdepay (I420)",
    }
}

fn color(t: Transport) -> RGBColor {
    match t {
        Transport::Bufshare => RGBColor(31, 119, 180),
        Transport::Shm => RGBColor(230, 115, 0),
        Transport::Unixfd => RGBColor(44, 160, 44),
        Transport::Tee => RGBColor(110, 110, 110),
    }
}

fn label(t: Transport) -> &'static str {
    match t {
        Transport::Bufshare => "bufshare",
        Transport::Shm => "shmsink/shmsrc",
        Transport::Unixfd => "unixfdsink/unixfdsrc",
        Transport::Tee => "tee (one process)",
    }
}

/// An entry of a legend: a line of the series' color and stroke, and text.
struct Key {
    text: String,
    color: RGBColor,
    dashed: bool,
}

fn key(t: Transport) -> Key {
    Key {
        text: label(t).to_string(),
        color: color(t),
        dashed: false,
    }
}

fn draw_key(area: &Area, k: &Key, (x, y): (i32, i32), font: &TextStyle) -> Result<i32, String> {
    let style = k.color.stroke_width(3);
    let line = vec![(x, y), (x + 34, y)];
    if k.dashed {
        area.draw(&DashedPathElement::new(line, 7, 4, style))
            .map_err(text)?;
    } else {
        area.draw(&PathElement::new(line, style)).map_err(text)?;
    }
    area.draw_text(&k.text, font, (x + 42, y - 9))
        .map_err(text)?;
    let (w, _) = area.estimate_text_size(&k.text, font).map_err(text)?;
    Ok(x + 42 + w as i32)
}

/// Draws the keys in one centered row.
fn key_row(area: &Area, keys: &[Key]) -> Result<(), String> {
    let font = TextStyle::from((FONT, 18).into_font());
    let gap = 36;
    let mut width = 0;
    for k in keys {
        width += 42 + area.estimate_text_size(&k.text, &font).map_err(text)?.0 as i32 + gap;
    }
    let (w, h) = area.dim_in_pixel();
    let mut x = ((w as i32 - width + gap) / 2).max(10);
    for k in keys {
        x = draw_key(area, k, (x, h as i32 / 2), &font)? + gap;
    }
    Ok(())
}

/// Fills the image; writes the title, a row of `keys` under it and `notes`
/// (one a line) at the bottom; returns the area in between.
fn frame<'a>(
    root: &Area<'a>,
    title: &str,
    keys: &[Key],
    notes: &[String],
) -> Result<Area<'a>, String> {
    root.fill(&WHITE).map_err(text)?;
    let body = root
        .titled(title, (FONT, 28, FontStyle::Bold).into_font())
        .map_err(text)?;
    let (legend, body) = body.split_vertically(34);
    key_row(&legend, keys)?;
    let height = body.dim_in_pixel().1;
    let (body, foot) = body.split_vertically(height.saturating_sub(8 + 22 * notes.len() as u32));
    let font = (FONT, 15).into_font().color(&BLACK.mix(0.75));
    for (i, note) in notes.iter().enumerate() {
        foot.draw_text(note, &font, (12, 4 + 22 * i as i32))
            .map_err(text)?;
    }
    Ok(body)
}

/// A panel that has nothing to show says so.
fn empty(panel: &Area, caption: &str, why: &str) -> Result<(), String> {
    let h = panel.dim_in_pixel().1;
    panel
        .draw_text(caption, &TextStyle::from((FONT, 22).into_font()), (20, 10))
        .map_err(text)?;
    panel
        .draw_text(
            why,
            &TextStyle::from((FONT, 18).into_font()),
            (20, h as i32 / 2),
        )
        .map_err(text)
}

/// Ticks 1, 2, 5 x 10^k between `lo` and `hi`.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let t = decade * m;
            if t >= lo && t <= hi {
                ticks.push(t);
            }
        }
        decade *= 10.0;
    }
    ticks
}

/// The 1-2-5 tick at or below `v` (for the low end of a log axis).
fn tick_below(v: f64) -> f64 {
    let decade = 10f64.powf(v.log10().floor());
    [5.0, 2.0, 1.0]
        .into_iter()
        .map(|m| m * decade)
        .find(|&t| t <= v * (1.0 + 1e-9))
        .unwrap_or(decade)
}

/// The 1-2-5 tick at or above `v` (for the high end of a log axis).
fn tick_above(v: f64) -> f64 {
    let decade = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * decade)
        .find(|&t| t >= v * (1.0 - 1e-9))
        .unwrap_or(10.0 * decade)
}

/// A log axis from below `lo` to above `hi`, ending on ticks.
fn log_bounds(lo: f64, hi: f64) -> (f64, f64) {
    let lo = tick_below(lo * 0.9);
    (lo, tick_above((hi * 1.1).max(lo * 10.0)))
}

fn number(v: f64) -> String {
    if v.abs() >= 1.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// A y range that holds `values` and 0, with a little room above.
fn linear_bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((0f64, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let span = (hi - lo).max(1.0);
    (
        if lo < 0.0 { lo - 0.08 * span } else { 0.0 },
        hi + 0.1 * span,
    )
}

/// A chart in `panel` with the usual margins, caption and fonts.
fn builder<'a, 'b>(panel: &'a Area<'b>, caption: &str) -> ChartBuilder<'a, 'b, BitMapBackend<'b>> {
    let mut b = ChartBuilder::on(panel);
    b.caption(caption, (FONT, 22))
        .margin(14)
        .margin_right(24)
        .x_label_area_size(50)
        .y_label_area_size(80);
    b
}

/// Mesh fonts and grid shades, the same in every chart.
fn mesh_style<X, Y>(mesh: &mut MeshStyle<'_, '_, X, Y, BitMapBackend<'_>>)
where
    X: Ranged,
    Y: Ranged,
{
    mesh.axis_desc_style((FONT, 18))
        .label_style((FONT, 16))
        .bold_line_style(BLACK.mix(0.18))
        .light_line_style(BLACK.mix(0.05));
}

/// One transport's points in a CPU panel: (x, median, lowest, highest), µs.
type CpuPoints = Vec<(f64, f64, f64, f64)>;

fn cpu_point(results: &Results, si: usize, t: Transport, n: usize) -> Option<(f64, f64, f64)> {
    let figures = results.figures((si, t, n));
    let median = results.median_figure((si, t, n))?;
    let lo = figures.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = figures.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((median / 1e3, lo / 1e3, hi / 1e3))
}

/// What the CPU charts show, under them; `extra` ends the second line.
fn cpu_notes(note: &str, bars: bool, extra: &str) -> Vec<String> {
    let mut second = String::from("Median of rounds");
    if bars {
        second.push_str("; bars from the lowest to the highest round");
    }
    second.push('.');
    if !extra.is_empty() {
        second.push(' ');
        second.push_str(extra);
    }
    vec![
        "Transport CPU = (CPU of all processes - CPU of the producer alone with the same sink) \
         per frame, divided by the consumers. Below 0: noise of the producer-alone baseline."
            .to_string(),
        second,
        note.to_string(),
    ]
}

/// Draws lines (with min-max bars) of each transport; x offsets keep the
/// bars of transports at the same x apart.
fn draw_cpu_panel<'a, 'b: 'a, X>(
    chart: &mut ChartContext<'a, BitMapBackend<'b>, Cartesian2d<X, RangedCoordf64>>,
    series: &[(Transport, CpuPoints)],
    spread: f64,
    bars: bool,
) -> Result<(), String>
where
    X: Ranged<ValueType = f64>,
{
    let k = series.len() as f64;
    for (i, (t, points)) in series.iter().enumerate() {
        let c = color(*t);
        let dx = if bars {
            (i as f64 - (k - 1.0) / 2.0) * spread
        } else {
            0.0
        };
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0 + dx, p.1)),
                c.stroke_width(3),
            ))
            .map_err(text)?;
        if bars {
            chart
                .draw_series(points.iter().filter(|p| p.3 > p.2).map(|p| {
                    ErrorBar::new_vertical(p.0 + dx, p.2, p.1, p.3, c.stroke_width(2), 12)
                }))
                .map_err(text)?;
        }
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| Circle::new((p.0 + dx, p.1), 5, c.filled())),
            )
            .map_err(text)?;
    }
    Ok(())
}

fn draw_zero_line<'a, 'b: 'a, X>(
    chart: &mut ChartContext<'a, BitMapBackend<'b>, Cartesian2d<X, RangedCoordf64>>,
    x: (f64, f64),
    y_lo: f64,
) -> Result<(), String>
where
    X: Ranged<ValueType = f64>,
{
    if y_lo < 0.0 {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x.0, 0.0), (x.1, 0.0)],
                BLACK.stroke_width(1),
            )))
            .map_err(text)?;
    }
    Ok(())
}

fn cpu_vs_consumers(results: &Results, note: &str, path: &Path) -> Result<(), String> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    let bars = results.rounds() > 1;
    let transports = results.transports();
    let body = frame(
        &root,
        "Transport CPU per frame and consumer, by number of consumers (lower is better)",
        &transports.iter().map(|&t| key(t)).collect::<Vec<_>>(),
        &cpu_notes(note, bars, ""),
    )?;
    let sizes = results.sizes();
    let panels = body.split_evenly((1, sizes.len()));
    for (si, (panel, size)) in panels.iter().zip(sizes).enumerate() {
        let caption = format!("{} NV12 at {} fps", size.name(), size.fps);
        let counts = results.consumer_counts(si);
        let series: Vec<(Transport, CpuPoints)> = transports
            .iter()
            .map(|&t| {
                let points = counts
                    .iter()
                    .filter_map(|&n| {
                        cpu_point(results, si, t, n).map(|(m, lo, hi)| (n as f64, m, lo, hi))
                    })
                    .collect::<Vec<_>>();
                (t, points)
            })
            .filter(|(_, p)| !p.is_empty())
            .collect();
        if series.is_empty() {
            empty(panel, &caption, "not measured")?;
            continue;
        }
        let x_max = *counts.last().unwrap_or(&1) as f64 + 1.0;
        let (y_lo, y_hi) = linear_bounds(
            series
                .iter()
                .flat_map(|(_, p)| p.iter().flat_map(|q| [q.1, q.2, q.3])),
        );
        let mut chart = builder(panel, &caption)
            .build_cartesian_2d(
                ticked(0.0..x_max, counts.iter().map(|&n| n as f64).collect()),
                y_lo..y_hi,
            )
            .map_err(text)?;
        let mut mesh = chart.configure_mesh();
        mesh_style(&mut mesh);
        mesh.x_desc("consumers")
            .y_desc("transport CPU, µs per frame per consumer")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| number(*y))
            .draw()
            .map_err(text)?;
        draw_zero_line(&mut chart, (0.0, x_max), y_lo)?;
        draw_cpu_panel(&mut chart, &series, 0.12, bars)?;
    }
    root.present().map_err(text)
}

/// Consumer counts measured at every size; if there are none, every count.
fn counts_for_size_chart(results: &Results) -> Vec<usize> {
    let per_size: Vec<Vec<usize>> = (0..results.sizes().len())
        .map(|si| results.consumer_counts(si))
        .collect();
    let mut all: Vec<usize> = per_size.iter().flatten().copied().collect();
    all.sort_unstable();
    all.dedup();
    let common: Vec<usize> = all
        .iter()
        .copied()
        .filter(|n| per_size.iter().all(|c| c.contains(n)))
        .collect();
    if common.is_empty() {
        all
    } else {
        common
    }
}

/// "WxH (N KiB)", KiB as in the report's tables.
fn size_label(width: u32, height: u32) -> String {
    let kib = crate::roles::nv12_size(width, height) / 1024;
    format!("{width}x{height} ({kib} KiB)")
}

fn cpu_vs_size(results: &Results, note: &str, path: &Path) -> Result<(), String> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    let bars = results.rounds() > 1;
    let sizes = results.sizes();
    let transports = results.transports();
    let rates: Vec<String> = sizes
        .iter()
        .map(|s| format!("{} at {} fps", s.name(), s.fps))
        .collect();
    let notes = cpu_notes(note, bars, &format!("NV12 {}.", rates.join(", ")));
    let body = frame(
        &root,
        "Transport CPU per frame and consumer, by frame size (lower is better)",
        &transports.iter().map(|&t| key(t)).collect::<Vec<_>>(),
        &notes,
    )?;
    let counts = counts_for_size_chart(results);
    let panels = body.split_evenly((1, counts.len().max(1)));
    let labels: Vec<String> = sizes
        .iter()
        .map(|s| size_label(s.width, s.height))
        .collect();
    let x_range = (-0.5, sizes.len() as f64 - 0.5);
    for (panel, &n) in panels.iter().zip(&counts) {
        let caption = format!("{n} consumer{}", if n == 1 { "" } else { "s" });
        let series: Vec<(Transport, CpuPoints)> = transports
            .iter()
            .map(|&t| {
                let points = (0..sizes.len())
                    .filter_map(|si| {
                        cpu_point(results, si, t, n).map(|(m, lo, hi)| (si as f64, m, lo, hi))
                    })
                    .collect::<Vec<_>>();
                (t, points)
            })
            .filter(|(_, p)| !p.is_empty())
            .collect();
        if series.is_empty() {
            empty(panel, &caption, "not measured")?;
            continue;
        }
        let (y_lo, y_hi) = linear_bounds(
            series
                .iter()
                .flat_map(|(_, p)| p.iter().flat_map(|q| [q.1, q.2, q.3])),
        );
        let labels = labels.clone();
        let mut chart = builder(panel, &caption)
            .build_cartesian_2d(
                ticked(
                    x_range.0..x_range.1,
                    (0..sizes.len()).map(|i| i as f64).collect(),
                ),
                y_lo..y_hi,
            )
            .map_err(text)?;
        let mut mesh = chart.configure_mesh();
        mesh_style(&mut mesh);
        mesh.x_desc("NV12 frame")
            .y_desc("transport CPU, µs per frame per consumer")
            .x_label_formatter(&|x| {
                labels
                    .get(x.round().max(0.0) as usize)
                    .cloned()
                    .unwrap_or_default()
            })
            .y_label_formatter(&|y| number(*y))
            .draw()
            .map_err(text)?;
        draw_zero_line(&mut chart, x_range, y_lo)?;
        draw_cpu_panel(&mut chart, &series, 0.05, bars)?;
    }
    root.present().map_err(text)
}

/// The consumer count whose latency a size's CDF shows: the one nearest to
/// the latency target's count (the larger on a tie).
fn cdf_count(counts: &[usize]) -> Option<usize> {
    counts
        .iter()
        .copied()
        .min_by_key(|&n| (n.abs_diff(LATENCY_COUNT), std::cmp::Reverse(n)))
}

const LATENCY_NOTE: &str = "Latency: from the frame leaving the producer's `identity sync=true` \
    for the sink (its render time) to the consumer's source pad pushing it; every sample of \
    every consumer and round.";

fn latency_cdf(results: &Results, note: &str, path: &Path) -> Result<(), String> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    let transports = results.transports();
    let body = frame(
        &root,
        "Latency, producer to consumer: share of frames delivered within a time",
        &transports.iter().map(|&t| key(t)).collect::<Vec<_>>(),
        &[LATENCY_NOTE.to_string(), note.to_string()],
    )?;
    let sizes = results.sizes();
    let panels = body.split_evenly((1, sizes.len()));
    for (si, (panel, size)) in panels.iter().zip(sizes).enumerate() {
        let Some(n) = cdf_count(&results.consumer_counts(si)) else {
            empty(panel, &size.name(), "not measured")?;
            continue;
        };
        let caption = format!(
            "{} NV12 at {} fps, {n} consumer{}",
            size.name(),
            size.fps,
            if n == 1 { "" } else { "s" }
        );
        let series: Vec<(Transport, Vec<u64>)> = transports
            .iter()
            .map(|&t| (t, results.latencies((si, t, n))))
            .filter(|(_, l)| !l.is_empty())
            .collect();
        if series.is_empty() {
            empty(panel, &caption, "no latency samples")?;
            continue;
        }
        // Under the chart: each transport's p50 and p99.
        let rows = series.len() as u32;
        let (plot, table) = panel.split_vertically(panel.dim_in_pixel().1 - 10 - 26 * rows);
        let lo = series.iter().map(|(_, l)| l[0]).min().unwrap_or(1) as f64 / 1e3;
        let hi = series
            .iter()
            .map(|(_, l)| l[l.len() - 1])
            .max()
            .unwrap_or(1) as f64
            / 1e3;
        let (lo, hi) = log_bounds(lo.max(1.0), hi);
        let mut chart = builder(&plot, &caption)
            .build_cartesian_2d(
                (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
                ticked(0.0..100.0, vec![0.0, 20.0, 40.0, 50.0, 60.0, 80.0, 99.0]),
            )
            .map_err(text)?;
        let mut mesh = chart.configure_mesh();
        mesh_style(&mut mesh);
        mesh.x_desc("latency, µs (log scale)")
            .y_desc("frames delivered within, %")
            .x_label_formatter(&|x| number(*x))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(text)?;
        let font = TextStyle::from((FONT, 17).into_font());
        for (i, (t, lat)) in series.iter().enumerate() {
            let c = color(*t);
            let len = lat.len();
            let steps = 400.min(len);
            let points = (0..=steps).map(|j| {
                let idx = j * (len - 1) / steps.max(1);
                (lat[idx] as f64 / 1e3, 100.0 * (idx + 1) as f64 / len as f64)
            });
            chart
                .draw_series(LineSeries::new(points, c.stroke_width(3)))
                .map_err(text)?;
            let p50 = crate::measure::percentile(lat, 50.0).unwrap_or(0) as f64 / 1e3;
            let p99 = crate::measure::percentile(lat, 99.0).unwrap_or(0) as f64 / 1e3;
            let k = Key {
                text: format!(
                    "{}: p50 {} µs, p99 {} µs ({len} samples)",
                    label(*t),
                    number(p50),
                    number(p99)
                ),
                color: c,
                dashed: false,
            };
            draw_key(&table, &k, (94, 14 + 26 * i as i32), &font)?;
        }
    }
    root.present().map_err(text)
}

fn latency_percentiles(results: &Results, note: &str, path: &Path) -> Result<(), String> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    let transports = results.transports();
    let mut keys: Vec<Key> = transports.iter().map(|&t| key(t)).collect();
    for (text, dashed) in [("p50", false), ("p99", true)] {
        keys.push(Key {
            text: text.into(),
            color: RGBColor(0, 0, 0),
            dashed,
        });
    }
    let body = frame(
        &root,
        "Latency, producer to consumer: p50 (solid) and p99 (dashed), by number of consumers",
        &keys,
        &[LATENCY_NOTE.to_string(), note.to_string()],
    )?;
    let sizes = results.sizes();
    let panels = body.split_evenly((1, sizes.len()));
    for (si, (panel, size)) in panels.iter().zip(sizes).enumerate() {
        let caption = format!("{} NV12 at {} fps", size.name(), size.fps);
        let counts = results.consumer_counts(si);
        let series: Vec<(Transport, PercentilePoints)> = transports
            .iter()
            .map(|&t| {
                let points = counts
                    .iter()
                    .filter_map(|&n| {
                        let lat = results.latencies((si, t, n));
                        let p50 = crate::measure::percentile(&lat, 50.0)?;
                        let p99 = crate::measure::percentile(&lat, 99.0)?;
                        Some((n as f64, p50 as f64 / 1e3, p99 as f64 / 1e3))
                    })
                    .collect::<Vec<_>>();
                (t, points)
            })
            .filter(|(_, p)| !p.is_empty())
            .collect();
        if series.is_empty() {
            empty(panel, &caption, "no latency samples")?;
            continue;
        }
        let lo = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|q| q.1))
            .fold(f64::INFINITY, f64::min);
        let hi = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|q| q.2))
            .fold(0f64, f64::max);
        let (lo, hi) = log_bounds(lo.max(1.0), hi);
        let x_max = *counts.last().unwrap_or(&1) as f64 + 1.0;
        let mut chart = builder(panel, &caption)
            .build_cartesian_2d(
                ticked(0.0..x_max, counts.iter().map(|&n| n as f64).collect()),
                (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
            )
            .map_err(text)?;
        let mut mesh = chart.configure_mesh();
        mesh_style(&mut mesh);
        mesh.x_desc("consumers")
            .y_desc("latency, µs (log scale)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| number(*y))
            .draw()
            .map_err(text)?;
        for (t, points) in &series {
            let c = color(*t);
            chart
                .draw_series(LineSeries::new(
                    points.iter().map(|p| (p.0, p.1)),
                    c.stroke_width(3),
                ))
                .map_err(text)?;
            chart
                .draw_series(DashedLineSeries::new(
                    points.iter().map(|p| (p.0, p.2)),
                    8,
                    5,
                    c.stroke_width(3),
                ))
                .map_err(text)?;
            chart
                .draw_series(points.iter().flat_map(|p| {
                    [
                        Circle::new((p.0, p.1), 5, c.filled()),
                        Circle::new((p.0, p.2), 5, c.filled()),
                    ]
                }))
                .map_err(text)?;
        }
    }
    root.present().map_err(text)
}

fn link_rate(rows: &[LinkRow], note: &str, path: &Path) -> Result<(), String> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    let mut sizes: Vec<(u32, u32)> = Vec::new();
    let mut transports: Vec<Transport> = Vec::new();
    for r in rows {
        if !sizes.contains(&(r.width, r.height)) {
            sizes.push((r.width, r.height));
        }
        if !transports.contains(&r.transport) {
            transports.push(r.transport);
        }
    }
    let body = frame(
        &root,
        "One link at full speed: one producer, one consumer, NV12, sync=false",
        &transports.iter().map(|&t| key(t)).collect::<Vec<_>>(),
        &[
            "The producer pushes 8 prepared frames in a loop (memfd-backed for bufshare; \
             shmsink copies each into its area); CPU of both processes."
                .to_string(),
            note.to_string(),
        ],
    )?;
    let labels: Vec<String> = sizes.iter().map(|&(w, h)| size_label(w, h)).collect();
    type Figure = fn(&LinkRow) -> Option<f64>;
    let panels: [(&str, &str, Figure); 2] = [
        (
            "CPU per frame, producer + consumer (lower is better)",
            "CPU µs per frame (log scale)",
            LinkRow::cpu_us_per_frame,
        ),
        (
            "Frames per second received (higher is better)",
            "frames per second (log scale)",
            LinkRow::frames_per_s,
        ),
    ];
    let areas = body.split_evenly((1, 2));
    for (area, (caption, y_desc, figure)) in areas.iter().zip(panels) {
        let series: Vec<(Transport, Vec<(f64, f64)>)> = transports
            .iter()
            .map(|&t| {
                let points = rows
                    .iter()
                    .filter(|r| r.transport == t && !r.failed)
                    .filter_map(|r| {
                        let x = sizes.iter().position(|&s| s == (r.width, r.height))?;
                        Some((x as f64, figure(r)?))
                    })
                    .collect::<Vec<_>>();
                (t, points)
            })
            .filter(|(_, p)| !p.is_empty())
            .collect();
        if series.is_empty() {
            empty(area, caption, "not measured")?;
            continue;
        }
        let values = || series.iter().flat_map(|(_, p)| p.iter().map(|q| q.1));
        let lo = values().fold(f64::INFINITY, f64::min);
        let hi = values().fold(0f64, f64::max);
        let mut chart = size_log_panel(area, caption, &labels, "NV12 frame", y_desc, (lo, hi))?;
        for (t, points) in &series {
            let c = color(*t);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(3)))
                .map_err(text)?;
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 5, c.filled())))
                .map_err(text)?;
        }
    }
    root.present().map_err(text)
}

/// A chart with frame sizes across and a log scale up.
type SizeLogChart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<Ticked, WithKeyPoints<LogCoord<f64>>>>;

/// A panel with one column per frame size (`labels`) and a log scale from `lo` to `hi`
/// (widened to whole ticks), its mesh drawn: link-rate.png and cross-host.png.
fn size_log_panel<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    labels: &[String],
    x_desc: &str,
    y_desc: &str,
    (lo, hi): (f64, f64),
) -> Result<SizeLogChart<'a, 'b>, String> {
    let (lo, hi) = log_bounds(lo.max(0.1), hi);
    let n = labels.len();
    let mut chart = builder(area, caption)
        .build_cartesian_2d(
            ticked(-0.5..n as f64 - 0.5, (0..n).map(|i| i as f64).collect()),
            (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
        )
        .map_err(text)?;
    let mut mesh = chart.configure_mesh();
    mesh_style(&mut mesh);
    mesh.x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| {
            labels
                .get(x.round().max(0.0) as usize)
                .cloned()
                .unwrap_or_default()
        })
        .y_label_formatter(&|y| number(*y))
        .draw()
        .map_err(text)?;
    Ok(chart)
}

/// (x, median, min, max) of each transport, for the panels of cross-host.png.
type SpreadPoints = Vec<(f64, f64, f64, f64)>;

fn cross_host(p3: &part3::Saved, note: &str, path: &Path) -> Result<(), String> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    let points: Vec<part3::Point<'_>> = part3::points(p3).into_iter().filter(|p| !p.live).collect();
    let mut sizes: Vec<(u32, u32)> = Vec::new();
    let mut links: Vec<Link> = Vec::new();
    for p in &points {
        if !sizes.contains(&(p.width, p.height)) {
            sizes.push((p.width, p.height));
        }
        if !links.contains(&p.link) {
            links.push(p.link);
        }
    }
    let keys: Vec<Key> = links
        .iter()
        .map(|&l| Key {
            text: link_label(l).to_string(),
            color: link_color(l),
            dashed: false,
        })
        .collect();
    let body = frame(
        &root,
        "Across hosts: one link at full speed between two network namespaces (veth), sync=false",
        &keys,
        &[
            "The sender pushes 8 prepared frames in a loop (memfds for ucx); CPU of both \
             processes per frame received. UCX over its TCP transport: no RDMA here."
                .to_string(),
            note.to_string(),
        ],
    )?;
    let labels: Vec<String> = sizes.iter().map(|&(w, h)| size_label(w, h)).collect();
    type Figure = for<'a, 'b> fn(&'a part3::Point<'b>) -> Option<part3::Spread>;
    let panels: [(&str, &str, Figure); 2] = [
        (
            "CPU per frame, sender + receiver (lower is better)",
            "CPU µs per frame (log scale)",
            |p| p.total_us(),
        ),
        (
            "Frames per second received (higher is better)",
            "frames per second (log scale)",
            |p| p.rate(),
        ),
    ];
    let areas = body.split_evenly((1, 2));
    for (area, (caption, y_desc, figure)) in areas.iter().zip(panels) {
        let series: Vec<(Link, SpreadPoints)> = links
            .iter()
            .map(|&l| {
                let pts = points
                    .iter()
                    .filter(|p| p.link == l)
                    .filter_map(|p| {
                        let x = sizes.iter().position(|&s| s == (p.width, p.height))?;
                        let s = figure(p)?;
                        Some((x as f64, s.median, s.min, s.max))
                    })
                    .collect::<Vec<_>>();
                (l, pts)
            })
            .filter(|(_, p)| !p.is_empty())
            .collect();
        if series.is_empty() {
            empty(area, caption, "not measured")?;
            continue;
        }
        let lo = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|q| q.2))
            .fold(f64::INFINITY, f64::min);
        let hi = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|q| q.3))
            .fold(0f64, f64::max);
        let mut chart = size_log_panel(
            area,
            caption,
            &labels,
            "frame (NV12; I420 for rtp, the same size)",
            y_desc,
            (lo, hi),
        )?;
        let k = series.len() as f64;
        for (i, (l, pts)) in series.iter().enumerate() {
            let c = link_color(*l);
            let dx = (i as f64 - (k - 1.0) / 2.0) * 0.06;
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|p| (p.0 + dx, p.1)),
                    c.stroke_width(3),
                ))
                .map_err(text)?;
            chart
                .draw_series(pts.iter().filter(|p| p.3 > p.2).map(|p| {
                    ErrorBar::new_vertical(p.0 + dx, p.2, p.1, p.3, c.stroke_width(2), 12)
                }))
                .map_err(text)?;
            chart
                .draw_series(
                    pts.iter()
                        .map(|p| Circle::new((p.0 + dx, p.1), 5, c.filled())),
                )
                .map_err(text)?;
        }
    }
    root.present().map_err(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::tests::fake;
    use crate::runner::TempDir;

    const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

    fn check_png(path: &Path) {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            bytes.len() > 10_000,
            "{}: {} bytes",
            path.display(),
            bytes.len()
        );
        assert_eq!(bytes[..8], PNG_SIGNATURE, "{}", path.display());
        // IHDR: width and height, big-endian, at bytes 16..24.
        let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!((width, height), (WIDTH, HEIGHT), "{}", path.display());
    }

    #[test]
    fn every_chart_is_written() {
        let dir = TempDir::new().unwrap();
        let written = draw_all(&fake(3), &dir.path).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "cpu-vs-consumers.png",
                "cpu-vs-size.png",
                "latency-cdf.png",
                "latency-percentiles.png",
                "link-rate.png",
                "cross-host.png"
            ]
        );
        for path in &written {
            check_png(path);
        }
    }

    #[test]
    fn charts_of_a_partial_run() {
        // One round (no bars), part 2 only for bufshare and with a failed size,
        // and a part 1 without part 2: the charts of what there is.
        let dir = TempDir::new().unwrap();
        let mut saved = fake(1);
        let rows = saved.part2.as_mut().unwrap();
        rows.retain(|r| r.transport == Transport::Bufshare);
        rows[1].failed = true;
        let written = draw_all(&saved, &dir.path).unwrap();
        assert_eq!(written.len(), 6);
        written.iter().for_each(|p| check_png(p));

        saved.part2 = None;
        saved.part1 = None;
        saved.part3 = None;
        assert!(draw_all(&saved, &dir.path).unwrap().is_empty());
    }

    #[test]
    fn axis_helpers() {
        assert_eq!(log_ticks(30.0, 700.0), [50.0, 100.0, 200.0, 500.0]);
        assert_eq!(log_ticks(1.0, 9.0), [1.0, 2.0, 5.0]);
        assert_eq!(log_bounds(36.0, 42.6), (20.0, 200.0));
        assert_eq!(log_bounds(60.0, 1199.0), (50.0, 2000.0));
        assert_eq!(tick_below(100.0), 100.0);
        assert_eq!(tick_above(100.0), 100.0);
        assert_eq!(tick_above(501.0), 1000.0);
        assert_eq!(cdf_count(&[1, 3, 8]), Some(3));
        assert_eq!(cdf_count(&[1, 3, 4, 8]), Some(4));
        assert_eq!(cdf_count(&[3, 5]), Some(5));
        assert_eq!(cdf_count(&[]), None);
        assert_eq!(linear_bounds([10.0, 20.0].into_iter()), (0.0, 22.0));
        assert_eq!(number(0.25), "0.2");
        assert_eq!(number(733.4), "733");
    }
}
