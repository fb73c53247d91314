//! The fan-out core of bufsharesink: the consumers, what each has been sent
//! and holds, and the I/O thread that serves the socket.
//!
//! Two threads touch a [`Server`]:
//! - the streaming thread calls [`Server::send_frame`] (and caps/EOS). It only
//!   does non-blocking sends; a consumer whose socket is full, or that already
//!   holds `max_inflight` frames, is skipped for that frame (latest wins).
//! - the I/O thread accepts consumers, does the handshake, reads RELEASE
//!   messages, sends FORGET when a producer memory dies, flushes control
//!   messages that did not fit, and drops consumers that leave or misbehave.
//!
//! A consumer's frames are held (a `gst::Buffer` reference each) until it
//! releases them or goes away, so upstream pool buffers come back exactly
//! when no consumer needs them any more.
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
//!   bound stay free for the consumers that keep up. See [`Server::send_frame`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::memtag::ForgetListener;
use crate::protocol::{self, Hello, Message, Register, Role};
use crate::transport::unix::{wait, Listener, UnixChannel, Waker};
use crate::transport::{Channel, Received};

/// A consumer must send its HELLO within this time after connecting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Under a `max-held` bound, a consumer that holds only frames among this many
/// newest ones sent keeps up: a sink keeps its last sample until the next
/// frame arrives, and a busy process may not have read that one yet.
const RECENT_FRAMES: usize = 2;
/// Room kept for consumers that keep up: their recent frames and the new one.
/// A consumer holding older frames gets a new one only while this much of the
/// bound stays free.
const KEEPING_UP_RESERVE: usize = RECENT_FRAMES + 1;
/// A consumer that has not released a frame yet may still be starting its
/// pipeline: it counts as stalled only after this long (or `client-timeout`,
/// if longer).
const STARTUP_GRACE: Duration = Duration::from_secs(10);
/// Control messages queued for a consumer that does not read; past this it is dropped.
const MAX_QUEUED_MESSAGES: usize = 512;

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
    Disconnected {
        client_id: u64,
        reason: String,
        warn: bool,
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
    AwaitingHello { since: Instant },
    Active,
}

struct Client {
    id: u64,
    channel: UnixChannel,
    pid: Option<i32>,
    phase: Phase,
    /// Memory ids this consumer has been sent REGISTER for.
    registered: HashSet<u64>,
    /// Frames it holds, by frame id.
    inflight: HashMap<u64, gst::Buffer>,
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
                Ok(()) => return,
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
        if unread == 0 {
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
                    "consumer pid {pid} stalled: it left {unread} bytes unread in its socket and sent nothing for {} ms (client-timeout {} ms{}); returning the {} frames it held",
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
    max_inflight: usize,
    /// A consumer that stalls this long is disconnected; None: never.
    client_timeout: Option<Duration>,
    frames_rendered: u64,
    /// Read-only reopens of memfd memories, sent to consumers instead of the
    /// producer's writable fd; one per memory, closed when it is forgotten.
    read_only_fds: HashMap<u64, OwnedFd>,
    held: HeldStats,
    /// The [`RECENT_FRAMES`] newest frames sent to any consumer, oldest first.
    recent_sent: VecDeque<u64>,
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

/// Serves one socket. Dropping it stops the I/O thread, disconnects every
/// consumer, releases every held frame and removes the socket file.
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
        max_inflight: usize,
        client_timeout: Option<Duration>,
        events: impl Fn(Vec<Event>) + Send + Sync + 'static,
    ) -> std::io::Result<Server> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                listener,
                clients: Vec::new(),
                next_client_id: 1,
                stream: StreamState::default(),
                max_inflight,
                client_timeout,
                frames_rendered: 0,
                read_only_fds: HashMap::new(),
                held: HeldStats::default(),
                recent_sent: VecDeque::new(),
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

    pub fn set_max_inflight(&self, max: usize) {
        lock(&self.shared.state).max_inflight = max.max(1);
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
    /// A consumer is skipped for this frame (latest wins) when it holds
    /// `max_inflight` frames, when its socket is full, or when the bound on
    /// distinct frames held by all consumers together (`out.max_held`) says
    /// so. Under the bound, consumers are served from the one holding the
    /// fewest frames to the one holding the most. One that holds nothing, or
    /// only frames among the [`RECENT_FRAMES`] newest sent (a sink keeps its
    /// last sample until the next frame comes), may take the frame while the
    /// distinct frames held stay within the bound; one that holds older frames
    /// (a greedy one) only while [`KEEPING_UP_RESERVE`] frames of the bound
    /// stay free. So greedy
    /// consumers lose frames first, those that keep up keep getting them, and
    /// upstream always keeps the buffers beyond the bound.
    pub fn send_frame(&self, out: Outgoing) {
        let mut guard = lock(&self.shared.state);
        let state = &mut *guard;
        state.frames_rendered += 1;
        forget_freed(&self.shared, &mut state.clients, &mut state.read_only_fds);
        let (needs_release, frame_bytes, frame_id) =
            (out.needs_release, &out.frame_bytes, out.frame_id);
        // Distinct frames held now (each pins one buffer), if they are bounded.
        let bound = out.max_held.filter(|_| needs_release);
        // (Also the record of whether this frame went to anyone.)
        let mut held: HashSet<u64> = HashSet::new();
        if bound.is_some() {
            for c in &state.clients {
                held.extend(c.inflight.keys().copied());
            }
        }
        state.held.max_held = bound.map_or(0, |b| b as u32);
        let mut order: Vec<usize> = (0..state.clients.len()).collect();
        order.sort_by_key(|&i| state.clients[i].inflight.len());
        let mut any_dead = false;
        for i in order {
            let client = &mut state.clients[i];
            if client.phase != Phase::Active || client.dead.is_some() {
                continue;
            }
            client.flush();
            if !client.queued.is_empty()
                || (needs_release && client.inflight.len() >= state.max_inflight)
            {
                client.frames_dropped += 1;
                continue;
            }
            if let Some(bound) = bound {
                let held_after = held.len() + usize::from(!held.contains(&frame_id));
                let keeping_up = client
                    .inflight
                    .keys()
                    .all(|id| state.recent_sent.contains(id));
                let allowed = if keeping_up {
                    bound
                } else {
                    bound.saturating_sub(KEEPING_UP_RESERVE)
                };
                if held_after > allowed {
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
            match client.channel.send(frame_bytes, &[]) {
                Ok(()) => {
                    client.frames_sent += 1;
                    if needs_release {
                        client.inflight.insert(frame_id, out.buffer.clone());
                        client.inflight_peak =
                            client.inflight_peak.max(client.inflight.len() as u32);
                        held.insert(frame_id);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => client.frames_dropped += 1,
                Err(e) => client.kill(format!("sending a frame failed: {e}"), false),
            }
            any_dead |= client.dead.is_some();
        }
        if needs_release && held.contains(&frame_id) {
            if state.recent_sent.len() == RECENT_FRAMES {
                state.recent_sent.pop_front();
            }
            state.recent_sent.push_back(frame_id);
        }
        if bound.is_some() {
            state.held.frames_held = held.len() as u32;
            state.held.frames_held_peak = state.held.frames_held_peak.max(held.len() as u32);
        }
        drop(guard);
        if any_dead {
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
        let mut distinct = HashSet::new();
        for c in &state.clients {
            distinct.extend(c.inflight.keys().copied());
        }
        held.frames_held = distinct.len() as u32;
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
        let clients = std::mem::take(&mut lock(&self.shared.state).clients);
        for c in &clients {
            c.channel.shutdown();
        }
        // Dropping the clients drops every frame they held.
        drop(clients);
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
    let mut buf = vec![0u8; protocol::MAX_MESSAGE_LEN];
    while !shared.stop.load(Ordering::SeqCst) {
        // Poll the waker, the listener and every client, without holding the lock.
        let (raw, want_write): (Vec<RawFd>, Vec<bool>) = {
            let state = lock(&shared.state);
            let mut raw = vec![shared.waker.as_fd_raw(), state.listener.as_fd_raw()];
            let mut ww = vec![false, false];
            for c in &state.clients {
                raw.push(c.channel.raw_fd());
                ww.push(!c.queued.is_empty());
            }
            (raw, ww)
        };
        // SAFETY: only this thread closes client sockets and the listener, and
        // not before the next iteration; the waker lives as long as `shared`.
        let fds: Vec<(BorrowedFd<'_>, bool)> = raw
            .iter()
            .zip(&want_write)
            .map(|(fd, w)| (unsafe { BorrowedFd::borrow_raw(*fd) }, *w))
            .collect();
        // Wake often enough to notice a stalled consumer soon after its timeout.
        let tick = lock(&shared.state)
            .client_timeout
            .map_or(Duration::from_millis(500), |t| {
                (t / 4).clamp(Duration::from_millis(10), Duration::from_millis(500))
            });
        let revents = match wait(&fds, Some(tick)) {
            Ok(r) => r,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if revents[0].contains(rustix::event::PollFlags::IN) {
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

    // Clients that were polled, by fd (the list may have changed since).
    // Only this thread adds or removes clients, so they are still in poll-set
    // order (after the waker and the listener); the fd check is a safety net.
    for (i, client) in state.clients.iter_mut().enumerate() {
        let (Some(fd), Some(flags)) = (raw.get(i + 2), revents.get(i + 2)) else {
            continue;
        };
        if *fd != client.channel.raw_fd() {
            continue;
        }
        if flags.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR) {
            read_client(client, &state.stream, buf, &mut events);
        }
        if flags.contains(PollFlags::OUT) {
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
    if let Some(timeout) = state.client_timeout {
        let now = Instant::now();
        for client in state.clients.iter_mut() {
            if client.check_stall(timeout, now) {
                state.held.clients_timed_out += 1;
            }
        }
    }

    // Newcomers, when the listener said so (index 1 of the poll set).
    let listener_ready = revents
        .get(1)
        .is_some_and(|f| f.intersects(PollFlags::IN | PollFlags::ERR));
    if listener_ready {
        loop {
            match state.listener.accept() {
                Ok(Some(channel)) => {
                    let id = state.next_client_id;
                    state.next_client_id += 1;
                    let mut client = Client {
                        id,
                        pid: channel.peer_pid(),
                        channel,
                        phase: Phase::AwaitingHello {
                            since: Instant::now(),
                        },
                        registered: HashSet::new(),
                        inflight: HashMap::new(),
                        queued: VecDeque::new(),
                        frames_sent: 0,
                        frames_dropped: 0,
                        frames_dropped_held: 0,
                        inflight_peak: 0,
                        unread_since: None,
                        last_heard: Instant::now(),
                        released_any: false,
                        dead: None,
                        refused: None,
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
                Err(_) => break,
            }
        }
    }

    // Report handshakes that completed, and drop the dead.
    let mut i = 0;
    while i < state.clients.len() {
        let c = &mut state.clients[i];
        if let Some((reason, warn)) = c.dead.take() {
            let c = state.clients.remove(i);
            let was_active = c.phase == Phase::Active;
            c.channel.shutdown();
            if was_active || warn {
                events.push(Event::Disconnected {
                    client_id: c.id,
                    reason,
                    warn,
                });
            }
            // Dropping `c` releases every frame it held.
            continue;
        }
        i += 1;
    }
    events
}

fn hello() -> Message {
    Message::Hello(Hello {
        version: protocol::VERSION,
        role: Role::Producer,
        features: 0,
    })
}

/// Reads everything a client sent.
fn read_client(client: &mut Client, stream: &StreamState, buf: &mut [u8], events: &mut Vec<Event>) {
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
            (Phase::AwaitingHello { .. }, Message::Hello(h)) => {
                if h.role != Role::Consumer {
                    client.kill("peer says it is a producer, not a consumer".into(), true);
                } else if h.version != protocol::VERSION {
                    let reason = format!(
                        "protocol version mismatch: consumer speaks version {}, producer speaks version {}",
                        h.version,
                        protocol::VERSION
                    );
                    client.send_control(
                        &Message::Refuse {
                            reason: reason.clone(),
                        },
                        None,
                    );
                    client.kill(reason, true);
                } else {
                    client.phase = Phase::Active;
                    if let Some(caps) = &stream.caps {
                        client.send_control(
                            &Message::Caps {
                                caps: caps.clone(),
                                latency: stream.latency,
                            },
                            None,
                        );
                    }
                    if stream.eos {
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
                }
            }
            // Per-consumer grants are not applied yet; the request is accepted.
            (Phase::Active, Message::MaxInflight { .. }) => {}
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
