//! `bufshare-bench`: side-by-side measurements of bufshare (bufsharesink /
//! bufsharesrc) against GStreamer's shmsink/shmsrc and an in-process tee.
//!
//! Run from the workspace root:
//!
//! ```text
//! cargo build --release && target/release/bufshare-bench
//! ```
//!
//! Options: `--seconds N` (part 1 duration, default 10), `--rate-seconds N`
//! (part 2 duration per size, default 5), `--quick` (2 s runs, 1 and 2
//! consumers), `--only bufshare,shm,tee`, `--part 1|2`, `--plugin-dir DIR`
//! (where libgstbufshare.so is; default: next to this executable).
//!
//! What it measures, with real processes (the bench re-executes itself for
//! each producer and consumer, see roles.rs):
//!
//! - Part 1, fan-out: a live 1080p30 NV12 `videotestsrc pattern=solid-color`
//!   producer (cheap to render, so its own cost does not drown the
//!   transport's) and 1, 2, 4,
//!   8 consumers per transport. For each: frames delivered per consumer, CPU
//!   time of all processes (total CPU %, and the transport's CPU per frame:
//!   everything minus what the producer alone costs per frame), and the
//!   latency from the producer's sink rendering a frame to the consumer's
//!   source pushing it, p50 and p99 (the producer stamps the render time, in
//!   CLOCK_MONOTONIC ns, into the frame's first 8 bytes).
//! - Part 2, link rate: one producer pushing 8 prepared frames in a loop
//!   (no pixel generation), one consumer, sync=false, at 640x480, 1080p and
//!   4K: frames per second received and CPU per frame of both processes.
//!
//! The bench does not link the plugin: children find it via GST_PLUGIN_PATH.
//! It prints markdown tables and exits non-zero if a pipeline failed or the
//! plugin was not usable.

mod measure;
mod roles;
mod runner;
mod scenarios;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use scenarios::{Context, Outcome, Transport};

const PLUGIN_FILE: &str = "libgstbufshare.so";
const RATE_SIZES: [(u32, u32); 3] = [(640, 480), (1920, 1080), (3840, 2160)];

const USAGE: &str = "\
usage: bufshare-bench [--seconds N] [--rate-seconds N] [--quick]
                      [--only bufshare,shm,tee] [--part 1|2] [--plugin-dir DIR]

  --seconds N        duration of each part 1 (fan-out) run, default 10
  --rate-seconds N   duration of each part 2 (link rate) run, default 5
  --quick            smoke test: 2 s runs, 1 and 2 consumers only
  --only LIST        transports to measure (comma-separated)
  --part 1|2         run only part 1 (fan-out) or part 2 (link rate)
  --plugin-dir DIR   directory holding libgstbufshare.so
                     (default: the directory of this executable)";

struct Options {
    seconds: f64,
    rate_seconds: f64,
    consumers: Vec<usize>,
    transports: Vec<Transport>,
    parts: Vec<u8>,
    plugin_dir: Option<PathBuf>,
}

fn parse_options(args: &[String]) -> Result<Options, String> {
    let mut quick = false;
    let mut seconds = None;
    let mut rate_seconds = None;
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
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    let default_seconds = if quick { 2.0 } else { 10.0 };
    let default_rate_seconds = if quick { 2.0 } else { 5.0 };
    Ok(Options {
        seconds: seconds.unwrap_or(default_seconds),
        rate_seconds: rate_seconds.unwrap_or(default_rate_seconds),
        consumers: if quick { vec![1, 2] } else { vec![1, 2, 4, 8] },
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
    if args.first().map(String::as_str) == Some("__child") {
        return ExitCode::from(roles::child_main(&args[1..]) as u8);
    }
    let opts = match parse_options(&args) {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("bufshare-bench: {e}");
            }
            eprintln!("{USAGE}");
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

/// Runs everything and prints the tables. Ok(false): something failed.
fn orchestrate(opts: &Options) -> Result<bool, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut plugin = locate_plugin(&exe, opts.plugin_dir.as_deref());
    gst::init().map_err(|e| format!("gst::init: {e}"))?;
    check_plugin(&mut plugin);

    let mut tmp = runner::TempDir::new().map_err(|e| format!("temp dir: {e}"))?;
    let ctx = Context {
        exe,
        tmp: tmp.path.clone(),
        seconds: opts.seconds,
        rate_seconds: opts.rate_seconds,
        warmup: Duration::from_secs(1),
    };

    println!("# bufshare-bench\n");
    println!(
        "- machine: {} CPUs, {}",
        measure::nproc(),
        measure::cpu_model()
    );
    println!("- {}", gst::version_string());
    println!(
        "- part 1: {} s per run, part 2: {} s per size (each after a 1 s warm-up)",
        opts.seconds, opts.rate_seconds
    );
    match &plugin.problem {
        None => println!("- bufshare plugin: {}", plugin.file.display()),
        Some(p) => println!("- bufshare plugin: NOT USABLE: {p}"),
    }
    println!();

    let mut ok = true;
    let mut transports = opts.transports.clone();
    if let Some(problem) = &plugin.problem {
        if transports.contains(&Transport::Bufshare) {
            eprintln!("bufshare-bench: skipping bufshare rows: {problem}");
            transports.retain(|t| *t != Transport::Bufshare);
            ok = false;
        }
    }

    let mut errors: Vec<String> = Vec::new();
    if opts.parts.contains(&1) && !transports.is_empty() {
        part1(&ctx, opts, &transports, &mut errors);
    }
    let link_transports: Vec<Transport> = transports
        .iter()
        .copied()
        .filter(|t| *t != Transport::Tee)
        .collect();
    if opts.parts.contains(&2) && !link_transports.is_empty() {
        part2(&ctx, &link_transports, &mut errors);
    }

    if !errors.is_empty() {
        ok = false;
        tmp.keep = true;
        println!("## Errors\n");
        for e in &errors {
            println!("- {e}");
        }
        println!("\n(logs kept in {})", tmp.path.display());
    }
    if let Some(problem) = &plugin.problem {
        if opts.transports.contains(&Transport::Bufshare) {
            println!("\nbufshare rows skipped: {problem}");
        }
    }
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

fn part1(ctx: &Context, opts: &Options, transports: &[Transport], errors: &mut Vec<String>) {
    eprintln!("part 1: baseline ({} s)...", ctx.seconds);
    let base = scenarios::baseline(ctx);
    // CPU the producer alone spends per frame, in ns.
    let base_per_frame = if collect_errors("baseline", &base, errors) {
        let r = &base.reports[0];
        let frames = r.count("produced").max(1);
        println!(
            "## Part 1: fan-out, {}x{} NV12 at 30 fps, live\n",
            scenarios::FANOUT_WIDTH,
            scenarios::FANOUT_HEIGHT
        );
        println!(
            "Baseline, the producer alone (`videotestsrc pattern=solid-color ! fakesink sync=true`): {} frames in {:.1} s, \
             CPU {:.1} %, {:.0} µs/frame.\n",
            r.count("produced"),
            r.window_ns as f64 / 1e9,
            100.0 * r.cpu_ns as f64 / r.window_ns.max(1) as f64,
            us(r.cpu_ns as f64 / frames as f64)
        );
        Some(r.cpu_ns as f64 / frames as f64)
    } else {
        println!("## Part 1: fan-out\n\nBaseline failed: transport CPU per frame not available.\n");
        None
    };

    println!(
        "| transport | consumers | frames produced | frames per consumer (min-max) | CPU total % \
         | transport CPU µs/frame | latency p50 µs | latency p99 µs |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for &transport in transports {
        for &n in &opts.consumers {
            eprintln!("part 1: {} x{n} ({} s)...", transport.name(), ctx.seconds);
            let outcome = scenarios::fanout(ctx, transport, n);
            let what = format!("{} with {n} consumer(s)", transport.name());
            let clean = collect_errors(&what, &outcome, errors);
            println!(
                "{}",
                fanout_row(transport, n, &outcome, base_per_frame, clean)
            );
        }
    }
    println!(
        "\nTransport CPU per frame = (CPU of all processes - baseline CPU per frame x frames \
         produced) / frames produced. Latency: from the \
         producer's sink rendering the frame (stamped by a probe on its sink pad: now plus what \
         is left of a sync=true sink's clock wait) to the consumer's source pad, over all \
         consumers.\n"
    );
}

fn fanout_row(
    transport: Transport,
    n: usize,
    outcome: &Outcome,
    base_per_frame: Option<f64>,
    clean: bool,
) -> String {
    let mark = if clean { "" } else { " (error)" };
    let Some(producer) = outcome.reports.iter().find(|r| r.count("produced") > 0) else {
        return format!(
            "| {}{mark} | {n} | - | - | - | - | - | - |",
            transport.name()
        );
    };
    let produced = producer.count("produced");
    let per_consumer: Vec<u64> = outcome
        .reports
        .iter()
        .flat_map(|r| r.reader_counts())
        .collect();
    let (min, max) = (
        per_consumer.iter().min().copied().unwrap_or(0),
        per_consumer.iter().max().copied().unwrap_or(0),
    );
    let cpu = outcome.cpu_ns() as f64;
    let cpu_pct = 100.0 * cpu / producer.window_ns.max(1) as f64;
    let transport_cpu = base_per_frame
        .map(|b| format!("{:.0}", us((cpu - b * produced as f64) / produced as f64)))
        .unwrap_or_else(|| "-".into());
    let mut lat: Vec<u64> = outcome
        .reports
        .iter()
        .flat_map(|r| r.latencies_ns.iter().copied())
        .collect();
    lat.sort_unstable();
    let pct = |p| {
        measure::percentile(&lat, p)
            .map(|v| format!("{:.0}", us(v as f64)))
            .unwrap_or_else(|| "-".into())
    };
    format!(
        "| {}{mark} | {n} | {produced} | {min}-{max} | {cpu_pct:.1} | {transport_cpu} | {} | {} |",
        transport.name(),
        pct(50.0),
        pct(99.0)
    )
}

fn part2(ctx: &Context, transports: &[Transport], errors: &mut Vec<String>) {
    println!("## Part 2: highest rate of one link, NV12, sync=false\n");
    println!(
        "| transport | size | frame KiB | frames/s | CPU µs/frame (producer+consumer) | CPU total % |"
    );
    println!("|---|---|---:|---:|---:|---:|");
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
                println!(
                    "| {}{mark} | {w}x{h} | {kib} | - | - | - |",
                    transport.name()
                );
                continue;
            }
            let cpu = outcome.cpu_ns() as f64;
            println!(
                "| {}{mark} | {w}x{h} | {kib} | {:.0} | {:.1} | {:.1} |",
                transport.name(),
                received as f64 / (window as f64 / 1e9),
                us(cpu / received as f64),
                100.0 * cpu / window as f64
            );
        }
    }
    println!(
        "\nThe producer pushes clones of 8 prepared frames (memfd-backed for bufshare, \
         system memory for shm, which copies anyway).\n"
    );
}
