//! The child processes: `bufshare-bench __child ROLE --pipeline DESC [...]`.
//!
//! Every producer and consumer runs in a process of its own, started by the
//! orchestrator (main.rs) from the bench's own executable. The role name only
//! labels the process; what a child does is driven by element names in its
//! pipeline description:
//!
//! - `stamp`: a probe counts frames as `produced` and writes CLOCK_MONOTONIC
//!   ns into the first 8 bytes of each frame: on the src pad of an element
//!   that has one (the part 1 producers' `identity sync=true`, after its
//!   clock wait: the moment the frame goes to the sink), else on its sink pad;
//! - `read0`, `read1`, ...: a probe on each one's src pad counts frames as
//!   `read0`, ... and records `now - stamp` as a latency sample;
//! - `feed` (an appsrc): a thread pushes clones of 8 prepared frames as fast as
//!   downstream takes them, counted as `produced` (see `--width`, `--height`,
//!   `--fd-memory`, `--i420`).
//!
//! Protocol with the orchestrator, one line each way:
//! - child -> parent (stdout): `READY` once the pipeline is PLAYING, then at
//!   exit the report: `window_ns N`, `cpu_ns N`, `count NAME N`, `lat N N ...`
//!   (nanoseconds), `error TEXT`;
//! - parent -> child (stdin): `start` (begin the measurement window), `stop`
//!   (end it), `quit` (send EOS, wait for it, exit). EOF on stdin means quit.
//!
//! Frame counts, CPU time and latency samples are all taken inside the window
//! that `start` and `stop` delimit, so start-up, warm-up and shutdown cost do
//! not count.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;

use crate::measure::{monotonic_ns, process_cpu_ns};

/// Number of distinct frames the `feed` appsrc cycles through.
const FEED_FRAMES: usize = 8;
/// How long a child waits for EOS to go through after `quit`.
const EOS_TIMEOUT: Duration = Duration::from_secs(2);
/// Latency samples outside 0..this are garbage (a frame that was not stamped).
const MAX_SANE_LATENCY_NS: u64 = 10_000_000_000;

/// Options of a child process.
struct ChildArgs {
    role: String,
    pipeline: String,
    width: u32,
    height: u32,
    fd_memory: bool,
    /// The feed's frames are I420 instead of NV12 (same size; for rtpvrawpay).
    i420: bool,
}

fn parse_args(args: &[String]) -> Result<ChildArgs, String> {
    let mut it = args.iter();
    let role = it.next().ok_or("missing role")?.clone();
    let mut out = ChildArgs {
        role,
        pipeline: String::new(),
        width: 0,
        height: 0,
        fd_memory: false,
        i420: false,
    };
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--pipeline" => out.pipeline = value()?,
            "--width" => out.width = value()?.parse().map_err(|e| format!("--width: {e}"))?,
            "--height" => out.height = value()?.parse().map_err(|e| format!("--height: {e}"))?,
            "--fd-memory" => out.fd_memory = true,
            "--i420" => out.i420 = true,
            other => return Err(format!("unknown child option {other}")),
        }
    }
    if out.pipeline.is_empty() {
        return Err("missing --pipeline".into());
    }
    Ok(out)
}

/// Counters and samples shared by the probes, the stdin thread and main.
struct Stats {
    names: Vec<String>,
    counters: Vec<AtomicU64>,
    measuring: AtomicBool,
    latencies: Mutex<Vec<u64>>,
    start: Mutex<Option<Snapshot>>,
    end: Mutex<Option<Snapshot>>,
}

#[derive(Clone)]
struct Snapshot {
    mono_ns: u64,
    cpu_ns: u64,
    counts: Vec<u64>,
}

impl Stats {
    fn new(names: Vec<String>) -> Self {
        let counters = names.iter().map(|_| AtomicU64::new(0)).collect();
        Stats {
            names,
            counters,
            measuring: AtomicBool::new(false),
            latencies: Mutex::new(Vec::new()),
            start: Mutex::new(None),
            end: Mutex::new(None),
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            mono_ns: monotonic_ns(),
            cpu_ns: process_cpu_ns(),
            counts: self
                .counters
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
        }
    }

    fn begin(&self) {
        let mut start = self.start.lock().unwrap();
        if start.is_none() {
            *start = Some(self.snapshot());
            self.measuring.store(true, Ordering::Release);
        }
    }

    fn finish(&self) {
        if self.start.lock().unwrap().is_none() {
            return;
        }
        let mut end = self.end.lock().unwrap();
        if end.is_none() {
            self.measuring.store(false, Ordering::Release);
            *end = Some(self.snapshot());
        }
    }

    fn record_latency(&self, ns: u64) {
        if self.measuring.load(Ordering::Acquire) {
            self.latencies.lock().unwrap().push(ns);
        }
    }

    /// The report lines printed at exit.
    fn report(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let start = self.start.lock().unwrap().clone();
        let end = self.end.lock().unwrap().clone();
        if let (Some(s), Some(e)) = (start, end) {
            lines.push(format!("window_ns {}", e.mono_ns - s.mono_ns));
            lines.push(format!("cpu_ns {}", e.cpu_ns - s.cpu_ns));
            for (i, name) in self.names.iter().enumerate() {
                lines.push(format!("count {name} {}", e.counts[i] - s.counts[i]));
            }
            let lat = self.latencies.lock().unwrap();
            for chunk in lat.chunks(256) {
                let v: Vec<String> = chunk.iter().map(u64::to_string).collect();
                lines.push(format!("lat {}", v.join(" ")));
            }
        }
        lines
    }
}

/// Writes the stamp into the first 8 bytes of the frame, making the buffer
/// writable only if it is not already.
///
/// The stamp is the CLOCK_MONOTONIC time at which the sink renders the frame.
/// If the element is a BaseSink with sync=true, the probe runs before the
/// sink's clock wait (up to a frame period for a live source), so the stamp
/// is now plus the time left until the sink's render time; otherwise it is
/// simply now.
fn stamp_probe(
    stats: Arc<Stats>,
    counter: usize,
    element: &gst::Element,
) -> impl Fn(&gst::Pad, &mut gst::PadProbeInfo) -> gst::PadProbeReturn {
    let sink = element
        .clone()
        .downcast::<gst_base::BaseSink>()
        .ok()
        .map(|s| s.downgrade());
    move |pad, info| {
        let sink = sink.as_ref().and_then(|s| s.upgrade());
        if let Some(buffer) = info.buffer_mut() {
            let wait = sink
                .and_then(|sink| time_until_render(&sink, pad, buffer))
                .unwrap_or(0);
            let buffer = buffer.make_mut();
            if let Ok(mut map) = buffer.map_writable() {
                if map.len() >= 8 {
                    map[..8].copy_from_slice(&(monotonic_ns() + wait).to_ne_bytes());
                }
            }
            stats.counters[counter].fetch_add(1, Ordering::Relaxed);
        }
        gst::PadProbeReturn::Ok
    }
}

/// Nanoseconds until a syncing BaseSink renders `buffer`, if it will wait.
fn time_until_render(
    sink: &gst_base::BaseSink,
    pad: &gst::Pad,
    buffer: &gst::BufferRef,
) -> Option<u64> {
    use gst_base::prelude::*;
    if !sink.is_sync() {
        return None;
    }
    let clock = sink.clock()?;
    let base_time = sink.base_time()?;
    let segment = pad.sticky_event::<gst::event::Segment>(0)?;
    let segment = segment.segment().downcast_ref::<gst::ClockTime>()?;
    let running_time = segment.to_running_time(buffer.pts()?)?;
    let render_at = (base_time + running_time + sink.latency() + sink.render_delay()).nseconds()
        as i64
        + sink.ts_offset();
    let wait = render_at - clock.time().nseconds() as i64;
    u64::try_from(wait).ok()
}

/// Reads the stamp and records the latency.
fn read_probe(
    stats: Arc<Stats>,
    counter: usize,
) -> impl Fn(&gst::Pad, &mut gst::PadProbeInfo) -> gst::PadProbeReturn {
    move |_pad, info| {
        if let Some(buffer) = info.buffer() {
            let now = monotonic_ns();
            let mut stamp = [0u8; 8];
            if buffer.copy_to_slice(0, &mut stamp).is_ok() {
                let lat = now.wrapping_sub(u64::from_ne_bytes(stamp));
                if lat < MAX_SANE_LATENCY_NS {
                    stats.record_latency(lat);
                }
            }
            stats.counters[counter].fetch_add(1, Ordering::Relaxed);
        }
        gst::PadProbeReturn::Ok
    }
}

/// The NV12 frame size for `width` x `height` (even dimensions).
pub fn nv12_size(width: u32, height: u32) -> usize {
    width as usize * height as usize * 3 / 2
}

/// A frame whose memory is a memfd wrapped by GstFdAllocator.
fn fd_frame(size: usize, fill: u8) -> Result<gst::Buffer, String> {
    use gst_allocators::prelude::*;
    use std::os::fd::IntoRawFd;

    // Sealable: bufsharesink seals upstream memfds (and copies what it cannot seal).
    let fd = rustix::fs::memfd_create(
        "bufshare-bench",
        rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
    )
    .map_err(|e| format!("memfd_create: {e}"))?;
    rustix::fs::ftruncate(&fd, size as u64).map_err(|e| format!("ftruncate: {e}"))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(&vec![fill; size])
        .map_err(|e| format!("filling memfd: {e}"))?;
    let allocator = gst_allocators::FdAllocator::new();
    // SAFETY: the fd is a valid, open memfd of `size` bytes that we own;
    // ownership passes to the memory (no DONT_CLOSE flag), which closes it.
    let memory = unsafe {
        allocator.alloc_fd(
            file.into_raw_fd(),
            size,
            gst_allocators::FdMemoryFlags::NONE,
        )
    }
    .map_err(|e| format!("gst_fd_allocator_alloc: {e}"))?;
    let mut buffer = gst::Buffer::new();
    buffer.get_mut().unwrap().append_memory(memory);
    Ok(buffer)
}

/// A frame in plain system memory.
fn system_frame(size: usize, fill: u8) -> Result<gst::Buffer, String> {
    let mut buffer = gst::Buffer::with_size(size).map_err(|e| e.to_string())?;
    buffer
        .get_mut()
        .unwrap()
        .map_writable()
        .map_err(|e| e.to_string())?
        .fill(fill);
    Ok(buffer)
}

/// Configures the `feed` appsrc and returns the pushing loop to run in a thread.
fn setup_feed(
    appsrc: gst_app::AppSrc,
    args: &ChildArgs,
    stats: Arc<Stats>,
    counter: usize,
    stop: Arc<AtomicBool>,
) -> Result<impl FnOnce() + Send + 'static, String> {
    if args.width == 0 || args.height == 0 {
        return Err("an appsrc named feed needs --width and --height".into());
    }
    let caps = gst::Caps::builder("video/x-raw")
        .field("format", if args.i420 { "I420" } else { "NV12" })
        .field("width", args.width as i32)
        .field("height", args.height as i32)
        .field("framerate", gst::Fraction::new(30, 1))
        .build();
    appsrc.set_caps(Some(&caps));
    appsrc.set_format(gst::Format::Time);
    appsrc.set_is_live(false);
    appsrc.set_block(true);

    let size = nv12_size(args.width, args.height);
    let frames = (0..FEED_FRAMES)
        .map(|i| {
            let fill = 16 + 24 * i as u8;
            if args.fd_memory {
                fd_frame(size, fill)
            } else {
                system_frame(size, fill)
            }
        })
        .collect::<Result<Vec<_>, _>>()?;

    let duration = gst::ClockTime::from_nseconds(1_000_000_000 / 30);
    Ok(move || {
        let mut n: u64 = 0;
        while !stop.load(Ordering::Acquire) {
            // A shallow copy: new metadata, same (shared) memory.
            let mut buffer = frames[n as usize % FEED_FRAMES].copy();
            {
                let b = buffer.get_mut().unwrap();
                b.set_pts(duration * n);
                b.set_duration(duration);
            }
            if appsrc.push_buffer(buffer).is_err() {
                break;
            }
            stats.counters[counter].fetch_add(1, Ordering::Relaxed);
            n += 1;
        }
        let _ = appsrc.end_of_stream();
    })
}

/// Entry point of `bufshare-bench __child ...`; returns the exit code.
pub fn child_main(args: &[String]) -> i32 {
    // Never outlive the orchestrator, even if it is killed.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    if let Some(ppid) = std::env::var("BUFSHARE_BENCH_PARENT")
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    {
        if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(ppid) {
            return 3;
        }
    }

    let args = match parse_args(args) {
        Ok(a) => a,
        Err(e) => {
            println!("error {e}");
            return 2;
        }
    };
    match run(&args) {
        Ok(lines) => {
            print_lines(&lines);
            if lines.iter().any(|l| l.starts_with("error ")) {
                1
            } else {
                0
            }
        }
        Err(e) => {
            println!("error {}: {e}", args.role);
            1
        }
    }
}

fn print_lines(lines: &[String]) {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
}

fn run(args: &ChildArgs) -> Result<Vec<String>, String> {
    gst::init().map_err(|e| format!("gst::init: {e}"))?;
    let pipeline = gst::parse::launch(&args.pipeline)
        .map_err(|e| format!("parse '{}': {e}", args.pipeline))?
        .downcast::<gst::Pipeline>()
        .map_err(|_| "pipeline description is not a pipeline".to_string())?;

    // Find the instrumented elements and name the counters after them.
    let stamp = pipeline.by_name("stamp");
    let feed = pipeline.by_name("feed");
    let readers: Vec<gst::Element> = (0..)
        .map_while(|i| pipeline.by_name(&format!("read{i}")))
        .collect();
    let mut names = Vec::new();
    if stamp.is_some() || feed.is_some() {
        names.push("produced".to_string());
    }
    names.extend(readers.iter().map(|r| r.name().to_string()));
    let stats = Arc::new(Stats::new(names));

    let mut counter = 0;
    if let Some(stamp) = &stamp {
        // A sink is stamped on its sink pad (allowing for its clock wait); an
        // element with one src pad (identity sync=true) on that pad, after
        // its own clock wait, when the frame goes to the sink.
        let pad = if stamp.is::<gst_base::BaseSink>() {
            stamp.static_pad("sink")
        } else {
            stamp.static_pad("src").or_else(|| stamp.static_pad("sink"))
        }
        .ok_or("stamp element has no sink pad")?;
        pad.add_probe(
            gst::PadProbeType::BUFFER,
            stamp_probe(stats.clone(), counter, stamp),
        );
        counter += 1;
    }
    let stop_feed = Arc::new(AtomicBool::new(false));
    let mut feed_loop = None;
    if let Some(feed) = &feed {
        let appsrc = feed
            .clone()
            .downcast::<gst_app::AppSrc>()
            .map_err(|_| "element feed is not an appsrc")?;
        feed_loop = Some(setup_feed(
            appsrc,
            args,
            stats.clone(),
            counter,
            stop_feed.clone(),
        )?);
        counter += 1;
    }
    for reader in &readers {
        let pad = reader
            .static_pad("src")
            .ok_or("reader element has no src pad")?;
        pad.add_probe(
            gst::PadProbeType::BUFFER,
            read_probe(stats.clone(), counter),
        );
        counter += 1;
    }

    let bus = pipeline.bus().ok_or("pipeline has no bus")?;
    if let Err(e) = pipeline.set_state(gst::State::Playing) {
        // The reason is on the bus.
        let mut lines = vec![format!("error {}: set_state(PLAYING): {e}", args.role)];
        while let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error]) {
            lines.push(error_line(&args.role, &msg));
        }
        let _ = pipeline.set_state(gst::State::Null);
        return Ok(lines);
    }
    let feeder = feed_loop.map(std::thread::spawn);
    print_lines(&["READY".to_string()]);

    {
        let (stats, bus) = (stats.clone(), bus.clone());
        std::thread::spawn(move || read_commands(&stats, &bus));
    }
    let mut lines = run_until_end(&pipeline, &bus, &args.role, &stop_feed);
    stats.finish();
    stop_feed.store(true, Ordering::Release);
    let _ = pipeline.set_state(gst::State::Null);
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    let mut report = stats.report();
    report.append(&mut lines);
    Ok(report)
}

/// Follows the orchestrator's commands on stdin until `quit` or EOF, then
/// asks the main thread (through the bus) to stop the pipeline.
fn read_commands(stats: &Stats, bus: &gst::Bus) {
    for line in std::io::stdin().lock().lines() {
        match line.as_deref() {
            Ok("start") => stats.begin(),
            Ok("stop") => stats.finish(),
            Ok("quit") | Err(_) => break,
            Ok(_) => {}
        }
    }
    stats.finish();
    let quit = gst::Structure::new_empty("bench-quit");
    let _ = bus.post(gst::message::Application::new(quit));
}

/// Watches the bus until an error, the end of stream after `quit`, or a
/// timeout after `quit`; returns the error lines of the report.
fn run_until_end(
    pipeline: &gst::Pipeline,
    bus: &gst::Bus,
    role: &str,
    stop_feed: &AtomicBool,
) -> Vec<String> {
    let mut lines = Vec::new();
    let mut eos_deadline: Option<Instant> = None;
    loop {
        if eos_deadline.is_some_and(|d| Instant::now() > d) {
            eprintln!("{role}: EOS did not arrive in time, stopping anyway");
            break;
        }
        let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else {
            continue;
        };
        use gst::MessageView;
        match msg.view() {
            MessageView::Error(_) => {
                lines.push(error_line(role, &msg));
                break;
            }
            MessageView::Warning(w) => {
                eprintln!("{role}: warning: {} ({:?})", w.error(), w.debug());
            }
            MessageView::Eos(_) => {
                if eos_deadline.is_none() {
                    lines.push(format!("error {role}: unexpected end of stream"));
                }
                break;
            }
            MessageView::Application(a)
                if eos_deadline.is_none()
                    && a.structure().is_some_and(|s| s.name() == "bench-quit") =>
            {
                eos_deadline = Some(Instant::now() + EOS_TIMEOUT);
                stop_feed.store(true, Ordering::Release);
                pipeline.send_event(gst::event::Eos::new());
            }
            _ => {}
        }
    }
    lines
}

fn error_line(role: &str, msg: &gst::Message) -> String {
    let text = match msg.view() {
        gst::MessageView::Error(e) => format!(
            "{}: {}{}",
            msg.src()
                .map(|s| s.path_string().to_string())
                .unwrap_or_default(),
            e.error(),
            e.debug().map(|d| format!(" ({d})")).unwrap_or_default()
        ),
        _ => format!("{msg:?}"),
    };
    format!("error {role}: {}", text.replace('\n', " "))
}
