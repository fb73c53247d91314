//! The consumer's side of one connection: the handshake, the cache of
//! imported producer memories, and turning FRAME messages into buffers whose
//! release goes back to the producer.
//!
//! Each registered memory is imported once (GstFdMemory or GstDmaBufMemory,
//! read-only, kept mapped) and stays in the cache until FORGET. A frame's
//! memories are per-frame shares of those imports. When the last per-frame
//! share of a frame is freed, the frame is released right there, on the
//! thread that freed it, but only if nobody downstream made a share of its
//! own: GStreamer parents such shares to the import itself, so we count the
//! references we know of on each import and hold the release back while there
//! are more (the receiving thread checks again on a short timer).
//!
//! With a frame ring (see [`crate::protocol::frame_ring`]) FRAMEs come
//! through shared memory instead of the socket: the receive loop
//! ([`Connection::recv_message`]) takes ring entries and socket messages in
//! the order the producer sent them and, with nothing to take, waits with
//! one `epoll_wait` on the socket, the element's wake-up fd and the ring's
//! doorbell (edge-triggered: never read per frame).
//!
//! The element's reconnect mode replaces the [`Connection`] when its producer
//! goes away. Frames of the old connection may still be alive downstream:
//! their shares hold the old `Releaser`, whose channel is the old (shut
//! down) socket, so their releases fail quietly there and never reach the new
//! producer, whose frame ids may collide. Their imports stay mapped until the
//! last share is freed.

use gst::glib;
use rustc_hash::FxHashMap as HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bufshare_backends::share::is_sealed_against_shrink;
use bufshare_backends::{fd_kind, fd_size, MemoryKind as FdKind};
use glib::translate::IntoGlib;

use crate::protocol::frame_ring::{self, FEATURE_FRAME_RING};
use crate::protocol::release_ring::FEATURE_RELEASE_RING;
use crate::protocol::{self, Frame, Hello, MemoryKind, MemoryRef, Message, Role};
use crate::transport::frame_ring::ConsumerFrameRing;
use crate::transport::ring::ConsumerRing;
use crate::transport::unix::{wait_pair, UnixChannel, Waker};
use crate::transport::{Channel, Received};

static FRAME_QUARK: LazyLock<glib::Quark> =
    LazyLock::new(|| glib::Quark::from_str("bufshare-frame-guard"));

/// Why the connection could not go on.
#[derive(Debug)]
pub enum ReceiveError {
    /// `timeout` passed; the text says waiting for what.
    Timeout(String),
    /// The producer closed the connection (after everything it sent was read).
    ProducerGone,
    /// The producer dropped us and said why (DISCONNECT).
    Disconnected(String),
    /// The producer refused us, or speaks another version.
    Refused(String),
    /// The producer broke the protocol.
    Protocol(String),
    Io(std::io::Error),
    /// unlock(): the element is flushing.
    Flushing,
}

impl std::fmt::Display for ReceiveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReceiveError::Timeout(what) => write!(f, "timed out {what}"),
            ReceiveError::ProducerGone => write!(f, "the producer went away"),
            ReceiveError::Disconnected(why) => write!(f, "disconnected by the producer: {why}"),
            ReceiveError::Refused(r) => write!(f, "refused by the producer: {r}"),
            ReceiveError::Protocol(p) => write!(f, "protocol error from the producer: {p}"),
            ReceiveError::Io(e) => write!(f, "{e}"),
            ReceiveError::Flushing => write!(f, "flushing"),
        }
    }
}

/// What one message became.
pub enum Incoming {
    Caps { caps: String, latency: u64 },
    Frame(gst::Buffer, Frame),
    Eos,
}

struct Import {
    memory: gst::Memory,
    size: u64,
}

/// Release bookkeeping, shared with the per-frame shares, which are freed on
/// whatever thread drops the last buffer.
struct Releaser {
    channel: Arc<UnixChannel>,
    state: Mutex<ReleaseState>,
    waker: Arc<Waker>,
    /// Frames received that name producer memory and are not released yet:
    /// what the producer counts against this consumer's max-inflight.
    held: Arc<AtomicUsize>,
    /// The producer closed its end: releases have nowhere to go. What it sent
    /// before it left is still read, in order, to the end.
    closed: AtomicBool,
    /// The release ring, once the producer sent one (RELEASE_RING): releases
    /// are written there rather than sent, while the producer allows it.
    ring: OnceLock<ConsumerRing>,
}

#[derive(Default)]
struct ReleaseState {
    /// References we know of on each import root (by pointer): the cache's
    /// own, one per live per-frame share, one per root a frame guard holds.
    /// Always decremented before the reference itself goes, so it never
    /// exceeds the real count: anything above it is a share made downstream.
    accounted: HashMap<usize, usize>,
    /// Frames whose shares are gone but whose roots still carried unknown
    /// shares; checked again on a short timer.
    waiting: Vec<(u64, Vec<gst::Memory>)>,
    /// Ids that could not be sent (socket full), sent at the next chance.
    unsent: Vec<u64>,
}

impl ReleaseState {
    fn add(&mut self, root: usize) {
        *self.accounted.entry(root).or_default() += 1;
    }

    fn remove(&mut self, root: usize) {
        if let Some(n) = self.accounted.get_mut(&root) {
            *n -= 1;
            if *n == 0 {
                self.accounted.remove(&root);
            }
        }
    }

    /// Whether no unknown share holds any of `roots`. `dying` is a root whose
    /// share is being freed right now and still holds its parent reference.
    fn clean(&self, roots: &[gst::Memory], dying: Option<usize>) -> bool {
        roots.iter().all(|r| {
            let key = r.as_ptr() as usize;
            let allowance = usize::from(dying == Some(key));
            refcount(r) <= self.accounted.get(&key).copied().unwrap_or(0) + allowance
        })
    }

    /// Forgets a released frame's guard references. The caller drops `roots`
    /// after unlocking, so the count goes down before the references do.
    fn settle(&mut self, roots: &[gst::Memory]) {
        for r in roots {
            self.remove(r.as_ptr() as usize);
        }
    }
}

/// What a frame holds: its id and a reference to each import root it uses.
struct FrameGuard {
    frame_id: u64,
    roots: Vec<gst::Memory>,
}

/// Lives as qdata on each per-frame share. The last one of a frame to be
/// freed releases the frame, on the thread that freed it.
struct ShareToken {
    guard: Arc<FrameGuard>,
    root: usize,
    releaser: Arc<Releaser>,
}

impl Drop for ShareToken {
    fn drop(&mut self) {
        let releaser = &self.releaser;
        let mut st = releaser.state.lock().unwrap_or_else(|e| e.into_inner());
        st.remove(self.root);
        // Not the frame's last share: nothing more to do.
        let Some(guard) = Arc::get_mut(&mut self.guard) else {
            return;
        };
        let roots = std::mem::take(&mut guard.roots);
        let frame_id = guard.frame_id;
        // This share is still being freed and holds its parent: allow for it.
        if !st.clean(&roots, Some(self.root)) {
            st.waiting.push((frame_id, roots));
            drop(st);
            releaser.waker.wake();
            return;
        }
        st.settle(&roots);
        drop(st);
        drop(roots);
        releaser.send(&[frame_id]);
    }
}

unsafe extern "C" fn share_token_destroyed(data: glib::ffi::gpointer) {
    // SAFETY: `data` is the Box<ShareToken> leaked when the share was made, given back once.
    drop(unsafe { Box::from_raw(data as *mut ShareToken) });
}

/// Marks memory read-only, so nobody downstream can map it for writing.
///
/// # Safety
/// The caller must hold the only reference to `mem`.
unsafe fn set_readonly(mem: &gst::Memory) {
    unsafe {
        (*(mem.as_ptr() as *mut gst::ffi::GstMiniObject)).flags |=
            gst::ffi::GST_MEMORY_FLAG_READONLY;
    }
}

fn refcount(mem: &gst::Memory) -> usize {
    // SAFETY: reading the refcount of a live mini object; an atomic int in C.
    unsafe {
        let obj = mem.as_ptr() as *const gst::ffi::GstMiniObject;
        let rc = &*(std::ptr::addr_of!((*obj).refcount) as *const std::sync::atomic::AtomicI32);
        rc.load(std::sync::atomic::Ordering::Acquire) as usize
    }
}

impl Releaser {
    /// Sends RELEASE for `frame_ids`, on the thread that freed the frame.
    /// What cannot go now waits for the receiving thread, which is woken to
    /// retry it (and to report the error, if the producer is gone).
    fn send(&self, frame_ids: &[u64]) {
        self.held.fetch_sub(frame_ids.len(), Ordering::SeqCst);
        if !matches!(self.send_release(frame_ids), Ok(false)) {
            self.waker.wake();
        }
    }

    /// Sends RELEASE messages for `frame_ids`. Ids the socket does not take
    /// are kept in `unsent`; answers whether any were, or the hard error.
    /// Once the producer has closed its end, releases are dropped: the frames
    /// and the EOS it sent before leaving are still read (see `closed`).
    fn send_release(&self, frame_ids: &[u64]) -> std::io::Result<bool> {
        if self.closed.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let now = crate::clock::monotonic_now();
        if self
            .ring
            .get()
            .is_some_and(|ring| ring.push(frame_ids, now))
        {
            return Ok(false);
        }
        let mut kept = false;
        for chunk in frame_ids.chunks(protocol::MAX_RELEASE_IDS) {
            let msg = protocol::encode(&Message::Release {
                frame_ids: chunk.to_vec(),
            });
            match self.channel.send(&msg, &[]) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    st.unsent.extend_from_slice(chunk);
                    kept = true;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    // The producer is gone; the receiving thread learns it
                    // when it has read everything the producer sent.
                    self.closed.store(true, Ordering::SeqCst);
                    return Ok(false);
                }
                Err(e) => {
                    let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    st.unsent.extend_from_slice(chunk);
                    return Err(e);
                }
            }
        }
        Ok(kept)
    }

    /// Retries what could not be released or sent before. Cheap when there is nothing.
    fn flush(&self) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.waiting.is_empty() && st.unsent.is_empty() {
            return Ok(());
        }
        let unsent = std::mem::take(&mut st.unsent);
        let mut ready = Vec::new();
        let mut released_roots = Vec::new();
        for (frame_id, roots) in std::mem::take(&mut st.waiting) {
            if st.clean(&roots, None) {
                st.settle(&roots);
                ready.push(frame_id);
                released_roots.push(roots);
            } else {
                st.waiting.push((frame_id, roots));
            }
        }
        drop(st);
        drop(released_roots);
        self.held.fetch_sub(ready.len(), Ordering::SeqCst);
        ready.extend(unsent);
        self.send_release(&ready)?;
        Ok(())
    }

    fn has_waiting(&self) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        !st.waiting.is_empty() || !st.unsent.is_empty()
    }
}

/// The outcome of one connection attempt.
pub enum Attempt {
    Connected(Connection),
    /// Nobody listens on the path yet (no socket file, or one a dead
    /// producer left): why, as the OS said it.
    NoProducer(std::io::Error),
}

/// One connection to a producer.
pub struct Connection {
    channel: Arc<UnixChannel>,
    /// Frames the producer lets us hold at once (MAX_INFLIGHT), once it said.
    max_inflight: Option<u32>,
    imports: HashMap<u64, Import>,
    releaser: Arc<Releaser>,
    waker: Arc<Waker>,
    buf: Vec<u8>,
    /// Whether we asked for a frame ring.
    asked_frame_ring: bool,
    /// A FRAME_RING received, waiting for its DOORBELL: the memfd and its geometry.
    ring_offer: Option<(OwnedFd, u32, u32)>,
    /// The frame ring, once both came.
    frames: Option<FrameRingIn>,
    /// Socket messages handed on so far (the frame ring's order).
    socket_taken: u64,
    /// A socket message read but kept back behind older ring entries (or
    /// the producer's end of file).
    held: Option<Box<SocketMessage>>,
}

/// One message read from the socket, with its fds, or why none came.
type SocketMessage = Result<(Message, Vec<OwnedFd>), ReceiveError>;

/// The consumer's frame ring and the epoll set it waits with.
struct FrameRingIn {
    ring: ConsumerFrameRing,
    epoll: OwnedFd,
}

/// Epoll data of the three fds a frame ring consumer waits on.
const EP_SOCKET: u64 = 0;
const EP_WAKER: u64 = 1;
const EP_BELL: u64 = 2;

impl Connection {
    /// Connects to `path` and does the handshake, retrying while no producer
    /// listens, until `deadline`. `waker` interrupts the wait (unlock).
    pub fn connect(
        path: &Path,
        deadline: Instant,
        max_inflight: u32,
        release_ring: bool,
        frame_ring: bool,
        waker: Arc<Waker>,
        flushing: &dyn Fn() -> bool,
    ) -> Result<Connection, ReceiveError> {
        loop {
            match Self::try_connect(
                path,
                deadline,
                max_inflight,
                release_ring,
                frame_ring,
                waker.clone(),
                flushing,
            )? {
                Attempt::Connected(conn) => return Ok(conn),
                Attempt::NoProducer(e) => {
                    if flushing() {
                        return Err(ReceiveError::Flushing);
                    }
                    if Instant::now() >= deadline {
                        return Err(ReceiveError::Timeout(format!(
                            "waiting for a producer on {} ({e})",
                            path.display()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// One connection attempt: when a producer listens on `path`, connects
    /// and completes the handshake by `handshake_deadline`. The element's
    /// reconnect mode calls this at its own pace. `max_inflight` is how many
    /// frames we ask to hold at once (0: the producer's default);
    /// `release_ring` asks for a release ring (see `protocol::release_ring`),
    /// `frame_ring` for a frame ring (see `protocol::frame_ring`).
    pub fn try_connect(
        path: &Path,
        handshake_deadline: Instant,
        max_inflight: u32,
        release_ring: bool,
        frame_ring: bool,
        waker: Arc<Waker>,
        flushing: &dyn Fn() -> bool,
    ) -> Result<Attempt, ReceiveError> {
        let channel = match UnixChannel::connect(path) {
            Ok(c) => c,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                return Ok(Attempt::NoProducer(e))
            }
            Err(e) => {
                return Err(ReceiveError::Io(std::io::Error::new(
                    e.kind(),
                    format!("cannot connect to {}: {e}", path.display()),
                )))
            }
        };
        let deadline = handshake_deadline;
        let channel = Arc::new(channel);
        let releaser = Arc::new(Releaser {
            channel: channel.clone(),
            state: Mutex::new(ReleaseState::default()),
            waker: waker.clone(),
            held: Arc::new(AtomicUsize::new(0)),
            closed: AtomicBool::new(false),
            ring: OnceLock::new(),
        });
        let mut conn = Connection {
            channel,
            max_inflight: None,
            imports: HashMap::default(),
            releaser,
            waker,
            buf: vec![0u8; protocol::MAX_MESSAGE_LEN],
            asked_frame_ring: frame_ring,
            ring_offer: None,
            frames: None,
            socket_taken: 0,
            held: None,
        };
        let hello = protocol::encode(&Message::Hello(Hello {
            version: protocol::VERSION,
            role: Role::Consumer,
            features: if release_ring {
                FEATURE_RELEASE_RING
            } else {
                0
            } | if frame_ring { FEATURE_FRAME_RING } else { 0 },
        }));
        let ask = protocol::encode(&Message::MaxInflight {
            frames: max_inflight,
        });
        for msg in [&hello, &ask] {
            if let Err(e) = conn.channel.send(msg, &[]) {
                // A producer that refused us may already have closed; its REFUSE
                // is still waiting to be read, and says why. One that closed
                // with our HELLO unread (reset) said nothing: the read below
                // finds the end, ProducerGone, which a reconnecting consumer
                // retries.
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) {
                    return Err(ReceiveError::Io(e));
                }
            }
        }
        match conn.recv_message(Some(deadline), flushing, "waiting for the producer's HELLO")? {
            (Message::Hello(h), _) if h.role == Role::Producer && h.version == protocol::VERSION => Ok(Attempt::Connected(conn)),
            (Message::Hello(h), _) if h.version != protocol::VERSION => Err(ReceiveError::Refused(format!(
                "protocol version mismatch: producer speaks version {}, this consumer speaks version {}",
                h.version,
                protocol::VERSION
            ))),
            (Message::Hello(_), _) => Err(ReceiveError::Protocol("peer on the socket is not a producer".into())),
            (Message::Refuse { reason }, _) => Err(ReceiveError::Refused(reason)),
            (other, _) => Err(ReceiveError::Protocol(format!("expected HELLO, got {}", other.name()))),
        }
    }

    /// Waits for and returns the next message with its fds. Polls before
    /// each read: in steady state a frame is one poll and one recvmsg, with
    /// no read that finds nothing.
    fn recv_message(
        &mut self,
        deadline: Option<Instant>,
        flushing: &dyn Fn() -> bool,
        waiting_for: &str,
    ) -> Result<(Message, Vec<OwnedFd>), ReceiveError> {
        use rustix::event::PollFlags;
        if self.frames.is_some() {
            return self.recv_message_ring(deadline, flushing, waiting_for);
        }
        loop {
            if flushing() {
                return Err(ReceiveError::Flushing);
            }
            self.flush_releases()?;
            let mut timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if self.releaser.has_waiting() {
                let tick = Duration::from_millis(5);
                timeout = Some(timeout.map_or(tick, |t| t.min(tick)));
            }
            let revents = wait_pair(self.channel.as_fd(), self.waker.as_fd(), timeout)
                .map_err(ReceiveError::Io)?;
            if revents[1].contains(PollFlags::IN) {
                self.waker.drain();
            }
            if !revents[0].intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR) {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(ReceiveError::Timeout(waiting_for.to_string()));
                }
                continue;
            }
            if let Some(read) = self.read_socket()? {
                let (msg, fds) = read?;
                self.socket_taken += 1;
                return Ok((msg, fds));
            }
        }
    }

    /// One read of the socket: a message (or the producer's close, as
    /// `Some(Err(ProducerGone))`), `None` when there was nothing to read
    /// after all, or the error that ends the connection.
    fn read_socket(&mut self) -> Result<Option<SocketMessage>, ReceiveError> {
        match self.channel.recv(&mut self.buf) {
            Ok(Received::Message { len, fds }) => {
                let msg = protocol::decode(&self.buf[..len], fds.len())
                    .map_err(|e| ReceiveError::Protocol(e.to_string()))?;
                Ok(Some(Ok((msg, fds))))
            }
            Ok(Received::Closed) => Ok(Some(Err(ReceiveError::ProducerGone))),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                // The producer closed with our RELEASEs unread. The kernel
                // reports that once, before the messages it sent us that
                // are still queued: read those (frames, caps, EOS, the
                // reason it dropped us) to the end before calling it gone.
                self.releaser.closed.store(true, Ordering::SeqCst);
                Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                Err(ReceiveError::Protocol(e.to_string()))
            }
            Err(e) => Err(ReceiveError::Io(e)),
        }
    }

    /// [`Self::recv_message`] with a frame ring: the next ring entry or
    /// socket message, in the producer's order ([`frame_ring::next`]). With
    /// nothing to take it says it sleeps, looks at the ring once more and
    /// waits with one `epoll_wait`; the producer rings only then.
    fn recv_message_ring(
        &mut self,
        deadline: Option<Instant>,
        flushing: &dyn Fn() -> bool,
        waiting_for: &str,
    ) -> SocketMessage {
        use rustix::event::epoll;
        let ring_fault = |e: frame_ring::RingFault| ReceiveError::Protocol(e.to_string());
        loop {
            if flushing() {
                return Err(ReceiveError::Flushing);
            }
            self.flush_releases()?;
            let fr = self.frames.as_mut().expect("ring mode");
            let entry = fr.ring.peek().map_err(ring_fault)?;
            match frame_ring::next(entry, self.socket_taken, self.held.is_some()) {
                frame_ring::Next::Entry => {
                    let len = fr.ring.take(&mut self.buf).map_err(ring_fault)?;
                    return match protocol::decode(&self.buf[..len], 0) {
                        Ok(msg @ Message::Frame(_)) => Ok((msg, Vec::new())),
                        Ok(other) => Err(ReceiveError::Protocol(format!(
                            "frame ring entry is a {}, not a FRAME",
                            other.name()
                        ))),
                        Err(e) => Err(ReceiveError::Protocol(format!("frame ring entry: {e}"))),
                    };
                }
                frame_ring::Next::Held => {
                    let held = *self.held.take().expect("held");
                    if held.is_ok() {
                        self.socket_taken += 1;
                    }
                    return held;
                }
                frame_ring::Next::Socket | frame_ring::Next::Sleep => {}
            }
            let sleep = entry.is_none();
            if sleep && !fr.ring.prepare_sleep().map_err(ring_fault)? {
                continue;
            }
            let mut timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if self.releaser.has_waiting() {
                let tick = Duration::from_millis(5);
                timeout = Some(timeout.map_or(tick, |t| t.min(tick)));
            }
            let timeout = timeout.map(|t| rustix::event::Timespec {
                tv_sec: t.as_secs() as _,
                tv_nsec: t.subsec_nanos() as _,
            });
            let mut events = [epoll::Event {
                flags: epoll::EventFlags::empty(),
                data: epoll::EventData::new_u64(0),
            }; 3];
            let waited = epoll::wait(&fr.epoll, &mut events[..], timeout.as_ref());
            if sleep {
                fr.ring.woke();
            }
            let n = match waited {
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => 0,
                Err(e) => return Err(ReceiveError::Io(e.into())),
            };
            let mut socket_ready = false;
            for ev in &events[..n] {
                match ev.data.u64() {
                    EP_SOCKET => socket_ready = true,
                    EP_WAKER => self.waker.drain(),
                    _ => {}
                }
            }
            // Read the socket only when what it holds may come next (no
            // message kept back yet): at most one message is held.
            if !socket_ready || self.held.is_some() {
                if n == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(ReceiveError::Timeout(waiting_for.to_string()));
                }
                continue;
            }
            if let Some(read) = self.read_socket()? {
                self.held = Some(Box::new(read));
            }
        }
    }

    /// Starts taking frames from the ring the producer sent (FRAME_RING,
    /// then DOORBELL with `bell`).
    fn start_frame_ring(&mut self, bell: OwnedFd) -> Result<(), ReceiveError> {
        use rustix::event::epoll::{self, EventData, EventFlags};
        let unusable =
            |e: std::io::Error| ReceiveError::Protocol(format!("frame ring unusable: {e}"));
        let Some((ring_fd, capacity, slot_len)) = self.ring_offer.take() else {
            return Err(ReceiveError::Protocol(
                "DOORBELL without a FRAME_RING before it".into(),
            ));
        };
        let ring =
            ConsumerFrameRing::map(ring_fd.as_fd(), capacity, slot_len, bell).map_err(unusable)?;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| unusable(e.into()))?;
        epoll::add(
            &epoll,
            self.channel.as_fd(),
            EventData::new_u64(EP_SOCKET),
            EventFlags::IN,
        )
        .and_then(|()| {
            epoll::add(
                &epoll,
                self.waker.as_fd(),
                EventData::new_u64(EP_WAKER),
                EventFlags::IN,
            )
        })
        .and_then(|()| {
            epoll::add(
                &epoll,
                ring.bell(),
                EventData::new_u64(EP_BELL),
                EventFlags::IN | EventFlags::ET,
            )
        })
        .map_err(|e| unusable(e.into()))?;
        self.frames = Some(FrameRingIn { ring, epoll });
        Ok(())
    }

    /// Whether frames come through a frame ring.
    pub fn has_frame_ring(&self) -> bool {
        self.frames.is_some()
    }

    /// Sends releases that were waiting. A producer that has gone is not an
    /// error here: what it sent before it left is read first.
    fn flush_releases(&self) -> Result<(), ReceiveError> {
        self.releaser.flush().map_err(ReceiveError::Io)
    }

    /// Frames the producer lets us hold at once, once it has said (MAX_INFLIGHT).
    pub fn max_inflight(&self) -> Option<u32> {
        self.max_inflight
    }

    /// Frames received that name producer memory and are not released yet,
    /// kept up to date by whichever thread releases them (for stats).
    pub fn frames_held(&self) -> Arc<AtomicUsize> {
        self.releaser.held.clone()
    }

    /// How many of those there are now.
    pub fn held_now(&self) -> usize {
        self.releaser.held.load(Ordering::SeqCst)
    }

    /// The next caps, frame or EOS. Registrations and forgets are handled here.
    pub fn next(
        &mut self,
        deadline: Option<Instant>,
        flushing: &dyn Fn() -> bool,
        waiting_for: &str,
    ) -> Result<Incoming, ReceiveError> {
        loop {
            let (msg, mut fds) = self.recv_message(deadline, flushing, waiting_for)?;
            match msg {
                Message::Caps { caps, latency } => return Ok(Incoming::Caps { caps, latency }),
                Message::Register(reg) => {
                    let fd = fds.pop().expect("decode checked the fd count");
                    self.import(reg.mem_id, reg.kind, reg.size, fd)?;
                }
                Message::Forget { mem_id } => {
                    if let Some(import) = self.imports.remove(&mem_id) {
                        let root = import.memory.as_ptr() as usize;
                        self.releaser.state.lock().unwrap().remove(root);
                        drop(import);
                    }
                }
                Message::Frame(frame) => {
                    let buffer = self.build(&frame)?;
                    return Ok(Incoming::Frame(buffer, frame));
                }
                Message::Eos => return Ok(Incoming::Eos),
                Message::Refuse { reason } => return Err(ReceiveError::Refused(reason)),
                Message::Disconnect { reason } => return Err(ReceiveError::Disconnected(reason)),
                Message::MaxInflight { frames } => self.max_inflight = Some(frames),
                Message::ReleaseRing { capacity } => {
                    let fd = fds.pop().expect("decode checked the fd count");
                    let ring = ConsumerRing::map(fd.as_fd(), capacity).map_err(|e| {
                        ReceiveError::Protocol(format!("RELEASE_RING unusable: {e}"))
                    })?;
                    if self.releaser.ring.set(ring).is_err() {
                        return Err(ReceiveError::Protocol(
                            "a second RELEASE_RING on the same connection".into(),
                        ));
                    }
                }
                Message::FrameRing { capacity, slot_len } => {
                    if !self.asked_frame_ring || self.ring_offer.is_some() || self.frames.is_some()
                    {
                        return Err(ReceiveError::Protocol(
                            "FRAME_RING not asked for, or a second one".into(),
                        ));
                    }
                    let fd = fds.pop().expect("decode checked the fd count");
                    self.ring_offer = Some((fd, capacity, slot_len));
                }
                Message::Doorbell => {
                    let fd = fds.pop().expect("decode checked the fd count");
                    self.start_frame_ring(fd)?;
                }
                other => {
                    return Err(ReceiveError::Protocol(format!(
                        "producer sent {} after the handshake",
                        other.name()
                    )))
                }
            }
        }
    }

    fn import(
        &mut self,
        mem_id: u64,
        kind: MemoryKind,
        size: u64,
        fd: OwnedFd,
    ) -> Result<(), ReceiveError> {
        let proto = |m: String| Err(ReceiveError::Protocol(m));
        if self.imports.contains_key(&mem_id) {
            return proto(format!(
                "REGISTER of memory {mem_id}, which is already registered"
            ));
        }
        if self.imports.len() >= protocol::MAX_REGISTERED_MEMORIES {
            return proto(format!(
                "REGISTER of memory {mem_id} while {} memories are registered, the limit (a registration flood?)",
                self.imports.len()
            ));
        }
        let real_kind = fd_kind(fd.as_fd()).map_err(|e| {
            ReceiveError::Protocol(format!("cannot inspect the fd of memory {mem_id}: {e}"))
        })?;
        match (kind, real_kind) {
            (_, None) => {
                return proto(format!(
                    "memory {mem_id} is not memory (a pipe, socket or device)"
                ))
            }
            (MemoryKind::DmaBuf, Some(FdKind::Memfd)) => {
                return proto(format!(
                    "memory {mem_id}: announced as a dma-buf but the fd is a memfd or file"
                ))
            }
            (MemoryKind::Memfd, Some(FdKind::DmaBuf)) => {
                return proto(format!(
                    "memory {mem_id}: announced as a memfd but the fd is a dma-buf"
                ))
            }
            _ => {}
        }
        // An unsealed file could be truncated by the producer after the size
        // check below, and a read of a mapped page past the new end is SIGBUS.
        if kind == MemoryKind::Memfd && !is_sealed_against_shrink(fd.as_fd()) {
            return proto(format!(
                "memory {mem_id} is not a memfd sealed against shrinking (F_SEAL_SHRINK); it could be truncated under our mapping"
            ));
        }
        let real_size = fd_size(fd.as_fd()).map_err(|e| {
            ReceiveError::Protocol(format!("cannot find the size of memory {mem_id}: {e}"))
        })?;
        if size == 0 || size > real_size {
            return proto(format!(
                "memory {mem_id} announced with {size} bytes but its fd has {real_size}"
            ));
        }
        let size_usize =
            usize::try_from(size).map_err(|_| ReceiveError::Protocol("size too large".into()))?;
        let backend_kind = match kind {
            MemoryKind::Memfd => FdKind::Memfd,
            MemoryKind::DmaBuf => FdKind::DmaBuf,
        };
        let memory = crate::pool::wrap_fd(fd, backend_kind, size_usize)
            .map_err(|e| ReceiveError::Protocol(format!("cannot import memory {mem_id}: {e}")))?;
        // Read-only downstream; map once now, it stays mapped (KEEP_MAPPED).
        // SAFETY: we hold the only reference; setting a flag on our own memory.
        unsafe { set_readonly(&memory) };
        if kind == MemoryKind::Memfd {
            drop(memory.map_readable().map_err(|_| {
                ReceiveError::Protocol(format!("cannot map memory {mem_id} of {size} bytes"))
            })?);
        }
        self.releaser
            .state
            .lock()
            .unwrap()
            .add(memory.as_ptr() as usize);
        self.imports.insert(mem_id, Import { memory, size });
        Ok(())
    }

    fn build(&mut self, frame: &Frame) -> Result<gst::Buffer, ReceiveError> {
        let mut buffer = gst::Buffer::new();
        let b = buffer.get_mut().expect("new buffer is writable");
        let mut roots = Vec::new();
        for m in &frame.memories {
            if let MemoryRef::Registered {
                mem_id,
                offset,
                size,
            } = m
            {
                let import = self.imports.get(mem_id).ok_or_else(|| {
                    ReceiveError::Protocol(format!(
                        "frame {} names unknown memory {mem_id}",
                        frame.frame_id
                    ))
                })?;
                if offset
                    .checked_add(*size)
                    .is_none_or(|end| end > import.size)
                {
                    return Err(ReceiveError::Protocol(format!(
                        "frame {} addresses bytes {offset}+{size} of memory {mem_id}, which has {}",
                        frame.frame_id, import.size
                    )));
                }
                roots.push(import.memory.clone());
            }
        }
        let mut st = self.releaser.state.lock().unwrap();
        for r in &roots {
            st.add(r.as_ptr() as usize);
        }
        if !roots.is_empty() {
            self.releaser.held.fetch_add(1, Ordering::SeqCst);
        }
        let guard = (!roots.is_empty()).then(|| {
            Arc::new(FrameGuard {
                frame_id: frame.frame_id,
                roots,
            })
        });
        for m in &frame.memories {
            match m {
                MemoryRef::Registered {
                    mem_id,
                    offset,
                    size,
                } => {
                    let import = &self.imports[mem_id];
                    let share = import
                        .memory
                        .share(*offset as usize..(*offset + *size) as usize);
                    let root = import.memory.as_ptr() as usize;
                    st.add(root);
                    let token = Box::into_raw(Box::new(ShareToken {
                        guard: guard.clone().expect("registered memory has a guard"),
                        root,
                        releaser: self.releaser.clone(),
                    }));
                    // SAFETY: the share is ours alone; the token is freed by its destroy notify.
                    unsafe {
                        gst::ffi::gst_mini_object_set_qdata(
                            share.as_ptr() as *mut gst::ffi::GstMiniObject,
                            FRAME_QUARK.into_glib(),
                            token as glib::ffi::gpointer,
                            Some(share_token_destroyed),
                        );
                    }
                    b.append_memory(share);
                }
                MemoryRef::Inline(bytes) => {
                    let mem = gst::Memory::from_mut_slice(bytes.clone());
                    // SAFETY: we hold the only reference; setting a flag on our own memory.
                    unsafe { set_readonly(&mem) };
                    b.append_memory(mem);
                }
            }
        }
        Ok(buffer)
    }

    pub fn raw_fd(&self) -> i32 {
        self.channel.as_fd().as_raw_fd()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.channel.shutdown();
    }
}
