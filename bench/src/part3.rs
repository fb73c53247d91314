//! Part 3, cross-host: sender and receiver in two network namespaces joined
//! by a veth pair (made by the bench for the run, unique names, deleted at
//! the end, or by the next run if this one was killed), separate processes, over three transports:
//!
//! | transport | sender | receiver |
//! |---|---|---|
//! | ucx | `SRC ! ucxsink address=A:P transports=tcp sync=false` | `ucxsrc name=read0 address=A:P transports=tcp ! fakesink sync=false` |
//! | tcp+gdp | `SRC ! gdppay ! tcpserversink host=A port=P units-soft-max=4 recover-policy=latest sync=false` | `tcpclientsrc host=A port=P ! gdpdepay name=read0 ! fakesink sync=false` |
//! | rtp | `SRC ! rtpvrawpay ! udpsink host=B port=P buffer-size=32 MiB sync=false` | `udpsrc address=B port=P buffer-size=32 MiB caps=RTP ! rtpvrawdepay name=read0 ! fakesink sync=false` |
//!
//! Each side gets `UCX_TLS=tcp` and `UCX_NET_DEVICES` = its veth end. RFC 4175
//! (rtpvrawpay) has no NV12, so the rtp rows carry I420 (the same size).
//!
//! - (a) live: `SRC` = `videotestsrc is-live=true pattern=solid-color !
//!   1080p30 ! identity name=stamp sync=true` (part 1's stamping: the
//!   namespaces share CLOCK_MONOTONIC, so latency works for every transport);
//! - (b) link rate: `SRC` = part 2's `appsrc name=feed` pushing 8 prepared
//!   frames as fast as the sink takes them (memfds for ucx, which sends them
//!   from their registration; system memory for the others, which copy),
//!   at 640x480, 1080p and 4K.
//!
//! CPU per frame is each process's CPU in the window over the frames the
//! receiver got; the sender's includes making (a) or pushing (b) frames, and
//! the frames its sink drops when the link is slower than the source (ucxsink
//! keeps at most 4 queued, tcpserversink resyncs a client past 4, udp loses).

use std::ffi::OsString;
use std::fmt::Write;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::measure::percentile;
use crate::part2::RATE_SIZES;
use crate::roles::nv12_size;
use crate::runner::{ChildId, Fleet};
use crate::scenarios::Context;

/// Live format of (a): 1080p30.
pub const LIVE: (u32, u32, u32) = (1920, 1080, 30);
/// Socket buffers for udpsink/udpsrc (a 4K frame is 12 MiB).
const UDP_BUFFER: usize = 32 << 20;
const SENDER_IP: &str = "10.78.0.1";
const RECEIVER_IP: &str = "10.78.0.2";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Link {
    Ucx,
    TcpGdp,
    Rtp,
}

impl Link {
    pub const ALL: [Link; 3] = [Link::Ucx, Link::TcpGdp, Link::Rtp];

    pub fn name(self) -> &'static str {
        match self {
            Link::Ucx => "ucx",
            Link::TcpGdp => "tcp+gdp",
            Link::Rtp => "rtp (udp)",
        }
    }

    /// `ucx`, `tcp+gdp` (or `tcpgdp`, `tcp`), `rtp` (or `udp`): for `--only`.
    pub fn from_name(name: &str) -> Option<Link> {
        match name {
            "ucx" => Some(Link::Ucx),
            "tcp+gdp" | "tcpgdp" | "tcp" | "gdp" => Some(Link::TcpGdp),
            "rtp" | "udp" => Some(Link::Rtp),
            _ => None,
        }
    }

    /// The elements it needs, for the check before measuring.
    fn elements(self) -> &'static [&'static str] {
        match self {
            Link::Ucx => &["ucxsink", "ucxsrc"],
            Link::TcpGdp => &["gdppay", "gdpdepay", "tcpserversink", "tcpclientsrc"],
            Link::Rtp => &["rtpvrawpay", "rtpvrawdepay", "udpsink", "udpsrc"],
        }
    }
}

/// One run, as measured (and as results.json keeps it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub link: Link,
    /// (a) live 1080p30 (true) or (b) link rate (false).
    pub live: bool,
    pub width: u32,
    pub height: u32,
    pub failed: bool,
    /// Frames the sender's source produced (live) or pushed (rate) in the window.
    pub produced: u64,
    /// Frames the receiver got in the window.
    pub received: u64,
    pub window_ns: u64,
    pub sender_cpu_ns: u64,
    pub receiver_cpu_ns: u64,
    /// Latency p50 and p99, ns (live runs).
    pub latency_ns: Option<(u64, u64)>,
    /// Which round (0-based) it was measured in; results of older runs have only round 0.
    #[serde(default)]
    pub round: usize,
}

impl Row {
    fn measured(&self) -> bool {
        self.received > 0 && self.window_ns > 0
    }

    pub fn frames_per_s(&self) -> Option<f64> {
        self.measured()
            .then(|| self.received as f64 / (self.window_ns as f64 / 1e9))
    }

    /// CPU per frame received of the sender and of the receiver, µs.
    pub fn cpu_us(&self) -> Option<(f64, f64)> {
        self.measured().then(|| {
            let per = |ns: u64| ns as f64 / self.received as f64 / 1e3;
            (per(self.sender_cpu_ns), per(self.receiver_cpu_ns))
        })
    }
}

/// What results.json keeps of part 3.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// Why part 3 (or some transport) was not measured.
    pub skipped: Vec<String>,
    pub rows: Vec<Row>,
}

/// Two namespaces joined by a veth pair, deleted on drop.
struct Netns {
    /// (namespace, veth end) of the sender, then of the receiver.
    sides: [(String, String); 2],
    made: Vec<String>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth end, and with it the pair.
        for ns in &self.made {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("part 3: {e}");
            }
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    match Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("ip: {e}")),
    }
}

/// Namespaces of this bench are named `bsbench<pid>-...`.
const NS_PREFIX: &str = "bsbench";

/// Deletes the namespaces of earlier runs whose bench is gone (killed before
/// it could delete them).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "bufshare-bench" {
            eprintln!("part 3: deleting {name}, left by an earlier run");
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Netns {
    fn new() -> Result<Netns, String> {
        let id = std::process::id() % 100_000;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() % 1000)
            .unwrap_or(0);
        let tag = format!("{id}n{nanos}");
        let pid = std::process::id();
        remove_stale();
        let mut n = Netns {
            // The namespaces carry the whole pid (for remove_stale), the veth
            // ends (15 characters at most) a shorter tag.
            sides: [
                (format!("{NS_PREFIX}{pid}-{tag}s"), format!("bb{tag}s")),
                (format!("{NS_PREFIX}{pid}-{tag}r"), format!("bb{tag}r")),
            ],
            made: Vec::new(),
        };
        for (ns, _) in n.sides.clone() {
            ip(&["netns", "add", &ns])
                .map_err(|e| format!("cannot create a network namespace ({e})"))?;
            n.made.push(ns);
        }
        let [(ns_s, dev_s), (ns_r, dev_r)] = n.sides.clone();
        ip(&[
            "link", "add", &dev_s, "netns", &ns_s, "type", "veth", "peer", "name", &dev_r, "netns",
            &ns_r,
        ])
        .map_err(|e| format!("veth pair refused ({e})"))?;
        for ((ns, dev), addr) in n.sides.iter().zip([SENDER_IP, RECEIVER_IP]) {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        // The veth ends come up asynchronously.
        for _ in 0..100 {
            let up = n.sides.iter().all(|(ns, dev)| {
                Command::new("ip")
                    .args(["netns", "exec", ns, "cat"])
                    .arg(format!("/sys/class/net/{dev}/operstate"))
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "up")
            });
            if up {
                break;
            }
            sleep(Duration::from_millis(50));
        }
        Ok(n)
    }
}

/// The runs part 3 makes for `links` transports in `rounds` rounds.
pub fn runs(links: usize, rounds: usize) -> usize {
    links * (1 + RATE_SIZES.len()) * rounds
}

/// Why part 3 cannot run at all, if it cannot (checked before measuring).
pub fn unavailable() -> Option<String> {
    if gst::ElementFactory::find("ucxsink").is_none() {
        return Some(
            "the plugin has no ucxsink/ucxsrc (build it with `cargo build --release \
             -p gst-plugin-bufshare --features ucx`)"
                .into(),
        );
    }
    None
}

/// Runs (a) and (b) for every transport of `only` whose elements exist, `rounds` times,
/// interleaved (each round measures every size and transport, the transports' order turned
/// by one each round); errors go to `errors`.
pub fn run(ctx: &Context, only: &[Link], rounds: usize, errors: &mut Vec<String>) -> Saved {
    let mut saved = Saved {
        skipped: Vec::new(),
        rows: Vec::new(),
    };
    if let Some(why) = unavailable() {
        eprintln!("part 3: skipped: {why}");
        saved.skipped.push(why);
        return saved;
    }
    let netns = match Netns::new() {
        Ok(n) => n,
        Err(why) => {
            let why = format!("no network namespaces: {why} (part 3 needs root)");
            eprintln!("part 3: skipped: {why}");
            saved.skipped.push(why);
            return saved;
        }
    };
    let mut links = Vec::new();
    for link in Link::ALL.into_iter().filter(|l| only.contains(l)) {
        let missing: Vec<&str> = link
            .elements()
            .iter()
            .copied()
            .filter(|e| gst::ElementFactory::find(e).is_none())
            .collect();
        if missing.is_empty() {
            links.push(link);
        } else {
            saved.skipped.push(format!(
                "{}: no element {}",
                link.name(),
                missing.join(", ")
            ));
        }
    }
    let mut port = 7400;
    let mut sizes = vec![(true, LIVE.0, LIVE.1)];
    sizes.extend(RATE_SIZES.iter().map(|&(w, h)| (false, w, h)));
    for round in 0..rounds {
        for &(live, width, height) in &sizes {
            let mut order = links.clone();
            if !order.is_empty() {
                let turn = round % order.len();
                order.rotate_left(turn);
            }
            for link in order {
                port += 1;
                let what = if live { "live 1080p30" } else { "rate" };
                let seconds = if live { ctx.seconds } else { ctx.rate_seconds };
                eprintln!(
                    "part 3: round {}/{rounds}: {} {what} {width}x{height} ({seconds} s)...",
                    round + 1,
                    link.name()
                );
                let (mut row, found) =
                    measure(ctx, &netns, link, live, width, height, port, seconds);
                row.round = round;
                for e in found {
                    errors.push(format!(
                        "part 3 round {}/{rounds} {} {what} {width}x{height}: {e}",
                        round + 1,
                        link.name()
                    ));
                }
                saved.rows.push(row);
            }
        }
    }
    saved
}

#[allow(clippy::too_many_arguments)]
fn measure(
    ctx: &Context,
    netns: &Netns,
    link: Link,
    live: bool,
    width: u32,
    height: u32,
    port: u16,
    seconds: f64,
) -> (Row, Vec<String>) {
    let format = if link == Link::Rtp { "I420" } else { "NV12" };
    let mut extra = Vec::new();
    let source = if live {
        format!(
            "videotestsrc is-live=true pattern=solid-color ! \
             video/x-raw,format={format},width={width},height={height},framerate={}/1 ! \
             identity name=stamp sync=true",
            LIVE.2
        )
    } else {
        extra.extend([
            "--width".to_string(),
            width.to_string(),
            "--height".to_string(),
            height.to_string(),
        ]);
        match link {
            Link::Ucx => extra.push("--fd-memory".into()),
            Link::Rtp => extra.push("--i420".into()),
            Link::TcpGdp => {}
        }
        "appsrc name=feed".to_string()
    };
    let (a, b) = (SENDER_IP, RECEIVER_IP);
    let (sender, receiver) = match link {
        Link::Ucx => (
            format!(
                "{source} ! ucxsink address={a}:{port} transports=tcp sync=false {}",
                std::env::var("BUFSHARE_BENCH_UCXSINK_PROPS").unwrap_or_default()
            ),
            format!(
                "ucxsrc name=read0 address={a}:{port} transports=tcp timeout=20000 ! \
                 fakesink sync=false"
            ),
        ),
        Link::TcpGdp => (
            format!(
                "{source} ! gdppay ! tcpserversink host={a} port={port} \
                 units-soft-max=4 recover-policy=latest sync=false"
            ),
            format!(
                "tcpclientsrc host={a} port={port} ! gdpdepay name=read0 ! fakesink sync=false"
            ),
        ),
        Link::Rtp => (
            format!(
                "{source} ! rtpvrawpay ! udpsink host={b} port={port} \
                 buffer-size={UDP_BUFFER} sync=false"
            ),
            format!(
                "udpsrc address={b} port={port} buffer-size={UDP_BUFFER} \
                 caps=\"application/x-rtp,media=(string)video,clock-rate=(int)90000,\
                 encoding-name=(string)RAW,sampling=(string)YCbCr-4:2:0,depth=(string)8,\
                 width=(string){width},height=(string){height},payload=(int)96\" ! \
                 rtpvrawdepay name=read0 ! fakesink sync=false"
            ),
        ),
    };
    let env = |dev: &str| -> Vec<(OsString, OsString)> {
        vec![
            ("UCX_TLS".into(), "tcp".into()),
            ("UCX_NET_DEVICES".into(), dev.into()),
        ]
    };
    let label = format!(
        "x-{}-{}-{width}x{height}",
        link.name()
            .split(' ')
            .next()
            .unwrap_or("link")
            .replace('+', ""),
        if live { "live" } else { "rate" }
    );
    let [(ns_s, dev_s), (ns_r, dev_r)] = &netns.sides;
    let mut fleet = Fleet::new(&ctx.exe, &ctx.tmp, &[]);
    let mut ids: Vec<ChildId> = Vec::new();
    let mut errors = Vec::new();
    let spawn_sender = |fleet: &mut Fleet| {
        fleet.spawn_in(
            &format!("{label}-sender"),
            "producer",
            &sender,
            &extra,
            Some(ns_s),
            &env(dev_s),
        )
    };
    let spawn_receiver = |fleet: &mut Fleet| {
        fleet.spawn_in(
            &format!("{label}-receiver"),
            "consumer",
            &receiver,
            &[],
            Some(ns_r),
            &env(dev_r),
        )
    };
    // A TCP or UCX server listens before its client connects; a UDP receiver
    // is up before the first packet.
    let setup = if link == Link::Rtp {
        spawn_receiver(&mut fleet).and_then(|r| {
            ids.push(r);
            spawn_sender(&mut fleet).map(|_| ())
        })
    } else {
        spawn_sender(&mut fleet).and_then(|_| spawn_receiver(&mut fleet).map(|r| ids.push(r)))
    };
    match setup {
        Ok(()) => fleet.measure(ctx.warmup, seconds),
        Err(e) => errors.push(e),
    }
    let reports = fleet.finish_all(&ids);
    for r in &reports {
        errors.extend(r.errors.iter().cloned());
        if r.errors.is_empty() && !r.has_window() {
            errors.push(format!("{}: measured nothing", r.label));
        }
    }
    let side = |suffix: &str| reports.iter().find(|r| r.label.ends_with(suffix));
    let (s, r) = (side("-sender"), side("-receiver"));
    let mut lat: Vec<u64> = r.map(|r| r.latencies_ns.clone()).unwrap_or_default();
    lat.sort_unstable();
    let latency_ns = if live {
        percentile(&lat, 50.0).zip(percentile(&lat, 99.0))
    } else {
        None
    };
    let row = Row {
        link,
        live,
        width,
        height,
        failed: !errors.is_empty(),
        produced: s.map_or(0, |s| s.count("produced")),
        received: r.map_or(0, |r| r.count("read0")),
        window_ns: reports.iter().map(|r| r.window_ns).max().unwrap_or(0),
        sender_cpu_ns: s.map_or(0, |s| s.cpu_ns),
        receiver_cpu_ns: r.map_or(0, |r| r.cpu_ns),
        latency_ns,
        round: 0,
    };
    (row, errors)
}

/// Median, lowest and highest of the rounds' values of one figure.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(mut v: Vec<f64>) -> Option<Spread> {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    /// `median` alone for one round, `median (min-max)` for more.
    fn show(&self, decimals: usize) -> String {
        let f = |x: f64| format!("{x:.decimals$}");
        if self.n > 1 {
            format!("{} ({}-{})", f(self.median), f(self.min), f(self.max))
        } else {
            f(self.median)
        }
    }
}

fn show(s: Option<Spread>, decimals: usize) -> String {
    s.map_or("-".into(), |s| s.show(decimals))
}

/// Every round of one transport at one size and mode.
pub struct Point<'a> {
    pub link: Link,
    pub live: bool,
    pub width: u32,
    pub height: u32,
    /// Rounds that measured something without errors.
    pub good: Vec<&'a Row>,
    pub failed: usize,
}

impl Point<'_> {
    fn spread(&self, f: impl Fn(&Row) -> Option<f64>) -> Option<Spread> {
        Spread::of(self.good.iter().filter_map(|r| f(r)).collect())
    }
    pub fn rate(&self) -> Option<Spread> {
        self.spread(Row::frames_per_s)
    }
    pub fn sender_us(&self) -> Option<Spread> {
        self.spread(|r| r.cpu_us().map(|c| c.0))
    }
    pub fn receiver_us(&self) -> Option<Spread> {
        self.spread(|r| r.cpu_us().map(|c| c.1))
    }
    pub fn total_us(&self) -> Option<Spread> {
        self.spread(|r| r.cpu_us().map(|c| c.0 + c.1))
    }
    fn mark(&self) -> String {
        if self.failed == 0 {
            String::new()
        } else {
            format!(
                " (errors in {} of {} rounds)",
                self.failed,
                self.failed + self.good.len()
            )
        }
    }
}

/// The measured points, in the order first measured.
pub fn points(saved: &Saved) -> Vec<Point<'_>> {
    let mut out: Vec<Point<'_>> = Vec::new();
    for r in &saved.rows {
        let i = match out.iter().position(|p| {
            p.link == r.link && p.live == r.live && p.width == r.width && p.height == r.height
        }) {
            Some(i) => i,
            None => {
                out.push(Point {
                    link: r.link,
                    live: r.live,
                    width: r.width,
                    height: r.height,
                    good: Vec::new(),
                    failed: 0,
                });
                out.len() - 1
            }
        };
        if r.failed || !r.measured() {
            out[i].failed += 1;
        } else {
            out[i].good.push(r);
        }
    }
    out
}

fn rounds(saved: &Saved) -> usize {
    saved.rows.iter().map(|r| r.round + 1).max().unwrap_or(0)
}

/// Part 3's tables, markdown.
pub fn report(saved: &Saved) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Part 3: cross-host, two network namespaces over a veth pair (TCP)\n"
    );
    for why in &saved.skipped {
        let _ = writeln!(out, "- not measured: {why}");
    }
    if !saved.skipped.is_empty() {
        let _ = writeln!(out);
    }
    if saved.rows.is_empty() {
        return out;
    }
    let n = rounds(saved);
    if n > 1 {
        let _ = writeln!(
            out,
            "Median of {n} interleaved rounds, lowest-highest round in parentheses.\n"
        );
    }
    let points = points(saved);
    let _ = writeln!(out, "### (a) live 1080p30 (videotestsrc is-live)\n");
    let _ = writeln!(
        out,
        "| transport | frames sent | frames delivered | sender CPU µs/frame | receiver CPU µs/frame | latency p50 ms | p99 ms |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    for p in points.iter().filter(|p| p.live) {
        let lat = |i: usize| p.spread(|r| r.latency_ns.map(|l| [l.0, l.1][i] as f64 / 1e6));
        let _ = writeln!(
            out,
            "| {}{} | {} | {} | {} | {} | {} | {} |",
            p.link.name(),
            p.mark(),
            show(p.spread(|r| Some(r.produced as f64)), 0),
            show(p.spread(|r| Some(r.received as f64)), 0),
            show(p.sender_us(), 0),
            show(p.receiver_us(), 0),
            show(lat(0), 2),
            show(lat(1), 2),
        );
    }
    let _ = writeln!(
        out,
        "\nSender CPU includes videotestsrc filling the frames. Latency: from the \
         sender's identity (sync=true) letting the frame go to the receiver's element \
         pushing it (both namespaces share CLOCK_MONOTONIC).\n"
    );
    let _ = writeln!(out, "### (b) highest rate of one link, sync=false\n");
    let _ = writeln!(
        out,
        "| transport | size | frame KiB | frames/s | sender CPU µs/frame | receiver CPU µs/frame | total µs/frame |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
    for p in points.iter().filter(|p| !p.live) {
        let kib = nv12_size(p.width, p.height) / 1024;
        let _ = writeln!(
            out,
            "| {}{} | {}x{} | {kib} | {} | {} | {} | {} |",
            p.link.name(),
            p.mark(),
            p.width,
            p.height,
            show(p.rate(), 0),
            show(p.sender_us(), 0),
            show(p.receiver_us(), 0),
            show(p.total_us(), 0),
        );
    }
    let _ = writeln!(
        out,
        "\n### ucx / tcp+gdp (target: frame rate ≥ 1.5x, less CPU per frame)\n"
    );
    if n > 1 {
        let _ = writeln!(
            out,
            "Ratios of the medians; in parentheses the lowest and highest ratio of one round's \
             two runs (measured one after the other).\n"
        );
    }
    let _ = writeln!(
        out,
        "| run | frame rate ucx / tcp+gdp | CPU per frame ucx / tcp+gdp | target |"
    );
    let _ = writeln!(out, "|---|---:|---:|---|");
    for u in points.iter().filter(|p| p.link == Link::Ucx) {
        let Some(t) = points.iter().find(|p| {
            p.link == Link::TcpGdp && p.live == u.live && p.width == u.width && p.height == u.height
        }) else {
            continue;
        };
        let name = if u.live {
            "live 1080p30".to_string()
        } else {
            format!("rate {}x{}", u.width, u.height)
        };
        let ratio =
            |a: Option<Spread>, b: Option<Spread>| a.zip(b).map(|(a, b)| a.median / b.median);
        let rate = ratio(u.rate(), t.rate());
        let cpu = ratio(u.total_us(), t.total_us());
        // Per round: the two runs of the same round.
        let per_round = |f: fn(&Row) -> Option<f64>| {
            Spread::of(
                u.good
                    .iter()
                    .filter_map(|a| {
                        let b = t.good.iter().find(|b| b.round == a.round)?;
                        Some(f(a)? / f(b)?)
                    })
                    .collect(),
            )
        };
        let total = |r: &Row| r.cpu_us().map(|(s, r)| s + r);
        let fmt = |v: Option<f64>, range: Option<Spread>| match (v, range) {
            (None, _) => "-".to_string(),
            (Some(v), Some(r)) if r.n > 1 => format!("{v:.2}x ({:.2}-{:.2}x)", r.min, r.max),
            (Some(v), _) => format!("{v:.2}x"),
        };
        // A live source caps the rate at 30 fps: there only the CPU counts.
        let verdict = match (rate, cpu) {
            (_, None) | (None, _) => "-".to_string(),
            (Some(r), Some(c)) => {
                let mut missed = Vec::new();
                if !u.live && r < 1.5 {
                    missed.push(format!("rate {r:.3}x < 1.5x"));
                }
                if c >= 1.0 {
                    missed.push("CPU per frame not lower".to_string());
                }
                if missed.is_empty() {
                    "met".to_string()
                } else {
                    format!("missed ({})", missed.join(", "))
                }
            }
        };
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {verdict} |",
            fmt(rate, per_round(Row::frames_per_s)),
            fmt(cpu, per_round(total)),
        );
    }
    let _ = writeln!(
        out,
        "\nOn one machine over veth this measures UCX's software path (its TCP \
         transport), not RDMA. rtp (udp) carries I420 (RFC 4175 has no NV12), and \
         counts the frames its depayloader pushed, complete or not.\n"
    );
    out
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A small part 3 for the results.json round trip.
    pub fn fake() -> Saved {
        Saved {
            skipped: vec![],
            rows: vec![
                row(Link::Ucx, true, 1920, 1080, 30, 800),
                row(Link::Rtp, false, 640, 480, 500, 1500),
            ],
        }
    }

    fn row(link: Link, live: bool, w: u32, h: u32, received: u64, cpu_us: u64) -> Row {
        Row {
            link,
            live,
            width: w,
            height: h,
            failed: false,
            produced: received,
            received,
            window_ns: 1_000_000_000,
            sender_cpu_ns: cpu_us * 1000 * received / 2,
            receiver_cpu_ns: cpu_us * 1000 * received / 2,
            latency_ns: live.then_some((1_500_000, 3_000_000)),
            round: 0,
        }
    }

    #[test]
    fn tables_and_ratios() {
        let saved = Saved {
            skipped: vec!["rtp (udp): no element rtpvrawpay".into()],
            rows: vec![
                row(Link::Ucx, true, 1920, 1080, 30, 800),
                row(Link::TcpGdp, true, 1920, 1080, 30, 1000),
                row(Link::Ucx, false, 1920, 1080, 300, 2000),
                row(Link::TcpGdp, false, 1920, 1080, 100, 4000),
                row(Link::Ucx, false, 640, 480, 120, 900),
                row(Link::TcpGdp, false, 640, 480, 100, 800),
            ],
        };
        let t = report(&saved);
        assert!(t.contains("- not measured: rtp (udp): no element"), "{t}");
        assert!(
            t.contains("| ucx | 30 | 30 | 400 | 400 | 1.50 | 3.00 |"),
            "{t}"
        );
        assert!(
            t.contains("| tcp+gdp | 1920x1080 | 3037 | 100 | 2000 | 2000 | 4000 |"),
            "{t}"
        );
        assert!(t.contains("| live 1080p30 | 1.00x | 0.80x | met |"), "{t}");
        assert!(
            t.contains("| rate 1920x1080 | 3.00x | 0.50x | met |"),
            "{t}"
        );
    }

    #[test]
    fn rounds_give_medians_ranges_and_paired_ratios() {
        let mut rows = Vec::new();
        for (round, (ucx, tcp)) in [(300, 100), (200, 100), (400, 200)].into_iter().enumerate() {
            let mut u = row(Link::Ucx, false, 1920, 1080, ucx, 2000);
            let mut t = row(Link::TcpGdp, false, 1920, 1080, tcp, 4000);
            u.round = round;
            t.round = round;
            rows.extend([u, t]);
        }
        let mut failed = row(Link::TcpGdp, false, 1920, 1080, 900, 1);
        failed.failed = true;
        failed.round = 3;
        rows.push(failed);
        let t = report(&Saved {
            skipped: vec![],
            rows,
        });
        assert!(t.contains("Median of 4 interleaved rounds"), "{t}");
        assert!(
            t.contains("| ucx | 1920x1080 | 3037 | 300 (200-400) | 1000 (1000-1000) | 1000 (1000-1000) | 2000 (2000-2000) |"),
            "{t}"
        );
        assert!(
            t.contains("| tcp+gdp (errors in 1 of 4 rounds) | 1920x1080 | 3037 | 100 (100-200) |"),
            "{t}"
        );
        // Ratio of medians 300/100; per round 3.0, 2.0, 2.0.
        assert!(
            t.contains("| rate 1920x1080 | 3.00x (2.00-3.00x) | 0.50x (0.50-0.50x) | met |"),
            "{t}"
        );
        assert_eq!(Spread::of(vec![4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert_eq!(Link::from_name("tcp+gdp"), Some(Link::TcpGdp));
        assert_eq!(Link::from_name("bufshare"), None);
    }
}
