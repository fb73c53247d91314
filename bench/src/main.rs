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
//! - Part 3, cross-host (part3.rs): sender and receiver in two network
//!   namespaces joined by a veth pair, over ucxsink/ucxsrc, tcp+gdp and
//!   RTP (RFC 4175) over UDP: live 1080p30 (frames, CPU per frame per side,
//!   latency) and the highest rate of one link at three sizes; medians of
//!   `--rounds` interleaved rounds with the lowest and highest round.
//!
//! The bench does not link the plugin: children find it via GST_PLUGIN_PATH.
//! unixfd children may run on another GStreamer install (gstprefix.rs). The
//! report (markdown, on stdout) is printed at the end, with the machine's
//! load average at start and end in its header; progress goes to stderr. The
//! exit status is non-zero if a pipeline failed, the plugin was not usable,
//! or the results or charts could not be written.
//!
//! Results and charts (results.rs, plots.rs) go to the `--plots` directory
//! (default `target/bench-plots`): `results.json` (every run's raw figures
//! and latency samples), `report.md` (the report) and PNG charts.
//! `--plot-from FILE` makes the report and the charts again from a
//! results.json without measuring.

mod gstprefix;
mod measure;
mod part1;
mod part2;
mod part3;
mod plots;
mod results;
mod roles;
mod runner;
mod scenarios;
mod wakefloor;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gstprefix::Unixfd;
use part2::RATE_SIZES;
use results::{Meta, Saved};
use scenarios::{Context, Transport};

const PLUGIN_FILE: &str = "libgstbufshare.so";
/// Where results.json, report.md and the charts go without `--plots`.
const DEFAULT_PLOTS_DIR: &str = "target/bench-plots";
/// Start-up and shutdown of a run's processes, beyond warm-up and window (for the estimate).
const RUN_OVERHEAD_S: f64 = 0.5;

const USAGE: &str = "\
usage: bufshare-bench [--seconds N] [--rounds N] [--warmup N] [--rate-seconds N]
                      [--quick] [--only bufshare,shm,unixfd,tee,ucx,tcp+gdp,rtp]
                      [--part 1|2|3]
                      [--plugin-dir DIR] [--plots DIR]
       bufshare-bench --plot-from FILE [--plots DIR]

  --seconds N        measured duration of each part 1 (fan-out) run, default 10
  --rounds N         rounds of parts 1 and 3, interleaved (every transport and
                     consumer count or size once per round); rows show the
                     median (part 3: and the lowest-highest round), default 3
  --warmup N         seconds between starting a run's processes and measuring,
                     default 1
  --rate-seconds N   duration of each part 2 (link rate) run, default 5
  --quick            smoke test: 2 s runs, 1 round, 1 and 3 consumers at
                     320x240, 4 at 1080p
  --only LIST        transports to measure (comma-separated): bufshare, shm,
                     unixfd, tee (parts 1, 2); ucx, tcp+gdp, rtp (part 3; only
                     these names: part 3 alone)
  --part 1|2|3       run only part 1 (fan-out), part 2 (link rate) or part 3
                     (cross-host: two network namespaces joined by a veth
                     pair, made and deleted by the bench, so it needs root;
                     ucxsink/ucxsrc vs tcpserversink+gdppay vs rtpvrawpay over
                     UDP, live 1080p30 for --seconds and the link rate for
                     --rate-seconds). Part 3 needs the plugin built with UCX:
                     cargo build --release -p gst-plugin-bufshare --features ucx
                     (skipped, saying why, without it or without namespaces)
  --plugin-dir DIR   directory holding libgstbufshare.so
                     (default: the directory of this executable)
  --plots DIR        where to write results.json (every run's figures and
                     latency samples), report.md (the report also printed on
                     stdout) and the PNG charts; created if missing, files of
                     the same names replaced (default: target/bench-plots)
  --plot-from FILE   measure nothing: read a results.json of an earlier run,
                     print its report and draw its charts into --plots DIR

charts (fonts: DejaVu Sans, Debian package fonts-dejavu-core, or the TTF file
in BUFSHARE_BENCH_FONT): cpu-vs-consumers.png, cpu-vs-size.png,
latency-cdf.png, latency-percentiles.png (part 1), link-rate.png (part 2),
cross-host.png (part 3)

environment:
  BUFSHARE_BENCH_SRC_PROPS=\"PROPS\"  extra bufsharesrc properties of part 1
                     consumers, e.g. frame-ring=false (the socket path)
  BUFSHARE_BENCH_GST_PREFIX=DIR   install prefix of a GStreamer >= 1.24 that
                     has unixfdsink/unixfdsrc (e.g. /opt/gst-1.24); the unixfd
                     children run on it (its lib/<multiarch>/gstreamer-1.0 and
                     lib on GST_PLUGIN_SYSTEM_PATH_1_0 and LD_LIBRARY_PATH).
                     Without it, unixfd is measured only if this GStreamer has it.
  BUFSHARE_BENCH_UCXSINK_PROPS=\"PROPS\"  extra ucxsink properties of part 3,
                     e.g. max-inflight=4";

#[derive(Debug)]
struct Options {
    seconds: f64,
    rate_seconds: f64,
    warmup: f64,
    rounds: usize,
    quick: bool,
    transports: Vec<Transport>,
    /// Part 3's transports.
    links: Vec<part3::Link>,
    parts: Vec<u8>,
    plugin_dir: Option<PathBuf>,
    plots: PathBuf,
    plot_from: Option<PathBuf>,
}

fn parse_options(args: &[String]) -> Result<Options, String> {
    let mut quick = false;
    let mut seconds = None;
    let mut rate_seconds = None;
    let mut warmup = None;
    let mut rounds = None;
    let mut transports = Transport::ALL.to_vec();
    let mut parts = vec![1, 2, 3];
    let mut links = part3::Link::ALL.to_vec();
    let mut part_given = false;
    let mut plugin_dir = None;
    let mut plots = PathBuf::from(DEFAULT_PLOTS_DIR);
    let mut plot_from = None;
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
                let (mut t, mut l) = (Vec::new(), Vec::new());
                for s in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    if let Some(x) = Transport::from_name(s) {
                        t.push(x);
                    } else if let Some(x) = part3::Link::from_name(s) {
                        l.push(x);
                    } else {
                        return Err(format!("unknown transport {s}"));
                    }
                }
                // Part 3's names only: parts 1 and 2 have nothing to measure.
                if t.is_empty() {
                    parts.retain(|&p| p == 3);
                }
                if !l.is_empty() {
                    links = l;
                }
                transports = t;
            }
            "--part" => {
                part_given = true;
                parts = match it.next().map(String::as_str) {
                    Some("1") => vec![1],
                    Some("2") => vec![2],
                    Some("3") => vec![3],
                    _ => return Err("--part needs 1, 2 or 3".into()),
                }
            }
            "--plugin-dir" => {
                plugin_dir = Some(PathBuf::from(
                    it.next().ok_or("--plugin-dir needs a value")?,
                ))
            }
            "--plots" => plots = PathBuf::from(it.next().ok_or("--plots needs a directory")?),
            "--plot-from" => {
                plot_from = Some(PathBuf::from(
                    it.next().ok_or("--plot-from needs a results.json")?,
                ))
            }
            "-h" | "--help" => return Err(String::new()), // USAGE on stdout
            other => return Err(format!("unknown option {other}")),
        }
    }
    if part_given && parts.is_empty() {
        return Err("--part and --only name nothing to measure together".into());
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
        links,
        parts,
        plugin_dir,
        plots,
        plot_from,
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
        Some("__wake") => return ExitCode::from(wakefloor::child_main() as u8),
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
    if let Some(file) = &opts.plot_from {
        let saved = Saved::read(file)?;
        print!("{}", saved.report(None)?);
        return Ok(write_outputs(&saved, &opts.plots, Some(file)));
    }
    let started = Instant::now();
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
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
    let part3_links = if opts.parts.contains(&3) {
        opts.links.len()
    } else {
        0
    };
    let part3_runs = part3::runs(part3_links, opts.rounds);
    let part3_live = part3_links * opts.rounds;
    // Part 1 also measures the wake-up floor once per round, for --seconds.
    let part1_floor = if part1_runs > 0 { opts.rounds } else { 0 };
    let estimate = part1_runs as f64 * (opts.seconds + opts.warmup + RUN_OVERHEAD_S)
        + part1_floor as f64 * (opts.seconds + RUN_OVERHEAD_S)
        + part2_runs as f64 * (opts.rate_seconds + opts.warmup + RUN_OVERHEAD_S)
        + (part3_live as f64 * (opts.seconds + opts.warmup + RUN_OVERHEAD_S)
            + (part3_runs - part3_live) as f64
                * (opts.rate_seconds + opts.warmup + RUN_OVERHEAD_S));
    eprintln!(
        "bufshare-bench: {part1_runs} part 1 runs, {part2_runs} part 2 runs, \
         {part3_runs} part 3 runs: about {:.0} min",
        estimate / 60.0
    );

    let mut errors: Vec<String> = Vec::new();
    let part1 = (part1_runs > 0).then(|| {
        let results = part1::run(&ctx, &settings, &mut errors);
        part1::Saved::new(&results, &settings)
    });
    let part2 = (part2_runs > 0).then(|| part2::run(&ctx, &link_transports, &mut errors));
    let part3 = (part3_runs > 0).then(|| part3::run(&ctx, &opts.links, opts.rounds, &mut errors));

    let unixfd = if let Some(source) = unixfd_source {
        Some(source)
    } else {
        settings.unavailable.get(&Transport::Unixfd).cloned()
    };
    let saved = Saved {
        format: results::FORMAT,
        meta: Meta {
            started_unix_s,
            cpus: measure::nproc(),
            cpu_model: measure::cpu_model(),
            load_start,
            load_end: measure::loadavg(),
            wall_s: started.elapsed().as_secs_f64(),
            gstreamer: gst::version_string().to_string(),
            seconds: opts.seconds,
            warmup: opts.warmup,
            rate_seconds: opts.rate_seconds,
            plugin: match &plugin.problem {
                None => Ok(plugin.file.display().to_string()),
                Some(p) => Err(p.clone()),
            },
            unixfd,
        },
        part1,
        part2,
        part3,
        errors,
    };
    if !saved.errors.is_empty() {
        ok = false;
        tmp.keep = true;
    }
    let logs = tmp.keep.then_some(tmp.path.as_path());
    print!("{}", saved.report(logs)?);
    Ok(write_outputs(&saved, &opts.plots, None) && ok)
}

/// Writes results.json (unless the results were read from `read_from`),
/// report.md and the charts into `dir`, saying on stderr what it wrote.
/// False if any of it failed.
fn write_outputs(saved: &Saved, dir: &Path, read_from: Option<&Path>) -> bool {
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("bufshare-bench: {}: {e}", dir.display());
        return false;
    }
    let mut ok = true;
    let json = read_from.map_or_else(|| dir.join("results.json"), Path::to_path_buf);
    if read_from.is_none() {
        match saved.write(&json) {
            Ok(()) => eprintln!("bufshare-bench: results in {}", json.display()),
            Err(e) => {
                eprintln!("bufshare-bench: {e}");
                ok = false;
            }
        }
    }
    let report = dir.join("report.md");
    match saved
        .report(None)
        .and_then(|r| std::fs::write(&report, r).map_err(|e| format!("{}: {e}", report.display())))
    {
        Ok(()) => eprintln!("bufshare-bench: report in {}", report.display()),
        Err(e) => {
            eprintln!("bufshare-bench: {e}");
            ok = false;
        }
    }
    match plots::draw_all(saved, dir) {
        Ok(files) => {
            for f in files {
                eprintln!("bufshare-bench: chart {}", f.display());
            }
        }
        Err(e) => {
            eprintln!(
                "bufshare-bench: charts: {e} (draw them again with \
                 `bufshare-bench --plot-from {}`)",
                json.display()
            );
            ok = false;
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, String> {
        parse_options(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn plot_options() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.plots, Path::new("target/bench-plots"));
        assert_eq!(o.plot_from, None);
        let o = parse(&["--plots", "/tmp/p", "--plot-from", "r.json"]).unwrap();
        assert_eq!(o.plots, Path::new("/tmp/p"));
        assert_eq!(o.plot_from.as_deref(), Some(Path::new("r.json")));
        assert!(parse(&["--plots"]).unwrap_err().contains("--plots needs"));
        assert_eq!(parse(&[]).unwrap().parts, vec![1, 2, 3]);
        assert_eq!(parse(&["--part", "3"]).unwrap().parts, vec![3]);
        assert!(parse(&["--part", "4"]).is_err());
        assert!(parse(&["--plot-from"])
            .unwrap_err()
            .contains("--plot-from needs"));
    }
}
