//! The fan-out core of bufsharesink: the consumers, what each has been sent
//! and holds, and the I/O thread that serves the socket.
//!
//! Two threads touch a [`Server`]:
//! - the streaming thread calls [`Server::send_frame`] (and caps/EOS). It only
//!   does non-blocking sends; a consumer whose socket is full, or that already
//!   holds `max_inflight` frames, is skipped for that frame (latest wins).
//!   Who gets a frame is the pure policy of [`super::fanout`]. After sending,
//!   it reads the RELEASEs that came since the last frame (a drain).
//! - the I/O thread accepts consumers, does the handshake, sends FORGET when
//!   a producer memory dies, flushes control messages that did not fit, and
//!   drops consumers that leave or misbehave. It reads consumers' messages
//!   too, except while the streaming thread drains them: then (for
//!   [`DRAIN_HANDOFF`] after each drain) it only watches for hang-ups, so a
//!   RELEASE costs no thread wake-up. Under a bound on held frames (below) the
//!   streaming thread does not drain and the I/O thread reads every RELEASE at
//!   once, so pool buffers go back upstream as soon as they can.
//!
//! A consumer that asks for it gets a release ring (shared memory, see
//! [`crate::protocol::release_ring`]) and writes its releases there: the
//! streaming thread reads the rings before each frame, with no system call.
//! While the I/O thread is in charge of releases (a held bound, or no frame
//! for [`DRAIN_HANDOFF`]) the rings say "release on the socket"; the I/O
//! thread also reads the rings, on every round and every few ms for a while
//! after that switch, so a release written just before it is not left behind.
//!
//! A consumer that asks for it also gets a frame ring (shared memory and a
//! doorbell, see [`crate::protocol::frame_ring`]): its FRAMEs are written
//! there instead of sent, and the doorbell rings only if it sleeps. Every
//! other message still goes on the socket, counted: each ring entry carries
//! how many socket messages went before it, so the consumer keeps the
//! order. A full ring is a full socket (the frame is skipped for it), and a
//! consumer that stops reading is seen by its read count not moving.
//!
//! A consumer's frames are held (a `gst::Buffer` reference each) until it
//! releases them or goes away, so upstream pool buffers come back exactly
//! when no consumer needs them any more.
//!
//! Each consumer holds at most the frames it was granted (MAX_INFLIGHT): what
//! it asked for, clamped to `max-inflight-limit`, or `max-inflight` when it
//! asked for nothing. The grant goes to it before CAPS and whenever it changes.
//!
//! When the producer drops a consumer that is past the handshake (stalled,
//! protocol error, too many queued messages), it first tells it why
//! (DISCONNECT). The frames it held go back at once; if the DISCONNECT does
//! not fit in its socket, the connection lingers (closing, nothing else
//! sent) until the I/O thread could send it, or for at most
//! [`DISCONNECT_LINGER`].
//!
//! Connections that have not said HELLO are capped (`max-pending-connections`:
//! the oldest goes), and an accept that fails for lack of fds pauses the
//! listener briefly: idle connections cannot take the producer's fds away.
//!
//! On EOS the streaming thread waits (at most [`FLUSH_LIMIT`]) until every
//! consumer has the EOS in its socket, and dropping the server flushes what is
//! still queued (within the same limit) before closing: a consumer that was
//! slow to read still gets the end of the stream.
//!
//! Two limits protect the producer from its consumers:
//! - a stall timeout (`client-timeout`): a consumer that leaves messages
//!   unread in its socket and sends nothing for that long is disconnected,
//!   which returns what it held;
//! - a bound on the frames all consumers together hold (`max-held`, derived
//!   from a fixed upstream pool by default): a frame goes to nobody if that
//!   would pin more distinct frames than the bound, so the upstream pool never
//!   runs dry; and a consumer that holds frames older than the two newest
//!   sent (a greedy one) gets a new frame only while three frames of the
//!   bound stay free for the consumers that keep up. See [`super::fanout`].

use std::collections::VecDeque;

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::fanout::{Candidate, FanOut, RecentFrames, Verdict};
use super::stats::SendTimes;
use crate::memtag::ForgetListener;
use crate::protocol::frame_ring::{self, FEATURE_FRAME_RING};
use crate::protocol::release_ring::{self, FEATURE_RELEASE_RING};
use crate::protocol::{self, Hello, Message, Register, Role};
use crate::transport::frame_ring::ProducerFrameRing;
use crate::transport::ring::ProducerRing;
use crate::transport::unix::{wait_for, Listener, UnixChannel, Waker};
use crate::transport::{Channel, Received};

/// After the rings switch to releases on the socket, the I/O thread reads
/// them this often for [`RING_SWITCH_WATCH`] (a consumer may have written a
/// release just as the switch happened).
const RING_SWITCH_TICK: Duration = Duration::from_millis(5);
const RING_SWITCH_WATCH: Duration = Duration::from_millis(100);
#[path = "monitor.rs"]
mod monitor;

/// A consumer must send its HELLO within this time after connecting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after the streaming thread's last drain of consumers' messages
/// the I/O thread leaves them to it. Past this (frames stopped: EOS, pause, a
/// stalled upstream) the I/O thread reads them again.
pub const DRAIN_HANDOFF: Duration = Duration::from_millis(100);
/// A consumer that has not released a frame yet may still be starting its
/// pipeline: it counts as stalled only after this long (or `client-timeout`,
/// if longer).
const STARTUP_GRACE: Duration = Duration::from_secs(10);
/// Control messages queued for a consumer that does not read; past this it is dropped.
const MAX_QUEUED_MESSAGES: usize = 512;
/// How long a dropped consumer's connection may wait for its DISCONNECT to
/// fit in its socket before it is closed anyway.
pub const DISCONNECT_LINGER: Duration = Duration::from_secs(30);
/// Most dropped connections kept waiting for their DISCONNECT to fit; past
/// this, the oldest is closed at once.
const MAX_CLOSING: usize = 64;
/// How long the listener is left out of the poll set after accept failed
/// (out of fds), so that the I/O thread does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long, at most, EOS waits for consumers to have it in their sockets, and
/// how long stopping waits for queued messages to go out.
pub const FLUSH_LIMIT: Duration = Duration::from_secs(2);
/// Rate limit of the log lines about pending connections and accept errors.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// One memory of a frame, as the streaming thread prepared it.
#[derive(Debug, Clone)]
pub struct SharedMemory {
    pub mem_id: u64,
    pub kind: protocol::MemoryKind,
    /// Size of the fd's memory that frames may address (REGISTER's size).
    pub fd_size: u64,
    /// Valid as long as the frame's buffer is alive.
    pub raw_fd: RawFd,
}

/// A frame ready to fan out: the encoded FRAME message, the memories it
/// names, and the buffer that keeps them alive while consumers hold the frame.
#[derive(Debug)]
pub struct Outgoing {
    pub buffer: gst::Buffer,
    pub frame_id: u64,
    /// The encoded FRAME message (at most `protocol::MAX_MESSAGE_LEN` bytes).
    pub frame_bytes: Vec<u8>,
    /// Whether consumers hold the frame until RELEASE (it names registered memory).
    pub needs_release: bool,
    pub memories: Vec<SharedMemory>,
    /// At most this many distinct frames may be held by all consumers
    /// together after this one is sent; None: no bound.
    pub max_held: Option<usize>,
}

/// Things that happened, for the element to report outside the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Connected {
        client_id: u64,
        pid: Option<i32>,
    },
    /// A connection ended. `active`: it was past the handshake (it had been
    /// reported Connected); otherwise it is reported only when `warn`.
    Disconnected {
        client_id: u64,
        reason: String,
        warn: bool,
        active: bool,
    },
}

/// Counters for the `stats` property.
#[derive(Debug, Clone, Default)]
pub struct ClientStats {
    pub client_id: u64,
    pub pid: Option<i32>,
    pub frames_sent: u64,
    pub frames_dropped: u64,
    pub frames_in_flight: u32,
    /// The most frames it held at once.
    pub frames_in_flight_peak: u32,
    /// Frames skipped for it because of the bound on frames all consumers hold.
    pub frames_dropped_held: u64,
    pub memories_registered: u64,
    /// Frames it may hold at once (its MAX_INFLIGHT grant).
    pub max_inflight: u32,
    /// Frames it released through its release ring, and in RELEASE messages.
    pub released_by_ring: u64,
    pub released_by_message: u64,
    /// Of the frames sent, those that went through its frame ring.
    pub frames_by_ring: u64,
}

/// Counters of the bound on frames held by all consumers together.
#[derive(Debug, Clone, Default)]
pub struct HeldStats {
    /// The bound used for the last frame (0: none).
    pub max_held: u32,
    /// Distinct frames held by consumers now.
    pub frames_held: u32,
    /// The most distinct frames consumers held at once.
    pub frames_held_peak: u32,
    /// Consumers disconnected by the stall timeout.
    pub clients_timed_out: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    AwaitingHello {
        since: Instant,
    },
    Active,
    /// A monitor (HELLO role 3): gets STATS only, is no consumer (see `monitor.rs`).
    Monitor,
    /// Dropped; waits for its DISCONNECT (the only message queued) to fit
    /// in its socket, then is closed. Holds nothing, gets nothing else.
    Closing {
        since: Instant,
    },
}

struct Client {
    id: u64,
    channel: UnixChannel,
    pid: Option<i32>,
    phase: Phase,
    /// Memory ids this consumer has been sent REGISTER for.
    registered: HashSet<u64>,
    /// Frames it asked to hold at once (MAX_INFLIGHT; 0: the default).
    asked: u32,
    /// Frames it may hold at once, as last sent to it.
    granted: u32,
    /// Frames it holds, by frame id.
    inflight: HashMap<u64, gst::Buffer>,
    /// Its release ring, if it asked for one.
    ring: Option<ProducerRing>,
    /// Frames it released through its ring, and in RELEASE messages.
    released_by_ring: u64,
    released_by_message: u64,
    /// Its frame ring, if it asked for one.
    frame_ring: Option<ProducerFrameRing>,
    /// Messages committed to its socket (sent or queued), HELLO included:
    /// the `seq` of the next frame ring entry.
    socket_sent: u64,
    /// Frames it got through its frame ring.
    frames_by_ring: u64,
    /// Its frame ring's read count at the last stall check.
    ring_read_seen: u64,
    /// Control messages that did not fit in the socket, in order.
    queued: VecDeque<(Vec<u8>, Option<OwnedFd>)>,
    frames_sent: u64,
    frames_dropped: u64,
    frames_dropped_held: u64,
    inflight_peak: u32,
    /// Since when messages sent to it have stayed unread (stall detection).
    unread_since: Option<Instant>,
    /// When it last sent us anything.
    last_heard: Instant,
    /// Whether it has released a frame yet (it is past its start).
    released_any: bool,
    /// Set when the consumer must go; the I/O thread removes it.
    dead: Option<(String, bool)>,
    /// Refused by the access policy: sent REFUSE, waits for the peer's HELLO
    /// (or the handshake timeout) and then drops it with this reason. Closing
    /// before reading what the peer sent would reset the connection and the
    /// peer could lose the REFUSE.
    refused: Option<String>,
    /// Its measurements for monitors, or its own state as a monitor.
    monitor: monitor::ClientMonitor,
}

impl Client {
    /// Sends a control message now, or queues it behind earlier ones.
    fn send_control(&mut self, msg: &Message, fd: Option<BorrowedFd<'_>>) {
        if self.dead.is_some() {
            return;
        }
        let bytes = protocol::encode(msg);
        if self.queued.is_empty() {
            let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
            match self.channel.send(&bytes, &fds) {
                Ok(()) => {
                    self.socket_sent += 1;
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.kill(format!("sending {} failed: {e}", msg.name()), false);
                    return;
                }
            }
        }
        if self.queued.len() >= MAX_QUEUED_MESSAGES {
            self.kill(
                format!("not reading: {MAX_QUEUED_MESSAGES} control messages queued"),
                true,
            );
            return;
        }
        let owned = match fd.map(|fd| fd.try_clone_to_owned()).transpose() {
            Ok(owned) => owned,
            Err(e) => {
                self.kill(format!("cannot keep fd for a queued message: {e}"), true);
                return;
            }
        };
        self.queued.push_back((bytes, owned));
        self.socket_sent += 1;
    }

    /// Sends what was queued, as far as the socket takes it.
    fn flush(&mut self) {
        while let Some((bytes, fd)) = self.queued.front() {
            let fds: Vec<BorrowedFd<'_>> = fd.iter().map(|f| f.as_fd()).collect();
            match self.channel.send(bytes, &fds) {
                Ok(()) => {
                    self.queued.pop_front();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.kill(format!("send failed: {e}"), false);
                    return;
                }
            }
        }
    }

    /// Refuses a peer (`who`: consumer, monitor) of another protocol
    /// version: REFUSE naming both versions, then it is dropped.
    fn refuse_version(&mut self, who: &str, version: u16) {
        let reason = format!(
            "protocol version mismatch: {who} speaks version {version}, producer speaks version {}",
            protocol::VERSION
        );
        self.send_control(
            &Message::Refuse {
                reason: reason.clone(),
            },
            None,
        );
        self.kill(reason, true);
    }

    fn kill(&mut self, reason: String, warn: bool) {
        if self.dead.is_none() {
            self.dead = Some((reason, warn));
        }
    }

    fn stats(&self) -> ClientStats {
        ClientStats {
            client_id: self.id,
            pid: self.pid,
            frames_sent: self.frames_sent,
            frames_dropped: self.frames_dropped,
            frames_in_flight: self.inflight.len() as u32,
            frames_in_flight_peak: self.inflight_peak,
            frames_dropped_held: self.frames_dropped_held,
            memories_registered: self.registered.len() as u64,
            max_inflight: self.granted,
            released_by_ring: self.released_by_ring,
            released_by_message: self.released_by_message,
            frames_by_ring: self.frames_by_ring,
        }
    }

    /// Gives back every frame it holds (each is one holder less).
    fn drop_frames(&mut self, holders: &mut HashMap<u64, u32>) {
        for (id, _) in self.inflight.drain() {
            unhold(holders, id);
        }
    }

    /// Grants what `limits` allow for what it asked; sends MAX_INFLIGHT when
    /// the grant changed, or always with `always` (an answer to a request).
    fn regrant(&mut self, limits: &InflightLimits, always: bool) {
        let granted = limits.grant(self.asked);
        if granted != self.granted || always {
            self.granted = granted;
            self.send_control(&Message::MaxInflight { frames: granted }, None);
        }
    }

    /// Takes the releases it wrote to its ring since the last look.
    /// Release latencies (for monitors) are measured to the release time
    /// the consumer wrote with each id, kept between the send and now.
    fn take_ring_releases(
        &mut self,
        holders: &mut HashMap<u64, u32>,
        sent: &SendTimes,
        now: Instant,
    ) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        if self.phase != Phase::Active || self.dead.is_some() {
            return;
        }
        let inflight = &mut self.inflight;
        let meter = &mut self.monitor.meter;
        let mut now_ns = None;
        let taken = ring.drain(|id, released| {
            if inflight.remove(&id).is_none() {
                return Err(format!(
                    "release ring names frame {id}, which it does not hold"
                ));
            }
            unhold(holders, id);
            if let Some(t) = sent.sent_at(id) {
                let now_ns = *now_ns.get_or_insert_with(crate::clock::monotonic_now);
                meter.released(release_ring::release_latency(t, released, now_ns));
            }
            Ok(())
        });
        match taken {
            Ok(0) => {}
            Ok(n) => {
                self.released_any = true;
                self.last_heard = now;
                self.released_by_ring += n;
            }
            Err(e) => self.kill(format!("protocol error: {e}"), true),
        }
    }

    /// Whether it has left messages unread and said nothing for longer than
    /// `timeout`; checked by the I/O thread. True when it is dropped for it.
    fn check_stall(&mut self, timeout: Duration, now: Instant) -> bool {
        if self.phase != Phase::Active || self.dead.is_some() {
            return false;
        }
        let Ok(unread) = unread_bytes(self.channel.raw_fd()) else {
            return false;
        };
        // Frames left in its frame ring count as unread; its read count
        // moving is progress.
        let mut ring_unread = 0;
        if let Some(ring) = &self.frame_ring {
            match ring.backlog() {
                Ok((read, backlog)) => {
                    if read != self.ring_read_seen {
                        self.ring_read_seen = read;
                        self.unread_since = None;
                    }
                    ring_unread = backlog;
                }
                Err(e) => {
                    self.kill(format!("protocol error: {e}"), true);
                    return false;
                }
            }
        }
        if unread == 0 && ring_unread == 0 {
            self.unread_since = None;
            return false;
        }
        let since = *self.unread_since.get_or_insert(now);
        let quiet = now.saturating_duration_since(self.last_heard);
        let limit = if self.released_any {
            timeout
        } else {
            timeout.max(STARTUP_GRACE)
        };
        if now.saturating_duration_since(since) > limit && quiet > limit {
            let pid = self
                .pid
                .map_or_else(|| "unknown".to_string(), |p| p.to_string());
            self.kill(
                format!(
                    "consumer pid {pid} stalled: it left {unread} bytes unread in its socket{} and sent nothing for {} ms (client-timeout {} ms{}); returning the {} frames it held",
                    if ring_unread > 0 {
                        format!(" and {ring_unread} frames unread in its frame ring")
                    } else {
                        String::new()
                    },
                    quiet.as_millis(),
                    timeout.as_millis(),
                    if self.released_any {
                        ""
                    } else {
                        ", at least 10 s before its first release"
                    },
                    self.inflight.len()
                ),
                true,
            );
            return true;
        }
        false
    }
}

/// Bytes sent on a socket that its peer has not read yet (SIOCOUTQ).
fn unread_bytes(fd: RawFd) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (= SIOCOUTQ) on a socket fd we own writes one int.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// What the sink knows about the stream, sent to every consumer that joins.
#[derive(Debug, Default, Clone)]
struct StreamState {
    caps: Option<String>,
    latency: u64,
    eos: bool,
}

struct State {
    listener: Listener,
    clients: Vec<Client>,
    next_client_id: u64,
    stream: StreamState,
    inflight: InflightLimits,
    /// Most connections that have not completed the handshake.
    max_pending: usize,
    /// Until when accepting pauses (accept failed: out of fds).
    accept_paused_until: Option<Instant>,
    pending_log: RateLimit,
    accept_log: RateLimit,
    /// For each frame consumers hold, how many of them hold it: its length is
    /// the distinct frames held. Kept up to date on send, release and drop.
    holders: HashMap<u64, u32>,
    /// A consumer that stalls this long is disconnected; None: never.
    client_timeout: Option<Duration>,
    frames_rendered: u64,
    /// Read-only reopens of memfd memories, sent to consumers instead of the
    /// producer's writable fd; one per memory, closed when it is forgotten.
    read_only_fds: HashMap<u64, OwnedFd>,
    held: HeldStats,
    /// The newest frames sent to any consumer (see [`super::fanout`]).
    recent_sent: RecentFrames,
    /// Until when the streaming thread reads consumers' messages itself (it
    /// drained them after its last frame); None: the I/O thread reads them.
    drained_until: Option<Instant>,
    /// When the I/O thread next checks consumers for stalls.
    next_stall_check: Instant,
    /// Whether the release rings say "release on the socket" (the I/O
    /// thread is in charge of releases), and when that last became so.
    rings_on_socket: bool,
    rings_on_socket_since: Option<Instant>,
    /// Scratch of the streaming thread: the serving order of consumers, and
    /// the buffer messages are read into.
    order: Vec<usize>,
    drain_buf: Vec<u8>,
    /// What monitors are told (see `monitor.rs`).
    monitoring: monitor::Monitoring,
}

/// `max-inflight` and `max-inflight-limit`: what a consumer may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightLimits {
    /// Granted to a consumer that asks for nothing (0).
    pub default: u32,
    /// Most granted to a consumer that asks.
    pub limit: u32,
}

impl InflightLimits {
    /// What a consumer that asked for `asked` frames gets.
    pub fn grant(&self, asked: u32) -> u32 {
        if asked == 0 {
            self.default.max(1)
        } else {
            asked.min(self.limit).max(1)
        }
    }
}

/// One more consumer holds `frame_id`.
fn hold(holders: &mut HashMap<u64, u32>, held: &mut HeldStats, frame_id: u64) {
    *holders.entry(frame_id).or_insert(0) += 1;
    // frames_held itself is derived from `holders` when stats are read.
    held.frames_held_peak = held.frames_held_peak.max(holders.len() as u32);
}

/// One consumer less holds `frame_id`.
fn unhold(holders: &mut HashMap<u64, u32>, frame_id: u64) {
    if let std::collections::hash_map::Entry::Occupied(mut e) = holders.entry(frame_id) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
        }
    }
}

/// At most one log line per [`LOG_INTERVAL`]; counts what it held back.
#[derive(Debug, Default)]
struct RateLimit {
    last: Option<Instant>,
    held_back: u64,
}

impl RateLimit {
    /// Some(lines held back since the last one) when a line may go out now.
    fn ready(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|l| now.saturating_duration_since(l) < LOG_INTERVAL)
        {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

/// State shared with the memory-freed callback; has its own small lock so that
/// callbacks from any thread never wait on the server.
#[derive(Default)]
struct Registry {
    /// Ids of memories this sink has tagged and that are still alive.
    known: HashSet<u64>,
    /// Ids whose memory was freed, waiting for FORGET to go out.
    freed: Vec<u64>,
}

struct Shared {
    state: Mutex<State>,
    registry: Mutex<Registry>,
    waker: Waker,
    stop: AtomicBool,
    events: Box<dyn Fn(Vec<Event>) + Send + Sync>,
}

impl ForgetListener for Shared {
    fn memory_freed(&self, mem_id: u64) {
        let mut reg = lock(&self.registry);
        if reg.known.remove(&mem_id) {
            reg.freed.push(mem_id);
            self.waker.wake();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a [`Server`] starts.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub inflight: InflightLimits,
    /// A consumer that stalls this long is disconnected; None: never.
    pub client_timeout: Option<Duration>,
    /// Most connections that have not completed the handshake.
    pub max_pending: usize,
}

/// Serves one socket. Dropping it stops the I/O thread, sends what is still
/// queued for consumers (within [`FLUSH_LIMIT`]), disconnects every consumer,
/// releases every held frame and removes the socket file.
pub struct Server {
    shared: Arc<Shared>,
    listener_forget: Arc<dyn ForgetListener>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts serving on a bound listener. `events` is called from the I/O
    /// thread, without locks held, with what happened.
    pub fn start(
        listener: Listener,
        config: Config,
        events: impl Fn(Vec<Event>) + Send + Sync + 'static,
    ) -> std::io::Result<Server> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                listener,
                clients: Vec::new(),
                next_client_id: 1,
                stream: StreamState::default(),
                inflight: config.inflight,
                max_pending: config.max_pending.max(1),
                accept_paused_until: None,
                pending_log: RateLimit::default(),
                accept_log: RateLimit::default(),
                holders: HashMap::default(),
                client_timeout: config.client_timeout,
                frames_rendered: 0,
                read_only_fds: HashMap::default(),
                held: HeldStats::default(),
                recent_sent: RecentFrames::default(),
                drained_until: None,
                next_stall_check: Instant::now(),
                rings_on_socket: true,
                rings_on_socket_since: None,
                order: Vec::new(),
                drain_buf: vec![0u8; protocol::MAX_MESSAGE_LEN],
                monitoring: monitor::Monitoring::default(),
            }),
            registry: Mutex::new(Registry::default()),
            waker: Waker::new()?,
            stop: AtomicBool::new(false),
            events: Box::new(events),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("bufsharesink-io".into())
            .spawn(move || io_loop(&thread_shared))?;
        let listener_forget: Arc<dyn ForgetListener> = shared.clone();
        Ok(Server {
            shared,
            listener_forget,
            thread: Some(thread),
        })
    }

    /// What memtag calls back when a tagged memory dies.
    pub fn forget_listener(&self) -> &Arc<dyn ForgetListener> {
        &self.listener_forget
    }

    /// Records that this sink tagged `mem_id`; true the first time (subscribe then).
    pub fn note_memory(&self, mem_id: u64) -> bool {
        lock(&self.shared.registry).known.insert(mem_id)
    }

    /// New `max-inflight` / `max-inflight-limit`: consumers whose grant
    /// changes are told (MAX_INFLIGHT).
    pub fn set_inflight_limits(&self, limits: InflightLimits) {
        let mut state = lock(&self.shared.state);
        state.inflight = limits;
        for c in state
            .clients
            .iter_mut()
            .filter(|c| c.phase == Phase::Active)
        {
            c.regrant(&limits, false);
        }
        drop(state);
        self.shared.waker.wake();
    }

    pub fn set_max_pending(&self, max: usize) {
        lock(&self.shared.state).max_pending = max.max(1);
    }

    /// Waits until every consumer past the handshake has taken all queued
    /// control messages into its socket (after EOS: the EOS), or `limit`
    /// passes. Tries to send them itself every few ms (a socket that a reader
    /// drains a little does not always wake the I/O thread's poll). True
    /// when nothing is left queued.
    pub fn wait_flushed(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let pending = {
                let mut state = lock(&self.shared.state);
                let mut pending = 0;
                for c in state.clients.iter_mut() {
                    if c.phase == Phase::Active && c.dead.is_none() && !c.queued.is_empty() {
                        c.flush();
                        pending += usize::from(!c.queued.is_empty());
                    }
                }
                pending
            };
            if pending == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                gst::info!(
                    crate::bufsharesink::imp::CAT,
                    "{} consumers did not take their queued messages within {} ms",
                    pending,
                    limit.as_millis()
                );
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn set_client_timeout(&self, timeout: Option<Duration>) {
        lock(&self.shared.state).client_timeout = timeout;
        self.shared.waker.wake();
    }

    /// New caps (or a new latency): every active consumer gets CAPS now,
    /// later ones when they join.
    pub fn set_caps(&self, caps: Option<String>, latency: u64) {
        let mut state = lock(&self.shared.state);
        state.stream.caps = caps;
        state.stream.latency = latency;
        if let Some(caps) = state.stream.caps.clone() {
            broadcast(&mut state.clients, &Message::Caps { caps, latency });
        }
        drop(state);
        self.shared.waker.wake();
    }

    pub fn latency(&self) -> u64 {
        lock(&self.shared.state).stream.latency
    }

    pub fn send_eos(&self) {
        let mut state = lock(&self.shared.state);
        state.stream.eos = true;
        broadcast(&mut state.clients, &Message::Eos);
        drop(state);
        self.shared.waker.wake();
    }

    /// A new stream starts after EOS (flush or stream-start).
    pub fn clear_eos(&self) {
        lock(&self.shared.state).stream.eos = false;
    }

    /// Fans `out` out to every active consumer that has room. Never blocks.
    ///
    /// A consumer is skipped for this frame (latest wins) when [`FanOut`]
    /// says so: it holds all it was granted, its socket has control messages
    /// queued, or the bound on distinct frames held by all consumers together
    /// (`out.max_held`) leaves no room for it. Without such a bound, the
    /// RELEASEs that came since the last frame are read here, after sending:
    /// a consumer that looks full is read first, so it is never skipped for
    /// a release that waits unread.
    pub fn send_frame(&self, out: &Outgoing) {
        let mut guard = lock(&self.shared.state);
        let state = &mut *guard;
        state.frames_rendered += 1;
        if out.needs_release {
            monitor::note_sent(state, out.frame_id);
        }
        forget_freed(&self.shared, &mut state.clients, &mut state.read_only_fds);
        let frame_id = out.frame_id;
        let mut fan = FanOut::new(out.max_held, out.needs_release, state.holders.len());
        state.held.max_held = fan.bound().map_or(0, |b| b as u32);
        let drains = fan.bound().is_none();
        let mut events = Vec::new();
        let mut order = std::mem::take(&mut state.order);
        fan.order(state.clients.iter().map(|c| c.inflight.len()), &mut order);
        // Releases written to the rings since the last frame, and where the
        // next ones go: the rings while this thread drains, the socket while
        // a held bound needs them read at once.
        let now = Instant::now();
        let ring_mode_changed = state.rings_on_socket == drains;
        if ring_mode_changed {
            state.rings_on_socket = !drains;
            state.rings_on_socket_since = (!drains).then_some(now);
        }
        for client in state.clients.iter_mut() {
            if ring_mode_changed {
                if let Some(ring) = client.ring.as_mut() {
                    ring.switch(!drains);
                }
            }
            client.take_ring_releases(&mut state.holders, &state.monitoring.sent, now);
        }
        let mut ctx = ReadContext {
            stream: &state.stream,
            limits: state.inflight,
            holders: &mut state.holders,
            rings_on_socket: state.rings_on_socket,
            sent: &state.monitoring.sent,
        };
        for &i in &order {
            let client = &mut state.clients[i];
            if client.phase != Phase::Active || client.dead.is_some() {
                continue;
            }
            client.flush();
            if drains
                && out.needs_release
                && client.ring.is_none()
                && client.inflight.len() >= client.granted as usize
            {
                read_client(client, &mut ctx, &mut state.drain_buf, &mut events);
            }
            let candidate = Candidate {
                held: client.inflight.len(),
                granted: client.granted as usize,
                queue_blocked: !client.queued.is_empty(),
                keeping_up: fan.bound().is_some()
                    && state
                        .recent_sent
                        .all_recent(client.inflight.keys().copied()),
            };
            match fan.verdict(&candidate) {
                Verdict::Send => {}
                Verdict::SkipBusy => {
                    client.frames_dropped += 1;
                    continue;
                }
                Verdict::SkipHeldBound => {
                    client.frames_dropped += 1;
                    client.frames_dropped_held += 1;
                    continue;
                }
            }
            let mut unshareable = false;
            for m in &out.memories {
                if client.registered.contains(&m.mem_id) {
                    continue;
                }
                let fd = match fd_for_consumers(&mut state.read_only_fds, m) {
                    Ok(fd) => fd,
                    Err(e) => {
                        gst::warning!(
                            crate::bufsharesink::imp::CAT,
                            "cannot make a read-only fd of memory {}: {}; frame {} not sent",
                            m.mem_id,
                            e,
                            frame_id
                        );
                        unshareable = true;
                        break;
                    }
                };
                client.registered.insert(m.mem_id);
                let reg = Message::Register(Register {
                    mem_id: m.mem_id,
                    kind: m.kind,
                    size: m.fd_size,
                });
                client.send_control(&reg, Some(fd));
            }
            if unshareable || !client.queued.is_empty() {
                // The registration waits in the queue; this frame cannot overtake it.
                client.frames_dropped += 1;
                continue;
            }
            let sent = match client.frame_ring.as_mut() {
                Some(ring) if ring.fits(out.frame_bytes.len()) => {
                    match ring.push(&out.frame_bytes, client.socket_sent) {
                        Ok(true) => {
                            client.frames_by_ring += 1;
                            Ok(())
                        }
                        // Full: as a full socket, skipped for this frame.
                        Ok(false) => Err(std::io::ErrorKind::WouldBlock.into()),
                        Err(e) => {
                            client.kill(format!("protocol error: {e}"), true);
                            continue;
                        }
                    }
                }
                // No ring, or a FRAME too large for a slot: the socket.
                _ => client.channel.send(&out.frame_bytes, &[]).inspect(|()| {
                    client.socket_sent += 1;
                }),
            };
            match sent {
                Ok(()) => {
                    client.frames_sent += 1;
                    if out.needs_release {
                        client.inflight.insert(frame_id, out.buffer.clone());
                        client.inflight_peak =
                            client.inflight_peak.max(client.inflight.len() as u32);
                        hold(ctx.holders, &mut state.held, frame_id);
                        fan.sent();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => client.frames_dropped += 1,
                Err(e) => client.kill(format!("sending a frame failed: {e}"), false),
            }
        }
        if fan.taken() {
            state.recent_sent.push(frame_id);
        }
        // The RELEASEs (and anything else) consumers sent since the last frame.
        let was_draining = state.drained_until.is_some();
        if drains {
            // Consumers with a ring release there; the I/O thread reads the
            // rest of what they send (it is rare).
            for client in state.clients.iter_mut() {
                if client.phase == Phase::Active && client.dead.is_none() && client.ring.is_none() {
                    read_client(client, &mut ctx, &mut state.drain_buf, &mut events);
                }
            }
            state.drained_until = Some(Instant::now() + DRAIN_HANDOFF);
        } else {
            state.drained_until = None;
        }
        state.order = order;
        let any_dead = state.clients.iter().any(|c| c.dead.is_some());
        drop(guard);
        if !events.is_empty() {
            (self.shared.events)(events);
        }
        if any_dead || (was_draining && !drains) {
            // Someone to drop, or the I/O thread must read RELEASEs again.
            self.shared.waker.wake();
        }
    }

    pub fn num_clients(&self) -> usize {
        lock(&self.shared.state)
            .clients
            .iter()
            .filter(|c| c.phase == Phase::Active)
            .count()
    }

    pub fn frames_rendered(&self) -> u64 {
        lock(&self.shared.state).frames_rendered
    }

    pub fn held_stats(&self) -> HeldStats {
        let state = lock(&self.shared.state);
        let mut held = state.held.clone();
        held.frames_held = state.holders.len() as u32;
        held
    }

    pub fn client_stats(&self) -> Vec<ClientStats> {
        lock(&self.shared.state)
            .clients
            .iter()
            .filter(|c| c.phase == Phase::Active)
            .map(Client::stats)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut clients = std::mem::take(&mut lock(&self.shared.state).clients);
        flush_before_closing(&mut clients, FLUSH_LIMIT);
        for c in clients {
            // Dropping the client drops every frame it held; what was sent
            // stays readable by the consumer.
            c.channel.close();
        }
    }
}

/// Sends what is queued for `clients` (EOS, a DISCONNECT...) as far as their
/// sockets take it within `limit` in total, trying every few ms.
fn flush_before_closing(clients: &mut [Client], limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let mut waiting = 0;
        for c in clients.iter_mut() {
            if c.dead.is_none() && !c.queued.is_empty() {
                c.flush();
                waiting += usize::from(c.dead.is_none() && !c.queued.is_empty());
            }
        }
        if waiting == 0 {
            return;
        }
        if Instant::now() >= deadline {
            gst::info!(
                crate::bufsharesink::imp::CAT,
                "stopping: {} consumers did not take their queued messages within {} ms",
                waiting,
                limit.as_millis()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends a control message to every consumer past the handshake.
fn broadcast(clients: &mut [Client], msg: &Message) {
    for c in clients.iter_mut().filter(|c| c.phase == Phase::Active) {
        c.send_control(msg, None);
    }
}

/// The fd a consumer gets for `m`. For memfd memory, a read-only reopen of
/// the same file, made once per memory, so that no consumer can map the
/// producer's frames for writing. A dma-buf fd goes as it is: it cannot be
/// reopened, and consumers map it read-only by their own choice.
fn fd_for_consumers<'a>(
    read_only_fds: &'a mut HashMap<u64, OwnedFd>,
    m: &SharedMemory,
) -> std::io::Result<BorrowedFd<'a>> {
    // SAFETY: the fd belongs to a memory of the frame being sent, alive here.
    let fd = unsafe { BorrowedFd::borrow_raw(m.raw_fd) };
    if m.kind != protocol::MemoryKind::Memfd {
        return Ok(fd);
    }
    let read_only: &'a OwnedFd = match read_only_fds.entry(m.mem_id) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(bufshare_backends::share::reopen_read_only(fd)?)
        }
    };
    Ok(read_only.as_fd())
}

/// Sends FORGET for memories that died since last time.
fn forget_freed(
    shared: &Shared,
    clients: &mut [Client],
    read_only_fds: &mut HashMap<u64, OwnedFd>,
) {
    let freed = std::mem::take(&mut lock(&shared.registry).freed);
    for mem_id in freed {
        read_only_fds.remove(&mem_id);
        for c in clients.iter_mut() {
            if c.registered.remove(&mem_id) {
                c.send_control(&Message::Forget { mem_id }, None);
            }
        }
    }
}

fn io_loop(shared: &Shared) {
    use rustix::event::PollFlags;
    let mut buf = vec![0u8; protocol::MAX_MESSAGE_LEN];
    while !shared.stop.load(Ordering::SeqCst) {
        // Poll the waker, the listener and every client, without holding the lock.
        let (raw, flags, tick) = {
            let mut state = lock(&shared.state);
            let now = Instant::now();
            // Wake often enough to notice a stalled consumer soon after its timeout.
            let mut tick = state
                .client_timeout
                .map_or(Duration::from_millis(500), stall_tick);
            // A paused listener stays in the set (poll-set order is fixed) but
            // is not asked for anything until the pause is over.
            let listen = match state.accept_paused_until {
                Some(until) if until > now => {
                    tick = tick.min(until - now);
                    PollFlags::empty()
                }
                _ => {
                    state.accept_paused_until = None;
                    PollFlags::IN
                }
            };
            // While the streaming thread drains consumers' messages, active
            // consumers are watched only for hang-ups and errors (always
            // reported), until the hand-off time passes.
            let streaming_reads = match state.drained_until {
                Some(until) if until > now => {
                    tick = tick.min(until - now);
                    true
                }
                _ => false,
            };
            // Just after the rings switched to the socket, look at them often.
            if let Some(since) = state.rings_on_socket_since {
                if now.saturating_duration_since(since) < RING_SWITCH_WATCH {
                    tick = tick.min(RING_SWITCH_TICK);
                }
            }
            tick = tick.min(monitor::until_due(&state));
            let mut raw = vec![shared.waker.as_fd_raw(), state.listener.as_fd_raw()];
            let mut flags = vec![PollFlags::IN, listen];
            for c in &state.clients {
                raw.push(c.channel.raw_fd());
                // A consumer with a ring sends little on its socket: always read it.
                let mut want = if streaming_reads && c.phase == Phase::Active && c.ring.is_none() {
                    PollFlags::empty()
                } else {
                    PollFlags::IN
                };
                if !c.queued.is_empty() {
                    want |= PollFlags::OUT;
                }
                flags.push(want);
            }
            (raw, flags, tick)
        };
        // SAFETY: only this thread closes client sockets and the listener, and
        // not before the next iteration; the waker lives as long as `shared`.
        let fds: Vec<(BorrowedFd<'_>, PollFlags)> = raw
            .iter()
            .zip(&flags)
            .map(|(fd, f)| (unsafe { BorrowedFd::borrow_raw(*fd) }, *f))
            .collect();
        let revents = match wait_for(&fds, Some(tick)) {
            Ok(r) => r,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if revents[0].contains(PollFlags::IN) {
            shared.waker.drain();
        }
        let events = {
            let mut guard = lock(&shared.state);
            service(shared, &mut guard, &raw, &revents, &mut buf)
        };
        if !events.is_empty() {
            (shared.events)(events);
        }
    }
}

/// How often consumers are checked for stalls under `client-timeout`.
fn stall_tick(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(500))
}

trait AsRawFdExt {
    fn as_fd_raw(&self) -> RawFd;
}

impl<T: AsFd> AsRawFdExt for T {
    fn as_fd_raw(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.as_fd().as_raw_fd()
    }
}

/// One round of the I/O thread, under the lock.
fn service(
    shared: &Shared,
    state: &mut State,
    raw: &[RawFd],
    revents: &[rustix::event::PollFlags],
    buf: &mut [u8],
) -> Vec<Event> {
    use rustix::event::PollFlags;
    let mut events = Vec::new();
    forget_freed(shared, &mut state.clients, &mut state.read_only_fds);

    // When the streaming thread no longer drains (no frame for a while, or a
    // held bound), releases are this thread's: rings say "use the socket",
    // and what was written to them before is taken here.
    let now = Instant::now();
    if state.drained_until.is_none_or(|until| until <= now) {
        if !state.rings_on_socket {
            state.rings_on_socket = true;
            state.rings_on_socket_since = Some(now);
            for ring in state.clients.iter_mut().filter_map(|c| c.ring.as_mut()) {
                ring.switch(true);
            }
        }
        for client in state.clients.iter_mut() {
            client.take_ring_releases(&mut state.holders, &state.monitoring.sent, now);
        }
    }

    // Clients that were polled, by fd (the list may have changed since).
    // Only this thread adds or removes clients, so they are still in poll-set
    // order (after the waker and the listener); the fd check is a safety net.
    let mut ctx = ReadContext {
        stream: &state.stream,
        limits: state.inflight,
        holders: &mut state.holders,
        rings_on_socket: state.rings_on_socket,
        sent: &state.monitoring.sent,
    };
    for (i, client) in state.clients.iter_mut().enumerate() {
        let (Some(fd), Some(flags)) = (raw.get(i + 2), revents.get(i + 2)) else {
            continue;
        };
        if *fd != client.channel.raw_fd() {
            continue;
        }
        if flags.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR) {
            read_client(client, &mut ctx, buf, &mut events);
        }
    }
    // Queued messages go out as soon as they fit. Tried every round, not only
    // on POLLOUT: a unix socket polls writable only once its peer has read
    // three quarters of what it holds, though a message fits much earlier.
    for client in state.clients.iter_mut() {
        if !client.queued.is_empty() {
            client.flush();
        }
    }
    for client in state.clients.iter_mut() {
        if let Phase::AwaitingHello { since } = client.phase {
            if since.elapsed() > HANDSHAKE_TIMEOUT {
                let reason = client
                    .refused
                    .take()
                    .unwrap_or_else(|| "no HELLO within 5 s".into());
                client.kill(reason, true);
            }
        }
    }
    monitor::service(state);
    // Stalls are checked once per tick (an ioctl per consumer), not on every
    // wake-up: under a held bound the I/O thread wakes for each RELEASE.
    if let Some(timeout) = state.client_timeout {
        let now = Instant::now();
        if now >= state.next_stall_check {
            state.next_stall_check = now + stall_tick(timeout);
            for client in state.clients.iter_mut() {
                if client.check_stall(timeout, now) {
                    state.held.clients_timed_out += 1;
                }
            }
        }
    }

    // Newcomers, when the listener said so (index 1 of the poll set).
    let listener_ready = revents
        .get(1)
        .is_some_and(|f| f.intersects(PollFlags::IN | PollFlags::ERR));
    if listener_ready && state.accept_paused_until.is_none() {
        accept_newcomers(state);
    }

    // Report handshakes that completed, and drop the dead.
    let now = Instant::now();
    let mut i = 0;
    while i < state.clients.len() {
        let c = &mut state.clients[i];
        if let Some((reason, warn)) = c.dead.take() {
            match c.phase {
                Phase::Monitor => {
                    gst::debug!(
                        crate::bufsharesink::imp::CAT,
                        "monitor {}: {}",
                        c.id,
                        reason
                    );
                }
                Phase::Closing { .. } => {
                    gst::debug!(
                        crate::bufsharesink::imp::CAT,
                        "consumer {}: closing: {}",
                        c.id,
                        reason
                    );
                }
                Phase::Active => {
                    events.push(Event::Disconnected {
                        client_id: c.id,
                        reason: reason.clone(),
                        warn,
                        active: true,
                    });
                    // The producer's decision (not the consumer leaving, not a
                    // broken socket): say why before closing.
                    if warn && begin_closing(c, &reason, &mut state.holders, now) {
                        i += 1;
                        continue;
                    }
                }
                Phase::AwaitingHello { .. } => {
                    if warn {
                        events.push(Event::Disconnected {
                            client_id: c.id,
                            reason,
                            warn,
                            active: false,
                        });
                    }
                }
            }
            let mut c = state.clients.remove(i);
            c.drop_frames(&mut state.holders);
            c.channel.close();
            continue;
        }
        if let Phase::Closing { since } = c.phase {
            let expired = now.saturating_duration_since(since) > DISCONNECT_LINGER;
            if c.queued.is_empty() || expired {
                if expired {
                    gst::debug!(
                        crate::bufsharesink::imp::CAT,
                        "consumer {}: DISCONNECT still not read after {} s, closing",
                        c.id,
                        DISCONNECT_LINGER.as_secs()
                    );
                }
                state.clients.remove(i).channel.close();
                continue;
            }
        }
        i += 1;
    }
    // Too many waiting for their DISCONNECT to fit: the oldest go now.
    let closing = |c: &Client| matches!(c.phase, Phase::Closing { .. });
    let mut excess = state
        .clients
        .iter()
        .filter(|c| closing(c))
        .count()
        .saturating_sub(MAX_CLOSING);
    while excess > 0 {
        let oldest = state
            .clients
            .iter()
            .position(closing)
            .expect("counted above");
        state.clients.remove(oldest).channel.close();
        excess -= 1;
    }
    events
}

/// A consumer the producer drops: what it held goes back now, it gets
/// nothing more, and DISCONNECT (why) replaces whatever was queued for it.
/// True when the DISCONNECT did not fit and the connection stays, closing,
/// until it does; false when it can be closed now.
fn begin_closing(
    c: &mut Client,
    reason: &str,
    holders: &mut HashMap<u64, u32>,
    now: Instant,
) -> bool {
    c.drop_frames(holders);
    c.registered.clear();
    c.queued.clear();
    let bytes = protocol::encode(&Message::Disconnect {
        reason: reason.to_string(),
    });
    match c.channel.send(&bytes, &[]) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            c.queued.push_back((bytes, None));
            c.phase = Phase::Closing { since: now };
            true
        }
        // Sent, or the socket is broken: close now.
        _ => false,
    }
}

/// Accepts what the listener has. Connections that have not said HELLO are
/// capped (the oldest goes); running out of fds pauses accepting briefly.
fn accept_newcomers(state: &mut State) {
    // At most half the pending cap per round: a newcomer survives at least one
    // round, in which its HELLO (sent at once by a real consumer) is read,
    // before newer ones could make it the oldest pending connection.
    for _ in 0..(state.max_pending / 2).max(1) {
        match state.listener.accept() {
            Ok(Some(channel)) => {
                let now = Instant::now();
                let pending =
                    |c: &Client| matches!(c.phase, Phase::AwaitingHello { .. }) && c.dead.is_none();
                if state.clients.iter().filter(|c| pending(c)).count() >= state.max_pending {
                    let oldest = state
                        .clients
                        .iter_mut()
                        .filter(|c| pending(c))
                        .min_by_key(|c| match c.phase {
                            Phase::AwaitingHello { since } => since,
                            _ => now,
                        })
                        .expect("counted above");
                    oldest.kill(
                        format!(
                            "more than {} connections without HELLO (max-pending-connections): closing the oldest",
                            state.max_pending
                        ),
                        false,
                    );
                    if let Some(held_back) = state.pending_log.ready(now) {
                        gst::info!(
                            crate::bufsharesink::imp::CAT,
                            "{} connections have not said HELLO (max-pending-connections={}): closing the oldest, consumer {} (pid {:?}){}",
                            state.max_pending,
                            state.max_pending,
                            oldest.id,
                            oldest.pid,
                            if held_back > 0 {
                                format!("; {held_back} more closed since the last report")
                            } else {
                                String::new()
                            }
                        );
                    }
                }
                let id = state.next_client_id;
                state.next_client_id += 1;
                let mut client = Client {
                    id,
                    pid: channel.peer_pid(),
                    channel,
                    phase: Phase::AwaitingHello { since: now },
                    registered: HashSet::default(),
                    asked: 0,
                    granted: 0,
                    inflight: HashMap::default(),
                    ring: None,
                    released_by_ring: 0,
                    released_by_message: 0,
                    frame_ring: None,
                    socket_sent: 0,
                    frames_by_ring: 0,
                    ring_read_seen: 0,
                    queued: VecDeque::new(),
                    frames_sent: 0,
                    frames_dropped: 0,
                    frames_dropped_held: 0,
                    inflight_peak: 0,
                    unread_since: None,
                    last_heard: now,
                    released_any: false,
                    dead: None,
                    refused: None,
                    monitor: Default::default(),
                };
                match state.listener.peer_policy().check(&client.channel) {
                    Ok(()) => client.send_control(&hello(), None),
                    Err(reason) => {
                        // No HELLO: the peer's handshake ends on this REFUSE.
                        client.send_control(
                            &Message::Refuse {
                                reason: reason.clone(),
                            },
                            None,
                        );
                        client.refused = Some(format!("refused: {reason}"));
                    }
                }
                state.clients.push(client);
            }
            Ok(None) => break,
            // The peer gave up before we took it: next one.
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
            Err(e) => {
                // Out of fds (EMFILE, ENFILE) or memory: the connection stays
                // in the backlog; try again after a pause instead of spinning.
                let now = Instant::now();
                state.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                if let Some(held_back) = state.accept_log.ready(now) {
                    gst::warning!(
                        crate::bufsharesink::imp::CAT,
                        "cannot accept a consumer on {}: {}; retrying in {} ms{}",
                        state.listener.path().display(),
                        e,
                        ACCEPT_BACKOFF.as_millis(),
                        if held_back > 0 {
                            format!(" ({held_back} more failures since the last report)")
                        } else {
                            String::new()
                        }
                    );
                }
                break;
            }
        }
    }
}

/// What reading a client needs besides the client.
struct ReadContext<'a> {
    stream: &'a StreamState,
    limits: InflightLimits,
    holders: &'a mut HashMap<u64, u32>,
    /// Where a new consumer's ring tells it to release (see `State`).
    rings_on_socket: bool,
    /// When recent frames went out (release latencies for monitors).
    sent: &'a SendTimes,
}

fn hello() -> Message {
    Message::Hello(Hello {
        version: protocol::VERSION,
        role: Role::Producer,
        features: FEATURE_RELEASE_RING | protocol::FEATURE_MONITOR | FEATURE_FRAME_RING,
    })
}

/// Makes `client` a release ring and sends it (RELEASE_RING). Without
/// one (no memfd, no mapping) it releases on the socket, as older consumers do.
fn offer_ring(client: &mut Client, on_socket: bool) {
    match ProducerRing::create(release_ring::DEFAULT_CAPACITY, on_socket) {
        Ok((ring, fd)) => {
            let msg = Message::ReleaseRing {
                capacity: release_ring::DEFAULT_CAPACITY,
            };
            client.send_control(&msg, Some(fd.as_fd()));
            client.ring = Some(ring);
        }
        Err(e) => gst::warning!(
            crate::bufsharesink::imp::CAT,
            "consumer {}: no release ring ({}); it releases on the socket",
            client.id,
            e
        ),
    }
}

/// Makes `client` a frame ring and its doorbell and sends them (FRAME_RING,
/// DOORBELL). Without them (no memfd, no socket pair) its frames go on the
/// socket, as an older consumer's do.
fn offer_frame_ring(client: &mut Client) {
    match ProducerFrameRing::create(frame_ring::DEFAULT_CAPACITY, frame_ring::DEFAULT_SLOT_LEN) {
        Ok((ring, fds)) => {
            let msg = Message::FrameRing {
                capacity: ring.capacity(),
                slot_len: ring.slot_len(),
            };
            client.send_control(&msg, Some(fds.ring.as_fd()));
            client.send_control(&Message::Doorbell, Some(fds.bell.as_fd()));
            client.frame_ring = Some(ring);
        }
        Err(e) => gst::warning!(
            crate::bufsharesink::imp::CAT,
            "consumer {}: no frame ring ({}); its frames go on the socket",
            client.id,
            e
        ),
    }
}

/// Reads everything a client sent.
fn read_client(
    client: &mut Client,
    ctx: &mut ReadContext<'_>,
    buf: &mut [u8],
    events: &mut Vec<Event>,
) {
    loop {
        if client.dead.is_some() {
            return;
        }
        let (len, fds) = match client.channel.recv(buf) {
            Ok(Received::Message { .. }) if client.refused.is_some() => {
                // Whatever a refused peer says, it has been read: now it can go.
                let reason = client.refused.take().unwrap_or_default();
                client.kill(reason, true);
                return;
            }
            // A closing consumer's messages (late RELEASEs) are read and ignored.
            Ok(Received::Message { .. }) if matches!(client.phase, Phase::Closing { .. }) => {
                continue
            }
            Ok(Received::Message { len, fds }) => (len, fds),
            Ok(Received::Closed) => {
                match client.refused.take() {
                    Some(reason) => client.kill(reason, true),
                    None => client.kill("consumer closed the connection".into(), false),
                }
                return;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                match client.refused.take() {
                    Some(reason) => client.kill(reason, true),
                    None => client.kill("consumer closed the connection".into(), false),
                }
                return;
            }
            Err(e) if matches!(client.phase, Phase::Closing { .. }) => {
                client.kill(format!("reading failed: {e}"), false);
                return;
            }
            Err(e) => {
                client.kill(format!("protocol error: {e}"), true);
                return;
            }
        };
        client.last_heard = Instant::now();
        let msg = match protocol::decode(&buf[..len], fds.len()) {
            Ok(m) => m,
            Err(e) => {
                client.kill(format!("protocol error: {e}"), true);
                return;
            }
        };
        drop(fds);
        match (&client.phase, msg) {
            (Phase::AwaitingHello { .. }, Message::Hello(h)) if h.role == Role::Monitor => {
                monitor::accept(client, &h);
            }
            (Phase::AwaitingHello { .. }, Message::Hello(h)) => {
                if h.role != Role::Consumer {
                    client.kill("peer says it is a producer, not a consumer".into(), true);
                } else if h.version != protocol::VERSION {
                    client.refuse_version("consumer", h.version);
                } else {
                    client.phase = Phase::Active;
                    if h.features & FEATURE_RELEASE_RING != 0 {
                        offer_ring(client, ctx.rings_on_socket);
                    }
                    if h.features & FEATURE_FRAME_RING != 0 {
                        offer_frame_ring(client);
                    }
                    // What it may hold, before anything else (it asked for
                    // nothing yet: the default).
                    client.regrant(&ctx.limits, true);
                    if let Some(caps) = &ctx.stream.caps {
                        client.send_control(
                            &Message::Caps {
                                caps: caps.clone(),
                                latency: ctx.stream.latency,
                            },
                            None,
                        );
                    }
                    if ctx.stream.eos {
                        client.send_control(&Message::Eos, None);
                    }
                    events.push(Event::Connected {
                        client_id: client.id,
                        pid: client.pid,
                    });
                }
            }
            (Phase::Active, Message::Release { frame_ids }) => {
                client.released_any = true;
                client.released_by_message += frame_ids.len() as u64;
                let now = crate::clock::monotonic_now();
                for id in frame_ids {
                    if client.inflight.remove(&id).is_none() {
                        client.kill(
                            format!(
                                "protocol error: RELEASE of frame {id}, which it does not hold"
                            ),
                            true,
                        );
                        return;
                    }
                    unhold(ctx.holders, id);
                    monitor::released(client, ctx.sent, id, now);
                }
            }
            (Phase::Active, Message::MaxInflight { frames }) => {
                client.asked = frames;
                client.regrant(&ctx.limits, true);
            }
            (Phase::Monitor, msg) => {
                client.kill(format!("protocol error: monitor sent {}", msg.name()), true);
                return;
            }
            (phase, msg) => {
                let when = if *phase == Phase::Active {
                    "after the handshake"
                } else {
                    "before HELLO"
                };
                client.kill(
                    format!("protocol error: consumer sent {} {when}", msg.name()),
                    true,
                );
                return;
            }
        }
    }
}
