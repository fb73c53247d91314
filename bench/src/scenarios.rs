//! The measurements: pipelines of each transport and how a run goes.
//!
//! A run starts the producer, waits for its socket, starts the consumers,
//! lets everything warm up, then tells all processes to `start` and, after
//! the measured duration, to `stop` their measurement window (see roles.rs).
//! Consumers are then stopped before the producer.
//!
//! Part 1 pipelines (fan-out, `fanout`), with `SRC` = `videotestsrc
//! is-live=true pattern=solid-color ! video/x-raw,format=NV12,...`:
//!
//! | transport | producer | each consumer |
//! |---|---|---|
//! | bufshare | `SRC ! STAMP ! bufsharesink socket=S sync=false` | `bufsharesrc name=read0 socket=S ! fakesink sync=false` |
//! | shm | `SRC ! STAMP ! shmsink socket-path=S wait-for-connection=false shm-size=20 frames sync=false` | `shmsrc name=read0 socket-path=S is-live=true ! CAPS ! fakesink sync=false` |
//! | unixfd | `SRC ! STAMP ! unixfdsink socket-path=S sync=false` | `unixfdsrc name=read0 socket-path=S ! fakesink sync=false` |
//! | tee | `SRC ! STAMP ! tee name=fan` + per consumer `fan. ! queue name=readI ! fakesink sync=false`, one process | - |
//!
//! `STAMP` is `identity name=stamp sync=true`: it waits for each frame's
//! render time on the pipeline clock, as a sink with sync=true would, and the
//! stamp is taken as the frame leaves it for the sink. Latency then runs from
//! the render to the consumer, without the producer thread's lateness in
//! waking from its clock wait (a scheduler matter, the same for every
//! transport: 0.3-3 ms on a busy 2-core VM).
//!
//! With 0 consumers (the baseline of each transport), the producer runs alone
//! with the same sink element (tee: `SRC ! STAMP ! fakesink sync=false`), so
//! the baseline includes what the sink's proposed memory costs the source.
//! The unixfd children get the environment of `Context::unixfd_env` (another
//! GStreamer install, see gstprefix.rs).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::roles::nv12_size;
use crate::runner::{wait_for_path, ChildId, Fleet, Report};

/// A part 1 format: NV12 `width` x `height` at `fps`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
}

impl Size {
    pub fn name(self) -> String {
        format!("{}x{}", self.width, self.height)
    }

    /// The name the issue uses: 1080p for 1920x1080, else WxH.
    pub fn short(self) -> String {
        match (self.width, self.height) {
            (1920, 1080) => "1080p".into(),
            _ => self.name(),
        }
    }
}

/// Part 1 formats, the two: 320x240 at 60 fps and 1080p at 30 fps.
pub const FANOUT_SIZES: [Size; 2] = [
    Size {
        width: 320,
        height: 240,
        fps: 60,
    },
    Size {
        width: 1920,
        height: 1080,
        fps: 30,
    },
];

// solid-color is the cheapest pattern (ball ~7 ms a 1080p frame), but filling a 1080p NV12
// frame still costs about 1 ms of CPU when the 2-core machine is quiet, and 2-5 ms in runs
// where it is shared (measured 2026-11-30): the baseline's run-to-run noise is larger than
// one consumer's cost at 1080p, hence rounds, medians and the consumer-only column (part1.rs).
const FANOUT_SOURCE: &str = "videotestsrc is-live=true pattern=solid-color";
/// The element that paces frames and stamps them (see the module comment).
const STAMP: &str = "identity name=stamp sync=true";
/// shmsink area for part 1: room for about 20 frames.
const FANOUT_SHM_FRAMES: usize = 20;
/// shmsink area for part 2: room for several frames of the largest size.
const RATE_SHM_FRAMES: usize = 8;
/// How long a producer's socket may take to appear.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// Saved in results.json by its name (`bufshare`, `shm`, `unixfd`, `tee`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Bufshare,
    Shm,
    Unixfd,
    Tee,
}

impl Transport {
    pub const ALL: [Transport; 4] = [
        Transport::Bufshare,
        Transport::Shm,
        Transport::Unixfd,
        Transport::Tee,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Transport::Bufshare => "bufshare",
            Transport::Shm => "shm",
            Transport::Unixfd => "unixfd",
            Transport::Tee => "tee",
        }
    }

    pub fn from_name(name: &str) -> Option<Transport> {
        Transport::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// What every run needs to know.
pub struct Context {
    pub exe: PathBuf,
    pub tmp: PathBuf,
    pub seconds: f64,
    pub rate_seconds: f64,
    pub warmup: Duration,
    /// Extra environment of the unixfd children (empty: this process's GStreamer).
    pub unixfd_env: Vec<(OsString, OsString)>,
}

fn nv12_caps(width: u32, height: u32, fps: u32) -> String {
    format!("video/x-raw,format=NV12,width={width},height={height},framerate={fps}/1")
}

/// A path quoted for a gst-launch description.
fn quoted(path: &Path) -> String {
    format!("\"{}\"", path.display())
}

/// Outcome of one measurement: the reports of all processes, plus errors of
/// the orchestration itself.
pub struct Outcome {
    pub reports: Vec<Report>,
    pub errors: Vec<String>,
}

impl Outcome {
    pub fn all_errors(&self) -> Vec<String> {
        let mut errors = self.errors.clone();
        for r in &self.reports {
            errors.extend(r.errors.iter().cloned());
            if r.errors.is_empty() && !r.has_window() {
                errors.push(format!("{}: measured nothing", r.label));
            }
        }
        errors
    }

    pub fn cpu_ns(&self) -> u64 {
        self.reports.iter().map(|r| r.cpu_ns).sum()
    }
}

/// Producer-side pipeline and the consumers' pipelines of one measurement.
struct Plan {
    producer: (String, Vec<String>),
    socket: Option<PathBuf>,
    consumers: Vec<String>,
    env: Vec<(OsString, OsString)>,
}

/// Runs one measurement of `plan`: start, warm up, measure, stop.
fn execute(ctx: &Context, label: &str, plan: Plan, seconds: f64) -> Outcome {
    let mut fleet = Fleet::new(&ctx.exe, &ctx.tmp, &plan.env);
    let mut consumers: Vec<ChildId> = Vec::new();
    let mut setup = || -> Result<(), String> {
        let (desc, extra) = &plan.producer;
        fleet.spawn(&format!("{label}-producer"), "producer", desc, extra)?;
        if let Some(socket) = &plan.socket {
            wait_for_path(socket, SOCKET_TIMEOUT)?;
        }
        for (i, desc) in plan.consumers.iter().enumerate() {
            let id = fleet.spawn(&format!("{label}-consumer{i}"), "consumer", desc, &[])?;
            consumers.push(id);
        }
        Ok(())
    };
    let mut errors = Vec::new();
    match setup() {
        Ok(()) => fleet.measure(ctx.warmup, seconds),
        Err(e) => errors.push(e),
    }
    let reports = fleet.finish_all(&consumers);
    Outcome { reports, errors }
}

/// Extra bufsharesrc properties for part 1 consumers, from
/// `BUFSHARE_BENCH_SRC_PROPS` (e.g. `frame-ring=false`, to compare the
/// socket path with the frame ring); empty by default.
fn src_props() -> String {
    std::env::var("BUFSHARE_BENCH_SRC_PROPS").unwrap_or_default()
}

/// Part 1: one live producer of `size`, `n` consumers (0: the producer
/// alone, the baseline of `transport`). `round` only makes names unique.
pub fn fanout(ctx: &Context, transport: Transport, size: Size, n: usize, round: usize) -> Outcome {
    let caps = nv12_caps(size.width, size.height, size.fps);
    let source = format!("{FANOUT_SOURCE} ! {caps}");
    let label = format!("r{}-{}-{}-{n}", round + 1, transport.name(), size.name());
    let socket = ctx.tmp.join(format!("{label}.sock"));
    let s = quoted(&socket);
    let plan = match transport {
        Transport::Bufshare => Plan {
            producer: (
                format!("{source} ! {STAMP} ! bufsharesink socket={s} sync=false"),
                vec![],
            ),
            socket: Some(socket.clone()),
            consumers: vec![
                format!(
                    "bufsharesrc name=read0 socket={s} {} ! fakesink sync=false",
                    src_props()
                );
                n
            ],
            env: vec![],
        },
        Transport::Shm => {
            let shm_size = FANOUT_SHM_FRAMES * nv12_size(size.width, size.height);
            Plan {
                producer: (
                    format!(
                        "{source} ! {STAMP} ! shmsink socket-path={s} \
                         wait-for-connection=false shm-size={shm_size} sync=false"
                    ),
                    vec![],
                ),
                socket: Some(socket.clone()),
                consumers: vec![
                    format!(
                        "shmsrc name=read0 socket-path={s} is-live=true ! {caps} ! fakesink sync=false"
                    );
                    n
                ],
                env: vec![],
            }
        }
        Transport::Unixfd => Plan {
            producer: (
                format!("{source} ! {STAMP} ! unixfdsink socket-path={s} sync=false"),
                vec![],
            ),
            socket: Some(socket.clone()),
            consumers: vec![
                format!("unixfdsrc name=read0 socket-path={s} ! fakesink sync=false");
                n
            ],
            env: ctx.unixfd_env.clone(),
        },
        Transport::Tee if n == 0 => Plan {
            producer: (format!("{source} ! {STAMP} ! fakesink sync=false"), vec![]),
            socket: None,
            consumers: vec![],
            env: vec![],
        },
        Transport::Tee => {
            let branches: String = (0..n)
                .map(|i| format!(" fan. ! queue name=read{i} ! fakesink sync=false"))
                .collect();
            Plan {
                producer: (
                    format!("{source} ! {STAMP} ! tee name=fan{branches}"),
                    vec![],
                ),
                socket: None,
                consumers: vec![],
                env: vec![],
            }
        }
    };
    execute(ctx, &label, plan, ctx.seconds)
}

/// Part 2: one link, producer pushing prepared frames as fast as it can.
pub fn rate(ctx: &Context, transport: Transport, width: u32, height: u32) -> Outcome {
    let caps = nv12_caps(width, height, 30);
    let socket = ctx
        .tmp
        .join(format!("rate-{}-{width}x{height}.sock", transport.name()));
    let s = quoted(&socket);
    let mut extra = vec![
        "--width".to_string(),
        width.to_string(),
        "--height".to_string(),
        height.to_string(),
    ];
    let plan = match transport {
        Transport::Bufshare => {
            extra.push("--fd-memory".to_string());
            Plan {
                producer: (
                    format!("appsrc name=feed ! bufsharesink socket={s} sync=false"),
                    extra,
                ),
                socket: Some(socket.clone()),
                consumers: vec![format!(
                    "bufsharesrc name=read0 socket={s} ! fakesink sync=false"
                )],
                env: vec![],
            }
        }
        Transport::Shm => {
            let shm_size = RATE_SHM_FRAMES * nv12_size(width, height);
            Plan {
                producer: (
                    format!(
                        "appsrc name=feed ! shmsink socket-path={s} shm-size={shm_size} \
                         sync=false wait-for-connection=true"
                    ),
                    extra,
                ),
                socket: Some(socket.clone()),
                consumers: vec![format!(
                    "shmsrc name=read0 socket-path={s} ! capsfilter caps=\"{caps}\" ! fakesink sync=false"
                )],
                env: vec![],
            }
        }
        Transport::Unixfd | Transport::Tee => {
            unreachable!("part 2 measures bufshare and shm links")
        }
    };
    execute(
        ctx,
        &format!("rate-{}-{width}x{height}", transport.name()),
        plan,
        ctx.rate_seconds,
    )
}
