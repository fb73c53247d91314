//! Orchestrator side of the child processes: spawning, commands, reports and
//! making sure none is left behind.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a child may take to build its pipeline and reach PLAYING.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a child may take to exit after `quit`.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a child reported at exit (see roles.rs for the format).
#[derive(Debug, Default)]
pub struct Report {
    pub label: String,
    pub window_ns: u64,
    pub cpu_ns: u64,
    pub counts: BTreeMap<String, u64>,
    pub latencies_ns: Vec<u64>,
    pub errors: Vec<String>,
}

impl Report {
    fn parse(label: &str, lines: &[String]) -> Report {
        let mut r = Report {
            label: label.to_string(),
            ..Default::default()
        };
        for line in lines {
            let (key, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            match key {
                "window_ns" => r.window_ns = rest.parse().unwrap_or(0),
                "cpu_ns" => r.cpu_ns = rest.parse().unwrap_or(0),
                "count" => {
                    if let Some((name, n)) = rest.split_once(' ') {
                        r.counts.insert(name.to_string(), n.parse().unwrap_or(0));
                    }
                }
                "lat" => r.latencies_ns.extend(
                    rest.split_whitespace()
                        .filter_map(|v| v.parse::<u64>().ok()),
                ),
                "error" => r.errors.push(rest.to_string()),
                _ => {}
            }
        }
        r
    }

    /// Whether the child measured a window at all.
    pub fn has_window(&self) -> bool {
        self.window_ns > 0
    }

    pub fn count(&self, name: &str) -> u64 {
        self.counts.get(name).copied().unwrap_or(0)
    }

    /// Frames counted by all `readN` probes, one entry per reader.
    pub fn reader_counts(&self) -> Vec<u64> {
        self.counts
            .iter()
            .filter(|(k, _)| k.starts_with("read"))
            .map(|(_, v)| *v)
            .collect()
    }
}

struct Child {
    label: String,
    process: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    lines: mpsc::Receiver<String>,
    reader: Option<JoinHandle<()>>,
    log: PathBuf,
    reaped: bool,
}

/// The child processes of one measurement. Dropping it kills and reaps any
/// child still running, so none is left behind on error or panic.
pub struct Fleet {
    exe: PathBuf,
    log_dir: PathBuf,
    env: Vec<(OsString, OsString)>,
    children: Vec<Child>,
}

/// Handle to a child within its fleet.
#[derive(Clone, Copy, Debug)]
pub struct ChildId(usize);

impl Fleet {
    /// A fleet whose children get `env` on top of this process's environment
    /// (e.g. the variables that select another GStreamer install, see gstprefix.rs).
    pub fn new(exe: &Path, log_dir: &Path, env: &[(OsString, OsString)]) -> Fleet {
        Fleet {
            exe: exe.to_path_buf(),
            log_dir: log_dir.to_path_buf(),
            env: env.to_vec(),
            children: Vec::new(),
        }
    }

    /// Starts `bufshare-bench __child ROLE --pipeline DESC EXTRA...` and
    /// waits until its pipeline is PLAYING.
    pub fn spawn(
        &mut self,
        label: &str,
        role: &str,
        pipeline: &str,
        extra: &[String],
    ) -> Result<ChildId, String> {
        self.spawn_in(label, role, pipeline, extra, None, &[])
    }

    /// Like `spawn`, with the child in network namespace `netns` (run through
    /// `ip netns exec`, which execs it: the child's parent is still this
    /// process) and `env` on top of the fleet's environment.
    pub fn spawn_in(
        &mut self,
        label: &str,
        role: &str,
        pipeline: &str,
        extra: &[String],
        netns: Option<&str>,
        env: &[(OsString, OsString)],
    ) -> Result<ChildId, String> {
        let log = self.log_dir.join(format!("{label}.log"));
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        };
        let mut process = command
            .arg("__child")
            .arg(role)
            .arg("--pipeline")
            .arg(pipeline)
            .args(extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("BUFSHARE_BENCH_PARENT", std::process::id().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("spawning {label}: {e}"))?;
        let stdin = process.stdin.take();
        let stdout = process.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let id = ChildId(self.children.len());
        self.children.push(Child {
            label: label.to_string(),
            process,
            stdin,
            lines: rx,
            reader: Some(reader),
            log,
            reaped: false,
        });
        self.wait_ready(id)?;
        Ok(id)
    }

    fn wait_ready(&mut self, id: ChildId) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let child = &mut self.children[id.0];
        let mut early = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match child.lines.recv_timeout(left) {
                Ok(line) if line == "READY" => return Ok(()),
                Ok(line) => early.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "{}: not ready after {READY_TIMEOUT:?}",
                        child.label
                    ));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let report = Report::parse(&child.label, &early);
                    let mut msg = format!("{}: exited before its pipeline ran", child.label);
                    for e in report.errors {
                        msg.push_str(&format!("\n    {e}"));
                    }
                    msg.push_str(&log_tail(&child.log));
                    return Err(msg);
                }
            }
        }
    }

    /// Sends a command line (`start`, `stop`, `quit`) to every child.
    pub fn broadcast(&mut self, cmd: &str) {
        for child in &mut self.children {
            send(child, cmd);
        }
    }

    /// The measurement of a run: lets the children warm up for `warmup`, then
    /// opens their window (`start`) for `seconds` and closes it (`stop`).
    pub fn measure(&mut self, warmup: Duration, seconds: f64) {
        std::thread::sleep(warmup);
        self.broadcast("start");
        std::thread::sleep(Duration::from_secs_f64(seconds));
        self.broadcast("stop");
    }

    /// Tells a child to quit, waits for it (killing it after a timeout) and
    /// returns its report. A child that crashed, had to be killed or exited
    /// non-zero has errors in its report.
    pub fn finish(&mut self, id: ChildId) -> Report {
        let child = &mut self.children[id.0];
        send(child, "quit");
        child.stdin = None;
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let mut killed = false;
        let status = loop {
            match child.process.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.process.kill();
                    killed = true;
                    break child.process.wait().ok();
                }
            }
        };
        child.reaped = true;
        if let Some(reader) = child.reader.take() {
            let _ = reader.join();
        }
        let lines: Vec<String> = child.lines.try_iter().collect();
        let mut report = Report::parse(&child.label, &lines);
        if killed {
            report
                .errors
                .push(format!("{}: did not exit in time, killed", child.label));
        } else if let Some(status) = status.filter(|s| !s.success()) {
            if report.errors.is_empty() {
                report.errors.push(format!("{}: {status}", child.label));
            }
        }
        if !report.errors.is_empty() {
            if let Some(last) = report.errors.last_mut() {
                last.push_str(&log_tail(&child.log));
            }
        }
        report
    }

    /// Finishes every child, in the order they were started, except those
    /// given first in `first` (finished before the others).
    pub fn finish_all(&mut self, first: &[ChildId]) -> Vec<Report> {
        let mut order: Vec<usize> = first.iter().map(|c| c.0).collect();
        let rest: Vec<usize> = (0..self.children.len())
            .filter(|i| !order.contains(i))
            .collect();
        order.extend(rest);
        // Tell the first group to quit all at once, so none waits behind another's shutdown.
        for c in first {
            let child = &mut self.children[c.0];
            if !child.reaped {
                send(child, "quit");
            }
        }
        let mut reports = Vec::new();
        for i in order {
            if !self.children[i].reaped {
                reports.push(self.finish(ChildId(i)));
            }
        }
        reports
    }
}

fn send(child: &mut Child, cmd: &str) {
    if let Some(stdin) = child.stdin.as_mut() {
        // A child that already exited is noticed by `finish`.
        let _ = writeln!(stdin, "{cmd}").and_then(|_| stdin.flush());
    }
}

/// The last lines of a child's stderr log, indented, for error messages.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(8)..];
    if tail.is_empty() {
        String::new()
    } else {
        format!(
            "\n    stderr ({}):\n      {}",
            log.display(),
            tail.join("\n      ")
        )
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in &mut self.children {
            if !child.reaped {
                child.stdin = None;
                let _ = child.process.kill();
                let _ = child.process.wait();
                child.reaped = true;
            }
        }
    }
}

/// A fresh temporary directory for sockets and logs, removed on drop
/// (unless `keep` is set, e.g. to look at logs after a failure).
pub struct TempDir {
    pub path: PathBuf,
    pub keep: bool,
}

impl TempDir {
    pub fn new() -> std::io::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("bufshare-bench-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir(&path)?;
        Ok(TempDir { path, keep: false })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Waits until `path` exists (a producer's socket), up to `timeout`.
pub fn wait_for_path(path: &Path, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not appear within {timeout:?}",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
