//! Monitors on the producer's socket (role 3 in HELLO, `docs/protocol.md` 9.11):
//! the `bufshare ls/top/dump` side of the server.
//!
//! A child module of `server.rs`, so that it can read the server's state; the
//! server calls it from a few hooks: the handshake (a HELLO with role 3 makes
//! the connection a monitor, [`accept`]), once per frame sent and per frame
//! released (the send-time ring and the latency histograms of `stats.rs`), and
//! once per round of the I/O thread ([`service`]), which closes a measuring
//! interval every [`SNAPSHOT_PERIOD`] and sends STATS to the monitors: at once
//! to a new one, then after each interval. A monitor is never a consumer: it
//! is not counted, gets no fan-out and no signals, only HELLO and STATS.

use std::time::Duration;

use super::{lock, Client, Phase, Server, State};
use crate::bufsharesink::stats::{ConsumerMeter, ProducerMeter, SendTimes};
use crate::protocol::{self, ConsumerStats, Hello, Message, Stats};
use crate::transport::Channel;

/// How often the producer closes a measuring interval and sends STATS.
pub const SNAPSHOT_PERIOD: Duration = Duration::from_secs(1);
/// Most monitors at once; one more gets REFUSE instead of its first STATS.
pub const MAX_MONITORS: usize = 16;
/// A monitor that could not take this many snapshots in a row (its socket
/// stayed full) is closed.
const MAX_UNTAKEN_SNAPSHOTS: u32 = 30;

/// The producer-wide part, kept in the server's state.
#[derive(Debug)]
pub(super) struct Monitoring {
    /// When each recent frame went out, for release latencies.
    pub sent: SendTimes,
    producer: ProducerMeter,
    /// Frames the element copied into shareable memory.
    copies: u64,
    /// The memory backend the element uses.
    backend: String,
}

impl Default for Monitoring {
    fn default() -> Self {
        Monitoring {
            sent: SendTimes::default(),
            producer: ProducerMeter::new(SNAPSHOT_PERIOD.as_nanos() as u64),
            copies: 0,
            backend: String::new(),
        }
    }
}

/// The per-connection part, kept in each client.
#[derive(Debug, Default)]
pub(super) struct ClientMonitor {
    /// A consumer's rates and release latencies.
    pub meter: ConsumerMeter,
    /// A consumer's uid and process name, read for its first snapshot.
    ident: Option<(u32, String)>,
    /// A monitor: whether it got its first STATS, and how many snapshots in
    /// a row did not fit in its socket.
    got_first: bool,
    untaken: u32,
}

impl Server {
    /// The element copied one frame into shareable memory.
    pub fn note_copy(&self) {
        lock(&self.shared.state).monitoring.copies += 1;
    }

    /// The element's memory backend, named in STATS.
    pub fn set_backend(&self, name: &str) {
        let mut state = lock(&self.shared.state);
        if state.monitoring.backend != name {
            state.monitoring.backend = name.to_string();
        }
    }
}

/// A HELLO with role 3 from a connection that has not said HELLO: it becomes
/// a monitor, or is refused for its version like a consumer.
pub(super) fn accept(client: &mut Client, hello: &Hello) {
    if hello.version != protocol::VERSION {
        client.refuse_version("monitor", hello.version);
        return;
    }
    client.phase = Phase::Monitor;
    client.monitor.got_first = false;
}

/// Frame `frame_id` goes out now (it needs release: its latency is measured).
pub(super) fn note_sent(state: &mut State, frame_id: u64) {
    state
        .monitoring
        .sent
        .note(frame_id, crate::clock::monotonic_now());
}

/// `client` released `frame_id` at `now` (CLOCK_MONOTONIC ns).
pub(super) fn released(client: &mut Client, sent: &SendTimes, frame_id: u64, now: u64) {
    if let Some(t) = sent.sent_at(frame_id) {
        client.monitor.meter.released(now.saturating_sub(t));
    }
}

/// How long the I/O thread may sleep before the current interval ends.
pub(super) fn until_due(state: &State) -> Duration {
    let ns = state
        .monitoring
        .producer
        .until_due(crate::clock::monotonic_now());
    Duration::from_nanos(ns).max(Duration::from_millis(1))
}

/// One round of the I/O thread: refuses monitors past [`MAX_MONITORS`],
/// closes the interval when due, and sends STATS (to new monitors at once,
/// to all after an interval).
pub(super) fn service(state: &mut State) {
    let now = crate::clock::monotonic_now();
    let monitor = |c: &Client| c.phase == Phase::Monitor && c.dead.is_none();
    let mut excess = state
        .clients
        .iter()
        .filter(|c| monitor(c))
        .count()
        .saturating_sub(MAX_MONITORS);
    // The newest (those still waiting for their first snapshot) go.
    for c in state.clients.iter_mut().rev() {
        if excess == 0 {
            break;
        }
        if monitor(c) && !c.monitor.got_first {
            let reason = format!("too many monitors: {MAX_MONITORS} are connected");
            c.send_control(
                &Message::Refuse {
                    reason: reason.clone(),
                },
                None,
            );
            c.kill(reason, false);
            excess -= 1;
        }
    }

    let interval_ended = match state.monitoring.producer.tick(now, state.frames_rendered) {
        Some(interval) => {
            for c in state
                .clients
                .iter_mut()
                .filter(|c| c.phase == Phase::Active)
            {
                c.monitor.meter.roll(c.frames_sent, interval);
            }
            true
        }
        None => false,
    };
    let waiting = |c: &Client| monitor(c) && (interval_ended || !c.monitor.got_first);
    if !state.clients.iter().any(waiting) {
        return;
    }
    let bytes = protocol::encode(&Message::Stats(snapshot(state, now)));
    for c in state.clients.iter_mut().filter(|c| waiting(c)) {
        match c.channel.send(&bytes, &[]) {
            Ok(()) => {
                c.monitor.got_first = true;
                c.monitor.untaken = 0;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                c.monitor.untaken += 1;
                if c.monitor.untaken >= MAX_UNTAKEN_SNAPSHOTS {
                    c.kill(
                        format!("monitor took none of the last {MAX_UNTAKEN_SNAPSHOTS} snapshots"),
                        false,
                    );
                }
            }
            Err(e) => c.kill(format!("sending STATS failed: {e}"), false),
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A process's name as the kernel keeps it (`/proc/PID/comm`); empty when
/// unknown (no pid, or the process is not visible from here).
fn process_name(pid: Option<i32>) -> String {
    let Some(pid) = pid.filter(|p| *p > 0) else {
        return String::new();
    };
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| cut(s.trim_end_matches('\n'), protocol::MAX_STATS_NAME_LEN).to_string())
        .unwrap_or_default()
}

/// The snapshot monitors get now: the last completed interval's rates and
/// latencies, and the counters as they are.
fn snapshot(state: &mut State, now: u64) -> Stats {
    let m = &state.monitoring;
    let interval = m.producer.last_interval;
    let mut stats = Stats {
        time: now,
        interval,
        flags: if state.stream.eos {
            protocol::STATS_EOS
        } else {
            0
        },
        frames: state.frames_rendered,
        fps_milli: m.producer.last_fps_milli,
        copies: m.copies,
        held: state.holders.len() as u32,
        max_held: state.held.max_held,
        num_consumers: 0,
        caps: cut(
            state.stream.caps.as_deref().unwrap_or(""),
            protocol::MAX_STATS_CAPS_LEN,
        )
        .to_string(),
        backend: cut(&m.backend, protocol::MAX_STATS_NAME_LEN).to_string(),
        consumers: Vec::new(),
    };
    for c in state.clients.iter_mut() {
        if c.phase != Phase::Active || c.dead.is_some() {
            continue;
        }
        stats.num_consumers += 1;
        if stats.consumers.len() >= protocol::MAX_STATS_CONSUMERS {
            continue;
        }
        let (uid, name) = c
            .monitor
            .ident
            .get_or_insert_with(|| {
                (
                    c.channel.peer_uid().unwrap_or(u32::MAX),
                    process_name(c.pid),
                )
            })
            .clone();
        let last = &c.monitor.meter.last;
        stats.consumers.push(ConsumerStats {
            client_id: c.id,
            pid: c.pid.map_or(0, |p| p.max(0) as u32),
            uid,
            frames: c.frames_sent,
            fps_milli: last.fps_milli,
            held: c.inflight.len() as u32,
            granted: c.granted,
            skipped: c.frames_dropped,
            releases: last.releases,
            release_p50: last.p50.unwrap_or(protocol::NONE),
            release_p99: last.p99.unwrap_or(protocol::NONE),
            name,
        });
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::cut;

    #[test]
    fn cuts_on_characters() {
        assert_eq!(cut("abc", 5), "abc");
        assert_eq!(cut("abc", 2), "ab");
        assert_eq!(cut("aé", 2), "a");
        assert_eq!(cut("", 0), "");
    }
}
