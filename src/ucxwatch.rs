//! What UCX does not report to `ucxsink`/`ucxsrc` through its API, made visible.
//!
//! * **UCX's own log.** UCX logs failures it returns no status for (a bind that failed, a
//!   connection manager that could not read a client's data) on stdout. [`watch`] installs a
//!   process-wide handler (`ucx::log`, `ucs_log_push_handler`) once: every message UCX
//!   dispatches (at or above `UCX_LOG_LEVEL`, default `warn`) goes into the GStreamer log, on
//!   the category of the element whose listening socket it is about (`ucxsink`, `ucxsrc`),
//!   else on the category of every UCX element of the process (UCX's log is process-wide),
//!   else on `ucx`. A warning or error about one of an element's listening sockets is also
//!   posted on the bus as an element warning naming the peer, rate-limited. UCX still prints
//!   its messages as before.
//! * **Strangers on a listening port.** UCX 1.13's TCP connection manager logs nothing when a
//!   client that is not UCX connects and sends something else (docs/ucx.md, "Junk on the
//!   port"): it holds the connection open, waiting for a handshake, until that client closes
//!   it. So [`Watch::poll`] looks at the process's own TCP sockets (once a second, only for
//!   elements that listen): a connection to the element's port that has not turned into a UCX
//!   connection request within [`GRACE`] is warned about once, naming the peer's address.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use gst::glib;
use ucx::log::{LogAction, LogLevel, LogRecord};

/// How long a TCP connection to a listening port may stay without a UCX connection request
/// before it is warned about.
pub const GRACE: Duration = Duration::from_secs(3);
/// How often the connection table is read.
const SCAN_EVERY: Duration = Duration::from_secs(1);
/// Bus warnings per element and window; more are counted and mentioned with the next one.
const WARNINGS_PER_WINDOW: u32 = 5;
const WINDOW: Duration = Duration::from_secs(10);

static CAT_UCX: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "ucx",
        gst::DebugColorFlags::empty(),
        Some("UCX's own log (libucs), when no UCX element is alive to carry it"),
    )
});

/// One UCX element of the process, as the log handler sees it.
struct Entry {
    element: glib::WeakRef<gst::Element>,
    cat: gst::DebugCategory,
    /// The address it listens on (set once bound).
    listen: Mutex<Option<SocketAddr>>,
    limiter: Mutex<Limiter>,
}

static ELEMENTS: Mutex<Vec<Weak<Entry>>> = Mutex::new(Vec::new());

struct Limiter {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl Limiter {
    /// Whether a warning may be posted now; with how many were suppressed before it.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .window_start
            .is_none_or(|s| now.duration_since(s) >= WINDOW)
        {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window >= WARNINGS_PER_WINDOW {
            self.suppressed += 1;
            return None;
        }
        self.in_window += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl Entry {
    fn warn(&self, text: &str) {
        gst::warning!(self.cat, "{}", text);
        let Some(e) = self.element.upgrade() else {
            return;
        };
        let allowed = self.limiter.lock().unwrap().allow(Instant::now());
        match allowed {
            Some(0) => gst::element_warning!(e, gst::ResourceError::Read, ("{}", text)),
            Some(n) => gst::element_warning!(
                e,
                gst::ResourceError::Read,
                ("{} ({n} similar warnings suppressed before this one)", text)
            ),
            None => {}
        }
    }

    fn listen(&self) -> Option<SocketAddr> {
        *self.listen.lock().unwrap()
    }

    fn serves(&self, local: SocketAddr) -> bool {
        self.listen().is_some_and(|l| {
            l.port() == local.port() && (l.ip().is_unspecified() || same_ip(l.ip(), local.ip()))
        })
    }
}

fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    v4(a) == v4(b)
}

fn gst_level(level: LogLevel) -> gst::DebugLevel {
    match level {
        LogLevel::Fatal | LogLevel::Error => gst::DebugLevel::Error,
        LogLevel::Warn => gst::DebugLevel::Warning,
        LogLevel::Diag | LogLevel::Info => gst::DebugLevel::Info,
        LogLevel::Debug => gst::DebugLevel::Debug,
        LogLevel::Trace => gst::DebugLevel::Trace,
    }
}

fn on_ucx_log(r: &LogRecord<'_>) -> LogAction {
    let level = gst_level(r.level);
    let mut text = format!("UCX {}:{}: {}", r.file, r.line, r.message);
    if let Some(peer) = r.peer {
        text += &format!(" (peer {peer})");
    }
    let entries: Vec<Arc<Entry>> = {
        let mut list = ELEMENTS.lock().unwrap();
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(Weak::upgrade).collect()
    };
    let owners: Vec<&Arc<Entry>> = match r.local {
        Some(local) => entries.iter().filter(|e| e.serves(local)).collect(),
        None => Vec::new(),
    };
    if owners.is_empty() {
        if entries.is_empty() {
            gst::log_with_level!(CAT_UCX, level, "{}", text);
        }
        for e in &entries {
            match e.element.upgrade() {
                Some(el) => gst::log_with_level!(e.cat, level, obj = &el, "{}", text),
                None => gst::log_with_level!(e.cat, level, "{}", text),
            }
        }
        return LogAction::Continue;
    }
    for e in owners {
        if r.level <= LogLevel::Warn {
            let who = r
                .peer
                .map_or_else(|| "a peer".to_string(), |p| p.to_string());
            e.warn(&format!(
                "a connection attempt from {who} to {} failed: {text}",
                e.listen().map_or_else(String::new, |l| l.to_string())
            ));
        } else {
            gst::log_with_level!(e.cat, level, "{}", text);
        }
    }
    LogAction::Continue
}

/// An element's link to UCX's log and, if it listens, its port watch. Made and polled on the
/// element's I/O thread; dropping it unregisters the element.
pub struct Watch {
    entry: Arc<Entry>,
    /// Peers whose UCX connection request arrived, and when.
    handshaken: HashMap<SocketAddr, Instant>,
    /// Connections to the port without one, by socket inode: first seen.
    strangers: HashMap<u64, Instant>,
    warned: HashSet<u64>,
    next_scan: Instant,
}

/// Installs the UCX log handler (once per process): before the first UCX context.
pub fn install() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| ucx::log::set_handler(Some(Box::new(on_ucx_log))));
}

/// Registers `element` (category `cat`) with the UCX log handler. If it listens, tell
/// [`Watch::listening`] where, once bound.
pub fn watch(element: glib::WeakRef<gst::Element>, cat: gst::DebugCategory) -> Watch {
    install();
    let entry = Arc::new(Entry {
        element,
        cat,
        listen: Mutex::new(None),
        limiter: Mutex::new(Limiter {
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }),
    });
    ELEMENTS.lock().unwrap().push(Arc::downgrade(&entry));
    Watch {
        entry,
        handshaken: HashMap::new(),
        strangers: HashMap::new(),
        warned: HashSet::new(),
        next_scan: Instant::now() + SCAN_EVERY,
    }
}

impl Watch {
    /// The element listens on `addr`.
    pub fn listening(&mut self, addr: SocketAddr) {
        *self.entry.listen.lock().unwrap() = Some(addr);
    }

    /// A UCX connection request from `peer` arrived (accepted or not).
    pub fn handshake(&mut self, peer: Option<SocketAddr>) {
        if let Some(p) = peer {
            self.handshaken.insert(p, Instant::now());
        }
    }

    /// Reads the connection table if it is time: warns once about each connection to the
    /// listening port that is not a UCX peer's.
    pub fn poll(&mut self) {
        let Some(listen) = self.entry.listen() else {
            return;
        };
        let now = Instant::now();
        if now < self.next_scan {
            return;
        }
        self.next_scan = now + SCAN_EVERY;
        let conns = tcp_connections(|local| self.entry.serves(local));
        let present: HashSet<u64> = conns.iter().map(|c| c.inode).collect();
        self.strangers.retain(|i, _| present.contains(i));
        self.warned.retain(|i| present.contains(i));
        let remotes: HashSet<SocketAddr> = conns.iter().map(|c| c.remote).collect();
        self.handshaken
            .retain(|p, at| remotes.contains(p) || now.duration_since(*at) < GRACE * 3);
        for c in conns {
            if self.handshaken.contains_key(&c.remote) || self.warned.contains(&c.inode) {
                continue;
            }
            let first = *self.strangers.entry(c.inode).or_insert(now);
            if now.duration_since(first) < GRACE {
                continue;
            }
            self.warned.insert(c.inode);
            let mut text = format!(
                "{} connected to {listen} but sent no UCX connection request in {} s: not a UCX peer (another protocol, a port scan, junk?)",
                c.remote,
                GRACE.as_secs()
            );
            if c.closed_by_peer {
                text += &format!(
                    "; it has closed the connection, and UCX still holds it with {} bytes unread and spins a CPU on it (UCX 1.13: docs/ucx.md)",
                    c.unread
                );
            } else {
                text += "; UCX holds the connection until that peer closes it";
            }
            self.entry.warn(&text);
        }
    }
}

struct TcpConn {
    remote: SocketAddr,
    inode: u64,
    unread: u64,
    closed_by_peer: bool,
}

/// This process's TCP connections (established, or closed by the peer: CLOSE_WAIT) whose
/// local address `mine` accepts: its socket fds (/proc/self/fd), asked with getsockname,
/// getpeername, TCP_INFO and FIONREAD. Cheap: the kernel's whole connection table
/// (/proc/net/tcp) costs about 2.6 ms to read here even when empty (it walks every hash
/// bucket), this about as many syscalls as the process has sockets.
fn tcp_connections(mine: impl Fn(SocketAddr) -> bool) -> Vec<TcpConn> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
        else {
            continue;
        };
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // The fd may have been closed (and reused) since the listing: then the answers are
        // about another socket, or errors; either way only a report is affected.
        let (Some(local), Some(remote)) = (
            ucx::socket_address(fd, false),
            ucx::socket_address(fd, true),
        ) else {
            continue;
        };
        if !mine(local) {
            continue;
        }
        let Some(state) = tcp_state(fd) else {
            continue;
        };
        if state != TCP_ESTABLISHED && state != TCP_CLOSE_WAIT {
            continue;
        }
        let mut unread: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut unread) } != 0 {
            unread = 0;
        }
        out.push(TcpConn {
            remote,
            inode,
            unread: unread.max(0) as u64,
            closed_by_peer: state == TCP_CLOSE_WAIT,
        });
    }
    out
}

const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE_WAIT: u8 = 8;

/// The TCP state of socket `fd` (TCP_INFO), None if it is not a TCP socket.
fn tcp_state(fd: i32) -> Option<u8> {
    // SAFETY: zeroed tcp_info is valid; len is its size.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let r = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        (r == 0).then_some(info.tcpi_state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_a_connection_of_this_process() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let c = std::net::TcpStream::connect(addr).unwrap();
        let (_s, _) = l.accept().unwrap();
        let conns = tcp_connections(|local| local == addr);
        assert!(
            conns.iter().any(|t| t.remote == c.local_addr().unwrap()),
            "connection {} -> {addr} not found",
            c.local_addr().unwrap()
        );
    }

    #[test]
    fn warnings_are_rate_limited() {
        let mut l = Limiter {
            window_start: None,
            in_window: 0,
            suppressed: 0,
        };
        let t = Instant::now();
        for _ in 0..WARNINGS_PER_WINDOW {
            assert_eq!(l.allow(t), Some(0));
        }
        assert_eq!(l.allow(t), None);
        assert_eq!(l.allow(t), None);
        assert_eq!(l.allow(t + WINDOW), Some(2));
    }
}
