//! `bufshare dump [--json] SOCKET`: one snapshot of one producer, as text for people or as
//! JSON for scripts and CI. Connects as a monitor (`monitor.rs`), takes the first snapshot
//! with measured rates and leaves.

use std::path::Path;

use gstbufshare::protocol::{self, Stats};
use serde_json::json;

use crate::args::DumpArgs;
use crate::monitor::{self, MonitorError};

pub fn run(args: &DumpArgs) -> Result<(), MonitorError> {
    let path = Path::new(&args.socket);
    let stats = monitor::snapshot(path)?;
    if args.json {
        println!("{}", to_json(path, &stats));
    } else {
        for line in text(path, &stats) {
            println!("{line}");
        }
    }
    Ok(())
}

/// A latency for JSON: ns, or null when none was measured.
fn ns_or_null(ns: u64) -> serde_json::Value {
    if ns == protocol::NONE {
        serde_json::Value::Null
    } else {
        ns.into()
    }
}

/// The snapshot as one JSON object (the fields are listed in `bufshare --help`).
pub fn to_json(path: &Path, s: &Stats) -> serde_json::Value {
    let consumers: Vec<serde_json::Value> = s
        .consumers
        .iter()
        .map(|c| {
            json!({
                "client_id": c.client_id,
                "pid": c.pid,
                "uid": if c.uid == u32::MAX { serde_json::Value::Null } else { c.uid.into() },
                "name": c.name,
                "frames": c.frames,
                "fps": c.fps_milli as f64 / 1000.0,
                "held": c.held,
                "max_inflight": c.granted,
                "skipped": c.skipped,
                "releases": c.releases,
                "release_p50_ns": ns_or_null(c.release_p50),
                "release_p99_ns": ns_or_null(c.release_p99),
            })
        })
        .collect();
    json!({
        "socket": path.display().to_string(),
        "protocol_version": protocol::VERSION,
        "time_ns": s.time,
        "interval_ns": s.interval,
        "eos": s.flags & protocol::STATS_EOS != 0,
        "caps": s.caps,
        "backend": s.backend,
        "frames": s.frames,
        "fps": s.fps_milli as f64 / 1000.0,
        "copies": s.copies,
        "held": s.held,
        "max_held": s.max_held,
        "num_clients": s.num_consumers,
        "consumers": consumers,
    })
}

/// The snapshot as text lines.
pub fn text(path: &Path, s: &Stats) -> Vec<String> {
    let caps = if s.caps.is_empty() {
        "(none yet)"
    } else {
        &s.caps
    };
    let eos = if s.flags & protocol::STATS_EOS != 0 {
        " (at EOS)"
    } else {
        ""
    };
    let mut lines = vec![
        format!("socket:     {}", path.display()),
        format!("caps:       {caps}"),
        format!("backend:    {}", s.backend),
        format!(
            "frames:     {}{eos}, {} fps over {:.2} s",
            s.frames,
            monitor::fps(s.fps_milli),
            s.interval as f64 / 1e9
        ),
        format!(
            "held:       {}{}",
            monitor::held(s.held, s.max_held),
            if s.max_held == 0 { " (no bound)" } else { "" }
        ),
        format!("copies:     {}", s.copies),
        format!("consumers:  {}", s.num_consumers),
    ];
    if !s.consumers.is_empty() {
        lines.extend(monitor::consumer_rows(s, "  "));
    }
    lines
}
