//! The machine's wake-up floor: how late a sleeping process runs after
//! another process wakes it, with no GStreamer and no transport in between.
//!
//! Part 1 measures it in the same run as the transports' latency, with the
//! same number of processes and frame rate as the latency target (4 at
//! 30 fps): the orchestrator writes a CLOCK_MONOTONIC stamp into one pipe per
//! child at each tick; each child (`bufshare-bench __wake`) is blocked in a
//! read, and answers `now - stamp` when it runs. Whatever a transport does, a
//! frame cannot reach a consumer's source pad sooner than its process is
//! scheduled, so the render -> push latency of any transport sits on top of
//! these figures.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::measure::monotonic_ns;

/// The child: reads 8-byte stamps from stdin until EOF; answers each with
/// the nanoseconds from the stamp to its own wake-up, on stdout.
pub fn child_main() -> i32 {
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    let mut stamp = [0u8; 8];
    while input.read_exact(&mut stamp).is_ok() {
        let late = monotonic_ns().saturating_sub(u64::from_le_bytes(stamp));
        if output.write_all(&late.to_le_bytes()).is_err() {
            return 1;
        }
    }
    0
}

/// Wakes `processes` children `fps` times a second for `seconds`; returns
/// every child's lateness of every tick, ns, ascending.
pub fn measure(processes: usize, fps: u32, seconds: f64) -> Result<Vec<u64>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let mut children = Vec::with_capacity(processes);
    for _ in 0..processes {
        let child = Command::new(&exe)
            .arg("__wake")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        children.push(child);
    }
    let mut pipes: Vec<_> = children
        .iter_mut()
        .map(|c| c.stdin.take().expect("stdin is piped"))
        .collect();
    // Each child answers every stamp; read the answers as they come, so no
    // pipe fills up during a long run.
    let readers: Vec<_> = children
        .iter_mut()
        .map(|c| {
            let mut out = c.stdout.take().expect("stdout is piped");
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = out.read_to_end(&mut bytes);
                bytes
            })
        })
        .collect();
    // Let the children reach their first read before the first tick.
    std::thread::sleep(Duration::from_millis(200));
    let period = 1_000_000_000 / u64::from(fps.max(1));
    let ticks = (seconds * f64::from(fps)).ceil() as u64;
    let mut next = monotonic_ns() + period;
    let mut failed = None;
    for _ in 0..ticks {
        let now = monotonic_ns();
        if now < next {
            std::thread::sleep(Duration::from_nanos(next - now));
        }
        next += period;
        let stamp = monotonic_ns().to_le_bytes();
        for pipe in &mut pipes {
            if let Err(e) = pipe.write_all(&stamp) {
                failed = Some(format!("a wake-up child went away: {e}"));
            }
        }
        if failed.is_some() {
            break;
        }
    }
    drop(pipes);
    let mut samples = Vec::with_capacity(processes * ticks as usize);
    for reader in readers {
        let bytes = reader.join().map_err(|_| "a reader thread panicked")?;
        samples.extend(
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
        );
    }
    for mut child in children {
        let _ = child.wait();
    }
    if let Some(e) = failed {
        return Err(e);
    }
    if samples.len() as u64 != processes as u64 * ticks {
        return Err(format!(
            "{} answers to {} wake-ups",
            samples.len(),
            processes as u64 * ticks
        ));
    }
    samples.sort_unstable();
    Ok(samples)
}
