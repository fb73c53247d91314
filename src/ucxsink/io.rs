//! The I/O thread of `ucxsink`: owns the whole UCX stack (context, worker, listener or
//! outgoing endpoint, one endpoint per receiver) and fans frames out.
//!
//! The streaming thread never waits for it: `render` queues a command ([`Shared::push`]) and
//! wakes the thread through an eventfd; when more than [`MAX_QUEUED_FRAMES`] frames wait, the
//! oldest is dropped (counted). The thread sleeps in poll(2) on the worker's event fd and that
//! eventfd.
//!
//! Per receiver: a handshake (HELLO both ways, versions checked, REFUSE naming both), then
//! its grant of frames in flight (sent and not released); a frame goes to a receiver only
//! while it holds fewer (the fan-out policy of bufsharesink, [`FanOut`]): a slow receiver is
//! skipped (latest wins) and never delays the others. A receiver that holds frames and
//! releases none for `client-timeout` is disconnected (DISCONNECT with the reason). A frame's
//! `gst::Buffer` is kept until every send of it completed (for rendezvous: until the receiver
//! pulled the bytes).
//!
//! Payloads: a buffer of one fd memory (our pool's memfds, or any memfd/dma-buf) is sent from
//! its registration ([`Regions`]), without a copy; other buffers are copied once per frame
//! into a freshly registered staging area shared by all receivers (or, at most
//! [`SMALL_FRAME`] bytes, sent as bytes).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use rustc_hash::FxHashSet as HashSet;

use crate::bufsharesink::fanout::{Candidate, FanOut, Verdict};
use crate::clock::monotonic_now;
use crate::protocol::{self, Message, Role};
use crate::transport::unix::Waker;
use crate::ucxio::{self, FreedQueue, Mode, Regions};
use crate::ucxwatch;
use crate::ucxwire::{self, AllowList, AM_CTRL, AM_FRAME, AM_TIME};

use super::imp::CAT;

/// Frames waiting for the I/O thread beyond which the oldest is dropped.
pub const MAX_QUEUED_FRAMES: usize = 4;
/// Frames up to this size are sent as bytes (eager), not from registered memory.
pub const SMALL_FRAME: usize = 8 * 1024;
/// Frames from this size on are sent by rendezvous (the receiver pulls them).
pub const RNDV_FROM: usize = 64 * 1024;
/// A receiver must say HELLO within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Client mode: time between connection attempts.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How long the last sends and closes may take when the element stops.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(2);
/// How long EOS waits for every receiver to have it.
pub const EOS_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Config {
    pub address: SocketAddr,
    pub mode: Mode,
    pub transports: String,
    pub allowed: AllowList,
    pub max_inflight: u32,
    pub client_timeout: Option<Duration>,
}

/// A frame for the receivers: its FRAME (timestamps, flags, metas; memories filled in here)
/// and the buffer holding its bytes.
pub struct OutFrame {
    pub frame: protocol::Frame,
    pub buffer: gst::Buffer,
}

enum Cmd {
    Caps(String, u64),
    Frame(Box<OutFrame>),
    Eos,
    ClearEos,
}

/// One receiver, for `stats`.
#[derive(Debug, Clone, Default)]
pub struct ClientStats {
    pub client_id: u64,
    pub address: String,
    pub frames_sent: u64,
    pub frames_skipped: u64,
    pub frames_in_flight: u32,
    pub max_inflight: u32,
    pub zero_copy: u64,
    pub copied: u64,
}

#[derive(Debug, Default, Clone)]
pub struct Status {
    pub clients: Vec<ClientStats>,
    pub frames_dropped_queue: u64,
    pub frames_staged: u64,
    pub clients_refused: u64,
    pub clients_timed_out: u64,
    pub registered_memories: u32,
    /// Frame sends (all receivers) from the frame's own registered memory.
    pub sends_zero_copy: u64,
    /// Frame sends from a copy (staging area or bytes).
    pub sends_copied: u64,
    /// EOS went out and every send to a receiver completed.
    pub eos_flushed: bool,
    /// Frames the roomiest ready receiver can still take within its grant (`u32::MAX` with
    /// no ready receiver): a render that waits for room may queue this many.
    pub room: u32,
}

/// What the streaming thread and the I/O thread share.
pub struct Shared {
    cmds: Mutex<VecDeque<Cmd>>,
    waker: Arc<Waker>,
    quit: AtomicBool,
    status: Mutex<Status>,
    cond: Condvar,
    /// Frames queued for the I/O thread, not yet taken.
    frames_queued: AtomicUsize,
    /// Signalled (with `status`) when `room` or `frames_queued` may have changed.
    room_cond: Condvar,
}

impl Shared {
    fn push(&self, cmd: Cmd) {
        let mut q = self.cmds.lock().unwrap();
        if let Cmd::Frame(_) = cmd {
            let frames = q.iter().filter(|c| matches!(c, Cmd::Frame(_))).count();
            if frames >= MAX_QUEUED_FRAMES {
                if let Some(i) = q.iter().position(|c| matches!(c, Cmd::Frame(_))) {
                    q.remove(i);
                    self.frames_queued.fetch_sub(1, Ordering::SeqCst);
                    self.status.lock().unwrap().frames_dropped_queue += 1;
                }
            }
            self.frames_queued.fetch_add(1, Ordering::SeqCst);
        }
        q.push_back(cmd);
        drop(q);
        self.waker.wake();
    }
}

/// The running I/O thread; stopping it (drop) flushes what is in flight, within limits.
pub struct Server {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts the thread; returns once it listens (server) or set up its context (client).
    pub fn start(cfg: Config, element: glib::WeakRef<gst::Element>) -> Result<Server, String> {
        let waker = Arc::new(Waker::new().map_err(|e| format!("eventfd: {e}"))?);
        let shared = Arc::new(Shared {
            cmds: Mutex::new(VecDeque::new()),
            waker,
            quit: AtomicBool::new(false),
            status: Mutex::new(Status {
                room: u32::MAX,
                ..Status::default()
            }),
            cond: Condvar::new(),
            frames_queued: AtomicUsize::new(0),
            room_cond: Condvar::new(),
        });
        let sh = shared.clone();
        let thread = crate::ucxio::spawn_io_thread(
            "ucxsink-io",
            move || Io::new(cfg, sh, element),
            |mut io| io.run(),
        )?;
        Ok(Server {
            shared,
            thread: Some(thread),
        })
    }

    pub fn set_caps(&self, caps: String, latency: u64) {
        self.shared.push(Cmd::Caps(caps, latency));
    }

    pub fn send_frame(&self, frame: OutFrame) {
        self.shared.push(Cmd::Frame(Box::new(frame)));
    }

    /// Sends EOS and waits (at most [`EOS_LIMIT`]) until every receiver has it.
    pub fn send_eos(&self) -> bool {
        self.shared.status.lock().unwrap().eos_flushed = false;
        self.shared.push(Cmd::Eos);
        let deadline = Instant::now() + EOS_LIMIT;
        let mut st = self.shared.status.lock().unwrap();
        while !st.eos_flushed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self.shared.cond.wait_timeout(st, left).unwrap().0;
        }
        true
    }

    /// Waits until a receiver has room in its grant for this frame and those queued before it
    /// (or none is connected), and the queue has a place (so no queued frame is dropped): the
    /// streaming thread runs ahead of the I/O thread by up to that many frames instead of
    /// waiting for it to take each one. False: `cancel` was set (unlock) or the thread quit.
    pub fn wait_for_room(&self, cancel: &AtomicBool) -> bool {
        let mut st = self.shared.status.lock().unwrap();
        loop {
            if cancel.load(Ordering::SeqCst) || self.shared.quit.load(Ordering::SeqCst) {
                return false;
            }
            let queued = self.shared.frames_queued.load(Ordering::SeqCst);
            if queued < MAX_QUEUED_FRAMES && (queued as u64) < u64::from(st.room) {
                return true;
            }
            // The timeout only bounds a missed wake-up.
            st = self
                .shared
                .room_cond
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap()
                .0;
        }
    }

    /// Wakes a render waiting for room (to look at its cancel flag).
    pub fn wake_waiters(&self) {
        let _st = self.shared.status.lock().unwrap();
        self.shared.room_cond.notify_all();
    }

    pub fn clear_eos(&self) {
        self.shared.push(Cmd::ClearEos);
    }

    pub fn status(&self) -> Status {
        self.shared.status.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        self.shared.waker.wake();
        self.wake_waiters();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum AmIn {
    Ctrl(Vec<u8>, Vec<u8>),
    Time(Vec<u8>, Vec<u8>),
}

struct Peer {
    conn_id: u64,
    ep: ucx::Endpoint,
    addr: String,
    failed: Rc<RefCell<Option<String>>>,
    ready: bool,
    since: Instant,
    granted: u32,
    inflight: HashSet<u64>,
    /// Since when it holds frames without releasing any.
    waiting_since: Option<Instant>,
    stats: ClientStats,
}

struct Pending {
    conn_id: u64,
    req: ucx::Request,
    /// Keeps the frame's memory alive until UCX is done with it.
    _buffer: Option<gst::Buffer>,
}

struct Closing {
    ep: ucx::Endpoint,
    req: Option<ucx::Request>,
    until: Instant,
}

/// The thread's state. Field order is drop order: sends and endpoints first, then the
/// worker and context, and the registrations (and our mappings) last.
struct Io {
    pending: Vec<Pending>,
    closing: Vec<Closing>,
    peers: Vec<Peer>,
    listener: Option<ucx::Listener>,
    conns: Rc<RefCell<VecDeque<ucx::ConnRequest>>>,
    am_in: Rc<RefCell<VecDeque<AmIn>>>,
    worker: ucx::Worker,
    ctx: ucx::Context,
    cfg: Config,
    shared: Arc<Shared>,
    element: glib::WeakRef<gst::Element>,
    next_conn_id: u64,
    caps: Option<(String, u64)>,
    eos: bool,
    retry_at: Instant,
    last_connect_error: Option<String>,
    max_header: usize,
    warned_metas: bool,
    /// The set of receivers changed: notify num-clients.
    changed: bool,
    frame_header: Vec<u8>,
    /// UCX's log into ours; strangers on the listening port.
    watch: ucxwatch::Watch,
    regions: Regions,
}

impl Io {
    fn new(
        cfg: Config,
        shared: Arc<Shared>,
        element: glib::WeakRef<gst::Element>,
    ) -> Result<Io, String> {
        let ctx = ucxio::context("ucxsink", &cfg.transports)
            .map_err(|e| format!("UCX context (transports '{}'): {e}", cfg.transports))?;
        let worker = ucx::Worker::new(&ctx).map_err(|e| format!("UCX worker: {e}"))?;
        let am_in: Rc<RefCell<VecDeque<AmIn>>> = Rc::default();
        for (id, time) in [(AM_CTRL, false), (AM_TIME, true)] {
            let q = am_in.clone();
            worker
                .set_am_handler(id, move |m| {
                    let h = m.header().to_vec();
                    // Control and time messages are small and sent eagerly; anything else
                    // (a rendezvous) is not ours to take.
                    let d = m.data().map(<[u8]>::to_vec).unwrap_or_default();
                    q.borrow_mut().push_back(if time {
                        AmIn::Time(h, d)
                    } else {
                        AmIn::Ctrl(h, d)
                    });
                })
                .map_err(|e| format!("UCX AM handler: {e}"))?;
        }
        // Receivers send no frames; a stray one is dropped (handler not taking it).
        worker
            .set_am_handler(AM_FRAME, |_| {})
            .map_err(|e| format!("UCX AM handler: {e}"))?;
        let conns: Rc<RefCell<VecDeque<ucx::ConnRequest>>> = Rc::default();
        // Registered before binding: UCX logs why a bind failed.
        let mut watch = ucxwatch::watch(element.clone(), *CAT);
        let listener = match cfg.mode {
            Mode::Server => {
                let c = conns.clone();
                let l =
                    ucx::Listener::bind(&worker, cfg.address, move |r| c.borrow_mut().push_back(r))
                        .map_err(|e| format!("cannot listen on {}: {e}", cfg.address))?;
                watch.listening(l.local_addr().unwrap_or(cfg.address));
                gst::info!(
                    CAT,
                    "listening on {}",
                    l.local_addr().unwrap_or(cfg.address)
                );
                Some(l)
            }
            Mode::Client => None,
        };
        let max_header = worker.max_am_header().unwrap_or(4096);
        gst::debug!(CAT, "largest AM header {max_header} bytes");
        let regions = Regions::new(FreedQueue::new(shared.waker.clone()));
        Ok(Io {
            pending: Vec::new(),
            closing: Vec::new(),
            peers: Vec::new(),
            listener,
            conns,
            am_in,
            worker,
            ctx,
            cfg,
            shared,
            element,
            next_conn_id: 1,
            caps: None,
            eos: false,
            retry_at: Instant::now(),
            last_connect_error: None,
            max_header,
            warned_metas: false,
            changed: false,
            frame_header: Vec::new(),
            watch,
            regions,
        })
    }

    fn warn(&self, text: &str) {
        gst::warning!(CAT, "{}", text);
        if let Some(e) = self.element.upgrade() {
            gst::element_warning!(e, gst::ResourceError::Write, ("{}", text));
        }
    }

    fn notify_clients(&mut self) {
        self.changed = true;
    }

    fn run(&mut self) {
        while !self.shared.quit.load(Ordering::SeqCst) {
            while self.worker.progress() > 0 {}
            self.regions.reap();
            self.accept();
            self.connect_out();
            self.handle_am();
            self.handle_cmds();
            self.poll_sends();
            self.check_peers();
            self.watch.poll();
            self.publish();
            if std::mem::take(&mut self.changed) {
                if let Some(e) = self.element.upgrade() {
                    e.notify("num-clients");
                }
            }
            let timeout = if self.pending.is_empty() && self.closing.is_empty() {
                Duration::from_millis(100)
            } else {
                Duration::from_millis(5)
            };
            ucxio::sleep(&self.worker, &self.shared.waker, timeout);
        }
        self.shutdown();
    }

    fn accept(&mut self) {
        loop {
            let Some(req) = self.conns.borrow_mut().pop_front() else {
                return;
            };
            let peer = req.peer_addr();
            self.watch.handshake(peer);
            if !self.cfg.allowed.allows(peer.map(|a| a.ip())) {
                self.warn(&format!(
                    "refused a connection from {}: not in allowed-hosts",
                    peer.map_or("an unknown address".into(), |a| a.to_string())
                ));
                self.shared.status.lock().unwrap().clients_refused += 1;
                req.reject();
                continue;
            }
            let failed: Rc<RefCell<Option<String>>> = Rc::default();
            let f = failed.clone();
            match req.accept(move |e| *f.borrow_mut() = Some(e.to_string())) {
                Ok(ep) => {
                    let addr = peer.map_or("?".into(), |a| a.to_string());
                    gst::info!(CAT, "connection from {addr}");
                    self.add_peer(ep, addr, failed);
                }
                Err(e) => self.warn(&format!("cannot accept a connection: {e}")),
            }
        }
    }

    /// Client mode: keeps one connection to the receiver at `address`.
    fn connect_out(&mut self) {
        // After EOS there is nothing to send: no new connection until the next stream
        // (reconnecting to a receiver that is shutting down races with UCX, docs/ucx.md).
        if self.cfg.mode != Mode::Client
            || !self.peers.is_empty()
            || !self.closing.is_empty()
            || self.eos
        {
            return;
        }
        let now = Instant::now();
        if now < self.retry_at {
            return;
        }
        self.retry_at = now + RETRY_INTERVAL;
        let failed: Rc<RefCell<Option<String>>> = Rc::default();
        let f = failed.clone();
        match ucx::Endpoint::connect(&self.worker, self.cfg.address, move |e| {
            *f.borrow_mut() = Some(e.to_string())
        }) {
            Ok(ep) => {
                let addr = self.cfg.address.to_string();
                self.add_peer(ep, addr, failed);
            }
            Err(e) => self.connect_failed(e.to_string()),
        }
    }

    fn connect_failed(&mut self, e: String) {
        if self.last_connect_error.as_ref() != Some(&e) {
            self.warn(&format!(
                "cannot reach a receiver at {}: {e}; retrying every {} s",
                self.cfg.address,
                RETRY_INTERVAL.as_secs()
            ));
            self.last_connect_error = Some(e);
        }
    }

    fn add_peer(&mut self, ep: ucx::Endpoint, addr: String, failed: Rc<RefCell<Option<String>>>) {
        let conn_id = self.next_conn_id;
        self.next_conn_id += 1;
        let mut peer = Peer {
            conn_id,
            ep,
            addr: addr.clone(),
            failed,
            ready: false,
            since: Instant::now(),
            granted: self.cfg.max_inflight.max(1),
            inflight: HashSet::default(),
            waiting_since: None,
            stats: ClientStats {
                client_id: conn_id,
                address: addr,
                ..Default::default()
            },
        };
        let hello = ucxwire::hello(Role::Producer);
        if let Err(e) = self.send_ctrl(&mut peer, &hello) {
            *peer.failed.borrow_mut() = Some(e);
        }
        self.peers.push(peer);
    }

    fn send_ctrl(&mut self, peer: &mut Peer, msg: &Message) -> Result<(), String> {
        let req = peer
            .ep
            .am_send(
                AM_CTRL,
                &ucxwire::conn_header(peer.conn_id),
                ucx::Payload::Bytes(ucxwire::encode_ctrl(msg)),
                ucx::Proto::Eager,
            )
            .map_err(|e| format!("sending {}: {e}", msg.name()))?;
        self.pending.push(Pending {
            conn_id: peer.conn_id,
            req,
            _buffer: None,
        });
        Ok(())
    }

    fn peer_index(&self, conn_id: u64) -> Option<usize> {
        self.peers.iter().position(|p| p.conn_id == conn_id)
    }

    fn handle_am(&mut self) {
        loop {
            let Some(m) = self.am_in.borrow_mut().pop_front() else {
                return;
            };
            match m {
                AmIn::Time(h, d) => {
                    let (Ok((conn_id, _)), Ok((asked, _))) =
                        (ucxwire::split_header(&h), ucxwire::decode_time(&d))
                    else {
                        continue;
                    };
                    let Some(peer) = self.peers.iter().find(|p| p.conn_id == conn_id) else {
                        continue;
                    };
                    if let Ok(req) = peer.ep.am_send(
                        AM_TIME,
                        &ucxwire::conn_header(conn_id),
                        ucx::Payload::Bytes(ucxwire::encode_time(asked, monotonic_now())),
                        ucx::Proto::Eager,
                    ) {
                        self.pending.push(Pending {
                            conn_id,
                            req,
                            _buffer: None,
                        });
                    }
                }
                AmIn::Ctrl(h, d) => {
                    let (conn_id, msg) = match ucxwire::decode_ctrl(&h, &d) {
                        Ok(x) => x,
                        Err(e) => {
                            // Without a valid connection id we cannot tell who sent it.
                            match ucxwire::split_header(&h)
                                .ok()
                                .and_then(|(id, _)| self.peer_index(id))
                            {
                                Some(i) => {
                                    let p = self.peers.swap_remove(i);
                                    self.drop_peer(p, &format!("protocol error: {e}"), true);
                                }
                                None => gst::debug!(CAT, "undecodable message: {e}"),
                            }
                            continue;
                        }
                    };
                    let Some(i) = self.peer_index(conn_id) else {
                        gst::debug!(CAT, "{} for unknown connection {conn_id}", msg.name());
                        continue;
                    };
                    let peer = self.peers.swap_remove(i);
                    if let Some(peer) = self.on_ctrl(peer, msg) {
                        self.peers.push(peer);
                    }
                }
            }
        }
    }

    /// A control message from a receiver; returns the peer unless it was dropped.
    fn on_ctrl(&mut self, mut peer: Peer, msg: Message) -> Option<Peer> {
        match msg {
            Message::Hello(h) if !peer.ready => {
                if let Some(reason) = ucxwire::check_consumer_hello(&h) {
                    let _ = self.send_ctrl(
                        &mut peer,
                        &Message::Refuse {
                            reason: reason.clone(),
                        },
                    );
                    self.shared.status.lock().unwrap().clients_refused += 1;
                    self.close_peer(
                        peer,
                        &format!("refused the receiver at {{}}: {reason}"),
                        true,
                    );
                    return None;
                }
                peer.ready = true;
                gst::info!(CAT, "receiver {} at {} connected", peer.conn_id, peer.addr);
                let grant = Message::MaxInflight {
                    frames: peer.granted,
                };
                let mut r = self.send_ctrl(&mut peer, &grant);
                if let Some((caps, latency)) = self.caps.clone() {
                    r = r.and(self.send_ctrl(&mut peer, &Message::Caps { caps, latency }));
                    if self.eos {
                        r = r.and(self.send_ctrl(&mut peer, &Message::Eos));
                    }
                }
                if let Err(e) = r {
                    *peer.failed.borrow_mut() = Some(e);
                }
                self.changed = true;
                Some(peer)
            }
            Message::MaxInflight { frames } if peer.ready => {
                let max = self.cfg.max_inflight.max(1);
                peer.granted = if frames == 0 { max } else { frames.min(max) };
                let grant = Message::MaxInflight {
                    frames: peer.granted,
                };
                if let Err(e) = self.send_ctrl(&mut peer, &grant) {
                    *peer.failed.borrow_mut() = Some(e);
                }
                Some(peer)
            }
            Message::Release { frame_ids } if peer.ready => {
                for id in frame_ids {
                    if !peer.inflight.remove(&id) {
                        self.drop_peer(
                            peer,
                            &format!(
                                "protocol error: RELEASE of frame {id}, which it does not hold"
                            ),
                            true,
                        );
                        return None;
                    }
                }
                peer.waiting_since = (!peer.inflight.is_empty()).then(Instant::now);
                Some(peer)
            }
            other => {
                let what = format!(
                    "protocol error: receiver sent {}{}",
                    other.name(),
                    if peer.ready { "" } else { " before HELLO" }
                );
                self.drop_peer(peer, &what, true);
                None
            }
        }
    }

    fn handle_cmds(&mut self) {
        loop {
            let Some(cmd) = self.shared.cmds.lock().unwrap().pop_front() else {
                return;
            };
            match cmd {
                Cmd::Caps(caps, latency) => {
                    if self.caps.as_ref() == Some(&(caps.clone(), latency)) {
                        continue;
                    }
                    self.caps = Some((caps.clone(), latency));
                    let msg = Message::Caps { caps, latency };
                    self.broadcast(&msg);
                }
                Cmd::Eos => {
                    self.eos = true;
                    self.broadcast(&Message::Eos);
                }
                Cmd::ClearEos => self.eos = false,
                Cmd::Frame(f) => {
                    self.fan_out(*f);
                    // The frame counts as queued until `room` says what its sends left: a
                    // render waiting for room must not see the old `room` with no frame queued.
                    let mut st = self.shared.status.lock().unwrap();
                    st.room = self.room();
                    self.shared.frames_queued.fetch_sub(1, Ordering::SeqCst);
                    drop(st);
                    self.shared.room_cond.notify_all();
                }
            }
        }
    }

    fn broadcast(&mut self, msg: &Message) {
        let mut peers = std::mem::take(&mut self.peers);
        for p in peers.iter_mut().filter(|p| p.ready) {
            if let Err(e) = self.send_ctrl(p, msg) {
                *p.failed.borrow_mut() = Some(e);
            }
        }
        self.peers = peers;
    }

    fn fan_out(&mut self, out: OutFrame) {
        let OutFrame { mut frame, buffer } = out;
        if !self.peers.iter().any(|p| p.ready) {
            return;
        }
        let len = buffer.size();
        // The payload: registered memory (ours or upstream's) as it is, else one copy.
        let mut why = String::new();
        let (payload, zero_copy) = if len <= SMALL_FRAME {
            let bytes = match buffer.map_readable() {
                Ok(m) => m.to_vec(),
                Err(_) => return,
            };
            (Out::Bytes(bytes), false)
        } else {
            let direct = if buffer.n_memory() == 1 {
                self.regions
                    .slice(&self.ctx, buffer.peek_memory(0), &mut why)
                    .map(|s| s.get())
            } else {
                why = format!("{} memories", buffer.n_memory());
                None
            };
            match direct {
                Some(s) => (Out::Region(s), true),
                None => {
                    gst::trace!(CAT, "frame {} copied: {why}", frame.frame_id);
                    let Ok(region) = ucx::MemoryRegion::allocate(&self.ctx, len) else {
                        return;
                    };
                    match buffer.map_readable() {
                        Ok(m) => region.write(0, &m),
                        Err(_) => return,
                    }
                    self.shared.status.lock().unwrap().frames_staged += 1;
                    (Out::Region(region.slice(0..len)), false)
                }
            }
        };
        ucxwire::describe_payload(&mut frame, len);
        let mut header = std::mem::take(&mut self.frame_header);
        ucxwire::encode_frame_header(0, &frame, &mut header);
        if header.len() > self.max_header {
            let dropped = frame.drop_metas_to_fit(self.max_header - ucxwire::CONN_ID_LEN);
            if !self.warned_metas {
                self.warned_metas = true;
                let names: Vec<String> = dropped.iter().map(|m| m.name()).collect();
                self.warn(&format!(
                    "frame header over UCX's limit of {} bytes: dropping {} (warned once)",
                    self.max_header,
                    names.join(", ")
                ));
            }
            ucxwire::encode_frame_header(0, &frame, &mut header);
        }
        let proto = if len >= RNDV_FROM {
            ucx::Proto::Rndv
        } else {
            ucx::Proto::Auto
        };
        let policy = FanOut::new(None, true, 0);
        let (mut sent_zero_copy, mut sent_copied) = (0, 0);
        let mut peers = std::mem::take(&mut self.peers);
        for p in peers.iter_mut().filter(|p| p.ready) {
            let verdict = policy.verdict(&Candidate {
                held: p.inflight.len(),
                granted: p.granted as usize,
                queue_blocked: p.failed.borrow().is_some(),
                keeping_up: true,
            });
            if verdict != Verdict::Send {
                p.stats.frames_skipped += 1;
                continue;
            }
            ucxwire::set_conn_id(&mut header, p.conn_id);
            let pl = match &payload {
                Out::Bytes(b) => ucx::Payload::Bytes(b.clone()),
                Out::Region(s) => ucx::Payload::Region(s.clone()),
            };
            match p.ep.am_send(AM_FRAME, &header, pl, proto) {
                Ok(req) => {
                    self.pending.push(Pending {
                        conn_id: p.conn_id,
                        req,
                        _buffer: Some(buffer.clone()),
                    });
                    if p.inflight.is_empty() {
                        p.waiting_since = Some(Instant::now());
                    }
                    p.inflight.insert(frame.frame_id);
                    p.stats.frames_sent += 1;
                    if zero_copy {
                        p.stats.zero_copy += 1;
                        sent_zero_copy += 1;
                    } else {
                        p.stats.copied += 1;
                        sent_copied += 1;
                    }
                }
                Err(e) => *p.failed.borrow_mut() = Some(format!("sending a frame: {e}")),
            }
        }
        self.peers = peers;
        self.frame_header = header;
        let mut st = self.shared.status.lock().unwrap();
        st.sends_zero_copy += sent_zero_copy;
        st.sends_copied += sent_copied;
    }

    fn poll_sends(&mut self) {
        let mut failures = Vec::new();
        self.pending.retain_mut(|p| match p.req.poll() {
            None => true,
            Some(Ok(())) => false,
            Some(Err(e)) => {
                failures.push((p.conn_id, e.to_string()));
                false
            }
        });
        for (conn_id, e) in failures {
            if let Some(i) = self.peer_index(conn_id) {
                let mut f = self.peers[i].failed.borrow_mut();
                if f.is_none() {
                    *f = Some(e);
                }
            }
        }
        let now = Instant::now();
        self.closing.retain_mut(|c| {
            now < c.until
                && c.req.as_mut().is_some_and(|r| !r.is_complete())
                && c.ep.error().is_none()
        });
        if self.eos {
            let flushed = !self
                .pending
                .iter()
                .any(|p| self.peer_index(p.conn_id).is_some());
            let mut st = self.shared.status.lock().unwrap();
            if flushed && !st.eos_flushed {
                st.eos_flushed = true;
                self.shared.cond.notify_all();
            }
        }
    }

    fn check_peers(&mut self) {
        let now = Instant::now();
        let peers = std::mem::take(&mut self.peers);
        for p in peers {
            let failed = p
                .failed
                .borrow()
                .clone()
                .or_else(|| p.ep.error().map(|s| s.to_string()));
            if let Some(e) = failed {
                if !p.ready && self.cfg.mode == Mode::Client {
                    self.connect_failed(e);
                    drop(p);
                    continue;
                }
                // A receiver that leaves closes its endpoint: UCX reports a reset.
                let left = e.contains("reset by remote peer");
                self.drop_peer(p, &format!("connection ended: {e}"), !left);
                continue;
            }
            if !p.ready && now.duration_since(p.since) > HANDSHAKE_TIMEOUT {
                self.drop_peer(
                    p,
                    &format!("no HELLO within {} s", HANDSHAKE_TIMEOUT.as_secs()),
                    true,
                );
                continue;
            }
            if let (Some(limit), Some(since)) = (self.cfg.client_timeout, p.waiting_since) {
                if p.ready && now.duration_since(since) > limit {
                    let reason = format!(
                        "stalled: it holds {} frames and released none for {} ms (client-timeout {} ms)",
                        p.inflight.len(),
                        now.duration_since(since).as_millis(),
                        limit.as_millis()
                    );
                    self.shared.status.lock().unwrap().clients_timed_out += 1;
                    self.close_peer(p, &format!("dropping the receiver at {{}}: {reason}"), true);
                    continue;
                }
            }
            self.peers.push(p);
        }
    }

    /// Drops a receiver at once (it left or its connection broke).
    fn drop_peer(&mut self, p: Peer, reason: &str, warn: bool) {
        let text = format!("receiver {} at {}: {reason}", p.conn_id, p.addr);
        if warn {
            self.warn(&text);
        } else {
            gst::info!(CAT, "{}", text);
        }
        let was_ready = p.ready;
        drop(p);
        self.retry_at = Instant::now() + RETRY_INTERVAL;
        if was_ready {
            self.notify_clients();
        }
    }

    /// Tells a receiver why it is dropped (DISCONNECT, or REFUSE already queued) and closes
    /// it once that went out, or after a second. `what` has `{}` for its address.
    fn close_peer(&mut self, p: Peer, what: &str, warn: bool) {
        let text = what.replace("{}", &p.addr);
        if warn {
            self.warn(&text);
        }
        let req = if p.ready {
            p.ep.am_send(
                AM_CTRL,
                &ucxwire::conn_header(p.conn_id),
                ucx::Payload::Bytes(ucxwire::encode_ctrl(&Message::Disconnect {
                    reason: text.clone(),
                })),
                ucx::Proto::Eager,
            )
            .ok()
        } else {
            p.ep.flush().ok()
        };
        let was_ready = p.ready;
        self.retry_at = Instant::now() + RETRY_INTERVAL;
        self.closing.push(Closing {
            ep: p.ep,
            req,
            until: Instant::now() + Duration::from_secs(1),
        });
        if was_ready {
            self.notify_clients();
        }
    }

    fn publish(&mut self) {
        let mut st = self.shared.status.lock().unwrap();
        st.clients = self
            .peers
            .iter()
            .filter(|p| p.ready)
            .map(|p| ClientStats {
                frames_in_flight: p.inflight.len() as u32,
                max_inflight: p.granted,
                ..p.stats.clone()
            })
            .collect();
        st.registered_memories = self.regions.len() as u32;
        st.room = self.room();
        self.shared.room_cond.notify_all();
    }

    /// Frames the roomiest ready receiver can still take in its grant (u32::MAX: none is ready).
    fn room(&self) -> u32 {
        self.peers
            .iter()
            .filter(|p| p.ready)
            .map(|p| p.granted.saturating_sub(p.inflight.len() as u32))
            .max()
            .unwrap_or(u32::MAX)
    }

    fn shutdown(&mut self) {
        let deadline = Instant::now() + SHUTDOWN_LIMIT;
        // No new receivers first (a listener destroyed while a connection request is on its
        // way in crashed UCX 1.13: docs/ucx.md).
        self.conns.borrow_mut().clear();
        self.listener = None;
        // Let frames in flight reach the receivers (rendezvous needs them to pull).
        while !self.pending.is_empty() && Instant::now() < deadline {
            self.poll_sends();
            if self.pending.is_empty() {
                break;
            }
            ucxio::sleep(&self.worker, &self.shared.waker, Duration::from_millis(5));
        }
        for p in std::mem::take(&mut self.peers) {
            let left = deadline.saturating_duration_since(Instant::now());
            if p.ep.error().is_none() && !left.is_zero() {
                let _ = p.ep.close(left.min(Duration::from_millis(500)));
            }
        }
        self.closing.clear();
        self.pending.clear();
        self.conns.borrow_mut().clear();
        self.publish();
    }
}

enum Out {
    Bytes(Vec<u8>),
    Region(ucx::RegionSlice),
}
