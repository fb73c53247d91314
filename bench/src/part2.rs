//! Part 2, link rate: one producer pushing 8 prepared frames in a loop (no
//! pixel generation), one consumer, sync=false, at 640x480, 1080p and 4K,
//! bufshare and shm: frames per second received and CPU per frame of both
//! processes.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::roles;
use crate::scenarios::{self, Context, Transport};

/// The frame sizes of part 2.
pub const RATE_SIZES: [(u32, u32); 3] = [(640, 480), (1920, 1080), (3840, 2160)];

/// One link run, as measured (and as results.json keeps it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkRow {
    pub transport: Transport,
    pub width: u32,
    pub height: u32,
    /// The run reported errors (its figures, if any, are marked in the report).
    pub failed: bool,
    /// Frames the consumer received inside the window.
    pub received: u64,
    pub window_ns: u64,
    /// CPU of producer and consumer inside the window.
    pub cpu_ns: u64,
}

impl LinkRow {
    pub fn frame_kib(&self) -> usize {
        roles::nv12_size(self.width, self.height) / 1024
    }

    fn measured(&self) -> bool {
        self.received > 0 && self.window_ns > 0
    }

    pub fn frames_per_s(&self) -> Option<f64> {
        self.measured()
            .then(|| self.received as f64 / (self.window_ns as f64 / 1e9))
    }

    /// CPU of both processes per frame received, µs.
    pub fn cpu_us_per_frame(&self) -> Option<f64> {
        self.measured()
            .then(|| self.cpu_ns as f64 / self.received as f64 / 1e3)
    }

    fn cpu_pct(&self) -> f64 {
        100.0 * self.cpu_ns as f64 / self.window_ns.max(1) as f64
    }
}

/// Runs every size of every transport; errors go to `errors`.
pub fn run(ctx: &Context, transports: &[Transport], errors: &mut Vec<String>) -> Vec<LinkRow> {
    let mut rows = Vec::new();
    for &transport in transports {
        for (width, height) in RATE_SIZES {
            eprintln!(
                "part 2: {} {width}x{height} ({} s)...",
                transport.name(),
                ctx.rate_seconds
            );
            let outcome = scenarios::rate(ctx, transport, width, height);
            let found = outcome.all_errors();
            for e in &found {
                errors.push(format!("{} at {width}x{height}: {e}", transport.name()));
            }
            rows.push(LinkRow {
                transport,
                width,
                height,
                failed: !found.is_empty(),
                received: outcome.reports.iter().flat_map(|r| r.reader_counts()).sum(),
                window_ns: outcome
                    .reports
                    .iter()
                    .map(|r| r.window_ns)
                    .max()
                    .unwrap_or(0),
                cpu_ns: outcome.cpu_ns(),
            });
        }
    }
    rows
}

/// Part 2's table, markdown.
pub fn report(rows: &[LinkRow]) -> String {
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
    for row in rows {
        let mark = if row.failed { " (error)" } else { "" };
        let (name, w, h, kib) = (row.transport.name(), row.width, row.height, row.frame_kib());
        match (row.frames_per_s(), row.cpu_us_per_frame()) {
            (Some(rate), Some(cpu)) => {
                let _ = writeln!(
                    out,
                    "| {name}{mark} | {w}x{h} | {kib} | {rate:.0} | {cpu:.1} | {:.1} |",
                    row.cpu_pct()
                );
            }
            _ => {
                let _ = writeln!(out, "| {name}{mark} | {w}x{h} | {kib} | - | - | - |");
            }
        }
    }
    let _ = writeln!(
        out,
        "\nThe producer pushes clones of 8 prepared frames (memfd-backed for bufshare, \
         system memory for shm, which copies anyway).\n"
    );
    out
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Rows like a run on this machine: bufshare flat, shm growing with the frame.
    pub fn fake() -> Vec<LinkRow> {
        let mut rows = Vec::new();
        for (transport, base_us) in [(Transport::Bufshare, 11.0), (Transport::Shm, 60.0)] {
            for (i, (width, height)) in RATE_SIZES.into_iter().enumerate() {
                let cpu_us = if transport == Transport::Shm {
                    base_us * 5f64.powi(i as i32)
                } else {
                    base_us
                };
                let received = 10_000 / (i as u64 + 1);
                rows.push(LinkRow {
                    transport,
                    width,
                    height,
                    failed: false,
                    received,
                    window_ns: 2_000_000_000,
                    cpu_ns: (cpu_us * 1e3) as u64 * received,
                });
            }
        }
        rows
    }

    #[test]
    fn rows_and_the_table() {
        let mut rows = fake();
        rows[1].failed = true;
        rows[1].received = 0;
        let table = report(&rows);
        assert!(
            table.contains("| bufshare | 640x480 | 450 | 5000 | 11.0 | 5.5 |"),
            "{table}"
        );
        assert!(
            table.contains("| bufshare (error) | 1920x1080 | 3037 | - | - | - |"),
            "{table}"
        );
        assert_eq!(rows[1].cpu_us_per_frame(), None);
        assert_eq!(rows[0].frames_per_s(), Some(5000.0));
    }
}
