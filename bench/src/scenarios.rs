//! The measurements: pipelines of each transport and how a run goes.
//!
//! A run starts the producer, waits for its socket, starts the consumers,
//! lets everything warm up, then tells all processes to `start` and, after
//! the measured duration, to `stop` their measurement window (see roles.rs).
//! Consumers are then stopped before the producer.

use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::Duration;

use crate::roles::nv12_size;
use crate::runner::{wait_for_path, ChildId, Fleet, Report};

/// Part 1 format.
pub const FANOUT_WIDTH: u32 = 1920;
pub const FANOUT_HEIGHT: u32 = 1080;
// solid-color costs ~0.1 ms a 1080p frame (ball ~7 ms), so the producer-alone baseline
// stays small and the transport cost is not lost in its noise.
const FANOUT_SOURCE: &str = "videotestsrc is-live=true pattern=solid-color";
/// shmsink area for part 1: room for about 20 frames.
const FANOUT_SHM_FRAMES: usize = 20;
/// shmsink area for part 2: room for several frames of the largest size.
const RATE_SHM_FRAMES: usize = 8;
/// How long a producer's socket may take to appear.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Bufshare,
    Shm,
    Tee,
}

impl Transport {
    pub const ALL: [Transport; 3] = [Transport::Bufshare, Transport::Shm, Transport::Tee];

    pub fn name(self) -> &'static str {
        match self {
            Transport::Bufshare => "bufshare",
            Transport::Shm => "shm",
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
}

fn nv12_caps(width: u32, height: u32) -> String {
    format!("video/x-raw,format=NV12,width={width},height={height},framerate=30/1")
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
}

/// Runs one measurement of `plan`: start, warm up, measure, stop.
fn execute(ctx: &Context, label: &str, plan: Plan, seconds: f64) -> Outcome {
    let mut fleet = Fleet::new(&ctx.exe, &ctx.tmp);
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
        Ok(()) => {
            sleep(ctx.warmup);
            fleet.broadcast("start");
            sleep(Duration::from_secs_f64(seconds));
            fleet.broadcast("stop");
        }
        Err(e) => errors.push(e),
    }
    let reports = fleet.finish_all(&consumers);
    Outcome { reports, errors }
}

/// Part 1 baseline: the live producer alone.
pub fn baseline(ctx: &Context) -> Outcome {
    let caps = nv12_caps(FANOUT_WIDTH, FANOUT_HEIGHT);
    let plan = Plan {
        producer: (
            format!("{FANOUT_SOURCE} ! {caps} ! fakesink name=stamp sync=true"),
            vec![],
        ),
        socket: None,
        consumers: vec![],
    };
    execute(ctx, "baseline", plan, ctx.seconds)
}

/// Part 1: one live 1080p30 producer, `n` consumers.
pub fn fanout(ctx: &Context, transport: Transport, n: usize) -> Outcome {
    let caps = nv12_caps(FANOUT_WIDTH, FANOUT_HEIGHT);
    let source = format!("{FANOUT_SOURCE} ! {caps}");
    let socket = ctx
        .tmp
        .join(format!("fanout-{}-{n}.sock", transport.name()));
    let s = quoted(&socket);
    let plan = match transport {
        Transport::Bufshare => Plan {
            producer: (
                format!("{source} ! bufsharesink name=stamp socket={s}"),
                vec![],
            ),
            socket: Some(socket.clone()),
            consumers: vec![format!("bufsharesrc name=read0 socket={s} ! fakesink sync=false"); n],
        },
        Transport::Shm => {
            let shm_size = FANOUT_SHM_FRAMES * nv12_size(FANOUT_WIDTH, FANOUT_HEIGHT);
            Plan {
                producer: (
                    format!(
                        "{source} ! shmsink name=stamp socket-path={s} \
                         wait-for-connection=false shm-size={shm_size} sync=true"
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
            }
        }
        Transport::Tee => {
            let branches: String = (0..n)
                .map(|i| format!(" stamp. ! queue name=read{i} ! fakesink sync=false"))
                .collect();
            Plan {
                producer: (format!("{source} ! tee name=stamp{branches}"), vec![]),
                socket: None,
                consumers: vec![],
            }
        }
    };
    execute(
        ctx,
        &format!("fanout-{}-{n}", transport.name()),
        plan,
        ctx.seconds,
    )
}

/// Part 2: one link, producer pushing prepared frames as fast as it can.
pub fn rate(ctx: &Context, transport: Transport, width: u32, height: u32) -> Outcome {
    let caps = nv12_caps(width, height);
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
            }
        }
        Transport::Tee => unreachable!("part 2 measures links between processes"),
    };
    execute(
        ctx,
        &format!("rate-{}-{width}x{height}", transport.name()),
        plan,
        ctx.rate_seconds,
    )
}
