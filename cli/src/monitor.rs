//! The monitor client that `ls`, `top` and `dump` share: connects to a producer's socket
//! with the monitor role (`docs/protocol.md` 9.11) and reads its STATS snapshots, with a
//! timeout on every wait; plus where producers are looked for and how the figures are
//! printed. Every failure becomes one [`MonitorError`] line naming the socket and the cause.

use std::fmt;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gstbufshare::protocol::{self, DecodeError, Hello, Message, Role, Stats};
use gstbufshare::transport::unix::{wait_for, UnixChannel};
use gstbufshare::transport::{Channel, Received};

/// Where producers' sockets are looked for when no directory is given, unless
/// `$BUFSHARE_DIR` is set.
pub const DEFAULT_DIR: &str = "/run/bufshare";
/// Longest wait for any answer of a producer.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// The directory to scan by default: `$BUFSHARE_DIR`, else [`DEFAULT_DIR`].
pub fn default_dir() -> PathBuf {
    match std::env::var_os("BUFSHARE_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(DEFAULT_DIR),
    }
}

/// Why a producer could not be monitored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    NotFound,
    NotASocket(&'static str),
    /// Connection refused: a socket file nobody serves.
    Stale,
    PermissionDenied,
    /// Its listen backlog is full.
    Busy,
    /// It sent REFUSE (allowed-uid, version, too many monitors).
    Refused(String),
    /// It does not know the monitor role: an older version, or version 2
    /// without the monitor feature.
    Older(String),
    Newer(u16),
    NotBufshare(String),
    NoAnswer(&'static str),
    Closed(&'static str),
    Protocol(String),
    Io(String),
}

/// A [`Failure`] on one socket; displays as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorError {
    pub path: PathBuf,
    pub failure: Failure,
}

impl MonitorError {
    /// Short state for tables (`ls`): stale, refused, older, ...
    pub fn state(&self) -> &'static str {
        match self.failure {
            Failure::Stale => "stale",
            Failure::Refused(_) => "refused",
            Failure::Older(_) | Failure::Newer(_) => "version",
            Failure::PermissionDenied => "denied",
            Failure::NoAnswer(_) | Failure::Busy => "no-answer",
            _ => "error",
        }
    }

    /// The cause alone, without the path.
    pub fn cause(&self) -> String {
        let v = protocol::VERSION;
        match &self.failure {
            Failure::NotFound => "no such socket (nothing at this path)".into(),
            Failure::NotASocket(what) => format!("not a socket (a {what})"),
            Failure::Stale => {
                "stale socket: connection refused (no producer is serving it)".into()
            }
            Failure::PermissionDenied => "permission denied: cannot connect to the socket (the producer's socket-mode keeps this user out)".into(),
            Failure::Busy => "the producer accepts no connection now (its backlog is full)".into(),
            Failure::Refused(reason) => format!("refused by the producer: {reason}"),
            Failure::Older(detail) => format!(
                "producer speaks an older protocol ({detail}; this bufshare speaks version {v} with monitors): it cannot be monitored, upgrade it"
            ),
            Failure::Newer(pv) => format!(
                "producer speaks a newer protocol (version {pv}; this bufshare speaks version {v}): upgrade bufshare"
            ),
            Failure::NotBufshare(detail) => format!("not a bufshare producer ({detail})"),
            Failure::NoAnswer(what) => format!(
                "no answer from the producer within {} s ({what})",
                TIMEOUT.as_secs()
            ),
            Failure::Closed(what) => format!("the producer closed the connection {what}"),
            Failure::Protocol(e) => format!("protocol error: {e}"),
            Failure::Io(e) => e.clone(),
        }
    }
}

impl fmt::Display for MonitorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.cause())
    }
}

/// A monitor connection to one producer.
pub struct Monitor {
    channel: UnixChannel,
    buf: Vec<u8>,
    path: PathBuf,
}

/// What a file that is not a socket is, for the error line.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "directory"
    } else if t.is_file() {
        "regular file"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "device"
    } else {
        "file of another kind"
    }
}

/// Whether `path` names a socket file; the error line says what it is otherwise.
pub fn check_socket_file(path: &Path) -> Result<(), MonitorError> {
    let fail = |failure| MonitorError {
        path: path.to_owned(),
        failure,
    };
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(fail(Failure::NotFound)),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            Err(fail(Failure::PermissionDenied))
        }
        Err(e) => Err(fail(Failure::Io(e.to_string()))),
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                Ok(())
            } else {
                Err(fail(Failure::NotASocket(file_kind(&meta))))
            }
        }
    }
}

impl Monitor {
    /// Connects to the producer at `path` and completes the monitor handshake: reads the
    /// producer's HELLO (or REFUSE) first, and says HELLO as a monitor only to a producer
    /// that announced the monitor feature, so an older one just sees a peer that left.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Monitor, MonitorError> {
        let fail = |failure| MonitorError {
            path: path.to_owned(),
            failure,
        };
        check_socket_file(path)?;
        let channel = UnixChannel::try_connect(path).map_err(|e| {
            fail(match e.raw_os_error() {
                Some(libc::ECONNREFUSED) => Failure::Stale,
                Some(libc::ENOENT) => Failure::NotFound,
                Some(libc::EACCES | libc::EPERM) => Failure::PermissionDenied,
                Some(libc::EAGAIN) => Failure::Busy,
                Some(libc::EPROTOTYPE) => {
                    Failure::NotBufshare("the socket is not of type SOCK_SEQPACKET".into())
                }
                _ => Failure::Io(format!("cannot connect: {e}")),
            })
        })?;
        let mut m = Monitor {
            channel,
            buf: vec![0u8; protocol::MAX_MESSAGE_LEN],
            path: path.to_owned(),
        };
        let deadline = Instant::now() + timeout;
        match m.recv(deadline, "waiting for its HELLO", "before its HELLO") {
            Ok(Message::Hello(h)) => m.check_hello(&h)?,
            Ok(Message::Refuse { reason }) => return Err(fail(Failure::Refused(reason))),
            Ok(other) => {
                return Err(fail(Failure::Protocol(format!(
                    "expected HELLO, got {}",
                    other.name()
                ))))
            }
            Err(e) => return Err(e),
        }
        let hello = protocol::encode(&Message::Hello(Hello {
            version: protocol::VERSION,
            role: Role::Monitor,
            features: 0,
        }));
        m.channel.send(&hello, &[]).map_err(|e| {
            fail(match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                    Failure::Closed("before it read our HELLO")
                }
                _ => Failure::Io(format!("sending HELLO: {e}")),
            })
        })?;
        Ok(m)
    }

    fn check_hello(&self, h: &Hello) -> Result<(), MonitorError> {
        let failure = if h.role != Role::Producer {
            Failure::NotBufshare("the peer on this socket is not a producer".into())
        } else if h.version < protocol::VERSION {
            Failure::Older(format!("version {}", h.version))
        } else if h.version > protocol::VERSION {
            Failure::Newer(h.version)
        } else if h.features & protocol::FEATURE_MONITOR == 0 {
            Failure::Older(format!(
                "version {} without the monitor role: no monitor feature in its HELLO",
                h.version
            ))
        } else {
            return Ok(());
        };
        Err(MonitorError {
            path: self.path.clone(),
            failure,
        })
    }

    /// The next snapshot, waiting at most `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Result<Stats, MonitorError> {
        let deadline = Instant::now() + timeout;
        match self.recv(deadline, "waiting for a snapshot", "")? {
            Message::Stats(s) => Ok(s),
            Message::Refuse { reason } => Err(MonitorError {
                path: self.path.clone(),
                failure: Failure::Refused(reason),
            }),
            other => Err(MonitorError {
                path: self.path.clone(),
                failure: Failure::Protocol(format!("expected STATS, got {}", other.name())),
            }),
        }
    }

    /// The next message, or why none came before `deadline`.
    fn recv(
        &mut self,
        deadline: Instant,
        waiting: &'static str,
        closed_when: &'static str,
    ) -> Result<Message, MonitorError> {
        let fail = |failure| MonitorError {
            path: self.path.clone(),
            failure,
        };
        let closed = if closed_when.is_empty() {
            "(it stopped, or dropped this monitor)"
        } else {
            closed_when
        };
        loop {
            match self.channel.recv(&mut self.buf) {
                Ok(Received::Message { len, fds }) => {
                    return protocol::decode(&self.buf[..len], fds.len()).map_err(|e| {
                        fail(match e {
                            DecodeError::BadMagic => {
                                Failure::NotBufshare("its HELLO has no bufshare magic".into())
                            }
                            e => Failure::Protocol(e.to_string()),
                        })
                    });
                }
                Ok(Received::Closed) => return Err(fail(Failure::Closed(closed))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(fail(Failure::Closed(closed)))
                }
                Err(e) => return Err(fail(Failure::Io(format!("reading: {e}")))),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(fail(Failure::NoAnswer(waiting)));
            }
            let fds = [(self.channel.as_fd(), rustix::event::PollFlags::IN)];
            wait_for(&fds, Some(deadline - now))
                .map_err(|e| fail(Failure::Io(format!("poll: {e}"))))?;
        }
    }
}

/// One snapshot of the producer at `path`, with its rates measured: the first snapshot,
/// or the next one if the producer had not measured an interval yet.
pub fn snapshot(path: &Path) -> Result<Stats, MonitorError> {
    let mut m = Monitor::connect(path, TIMEOUT)?;
    let first = m.next(TIMEOUT)?;
    if first.interval > 0 {
        return Ok(first);
    }
    Ok(m.next(TIMEOUT).unwrap_or(first))
}

/// Frames per second from STATS' fps × 1000, with one decimal.
pub fn fps(milli: u32) -> String {
    format!("{:.1}", milli as f64 / 1000.0)
}

/// A release latency in ns (NONE: none measured) for tables.
pub fn latency(ns: u64) -> String {
    if ns == protocol::NONE {
        return "-".into();
    }
    let ms = ns as f64 / 1e6;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

/// Frames held of the bound: `3/8`, or `3` without a bound.
pub fn held(held: u32, bound: u32) -> String {
    if bound == 0 {
        held.to_string()
    } else {
        format!("{held}/{bound}")
    }
}

/// A uid for tables (u32::MAX: unknown).
pub fn uid(uid: u32) -> String {
    if uid == u32::MAX {
        "-".into()
    } else {
        uid.to_string()
    }
}

/// The per-consumer table's header and rows, indented by `indent`.
pub fn consumer_rows(s: &Stats, indent: &str) -> Vec<String> {
    let mut rows = vec![format!(
        "{indent}{:>8}  {:<16} {:>6} {:>10} {:>6} {:>6} {:>8} {:>9} {:>9}",
        "PID", "NAME", "UID", "FRAMES", "FPS", "HELD", "SKIPPED", "REL-P50", "REL-P99"
    )];
    for c in &s.consumers {
        let pid = if c.pid == 0 {
            "-".to_string()
        } else {
            c.pid.to_string()
        };
        let name = if c.name.is_empty() { "-" } else { &c.name };
        rows.push(format!(
            "{indent}{:>8}  {:<16} {:>6} {:>10} {:>6} {:>6} {:>8} {:>9} {:>9}",
            pid,
            name,
            uid(c.uid),
            c.frames,
            fps(c.fps_milli),
            held(c.held, c.granted),
            c.skipped,
            latency(c.release_p50),
            latency(c.release_p99)
        ));
    }
    if (s.num_consumers as usize) > s.consumers.len() {
        rows.push(format!(
            "{indent}... and {} more consumers",
            s.num_consumers as usize - s.consumers.len()
        ));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures() {
        assert_eq!(fps(29_970), "30.0");
        assert_eq!(fps(0), "0.0");
        assert_eq!(latency(protocol::NONE), "-");
        assert_eq!(latency(1_234_567), "1.23 ms");
        assert_eq!(latency(45_600_000), "45.6 ms");
        assert_eq!(latency(2_500_000_000), "2.50 s");
        assert_eq!(held(3, 0), "3");
        assert_eq!(held(3, 8), "3/8");
        assert_eq!(uid(u32::MAX), "-");
    }

    #[test]
    fn error_lines_name_the_socket_and_the_cause() {
        let e = MonitorError {
            path: "/run/bufshare/cam.sock".into(),
            failure: Failure::Older("version 1".into()),
        };
        let line = e.to_string();
        assert!(line.starts_with("/run/bufshare/cam.sock: producer speaks an older protocol"));
        assert!(!line.contains('\n'));
        assert_eq!(e.state(), "version");
    }
}
