//! bufshare-peer: a producer or consumer process for tests and demos.
//!
//! It runs a real GStreamer pipeline around bufsharesink or bufsharesrc and
//! writes a report of what it saw, measured outside the elements: a checksum
//! of every frame's bytes, the inode of the file behind its memory, the kind
//! of memory, and (producer `slots` source) how many pushed buffers came back.
//!
//! ```text
//! bufshare-peer produce --socket S [--source test|slots|pool|rgba-padded|tensors|text|audio|caps-change]
//!                       [--frames N] [--width W --height H --fps F] [--wait-clients M [--settle MS]] [--report FILE]
//!                       [--backend auto|memfd|dma-heap|drm|v4l2] [--heap NAME|PATH] [--device PATH]
//!                       [--max-inflight N] [--max-held N] [--client-timeout MS] [--pool-max N]
//!                       [--stats-every MS] [--sum-bytes N] [--eos-file PATH] [--slots N]
//!                       [--frame-lines 0|1]
//! (with --address HOST:PORT [--mode server|client] [--transports TLS]
//! [--when-full auto|drop-oldest|wait]: ucxsink instead of bufsharesink, feature `ucx`;
//! `--live 0`: the `test` source is not live, it makes frames as fast as they are taken;
//! `--sink-pool 0`: it does not use the pool the sink proposes; `--pattern P`: videotestsrc's
//! pattern, ball by default; `--sync 0`: the sink does not sync to the clock)
//! bufshare-peer consume --socket S [--report FILE] [--max-frames N] [--timeout MS] [--hold N]
//!                       [--on-disconnect error|eos|reconnect] [--on-eos forward|wait|auto]
//!                       [--reconnect-interval MS] [--sum-bytes N] [--max-inflight N] [--stats-every MS]
//!                       [--frame-ring 0|1] [--release-ring 0|1]
//! (with --address HOST:PORT [--mode client|server] [--transports TLS]: ucxsrc instead of
//! bufsharesrc, feature `ucx`)
//! ```
//!
//! Report lines: `caps <caps>`, then `frame offset=.. sum=.. size=.. ino=.. kind=.. ro=.. clock=.. wall=.. fd=..`
//! per frame (`wall`: CLOCK_MONOTONIC ns when the frame reached the sink or the appsink; `fd`: the
//! fd number of the memory in this process, -1 if none).
//!
//! Producers end with `summary pushed=.. returned=.. made=.. freed=.. memfds-after-stop=.. inodes=..`
//! (`slots` source: `returned` buffers came back before the pipeline stopped, `made` were created
//! and `freed` came back in all, some never having reached the sink when the stream was ended
//! early; `memfds-after-stop`: memfd fds still open once the pipeline is stopped, frames someone
//! kept, 0 when everything came back), and with `--stats-every` lines
//! `client wall=.. pid=.. in-flight=.. peak=.. sent=.. dropped=.. held=.. by-ring=.. by-message=.. by-frame-ring=..`
//! sampled from the sink's stats (`by-ring`/`by-message`: frames it released through its release ring
//! and in RELEASE messages; `by-frame-ring`: frames it got through its frame ring).
//! Consumers' `--frame-ring 0` / `--release-ring 0` set bufsharesrc's `frame-ring` / `release-ring`
//! to false (both on by default).
//! `--frame-lines 0` makes a producer keep no line per frame (its memory stays flat in long
//! runs; `summary pushed=` still counts them). `--source slots` cycles through `--slots` memfds (12 by default). `--source pool` pushes buffers from a GstBufferPool of exactly `--pool-max` buffers (4 by
//! default), as v4l2src does, and fails if no buffer comes back for 10 s. `--hold N` makes a
//! consumer keep the last N frames it received (a greedy consumer). `--eos-file P` ends the
//! producer's stream (EOS) as soon as file P exists, for runs of unknown length. `--sum-bytes N` checksums only
//! the first N bytes of each frame (0, the default: all of it), for big frames in debug builds.
//!
//! Consumers add `at=` (CLOCK_MONOTONIC ns when the frame was pulled) to each frame line, a
//! `warning <text>` line per warning the pipeline posted, and end with `summary reconnects=..`
//! and `after-stop proc ...` (see below). With `--stats-every MS` both sides add `proc wall=..
//! fds=.. sockets=.. memfds=.. ucx-registrations=..` lines (this process's open fds, sockets and
//! memfds among them, and live UCX memory registrations), consumers `src wall=.. connected=..
//! connections=.. frames-queued=.. registered-memories=..` lines from ucxsrc's stats; a
//! producer's summary ends with the same `proc` figures taken after its pipeline stopped (a
//! consumer's `after-stop`: stopped, and its appsink disposed).
//! With `--hold N` frames of a producer that went away are still alive after a reconnect.
//! Producers also report `backend <name in use>`, `stats <the sink's stats>` and a `warning
//! <text>` line per warning the pipeline posted.
//!
//! Hardware tests (hwtests/) also use: `produce --source pipeline --pipeline "v4l2src ... ! caps"`,
//! which feeds bufsharesink from a gst-launch style description (the free src pad of its last
//! element), and `consume --pipeline "v4l2fwhtenc ... ! filesink ..."`, which ends the consumer in
//! that description instead of an appsink (frames are then recorded on bufsharesrc's src pad).

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst_allocators::prelude::*;

fn usage() -> ! {
    eprintln!(
        "usage: bufshare-peer produce|consume --socket PATH [options]; see the source header"
    );
    std::process::exit(64)
}

struct Args(HashMap<String, String>);

impl Args {
    fn parse(items: &[String]) -> Args {
        let mut map = HashMap::new();
        let mut it = items.iter();
        while let Some(k) = it.next() {
            let Some(k) = k.strip_prefix("--") else {
                usage()
            };
            let v = it.next().unwrap_or_else(|| usage());
            map.insert(k.to_string(), v.clone());
        }
        Args(map)
    }
    fn str(&self, k: &str, default: &str) -> String {
        self.0
            .get(k)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }
    fn num(&self, k: &str, default: u64) -> u64 {
        self.0
            .get(k)
            .map(|v| v.parse().unwrap_or_else(|_| usage()))
            .unwrap_or(default)
    }
}

/// How many bytes of each frame to checksum (0: all), from `--sum-bytes`.
static SUM_BYTES: AtomicUsize = AtomicUsize::new(0);

/// CLOCK_MONOTONIC now, in ns (the clock GStreamer's system clock and the wire use).
fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// FNV-1a over the buffer's bytes.
fn checksum(buffer: &gst::BufferRef) -> u64 {
    let map = buffer.map_readable().expect("readable buffer");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let limit = match SUM_BYTES.load(Ordering::Relaxed) {
        0 => map.len(),
        n => n.min(map.len()),
    };
    for b in map[..limit].iter() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The fd behind the buffer's first memory, if it is fd memory (-1 otherwise).
fn memory_fd(buffer: &gst::BufferRef) -> i32 {
    buffer
        .iter_memories()
        .next()
        .and_then(|m| {
            m.downcast_memory_ref::<gst_allocators::FdMemory>()
                .map(|m| m.fd())
        })
        .unwrap_or(-1)
}

/// (inode, kind) of the buffer's first memory.
fn memory_identity(buffer: &gst::BufferRef) -> (u64, &'static str, bool) {
    let Some(mem) = buffer.iter_memories().next() else {
        return (0, "none", false);
    };
    let ro = mem.flags().contains(gst::MemoryFlags::READONLY);
    let kind = if mem.is_memory_type::<gst_allocators::DmaBufMemory>() {
        "dmabuf"
    } else if mem.is_memory_type::<gst_allocators::FdMemory>() {
        "fd"
    } else {
        "system"
    };
    let ino = mem
        .downcast_memory_ref::<gst_allocators::FdMemory>()
        .map(|m| {
            // SAFETY: the fd belongs to the memory, alive while we look.
            let fd = unsafe { BorrowedFd::borrow_raw(m.fd()) };
            rustix::fs::fstat(fd).map(|s| s.st_ino).unwrap_or(0)
        })
        .unwrap_or(0);
    (ino, kind, ro)
}

fn frame_line(buffer: &gst::BufferRef, clock: Option<u64>) -> String {
    let (ino, kind, ro) = memory_identity(buffer);
    let strides = buffer
        .meta::<gst_video::VideoMeta>()
        .map(|m| {
            m.stride()
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(":")
        })
        .unwrap_or_else(|| "-".into());
    format!(
        "frame offset={} sum={:016x} size={} ino={} kind={} ro={} strides={} clock={} wall={} fd={}",
        buffer.offset(),
        checksum(buffer),
        buffer.size(),
        ino,
        kind,
        ro as u8,
        strides,
        clock.map_or("-".into(), |c| c.to_string()),
        monotonic_ns(),
        memory_fd(buffer)
    )
}

struct Report {
    lines: Mutex<Vec<String>>,
}

impl Report {
    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
    }
    /// Adds a `caps ...` line when `pad`'s current caps differ from the last ones seen.
    fn note_caps_change(&self, pad: &gst::Pad, last_caps: &Mutex<Option<String>>) {
        let caps = pad.current_caps().map(|c| c.to_string());
        let mut lc = last_caps.lock().unwrap();
        if *lc != caps {
            self.push(format!("caps {}", caps.clone().unwrap_or_default()));
            *lc = caps;
        }
    }
    fn write(&self, path: &str) {
        let lines = self.lines.lock().unwrap();
        let mut out: Box<dyn Write> = if path == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(std::fs::File::create(path).expect("report file"))
        };
        for l in lines.iter() {
            writeln!(out, "{l}").unwrap();
        }
    }
}

/// Runs the pipeline until EOS or error; returns whether it ended well. Warnings go to stderr
/// and, given a report, into it as `warning <text>` lines.
fn run_to_eos(
    pipeline: &gst::Pipeline,
    limit: Duration,
    report: Option<&Report>,
) -> Result<(), String> {
    let bus = pipeline.bus().unwrap();
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("timed out waiting for EOS".into());
        }
        let Some(msg) = bus.timed_pop_filtered(
            gst::ClockTime::from_mseconds(left.as_millis() as u64),
            &[
                gst::MessageType::Eos,
                gst::MessageType::Error,
                gst::MessageType::Warning,
            ],
        ) else {
            continue;
        };
        match msg.view() {
            gst::MessageView::Eos(_) => return Ok(()),
            gst::MessageView::Error(e) => return Err(format!("{} ({:?})", e.error(), e.debug())),
            gst::MessageView::Warning(w) => {
                eprintln!("warning: {} ({:?})", w.error(), w.debug());
                if let Some(r) = report {
                    r.push(format!("warning {}", w.error()));
                }
            }
            _ => {}
        }
    }
}

fn produce(args: &Args) -> Result<(), String> {
    let socket = args.str("socket", "");
    let source = args.str("source", "test");
    let frames = args.num("frames", 90);
    let width = args.num("width", 320) as u32;
    let height = args.num("height", 240) as u32;
    let fps = args.num("fps", 30) as i32;
    let report = Arc::new(Report {
        lines: Mutex::new(Vec::new()),
    });

    let pipeline = gst::Pipeline::new();
    let sink = match args.0.get("address") {
        // Across hosts: ucxsink (builds with the `ucx` feature).
        Some(address) => gst::ElementFactory::make("ucxsink")
            .property("address", address)
            .property_from_str("mode", &args.str("mode", "server"))
            .property("transports", args.str("transports", ""))
            .property("max-inflight", args.num("max-inflight", 4) as u32)
            .property("client-timeout", args.num("client-timeout", 3000) as u32)
            .property_from_str("when-full", &args.str("when-full", "auto"))
            .build(),
        None => gst::ElementFactory::make("bufsharesink")
            .property("socket", &socket)
            .property("max-inflight", args.num("max-inflight", 8) as u32)
            .property("max-held", args.num("max-held", 0) as u32)
            .property("client-timeout", args.num("client-timeout", 3000) as u32)
            .build(),
    }
    .map_err(|e| e.to_string())?;
    if args.num("sync", 1) == 0 {
        sink.set_property("sync", false);
    }
    // Memory backend options map to the sink's properties of the same names.
    for prop in ["backend", "heap", "device"] {
        if let Some(v) = args.0.get(prop) {
            sink.set_property_from_str(prop, v);
        }
    }
    let returned = Arc::new(AtomicUsize::new(0));
    let made = Arc::new(AtomicUsize::new(0));
    // Set when --eos-file appears: the app source stops making frames.
    let stop_pushing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut pusher: Option<Box<dyn FnOnce() + Send>> = None;
    let head = match source.as_str() {
        "pipeline" => {
            let desc = args.str("pipeline", "");
            let bin = gst::parse::bin_from_description(&desc, true)
                .map_err(|e| format!("--pipeline {desc:?}: {e}"))?;
            bin.upcast()
        }
        "test" | "audio" => {
            let (src, caps) = if source == "test" {
                let format = args.str("format", "NV12");
                let src = gst::ElementFactory::make("videotestsrc")
                    .property_from_str("pattern", &args.str("pattern", "ball"))
                    .build()
                    .map_err(|e| e.to_string())?;
                let caps = gst::Caps::builder("video/x-raw")
                    .field("format", format)
                    .field("width", width as i32)
                    .field("height", height as i32)
                    .field("framerate", gst::Fraction::new(fps, 1))
                    .build();
                (src, caps)
            } else {
                let src = gst::ElementFactory::make("audiotestsrc")
                    .property("samplesperbuffer", 4800i32)
                    .build()
                    .map_err(|e| e.to_string())?;
                let caps = gst::Caps::builder("audio/x-raw")
                    .field("format", "S16LE")
                    .field("rate", 48000i32)
                    .field("channels", 2i32)
                    .field("layout", "interleaved")
                    .build();
                (src, caps)
            };
            src.set_property("is-live", args.num("live", 1) != 0);
            src.set_property("num-buffers", frames as i32);
            let filter = gst::ElementFactory::make("capsfilter")
                .property("caps", &caps)
                .build()
                .map_err(|e| e.to_string())?;
            pipeline.add_many([&src, &filter]).unwrap();
            src.link(&filter).map_err(|e| e.to_string())?;
            if args.num("sink-pool", 1) == 0 {
                // The source keeps its own (unbounded) pool: no pool of the sink's paces it.
                let identity = gst::ElementFactory::make("identity")
                    .property("drop-allocation", true)
                    .build()
                    .map_err(|e| e.to_string())?;
                pipeline.add(&identity).unwrap();
                filter.link(&identity).map_err(|e| e.to_string())?;
                identity
            } else {
                filter
            }
        }
        _ => {
            let appsrc = gst_app::AppSrc::builder()
                .is_live(true)
                .format(gst::Format::Time)
                .build();
            let pool_max = args.num("pool-max", 4) as u32;
            let (caps, gen) = app_source(
                &source,
                width,
                height,
                fps,
                frames,
                AppSourceOptions {
                    returned: returned.clone(),
                    made: made.clone(),
                    pool_max,
                    slots: args.num("slots", 12) as usize,
                },
            );
            appsrc.set_caps(Some(&caps));
            let src = appsrc.clone();
            let dur = gst::ClockTime::SECOND / fps as u64;
            let stop = stop_pushing.clone();
            pusher = Some(Box::new(move || {
                for n in 0..frames {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Some((mut buffer, new_caps)) = gen(n) else {
                        break;
                    };
                    if let Some(caps) = new_caps {
                        src.set_caps(Some(&caps));
                    }
                    {
                        let b = buffer.get_mut().unwrap();
                        b.set_pts(dur * n);
                        b.set_duration(dur);
                        b.set_offset(n);
                        b.set_offset_end(n + 1);
                    }
                    if src.push_buffer(buffer).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_nanos(dur.nseconds()));
                }
                let _ = src.end_of_stream();
            }));
            appsrc.upcast()
        }
    };
    if head.parent().is_none() {
        pipeline.add(&head).unwrap();
    }
    pipeline.add(&sink).unwrap();
    head.link(&sink).map_err(|e| e.to_string())?;

    let rep = report.clone();
    // Long runs (the soak test) measure this process's memory: `--frame-lines 0`
    // keeps no line per frame, only the count.
    let frame_lines = args.num("frame-lines", 1) != 0;
    let rendered_count = Arc::new(AtomicUsize::new(0));
    let rendered = rendered_count.clone();
    let inodes = Arc::new(Mutex::new(BTreeSet::new()));
    let inos = inodes.clone();
    let last_caps = Arc::new(Mutex::new(None::<String>));
    let sink_weak = sink.downgrade();
    sink.static_pad("sink")
        .unwrap()
        .add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
            if let Some(buffer) = info.buffer() {
                rep.note_caps_change(pad, &last_caps);
                let (ino, _, _) = memory_identity(buffer);
                if ino != 0 {
                    inos.lock().unwrap().insert(ino);
                }
                // The frame's clock time: running time plus base time, as a consumer should see it.
                let segment = pad.sticky_event::<gst::event::Segment>(0);
                let clock = segment.and_then(|ev| {
                    let seg = ev.segment().downcast_ref::<gst::ClockTime>()?.clone();
                    let rt = seg.to_running_time(buffer.pts()?)?;
                    Some((rt + sink_weak.upgrade()?.base_time()?).nseconds())
                });
                rendered.fetch_add(1, Ordering::SeqCst);
                if frame_lines {
                    rep.push(frame_line(buffer, clock));
                }
            }
            gst::PadProbeReturn::Ok
        });

    pipeline.set_state(gst::State::Paused).map_err(|_| {
        let bus = pipeline.bus().unwrap();
        match bus.pop_filtered(&[gst::MessageType::Error]) {
            Some(m) => match m.view() {
                gst::MessageView::Error(e) => format!("{} ({:?})", e.error(), e.debug()),
                _ => unreachable!(),
            },
            None => "cannot start".into(),
        }
    })?;
    let wait_clients = args.num("wait-clients", 0) as u32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while sink.property::<u32>("num-clients") < wait_clients {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} consumers came",
                sink.property::<u32>("num-clients")
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if wait_clients > 0 {
        // They are connected; give their pipelines time to reach PLAYING:
        // a consumer drops frames rendered before its base time.
        std::thread::sleep(Duration::from_millis(args.num("settle", 500)));
    }
    println!("ready");
    pipeline
        .set_state(gst::State::Playing)
        .map_err(|_| "cannot play".to_string())?;
    let pusher_thread = pusher.map(std::thread::spawn);
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = match args.num("stats-every", 0) {
        0 => None,
        ms => {
            let (sink, rep, on) = (sink.clone(), report.clone(), sampling.clone());
            Some(std::thread::spawn(move || {
                while on.load(Ordering::SeqCst) {
                    sample_stats(&sink, &rep);
                    std::thread::sleep(Duration::from_millis(ms));
                }
            }))
        }
    };
    let eos_watch = match args.0.get("eos-file") {
        None => None,
        Some(path) => {
            let (path, pipeline, on) = (path.clone(), pipeline.clone(), sampling.clone());
            let stop = stop_pushing.clone();
            Some(std::thread::spawn(move || {
                while on.load(Ordering::SeqCst) {
                    if std::path::Path::new(&path).exists() {
                        stop.store(true, Ordering::SeqCst);
                        pipeline.send_event(gst::event::Eos::new());
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }))
        }
    };
    // Long enough for the longest run the tests ask for (the soak test's duration comes with --frames).
    let limit = Duration::from_secs(120 + 2 * frames / fps.max(1) as u64);
    let result = run_to_eos(&pipeline, limit, Some(&report));
    if let Some(t) = pusher_thread {
        let _ = t.join();
    }
    sampling.store(false, Ordering::SeqCst);
    for t in [sampler, eos_watch].into_iter().flatten() {
        let _ = t.join();
    }
    // Consumers finish and leave after EOS; what they held comes back then.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.property::<u32>("num-clients") > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    let returned_before_stop = returned.load(Ordering::SeqCst);
    let stats = sink.property::<gst::Structure>("stats");
    pipeline.set_state(gst::State::Null).unwrap();
    // Stopped, the pipeline has let go of every frame: the pool's memories
    // and the sink's read-only reopens are closed. A memfd still open is a
    // frame someone kept a reference to (the slots source's own memfds went
    // with its generator when the pusher thread ended).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut memfds_after_stop = own_memfds();
    while memfds_after_stop > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        memfds_after_stop = own_memfds();
    }
    let freed = returned.load(Ordering::SeqCst);
    let pushed = rendered_count.load(Ordering::SeqCst);
    report.push(format!(
        "summary pushed={pushed} returned={returned_before_stop} made={} freed={freed} memfds-after-stop={memfds_after_stop} inodes={} after-stop: {}",
        made.load(Ordering::SeqCst),
        inodes
            .lock()
            .unwrap()
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(","),
        proc_line()
    ));
    report.push(format!(
        "backend {}",
        stats.get::<String>("backend").unwrap_or_default()
    ));
    report.push(format!("stats {stats}"));
    report.write(&args.str("report", "-"));
    result
}

/// `proc wall=.. fds=.. sockets=.. memfds=.. ucx-registrations=..`: this process's open fds
/// (all of them, the sockets and the memfds among them) and its live UCX memory registrations
/// (-1 without the `ucx` feature), for leak checks.
fn proc_line() -> String {
    let (mut fds, mut sockets, mut memfds) = (0, 0, 0);
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        for e in dir.flatten() {
            fds += 1;
            if let Ok(t) = std::fs::read_link(e.path()) {
                let t = t.to_string_lossy();
                sockets += t.starts_with("socket:") as u32;
                memfds += t.starts_with("/memfd:") as u32;
            }
        }
    }
    #[cfg(feature = "ucx")]
    let regs = ucx::live_registrations() as i64;
    #[cfg(not(feature = "ucx"))]
    let regs = -1;
    format!(
        "proc wall={} fds={fds} sockets={sockets} memfds={memfds} ucx-registrations={regs}",
        monotonic_ns()
    )
}

/// memfd fds open in this process.
fn own_memfds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// One `client ...` report line per consumer, from the sink's stats.
fn sample_stats(sink: &gst::Element, report: &Report) {
    let stats = sink.property::<gst::Structure>("stats");
    report.push(proc_line());
    let wall = monotonic_ns();
    let Ok(clients) = stats.get::<gst::Array>("clients") else {
        return;
    };
    for c in clients.iter() {
        let Ok(c) = c.get::<gst::Structure>() else {
            continue;
        };
        report.push(format!(
            "client wall={wall} pid={} id={} in-flight={} peak={} sent={} dropped={} skipped={} held={} by-ring={} by-message={} by-frame-ring={}",
            c.get::<i32>("pid").unwrap_or(0),
            c.get::<u64>("client-id").unwrap_or(0),
            c.get::<u32>("frames-in-flight").unwrap_or(0),
            c.get::<u32>("frames-in-flight-peak").unwrap_or(0),
            c.get::<u64>("frames-sent").unwrap_or(0),
            c.get::<u64>("frames-dropped").unwrap_or(0),
            c.get::<u64>("frames-skipped").unwrap_or(0),
            stats.get::<u32>("frames-held").unwrap_or(0),
            c.get::<u64>("released-by-ring").unwrap_or(0),
            c.get::<u64>("released-by-message").unwrap_or(0),
            c.get::<u64>("frames-by-ring").unwrap_or(0),
        ));
    }
}

/// What the app sources count (buffers made, and freed: come back) and size.
struct AppSourceOptions {
    returned: Arc<AtomicUsize>,
    made: Arc<AtomicUsize>,
    /// Buffers in the `pool` source's pool.
    pool_max: u32,
    /// Memfds the `slots` source cycles through.
    slots: usize,
}

/// Makes frame n, and the caps to switch to before it, if any.
type FrameGen = Box<dyn Fn(u64) -> Option<(gst::Buffer, Option<gst::Caps>)> + Send>;

/// Deterministic bytes for frame `n`.
fn fill(n: u64, data: &mut [u8]) {
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

fn app_source(
    source: &str,
    width: u32,
    height: u32,
    fps: i32,
    frames: u64,
    options: AppSourceOptions,
) -> (gst::Caps, FrameGen) {
    let AppSourceOptions {
        returned,
        made,
        pool_max,
        slots: slot_count,
    } = options;
    match source {
        "pool" => {
            // A GstBufferPool with exactly `pool_max` buffers, as v4l2src has:
            // the next frame waits for a buffer to come back.
            let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::Nv12, width, height)
                .fps(gst::Fraction::new(fps, 1))
                .build()
                .unwrap();
            let caps = info.to_caps().unwrap();
            let backend: Arc<dyn bufshare_backends::MemoryBackend> =
                Arc::new(bufshare_backends::memfd::MemfdBackend::new());
            let pool = gstbufshare::pool::BackendBufferPool::configured(
                backend,
                Some(&caps),
                info.size() as u32,
                pool_max,
                pool_max,
            )
            .expect("pool config");
            pool.set_active(true).expect("pool activation");
            let pool = pool.upcast::<gst::BufferPool>();
            let params =
                gst::BufferPoolAcquireParams::with_flags(gst::BufferPoolAcquireFlags::DONTWAIT);
            let gen = move |n: u64| -> Option<(gst::Buffer, Option<gst::Caps>)> {
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut buffer = loop {
                    match pool.acquire_buffer(Some(&params)) {
                        Ok(b) => break b,
                        Err(gst::FlowError::Eos) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(1))
                        }
                        Err(e) => {
                            eprintln!(
                                "upstream pool starved: no buffer of {pool_max} came back for 10 s ({e:?})"
                            );
                            std::process::exit(3);
                        }
                    }
                };
                {
                    let mut map = buffer.get_mut().unwrap().map_writable().unwrap();
                    let len = map.len().min(4096);
                    fill(n, &mut map[..len]);
                }
                Some((buffer, None))
            };
            (caps, Box::new(gen))
        }
        "slots" => {
            // A fixed set of memfds, each written through our own shared mapping
            // and reused only once every consumer let go of it, which we learn
            // from a weak reference on each pushed buffer.
            let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::Nv12, width, height)
                .fps(gst::Fraction::new(fps, 1))
                .build()
                .unwrap();
            let size = info.size();
            let slots = slot_count;
            let alloc = gst_allocators::FdAllocator::new();
            let mut mems = Vec::new();
            let mut maps = Vec::new();
            for _ in 0..slots {
                // Sealable: bufsharesink seals upstream memfds against resizing
                // (and copies memory it cannot seal).
                let fd = rustix::fs::memfd_create(
                    "peer-slot",
                    rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
                )
                .unwrap();
                rustix::fs::ftruncate(&fd, size as u64).unwrap();
                // SAFETY: a fresh shared mapping of our own memfd, never unmapped.
                let ptr = unsafe {
                    rustix::mm::mmap(
                        std::ptr::null_mut(),
                        size,
                        rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                        rustix::mm::MapFlags::SHARED,
                        &fd,
                        0,
                    )
                    .unwrap()
                };
                maps.push(ptr as usize);
                let dup = rustix::io::fcntl_dupfd_cloexec(&fd, 0).unwrap();
                use std::os::fd::IntoRawFd;
                // SAFETY: the allocator owns the duplicate fd from here on.
                mems.push(unsafe {
                    alloc
                        .alloc_fd(dup.into_raw_fd(), size, gst_allocators::FdMemoryFlags::NONE)
                        .unwrap()
                });
            }
            let busy: Arc<Vec<std::sync::atomic::AtomicBool>> = Arc::new(
                (0..slots)
                    .map(|_| std::sync::atomic::AtomicBool::new(false))
                    .collect(),
            );
            let gen = move |n: u64| -> Option<(gst::Buffer, Option<gst::Caps>)> {
                let deadline = Instant::now() + Duration::from_secs(10);
                let slot = loop {
                    if let Some(i) = (0..slots).find(|i| !busy[*i].load(Ordering::SeqCst)) {
                        break i;
                    }
                    if Instant::now() > deadline {
                        eprintln!("no free slot for 10 s: buffers are not coming back");
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                };
                busy[slot].store(true, Ordering::SeqCst);
                made.fetch_add(1, Ordering::SeqCst);
                // SAFETY: the slot is free: no buffer, consumer or frame refers to it.
                fill(n, unsafe {
                    std::slice::from_raw_parts_mut(maps[slot] as *mut u8, size)
                });
                let mut buffer = gst::Buffer::new();
                buffer.get_mut().unwrap().append_memory(mems[slot].clone());
                let busy = busy.clone();
                let returned = returned.clone();
                on_buffer_freed(&buffer, move || {
                    busy[slot].store(false, Ordering::SeqCst);
                    returned.fetch_add(1, Ordering::SeqCst);
                });
                Some((buffer, None))
            };
            (info.to_caps().unwrap(), Box::new(gen))
        }
        "rgba-padded" => {
            let stride = ((width as usize * 4).div_ceil(256) * 256 + 64) as i32;
            let size = stride as usize * height as usize;
            let caps = gst_video::VideoInfo::builder(gst_video::VideoFormat::Rgba, width, height)
                .fps(gst::Fraction::new(fps, 1))
                .build()
                .unwrap()
                .to_caps()
                .unwrap();
            let gen = move |n: u64| {
                let mut data = vec![0u8; size];
                fill(n, &mut data);
                let mut buffer = gst::Buffer::from_mut_slice(data);
                gst_video::VideoMeta::add_full(
                    buffer.get_mut().unwrap(),
                    gst_video::VideoFrameFlags::empty(),
                    gst_video::VideoFormat::Rgba,
                    width,
                    height,
                    &[0],
                    &[stride],
                )
                .unwrap();
                Some((buffer, None))
            };
            (caps, Box::new(gen))
        }
        "tensors" => {
            let count = 3 * 64 * 64;
            let caps = gst::Caps::builder("neural-network/tensors")
                .field("num-tensors", 1i32)
                .field("types", "float32")
                .field("dimensions", "1:3:64:64")
                .field("framerate", gst::Fraction::new(fps, 1))
                .build();
            let gen = move |n: u64| {
                let floats: Vec<f32> = (0..count)
                    .map(|i| (n as f32) * 0.5 + i as f32 / 7.0)
                    .collect();
                let bytes: Vec<u8> = floats.iter().flat_map(|f| f.to_le_bytes()).collect();
                Some((gst::Buffer::from_mut_slice(bytes), None))
            };
            (caps, Box::new(gen))
        }
        "text" => {
            let caps = gst::Caps::builder("text/x-raw")
                .field("format", "utf8")
                .build();
            let gen = move |n: u64| {
                Some((
                    gst::Buffer::from_mut_slice(format!("line {n}: héllo wörld\n").into_bytes()),
                    None,
                ))
            };
            (caps, Box::new(gen))
        }
        "caps-change" => {
            let half = frames / 2;
            let caps_of = |w: u32, h: u32| {
                gst_video::VideoInfo::builder(gst_video::VideoFormat::Nv12, w, h)
                    .fps(gst::Fraction::new(fps, 1))
                    .build()
                    .unwrap()
            };
            let first = caps_of(width, height);
            let second = caps_of(width / 2, height / 2);
            let caps = first.to_caps().unwrap();
            let gen = move |n: u64| {
                let info = if n < half { &first } else { &second };
                let mut data = vec![0u8; info.size()];
                fill(n, &mut data);
                let new_caps = (n == half).then(|| info.to_caps().unwrap());
                Some((gst::Buffer::from_mut_slice(data), new_caps))
            };
            (caps, Box::new(gen))
        }
        other => {
            eprintln!("unknown source {other}");
            usage()
        }
    }
}

/// Calls `f` once when `buffer` (and every copy sharing it) is finalized.
fn on_buffer_freed(buffer: &gst::Buffer, f: impl FnOnce() + Send + 'static) {
    type Cb = Box<dyn FnOnce() + Send>;
    unsafe extern "C" fn notify(data: glib::ffi::gpointer, _obj: *mut gst::ffi::GstMiniObject) {
        // SAFETY: `data` is the Box<Cb> leaked below, given back exactly once.
        let cb = unsafe { Box::from_raw(data as *mut Cb) };
        cb();
    }
    let cb: Box<Cb> = Box::new(Box::new(f));
    // SAFETY: a weak ref on a live buffer; the callback owns its data.
    unsafe {
        gst::ffi::gst_mini_object_weak_ref(
            buffer.as_ptr() as *mut gst::ffi::GstMiniObject,
            Some(notify),
            Box::into_raw(cb) as glib::ffi::gpointer,
        );
    }
}

/// Moves the bus's warnings to the report and keeps its first error, which
/// the caller acts on once the frames before it are pulled.
fn drain_bus(bus: &gst::Bus, report: &Report, error: &mut Option<String>) {
    while let Some(m) = bus.pop_filtered(&[gst::MessageType::Warning, gst::MessageType::Error]) {
        match m.view() {
            gst::MessageView::Warning(w) => {
                eprintln!("warning: {}", w.error());
                report.push(format!("warning {}", w.error()));
            }
            gst::MessageView::Error(e) if error.is_none() => {
                *error = Some(format!("{} ({:?})", e.error(), e.debug()));
            }
            _ => {}
        }
    }
}

fn consume(args: &Args) -> Result<(), String> {
    let socket = args.str("socket", "");
    let max_frames = args.num("max-frames", u64::MAX);
    let pipeline = gst::Pipeline::new();
    let src = match args.0.get("address") {
        // Across hosts: ucxsrc (builds with the `ucx` feature).
        Some(address) => gst::ElementFactory::make("ucxsrc")
            .property("address", address)
            .property_from_str("mode", &args.str("mode", "client"))
            .property("transports", args.str("transports", ""))
            .property("timeout", args.num("timeout", 5000))
            .property_from_str("on-disconnect", &args.str("on-disconnect", "error"))
            .build(),
        None => gst::ElementFactory::make("bufsharesrc")
            .property("socket", &socket)
            .property("timeout", args.num("timeout", 5000))
            .property_from_str("on-disconnect", &args.str("on-disconnect", "error"))
            // The harness ends with its producer's EOS in every mode unless told otherwise.
            .property_from_str("on-eos", &args.str("on-eos", "forward"))
            .property("reconnect-interval", args.num("reconnect-interval", 100))
            .property("max-inflight", args.num("max-inflight", 0) as u32)
            .property("frame-ring", args.num("frame-ring", 1) != 0)
            .property("release-ring", args.num("release-ring", 1) != 0)
            .build(),
    }
    .map_err(|e| e.to_string())?;
    let tail = args.str("pipeline", "");
    if !tail.is_empty() {
        return consume_into(&pipeline, &src, &tail, &args.str("report", "-"));
    }
    let hold = args.num("hold", 0) as usize;
    let mut held = std::collections::VecDeque::new();
    let sink = gst_app::AppSink::builder().sync(false).build();
    pipeline.add_many([&src, sink.upcast_ref()]).unwrap();
    src.link(&sink).map_err(|e| e.to_string())?;
    let report = Report {
        lines: Mutex::new(Vec::new()),
    };
    if pipeline.set_state(gst::State::Playing).is_err() {
        let err = run_to_eos(&pipeline, Duration::from_secs(1), None)
            .err()
            .unwrap_or_default();
        return Err(format!("cannot start: {err}"));
    }
    let mut last_caps = None;
    let mut count = 0;
    let bus = pipeline.bus().unwrap();
    let mut error = None;
    let every = Duration::from_millis(args.num("stats-every", 0));
    let mut next_sample = Instant::now();
    let result = loop {
        drain_bus(&bus, &report, &mut error);
        if !every.is_zero() && Instant::now() >= next_sample {
            next_sample = Instant::now() + every;
            report.push(proc_line());
            let stats = src.property::<gst::Structure>("stats");
            report.push(format!(
                "src wall={} connected={} connections={} frames-queued={} registered-memories={}",
                monotonic_ns(),
                stats.get::<bool>("connected").unwrap_or(false),
                stats.get::<u64>("connections").unwrap_or(0),
                stats.get::<u32>("frames-queued").unwrap_or(0),
                stats.get::<u32>("registered-memories").unwrap_or(0),
            ));
        }
        if count >= max_frames {
            break Ok(());
        }
        match sink.try_pull_sample(gst::ClockTime::from_mseconds(100)) {
            Some(sample) => {
                let caps = sample.caps().map(|c| c.to_string());
                if caps != last_caps {
                    report.push(format!("caps {}", caps.clone().unwrap_or_default()));
                    last_caps = caps;
                }
                let buffer = sample.buffer().unwrap();
                let clock = buffer
                    .pts()
                    .zip(pipeline.base_time())
                    .map(|(p, b)| (p + b).nseconds());
                let at = gstbufshare::clock::monotonic_now();
                report.push(format!("{} at={at}", frame_line(buffer, clock)));
                count += 1;
                if hold > 0 {
                    // A greedy consumer: keep the last `hold` frames.
                    held.push_back(sample.clone());
                    if held.len() > hold {
                        held.pop_front();
                    }
                }
            }
            None => {
                // An error comes with an EOS downstream: look at the bus first.
                drain_bus(&bus, &report, &mut error);
                if let Some(e) = error.take() {
                    break Err(e);
                }
                if sink.is_eos() {
                    break Ok(());
                }
            }
        }
    };
    let reconnects = if src.find_property("reconnects").is_some() {
        src.property::<u64>("reconnects")
    } else {
        // ucxsrc: connections made, less the first.
        let stats = src.property::<gst::Structure>("stats");
        stats
            .get::<u64>("connections")
            .unwrap_or(0)
            .saturating_sub(1)
    };
    report.push(format!("summary reconnects={reconnects}"));
    drop(held);
    pipeline.set_state(gst::State::Null).unwrap();
    // The appsink keeps the last buffers it had queued until it is disposed (seen: two
    // frames); the source element stays, stopped, so that what it kept would show.
    let _ = pipeline.remove(&sink);
    drop(sink);
    report.push(format!("after-stop {}", proc_line()));
    report.write(&args.str("report", "-"));
    result
}

/// `consume --pipeline`: bufsharesrc feeds the described elements (an encoder, a converter, a
/// filesink...) until EOS; frames are recorded as they leave bufsharesrc.
fn consume_into(
    pipeline: &gst::Pipeline,
    src: &gst::Element,
    desc: &str,
    report_path: &str,
) -> Result<(), String> {
    let tail = gst::parse::bin_from_description(desc, true)
        .map_err(|e| format!("--pipeline {desc:?}: {e}"))?;
    pipeline.add_many([src, tail.upcast_ref()]).unwrap();
    src.link(&tail)
        .map_err(|e| format!("bufsharesrc ! {desc}: {e}"))?;
    let report = Arc::new(Report {
        lines: Mutex::new(Vec::new()),
    });
    let rep = report.clone();
    let last_caps = Mutex::new(None::<String>);
    let base = pipeline.downgrade();
    src.static_pad("src")
        .unwrap()
        .add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
            if let Some(buffer) = info.buffer() {
                rep.note_caps_change(pad, &last_caps);
                let clock = buffer
                    .pts()
                    .zip(base.upgrade().and_then(|p| p.base_time()))
                    .map(|(p, b)| (p + b).nseconds());
                rep.push(frame_line(buffer, clock));
            }
            gst::PadProbeReturn::Ok
        });
    let result = if pipeline.set_state(gst::State::Playing).is_err() {
        let err = run_to_eos(pipeline, Duration::from_secs(1), None)
            .err()
            .unwrap_or_default();
        Err(format!("cannot start: {err}"))
    } else {
        run_to_eos(pipeline, Duration::from_secs(120), Some(&report))
    };
    pipeline.set_state(gst::State::Null).unwrap();
    report.write(report_path);
    result
}

fn main() {
    gst::init().expect("GStreamer");
    gstbufshare::plugin_register_static().expect("register bufshare");
    let argv: Vec<String> = std::env::args().collect();
    let Some(mode) = argv.get(1) else { usage() };
    let args = Args::parse(&argv[2..]);
    SUM_BYTES.store(args.num("sum-bytes", 0) as usize, Ordering::Relaxed);
    if args.str("socket", "").is_empty() && args.str("address", "").is_empty() {
        usage();
    }
    let result = match mode.as_str() {
        "produce" => produce(&args),
        "consume" => consume(&args),
        _ => usage(),
    };
    if let Err(e) = result {
        eprintln!("bufshare-peer {mode}: error: {e}");
        std::process::exit(2);
    }
}
