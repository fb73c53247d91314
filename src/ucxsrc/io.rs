//! The I/O thread of `ucxsrc`: owns UCX (context, worker, listener or outgoing endpoint),
//! does the handshake and clock measurement, and receives frames into the element's own
//! pool of memfd memory.
//!
//! A frame's bytes land in a buffer of a memfd pool ([`BackendBufferPool`] over memfd): by
//! rendezvous straight into that memory (registered once per memory, [`Regions`]), or, for
//! a small eager frame, copied from UCX's receive buffer. The pushed buffer's memory is a
//! memfd GstFdMemory that a bufsharesink downstream shares by fd as it is.
//!
//! Messages reach the element in the order they were sent: a frame still being pulled
//! holds back the CAPS or EOS sent after it ([`Slot`] queue). The element acknowledges each
//! frame (RELEASE) once it handed it downstream or dropped it; the I/O thread sends those.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bufshare_backends::memfd::MemfdBackend;
use gst::glib;
use gst::prelude::*;

use crate::clock::monotonic_now;
use crate::pool::BackendBufferPool;
use crate::protocol::{self, Message, Role};
use crate::transport::unix::Waker;
use crate::ucxio::{self, FreedQueue, Mode, Regions};
use crate::ucxwatch;
use crate::ucxwire::{self, AllowList, ClockSync, AM_CTRL, AM_FRAME, AM_TIME};

use super::imp::CAT;

/// Client mode: time between connection attempts after the first.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(500);
/// TIME exchanges per connection (the shortest round trip wins).
const TIME_SAMPLES: u32 = 5;

#[derive(Debug, Clone)]
pub struct Config {
    pub address: SocketAddr,
    pub mode: Mode,
    pub transports: String,
    pub allowed: AllowList,
    /// How long a connection attempt may take until the sender's HELLO.
    pub timeout: Duration,
    /// Frames asked for (0: the sender's default).
    pub max_inflight: u32,
}

/// What the element gets, in order.
pub enum Item {
    /// A sender completed the handshake (a new connection: ids start again).
    Connected {
        peer: String,
    },
    Caps {
        caps: String,
        latency: u64,
    },
    Frame {
        conn: u64,
        frame: protocol::Frame,
        buffer: gst::Buffer,
        /// The sender's CLOCK_MONOTONIC minus ours.
        clock: ClockSync,
    },
    Eos,
    /// The sender went away (or could not be reached); `on-disconnect` applies.
    Gone(String),
    /// The sender refused us, speaks another version or broke the protocol.
    Fatal(String),
}

#[derive(Debug, Clone, Default)]
pub struct Status {
    pub connected: bool,
    /// Why the last connection attempt failed.
    pub last_error: Option<String>,
    pub connections: u64,
    pub clock_offset: i64,
    pub rtt: u64,
    pub frames_received: u64,
    pub frames_rendezvous: u64,
    pub registered_memories: u32,
    /// Frames received or being received, not yet taken by the streaming thread.
    pub frames_queued: u32,
}

pub struct Shared {
    pub items: Mutex<VecDeque<Item>>,
    pub cond: Condvar,
    acks: Mutex<Vec<(u64, u64)>>,
    waker: Arc<Waker>,
    quit: AtomicBool,
    pub status: Mutex<Status>,
    /// Signalled when `status` changes (start waits on it).
    pub status_cond: Condvar,
}

impl Shared {
    /// Frame `frame_id` of connection `conn` is done with: released to the sender.
    pub fn ack(&self, conn: u64, frame_id: u64) {
        self.acks.lock().unwrap().push((conn, frame_id));
        self.waker.wake();
    }

    /// Wakes whoever waits for items (unlock).
    pub fn interrupt(&self) {
        let _g = self.items.lock().unwrap();
        self.cond.notify_all();
    }
}

pub struct Receiver {
    pub shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// Starts the I/O thread; returns once it listens (server) or has its context (client).
    pub fn start(cfg: Config, element: glib::WeakRef<gst::Element>) -> Result<Receiver, String> {
        let waker = Arc::new(Waker::new().map_err(|e| format!("eventfd: {e}"))?);
        let shared = Arc::new(Shared {
            items: Mutex::new(VecDeque::new()),
            cond: Condvar::new(),
            acks: Mutex::new(Vec::new()),
            waker,
            quit: AtomicBool::new(false),
            status: Mutex::new(Status::default()),
            status_cond: Condvar::new(),
        });
        let sh = shared.clone();
        let thread = crate::ucxio::spawn_io_thread(
            "ucxsrc-io",
            move || Io::new(cfg, sh, element),
            |mut io| io.run(),
        )?;
        Ok(Receiver {
            shared,
            thread: Some(thread),
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        self.shared.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Data {
    Eager(Vec<u8>),
    Rndv(ucx::RndvData),
}

enum AmIn {
    Ctrl(Vec<u8>, Vec<u8>),
    Time(Vec<u8>, Vec<u8>),
    Frame(Vec<u8>, Data, usize),
}

/// A message on its way to the element, in arrival order.
enum Slot {
    Ready(Item),
    Receiving {
        req: ucx::Request,
        buffer: gst::Buffer,
        frame: protocol::Frame,
        conn: u64,
    },
}

struct Conn {
    /// Our number for this connection (acks name it).
    local: u64,
    ep: ucx::Endpoint,
    peer: String,
    failed: Rc<RefCell<Option<String>>>,
    /// The sender's id for us, from its HELLO.
    conn_id: Option<u64>,
    since: Instant,
    sync: ClockSync,
    time_asked: u32,
}

/// Field order is drop order: operations and endpoints, then the worker, then registrations.
struct Io {
    order: VecDeque<Slot>,
    sends: Vec<ucx::Request>,
    conn: Option<Conn>,
    /// Kept for its connection requests (`conns`).
    _listener: Option<ucx::Listener>,
    conns: Rc<RefCell<VecDeque<ucx::ConnRequest>>>,
    am_in: Rc<RefCell<VecDeque<AmIn>>>,
    worker: ucx::Worker,
    ctx: ucx::Context,
    cfg: Config,
    shared: Arc<Shared>,
    next_local: u64,
    retry_at: Instant,
    /// A fatal error was reported: no more connections.
    dead: bool,
    pool: Option<(BackendBufferPool, usize)>,
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
        let ctx = ucxio::context("ucxsrc", &cfg.transports)
            .map_err(|e| format!("UCX context (transports '{}'): {e}", cfg.transports))?;
        let worker = ucx::Worker::new(&ctx).map_err(|e| format!("UCX worker: {e}"))?;
        let am_in: Rc<RefCell<VecDeque<AmIn>>> = Rc::default();
        for id in [AM_CTRL, AM_TIME, AM_FRAME] {
            let q = am_in.clone();
            worker
                .set_am_handler(id, move |m| {
                    let h = m.header().to_vec();
                    let item = match id {
                        AM_FRAME => {
                            let len = m.data_len();
                            let data = match m.take_rndv() {
                                Some(r) => Data::Rndv(r),
                                None => {
                                    Data::Eager(m.data().map(<[u8]>::to_vec).unwrap_or_default())
                                }
                            };
                            AmIn::Frame(h, data, len)
                        }
                        AM_TIME => AmIn::Time(h, m.data().map(<[u8]>::to_vec).unwrap_or_default()),
                        _ => AmIn::Ctrl(h, m.data().map(<[u8]>::to_vec).unwrap_or_default()),
                    };
                    q.borrow_mut().push_back(item);
                })
                .map_err(|e| format!("UCX AM handler: {e}"))?;
        }
        let conns: Rc<RefCell<VecDeque<ucx::ConnRequest>>> = Rc::default();
        // Registered before binding: UCX logs why a bind failed.
        let mut watch = ucxwatch::watch(element, *CAT);
        let listener = match cfg.mode {
            Mode::Server => {
                let c = conns.clone();
                let l =
                    ucx::Listener::bind(&worker, cfg.address, move |r| c.borrow_mut().push_back(r))
                        .map_err(|e| format!("cannot listen on {}: {e}", cfg.address))?;
                watch.listening(l.local_addr().unwrap_or(cfg.address));
                Some(l)
            }
            Mode::Client => None,
        };
        let regions = Regions::new(FreedQueue::new(shared.waker.clone()));
        Ok(Io {
            order: VecDeque::new(),
            sends: Vec::new(),
            conn: None,
            _listener: listener,
            conns,
            am_in,
            worker,
            ctx,
            cfg,
            shared,
            next_local: 1,
            retry_at: Instant::now(),
            dead: false,
            pool: None,
            watch,
            regions,
        })
    }

    fn run(&mut self) {
        while !self.shared.quit.load(Ordering::SeqCst) {
            while self.worker.progress() > 0 {}
            self.regions.reap();
            self.accept();
            self.connect_out();
            self.handle_am();
            self.send_acks();
            self.deliver();
            self.check_conn();
            self.watch.poll();
            self.sends.retain_mut(|r| !r.is_complete());
            let busy = self
                .order
                .iter()
                .any(|s| matches!(s, Slot::Receiving { .. }));
            let timeout = Duration::from_millis(if busy { 2 } else { 100 });
            ucxio::sleep(&self.worker, &self.shared.waker, timeout);
        }
        // No new connections first, and let UCX finish those on their way in: destroying
        // a listener while a connection request is in flight crashed UCX 1.13 (docs/ucx.md).
        self.conns.borrow_mut().clear();
        self._listener = None;
        let _ = self.worker.wait_until(Duration::from_millis(100), || false);
        self.conns.borrow_mut().clear();
        if let Some(c) = self.conn.take() {
            if c.ep.error().is_none() {
                let _ = c.ep.close(Duration::from_millis(500));
            }
        }
        self.order.clear();
        self.sends.clear();
        if let Some((pool, _)) = self.pool.take() {
            let _ = pool.set_active(false);
        }
    }

    fn push(&mut self, item: Item) {
        self.order.push_back(Slot::Ready(item));
    }

    fn accept(&mut self) {
        loop {
            let Some(req) = self.conns.borrow_mut().pop_front() else {
                return;
            };
            let peer = req.peer_addr();
            self.watch.handshake(peer);
            let who = peer.map_or("an unknown address".into(), |a| a.to_string());
            if !self.cfg.allowed.allows(peer.map(|a| a.ip())) {
                gst::warning!(CAT, "refused a connection from {who}: not in allowed-hosts");
                req.reject();
                continue;
            }
            if self.conn.is_some() || self.dead {
                gst::warning!(
                    CAT,
                    "refused a connection from {who}: already receiving from a sender"
                );
                req.reject();
                continue;
            }
            let failed: Rc<RefCell<Option<String>>> = Rc::default();
            let f = failed.clone();
            match req.accept(move |e| *f.borrow_mut() = Some(e.to_string())) {
                Ok(ep) => self.new_conn(ep, who, failed),
                Err(e) => gst::warning!(CAT, "cannot accept {who}: {e}"),
            }
        }
    }

    fn connect_out(&mut self) {
        if self.cfg.mode != Mode::Client || self.conn.is_some() || self.dead {
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
                let peer = self.cfg.address.to_string();
                self.new_conn(ep, peer, failed)
            }
            Err(e) => self.attempt_failed(e.to_string()),
        }
    }

    fn new_conn(&mut self, ep: ucx::Endpoint, peer: String, failed: Rc<RefCell<Option<String>>>) {
        let local = self.next_local;
        self.next_local += 1;
        gst::debug!(CAT, "connection {local} with {peer}");
        self.conn = Some(Conn {
            local,
            ep,
            peer,
            failed,
            conn_id: None,
            since: Instant::now(),
            sync: ClockSync::default(),
            time_asked: 0,
        });
    }

    fn attempt_failed(&mut self, e: String) {
        gst::debug!(CAT, "connection attempt: {e}");
        self.shared.status.lock().unwrap().last_error = Some(e);
        self.shared.status_cond.notify_all();
    }

    fn send(&mut self, id: u16, payload: Vec<u8>) {
        let Some(c) = &self.conn else { return };
        let Some(conn_id) = c.conn_id else { return };
        match c.ep.am_send(
            id,
            &ucxwire::conn_header(conn_id),
            ucx::Payload::Bytes(payload),
            ucx::Proto::Eager,
        ) {
            Ok(r) => self.sends.push(r),
            Err(e) => *c.failed.borrow_mut() = Some(e.to_string()),
        }
    }

    fn ask_time(&mut self) {
        if let Some(c) = &mut self.conn {
            c.time_asked += 1;
        }
        self.send(AM_TIME, ucxwire::encode_time(monotonic_now(), 0));
    }

    /// Ends the connection with a fatal error (no reconnect).
    fn fatal(&mut self, e: String) {
        gst::warning!(CAT, "{e}");
        self.dead = true;
        self.conn = None;
        self.push(Item::Fatal(e.clone()));
        let mut st = self.shared.status.lock().unwrap();
        st.connected = false;
        st.last_error = Some(e);
        self.shared.status_cond.notify_all();
    }

    fn handle_am(&mut self) {
        loop {
            let Some(m) = self.am_in.borrow_mut().pop_front() else {
                return;
            };
            match m {
                AmIn::Ctrl(h, d) => match ucxwire::decode_ctrl(&h, &d) {
                    Ok((id, msg)) => self.on_ctrl(id, msg),
                    Err(e) => self.fatal(format!("protocol error from the sender: {e}")),
                },
                AmIn::Time(h, d) => {
                    let now = monotonic_now();
                    let (Ok((id, _)), Ok((asked, sender))) =
                        (ucxwire::split_header(&h), ucxwire::decode_time(&d))
                    else {
                        continue;
                    };
                    let Some(c) = &mut self.conn else { continue };
                    if c.conn_id != Some(id) {
                        continue;
                    }
                    c.sync.add(asked, sender, now);
                    let more = c.time_asked < TIME_SAMPLES;
                    let mut st = self.shared.status.lock().unwrap();
                    st.clock_offset = c.sync.offset() as i64;
                    st.rtt = c.sync.rtt().unwrap_or(0);
                    drop(st);
                    if more {
                        self.ask_time();
                    } else {
                        gst::info!(
                            CAT,
                            "clock offset to the sender {} ns (round trip {} ns)",
                            c.sync.offset(),
                            c.sync.rtt().unwrap_or(0)
                        );
                    }
                }
                AmIn::Frame(h, data, len) => self.on_frame(h, data, len),
            }
        }
    }

    fn on_ctrl(&mut self, id: u64, msg: Message) {
        let Some(c) = &self.conn else { return };
        let (conn_id, peer, local) = (c.conn_id, c.peer.clone(), c.local);
        match (conn_id, msg) {
            (None, Message::Hello(h)) => {
                if let Err(e) = ucxwire::check_producer_hello(&h) {
                    self.fatal(format!("sender at {peer}: {e}"));
                    return;
                }
                if let Some(c) = &mut self.conn {
                    c.conn_id = Some(id);
                }
                self.send(
                    AM_CTRL,
                    ucxwire::encode_ctrl(&ucxwire::hello(Role::Consumer)),
                );
                let frames = self.cfg.max_inflight;
                self.send(
                    AM_CTRL,
                    ucxwire::encode_ctrl(&Message::MaxInflight { frames }),
                );
                self.ask_time();
                gst::info!(CAT, "connection {local}: sender at {peer} said HELLO");
                {
                    let mut st = self.shared.status.lock().unwrap();
                    st.connected = true;
                    st.connections += 1;
                    st.last_error = None;
                }
                self.shared.status_cond.notify_all();
                self.push(Item::Connected { peer });
            }
            (None, Message::Refuse { reason }) => {
                self.fatal(format!("refused by the sender at {peer}: {reason}"));
            }
            (Some(cid), msg) if cid == id => match msg {
                Message::Caps { caps, latency } => self.push(Item::Caps { caps, latency }),
                Message::Eos => self.push(Item::Eos),
                Message::MaxInflight { frames } => {
                    gst::debug!(CAT, "the sender grants {frames} frames in flight")
                }
                Message::Disconnect { reason } => {
                    self.conn = None;
                    self.gone(format!("disconnected by the sender at {peer}: {reason}"));
                }
                other => {
                    self.fatal(format!(
                        "protocol error: the sender at {peer} sent {}",
                        other.name()
                    ));
                }
            },
            (Some(_), _) => gst::debug!(CAT, "message for another connection ({id})"),
            (None, other) => {
                self.fatal(format!(
                    "protocol error: the sender at {peer} sent {} before HELLO",
                    other.name()
                ));
            }
        }
    }

    fn gone(&mut self, e: String) {
        gst::info!(CAT, "{e}");
        self.push(Item::Gone(e.clone()));
        let mut st = self.shared.status.lock().unwrap();
        st.connected = false;
        st.last_error = Some(e);
        self.shared.status_cond.notify_all();
        self.retry_at = Instant::now() + RETRY_INTERVAL;
    }

    /// A pool buffer of at least `len` bytes.
    fn buffer(&mut self, len: usize) -> Result<gst::Buffer, String> {
        if self.pool.as_ref().is_none_or(|(_, size)| *size < len) {
            if let Some((old, _)) = self.pool.take() {
                let _ = old.set_active(false);
            }
            let pool = BackendBufferPool::configured(
                Arc::new(MemfdBackend::new()),
                None,
                len as u32,
                0,
                0,
            )?;
            pool.set_active(true)
                .map_err(|e| format!("activating the receive pool: {e}"))?;
            gst::debug!(CAT, "receive pool of {len}-byte memfd buffers");
            self.pool = Some((pool, len));
        }
        let (pool, _) = self.pool.as_ref().expect("set above");
        let mut b = pool
            .acquire_buffer(None)
            .map_err(|e| format!("no buffer from the receive pool: {e:?}"))?;
        b.get_mut().expect("fresh buffer").set_size(len);
        Ok(b)
    }

    fn on_frame(&mut self, h: Vec<u8>, data: Data, len: usize) {
        let Some(c) = &self.conn else { return };
        let (local, conn_id, sync) = (c.local, c.conn_id, c.sync);
        let (id, frame) = match ucxwire::decode_frame(&h, len) {
            Ok(x) => x,
            Err(e) => {
                self.fatal(format!("protocol error from the sender: {e}"));
                return;
            }
        };
        if conn_id != Some(id) {
            return;
        }
        let frame_id = frame.frame_id;
        if len == 0 {
            let buffer = gst::Buffer::new();
            let clock = sync;
            self.push(Item::Frame {
                conn: local,
                frame,
                buffer,
                clock,
            });
            return;
        }
        let mut buffer = match self.buffer(len) {
            Ok(b) => b,
            Err(e) => {
                gst::warning!(CAT, "frame {frame_id} dropped: {e}");
                self.shared.ack(local, frame_id);
                return;
            }
        };
        match data {
            Data::Eager(bytes) => {
                {
                    let b = buffer.get_mut().expect("fresh buffer");
                    let Ok(mut map) = b.map_writable() else {
                        self.shared.ack(local, frame_id);
                        return;
                    };
                    map.copy_from_slice(&bytes);
                }
                let clock = sync;
                self.shared.status.lock().unwrap().frames_received += 1;
                self.push(Item::Frame {
                    conn: local,
                    frame,
                    buffer,
                    clock,
                });
            }
            Data::Rndv(r) => {
                let mut why = String::new();
                let slice = self
                    .regions
                    .slice(&self.ctx, buffer.peek_memory(0), &mut why);
                let Some(slice) = slice else {
                    gst::warning!(
                        CAT,
                        "frame {frame_id} dropped: cannot register its memory: {why}"
                    );
                    drop(r);
                    self.shared.ack(local, frame_id);
                    return;
                };
                let dest = slice.region.slice(slice.offset..slice.offset + len);
                match self.worker.am_recv(r, dest) {
                    Ok(req) => self.order.push_back(Slot::Receiving {
                        req,
                        buffer,
                        frame,
                        conn: local,
                    }),
                    Err(e) => {
                        gst::warning!(CAT, "frame {frame_id}: receive failed: {e}");
                        self.shared.ack(local, frame_id);
                    }
                }
            }
        }
    }

    fn send_acks(&mut self) {
        let acks = std::mem::take(&mut *self.shared.acks.lock().unwrap());
        let Some(c) = &self.conn else { return };
        let local = c.local;
        let ids: Vec<u64> = acks
            .into_iter()
            .filter(|(conn, _)| *conn == local)
            .map(|(_, id)| id)
            .collect();
        for chunk in ids.chunks(protocol::MAX_RELEASE_IDS) {
            let msg = Message::Release {
                frame_ids: chunk.to_vec(),
            };
            self.send(AM_CTRL, ucxwire::encode_ctrl(&msg));
        }
    }

    /// Hands the element what is ready, in order.
    fn deliver(&mut self) {
        let mut out = Vec::new();
        while let Some(front) = self.order.front_mut() {
            match front {
                Slot::Ready(_) => {}
                Slot::Receiving { req, .. } => match req.poll() {
                    None => break,
                    Some(Ok(())) => {}
                    Some(Err(e)) => {
                        gst::debug!(CAT, "a frame's receive failed: {e}");
                        self.order.pop_front();
                        continue;
                    }
                },
            }
            match self.order.pop_front().expect("front") {
                Slot::Ready(item) => out.push(item),
                Slot::Receiving {
                    buffer,
                    frame,
                    conn,
                    ..
                } => {
                    let clock = self.conn.as_ref().map(|c| c.sync).unwrap_or_default();
                    let mut st = self.shared.status.lock().unwrap();
                    st.frames_received += 1;
                    st.frames_rendezvous += 1;
                    drop(st);
                    out.push(Item::Frame {
                        conn,
                        frame,
                        buffer,
                        clock,
                    });
                }
            }
        }
        let waiting = {
            let mut items = self.shared.items.lock().unwrap();
            if !out.is_empty() {
                items.extend(out);
                self.shared.cond.notify_all();
            }
            items
                .iter()
                .filter(|i| matches!(i, Item::Frame { .. }))
                .count()
        };
        let mut st = self.shared.status.lock().unwrap();
        st.registered_memories = self.regions.len() as u32;
        st.frames_queued = (self.order.len() + waiting) as u32;
    }

    fn check_conn(&mut self) {
        let Some(c) = &self.conn else { return };
        let failed = c
            .failed
            .borrow()
            .clone()
            .or_else(|| c.ep.error().map(|s| s.to_string()));
        let ready = c.conn_id.is_some();
        let peer = c.peer.clone();
        if let Some(e) = failed {
            self.conn = None;
            if ready {
                self.gone(format!("the sender at {peer} went away ({e})"));
            } else {
                self.attempt_failed(format!("cannot connect to {peer}: {e}"));
            }
            return;
        }
        if !ready && c.since.elapsed() > self.cfg.timeout {
            self.conn = None;
            self.attempt_failed(format!(
                "no sender answered at {peer} within {} ms",
                self.cfg.timeout.as_millis()
            ));
        }
    }
}
