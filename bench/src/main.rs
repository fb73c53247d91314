//! `bufshare-bench`: side-by-side measurements of bufshare (bufsharesink /
//! bufsharesrc) against GStreamer's shmsink/shmsrc, unixfdsink/unixfdsrc
//! (GStreamer >= 1.24, when found) and an in-process tee.
//!
//! Run from the workspace root:
//!
//! ```text
//! cargo build --release && target/release/bufshare-bench
//! ```
//!
//! Options: see `USAGE` (`--help`). What it measures, with real processes
//! (the bench re-executes itself for each producer and consumer, see
//! roles.rs):
//!
//! - Part 1, fan-out (part1.rs): a live NV12 `videotestsrc
//!   pattern=solid-color` producer at 320x240 60 fps and 1080p 30 fps, with
//!   1, 3, (4 at 1080p) and 8 consumers per transport, and each transport's
//!   producer alone with the same sink (the baseline). Per row: frames
//!   produced and per consumer, CPU %, transport CPU per frame per consumer
//!   (everything minus that transport's baseline, per frame, divided by the
//!   consumers), latency p50/p99 from the producer's sink rendering a frame
//!   to a consumer's source pushing it, and the ratios to shm and unixfd;
//!   medians of `--rounds` interleaved rounds; then met/missed lines for the
//!   targets of issue 9.
//! - Part 2, link rate: one producer pushing 8 prepared frames in a loop
//!   (no pixel generation), one consumer, sync=false, at 640x480, 1080p and
//!   4K, bufshare and shm: frames per second received and CPU per frame of
//!   both processes.
//!
//! The bench does not link the plugin: children find it via GST_PLUGIN_PATH.
//! unixfd children may run on another GStreamer install (gstprefix.rs). The
//! report (markdown, on stdout) is printed at the end, with the machine's
//! load average at start and end in its header; progress goes to stderr. The
//! exit status is non-zero if a pipeline failed or the plugin was not usable.

mod gstprefix;
mod measure;
mod part1;
mod roles;
mod runner;
mod scenarios;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use gstprefix::Unixfd;
use scenarios::{Context, Outcome, Transport};

const PLUGIN_FILE: &str = "libgstbufshare.so";
const RATE_SIZES: [(u32, u32); 3] = [(640, 480), (1920, 1080), (3840, 2160)];
/// Start-up and shutdown of a run's processes, beyond warm-up and window (for the estimate).
const RUN_OVERHEAD_S: f64 = 0.5;

const USAGE: &str = "\
usage: bufshare-bench [--seconds N] [--rounds N] [--warmup N] [--rate-seconds N]
                      [--quick] [--only bufshare,shm,unixfd,tee] [--part 1|2]
                      [--plugin-dir DIR]

  --seconds N        measured duration of each part 1 (fan-out) run, default 10
  --rounds N         part 1 rounds, interleaved (every transport and consumer
                     count once per round); rows show the median, default 3
  --warmup N         seconds between starting a run's processes and measuring,
                     default 1
  --rate-seconds N   duration of each part 2 (link rate) run, default 5
  --quick            smoke test: 2 s runs, 1 round, 1 and 3 consumers at
                     320x240, 4 at 1080p
  --only LIST        transports to measure (comma-separated)
  --part 1|2         run only part 1 (fan-out) or part 2 (link rate)
  --plugin-dir DIR   directory holding libgstbufshare.so
                     (default: the directory of this executable)

environment:
  BUFSHARE_BENCH_GST_PREFIX=DIR   install prefix of a GStreamer >= 1.24 that
                     has unixfdsink/unixfdsrc (e.g. /opt/gst-1.24); the unixfd
                     children run on it (its lib/<multiarch>/gstreamer-1.0 and
                     lib on GST_PLUGIN_SYSTEM_PATH_1_0 and LD_LIBRARY_PATH).
                     Without it, unixfd is measured only if this GStreamer has it.";

struct Options {
    seconds: f64,
    rate_seconds: f64,
    warmup: f64,
    rounds: usize,
    quick: bool,
    transports: Vec<Transport>,
    parts: Vec<u8>,
    plugin_dir: Option<PathBuf>,
}

fn parse_options(args: &[String]) -> Result<Options, String> {
    let mut quick = false;
    let mut seconds = None;
    let mut rate_seconds = None;
    let mut warmup = None;
    let mut rounds = None;
    let mut transports = Transport::ALL.to_vec();
    let mut parts = vec![1, 2];
    let mut plugin_dir = None;
    let mut it = args.iter();
    let positive = |name: &str, v: Option<&String>| -> Result<f64, String> {
        let v = v.ok_or(format!("{name} needs a value"))?;
        match v.parse::<f64>() {
            Ok(x) if x > 0.0 && x.is_finite() => Ok(x),
            _ => Err(format!("{name}: not a positive number: {v}")),
        }
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => seconds = Some(positive(arg, it.next())?),
            "--rate-seconds" => rate_seconds = Some(positive(arg, it.next())?),
            "--warmup" => warmup = Some(positive(arg, it.next())?),
            "--rounds" => {
                let v = it.next().ok_or("--rounds needs a value")?;
                rounds = Some(match v.parse::<usize>() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(format!("--rounds: not a positive integer: {v}")),
                });
            }
            "--quick" => quick = true,
            "--only" => {
                let list = it.next().ok_or("--only needs a value")?;
                transports = list
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| Transport::from_name(s.trim()).ok_or(format!("unknown transport {s}")))
                    .collect::<Result<_, _>>()?;
            }
            "--part" => {
                parts = match it.next().map(String::as_str) {
                    Some("1") => vec![1],
                    Some("2") => vec![2],
                    _ => return Err("--part needs 1 or 2".into()),
                }
            }
            "--plugin-dir" => {
                plugin_dir = Some(PathBuf::from(
                    it.next().ok_or("--plugin-dir needs a value")?,
                ))
            }
            "-h" | "--help" => return Err(String::new()), // USAGE on stdout
            other => return Err(format!("unknown option {other}")),
        }
    }
    let default_seconds = if quick { 2.0 } else { 10.0 };
    let default_rate_seconds = if quick { 2.0 } else { 5.0 };
    Ok(Options {
        seconds: seconds.unwrap_or(default_seconds),
        rate_seconds: rate_seconds.unwrap_or(default_rate_seconds),
        warmup: warmup.unwrap_or(1.0),
        rounds: rounds.unwrap_or(if quick { 1 } else { 3 }),
        quick,
        transports,
        parts,
        plugin_dir,
    })
}

/// Where the bufshare plugin is, and whether it loads.
struct Plugin {
    file: PathBuf,
    problem: Option<String>,
}

/// Finds libgstbufshare.so (in `--plugin-dir`, else next to this executable,
/// else in the workspace's target/release) and puts its directory on
/// GST_PLUGIN_PATH, for this process and the children. Must run before
/// `gst::init`.
fn locate_plugin(exe: &Path, dir: Option<&Path>) -> Plugin {
    let candidates: Vec<PathBuf> = match dir {
        Some(d) => vec![d.to_path_buf()],
        None => {
            let exe_dir = exe.parent().unwrap_or(Path::new("."));
            vec![exe_dir.to_path_buf(), exe_dir.join("../release")]
        }
    };
    let Some(file) = candidates
        .iter()
        .map(|d| d.join(PLUGIN_FILE))
        .find(|f| f.is_file())
    else {
        let file = candidates[0].join(PLUGIN_FILE);
        return Plugin {
            problem: Some(format!(
                "{} not found (build it with `cargo build --release -p gst-plugin-bufshare` \
                 or pass --plugin-dir DIR)",
                file.display()
            )),
            file,
        };
    };
    let file = file.canonicalize().unwrap_or(file);
    let dir = file
        .parent()
        .unwrap_or(Path::new("."))
        .as_os_str()
        .to_owned();
    let mut path = dir;
    if let Some(old) = std::env::var_os("GST_PLUGIN_PATH").filter(|p| !p.is_empty()) {
        path.push(":");
        path.push(old);
    }
    // Single-threaded still: nothing else reads the environment concurrently.
    std::env::set_var("GST_PLUGIN_PATH", &path);
    Plugin {
        file,
        problem: None,
    }
}

/// After `gst::init`: checks that the plugin provides both elements.
fn check_plugin(plugin: &mut Plugin) {
    if plugin.problem.is_some() {
        return;
    }
    let missing: Vec<&str> = ["bufsharesink", "bufsharesrc"]
        .into_iter()
        .filter(|name| gst::ElementFactory::find(name).is_none())
        .collect();
    if !missing.is_empty() {
        let why = match gst::Plugin::load_file(&plugin.file) {
            Err(e) => format!("it does not load: {e}"),
            Ok(_) => "it loads but does not register them".to_string(),
        };
        plugin.problem = Some(format!(
            "{}: no element {} ({why})",
            plugin.file.display(),
            missing.join(", ")
        ));
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("__child") => return ExitCode::from(roles::child_main(&args[1..]) as u8),
        Some("__probe") => return ExitCode::from(gstprefix::probe_main(&args[1..]) as u8),
        _ => {}
    }
    let opts = match parse_options(&args) {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("bufshare-bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match orchestrate(&opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bufshare-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs everything and prints the report. Ok(false): something failed.
fn orchestrate(opts: &Options) -> Result<bool, String> {
    let started = Instant::now();
    let load_start = measure::loadavg();
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut plugin = locate_plugin(&exe, opts.plugin_dir.as_deref());
    gst::init().map_err(|e| format!("gst::init: {e}"))?;
    check_plugin(&mut plugin);

    let mut tmp = runner::TempDir::new().map_err(|e| format!("temp dir: {e}"))?;
    let mut unavailable = BTreeMap::new();
    let mut unixfd_env = Vec::new();
    let mut unixfd_source = None;
    if opts.parts.contains(&1) && opts.transports.contains(&Transport::Unixfd) {
        match gstprefix::find_unixfd(&exe, &tmp.path) {
            Unixfd::Available { env, source } => {
                unixfd_env = env;
                unixfd_source = Some(source);
            }
            Unixfd::Missing(why) => {
                unavailable.insert(Transport::Unixfd, why);
            }
        }
    }
    let mut ok = true;
    if let Some(problem) = &plugin.problem {
        if opts.transports.contains(&Transport::Bufshare) {
            eprintln!("bufshare-bench: skipping bufshare rows: {problem}");
            unavailable.insert(Transport::Bufshare, format!("plugin not usable: {problem}"));
            ok = false;
        }
    }
    let ctx = Context {
        exe,
        tmp: tmp.path.clone(),
        seconds: opts.seconds,
        rate_seconds: opts.rate_seconds,
        warmup: Duration::from_secs_f64(opts.warmup),
        unixfd_env,
    };
    let settings = part1::Settings {
        rounds: opts.rounds,
        quick: opts.quick,
        transports: opts.transports.clone(),
        unavailable,
    };
    let link_transports: Vec<Transport> = opts
        .transports
        .iter()
        .copied()
        .filter(|t| matches!(t, Transport::Bufshare | Transport::Shm))
        .filter(|t| !settings.unavailable.contains_key(t))
        .collect();

    let part1_runs = if opts.parts.contains(&1) {
        settings.runs()
    } else {
        0
    };
    let part2_runs = if opts.parts.contains(&2) {
        link_transports.len() * RATE_SIZES.len()
    } else {
        0
    };
    let estimate = part1_runs as f64 * (opts.seconds + opts.warmup + RUN_OVERHEAD_S)
        + part2_runs as f64 * (opts.rate_seconds + opts.warmup + RUN_OVERHEAD_S);
    eprintln!(
        "bufshare-bench: {part1_runs} part 1 runs, {part2_runs} part 2 runs: about {:.0} min",
        estimate / 60.0
    );

    let mut errors: Vec<String> = Vec::new();
    let mut body = String::new();
    if part1_runs > 0 {
        let results = part1::run(&ctx, &settings, &mut errors);
        body.push_str(&part1::report(&results, &settings));
    }
    if part2_runs > 0 {
        body.push_str(&part2(&ctx, &link_transports, &mut errors));
    }

    let mut out = String::new();
    let _ = writeln!(out, "# bufshare-bench\n");
    let _ = writeln!(
        out,
        "- machine: {} CPUs, {}",
        measure::nproc(),
        measure::cpu_model()
    );
    let _ = writeln!(
        out,
        "- load average (1/5/15 min): {load_start} at start, {} at end; wall time {:.0} s",
        measure::loadavg(),
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(out, "- {}", gst::version_string());
    if opts.parts.contains(&1) {
        let _ = writeln!(
            out,
            "- part 1: {} round(s) of {} s runs, each after a {} s warm-up",
            opts.rounds, opts.seconds, opts.warmup
        );
    }
    if opts.parts.contains(&2) {
        let _ = writeln!(
            out,
            "- part 2: {} s per size, after a {} s warm-up",
            opts.rate_seconds, opts.warmup
        );
    }
    match &plugin.problem {
        None => {
            let _ = writeln!(out, "- bufshare plugin: {}", plugin.file.display());
        }
        Some(p) => {
            let _ = writeln!(out, "- bufshare plugin: NOT USABLE: {p}");
        }
    }
    if let Some(source) = &unixfd_source {
        let _ = writeln!(out, "- unixfd: {source}");
    } else if let Some(why) = settings.unavailable.get(&Transport::Unixfd) {
        let _ = writeln!(out, "- unixfd: {why}");
    }
    let _ = writeln!(out);
    out.push_str(&body);

    if !errors.is_empty() {
        ok = false;
        tmp.keep = true;
        let _ = writeln!(out, "## Errors\n");
        for e in &errors {
            let _ = writeln!(out, "- {e}");
        }
        let _ = writeln!(out, "\n(logs kept in {})", tmp.path.display());
    }
    if let Some(problem) = &plugin.problem {
        if opts.transports.contains(&Transport::Bufshare) {
            let _ = writeln!(out, "\nbufshare rows skipped: {problem}");
        }
    }
    print!("{out}");
    Ok(ok)
}

fn us(ns: f64) -> f64 {
    ns / 1000.0
}

fn collect_errors(what: &str, outcome: &Outcome, errors: &mut Vec<String>) -> bool {
    let found = outcome.all_errors();
    for e in &found {
        errors.push(format!("{what}: {e}"));
    }
    found.is_empty()
}

fn part2(ctx: &Context, transports: &[Transport], errors: &mut Vec<String>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Part 2: highest rate of one link, NV12, sync=false\n"
    );
    let _ = writeln!(
        out,
        "| transport | size | frame KiB | frames/s | CPU µs/frame (producer+consumer) | CPU total % |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|");
    for &transport in transports {
        for (w, h) in RATE_SIZES {
            eprintln!(
                "part 2: {} {w}x{h} ({} s)...",
                transport.name(),
                ctx.rate_seconds
            );
            let outcome = scenarios::rate(ctx, transport, w, h);
            let what = format!("{} at {w}x{h}", transport.name());
            let clean = collect_errors(&what, &outcome, errors);
            let mark = if clean { "" } else { " (error)" };
            let kib = roles::nv12_size(w, h) / 1024;
            let received: u64 = outcome.reports.iter().flat_map(|r| r.reader_counts()).sum();
            let window = outcome
                .reports
                .iter()
                .map(|r| r.window_ns)
                .max()
                .unwrap_or(0);
            if received == 0 || window == 0 {
                let _ = writeln!(
                    out,
                    "| {}{mark} | {w}x{h} | {kib} | - | - | - |",
                    transport.name()
                );
                continue;
            }
            let cpu = outcome.cpu_ns() as f64;
            let _ = writeln!(
                out,
                "| {}{mark} | {w}x{h} | {kib} | {:.0} | {:.1} | {:.1} |",
                transport.name(),
                received as f64 / (window as f64 / 1e9),
                us(cpu / received as f64),
                100.0 * cpu / window as f64
            );
        }
    }
    let _ = writeln!(
        out,
        "\nThe producer pushes clones of 8 prepared frames (memfd-backed for bufshare, \
         system memory for shm, which copies anyway).\n"
    );
    out
}
