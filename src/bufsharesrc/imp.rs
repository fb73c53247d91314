//! The bufsharesrc element: settings, start (connect + caps), create (one
//! frame), negotiation from the producer's caps, latency, unlock, and what
//! happens when the producer goes away (`on-disconnect`: error, EOS, or wait
//! for a new producer on the same path and go on with its caps).

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::base_src::CreateSuccess;
use gst_base::subclass::prelude::*;

use super::receiver::{Attempt, Connection, Incoming, ReceiveError};
use super::stale::StaleFilter;
use crate::clock::TimeMapCache;
use crate::protocol;
use crate::transport::unix::{wait, Waker};

pub(crate) static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "bufsharesrc",
        gst::DebugColorFlags::empty(),
        Some("bufshare consumer: receives frames from a bufsharesink"),
    )
});

const DEFAULT_TIMEOUT_MS: u64 = 1000;
const DEFAULT_RECONNECT_INTERVAL_MS: u64 = 100;

/// What the element does when its producer goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstBufShareSrcOnDisconnect")]
pub enum OnDisconnect {
    #[default]
    #[enum_value(
        name = "Fail with an error naming the socket (the producer went away)",
        nick = "error"
    )]
    Error,
    #[enum_value(name = "End the stream: push EOS downstream", nick = "eos")]
    Eos,
    #[enum_value(
        name = "Post a warning, wait for a new producer on the same path and go on with its caps",
        nick = "reconnect"
    )]
    Reconnect,
}

#[derive(Debug, Clone)]
struct Settings {
    socket: Option<String>,
    timeout_ms: u64,
    on_disconnect: OnDisconnect,
    reconnect_interval_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            socket: None,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            on_disconnect: OnDisconnect::default(),
            reconnect_interval_ms: DEFAULT_RECONNECT_INTERVAL_MS,
        }
    }
}

/// The current connection, if any, and where it stands. Held by `create`.
#[derive(Default)]
struct Link {
    connection: Option<Connection>,
    /// Connected, but the producer's caps have not come yet.
    awaiting_caps: bool,
    /// The next buffer is the first of a new connection: mark it DISCONT.
    fresh: bool,
}

/// What the producer said about the stream. Its own lock: queries (caps,
/// latency) must never wait behind `create`, which blocks for frames.
#[derive(Default)]
struct Stream {
    caps: Option<gst::Caps>,
    /// Caps received but not yet set on the pad (set before the next buffer).
    pending_caps: Option<gst::Caps>,
    latency: u64,
}

pub struct BufShareSrc {
    settings: Mutex<Settings>,
    /// The connection; held by `create` while it waits for the producer.
    link: Mutex<Link>,
    /// Connections made since start (read by the `reconnects` property
    /// without waiting for `create`).
    connections: AtomicU64,
    connected: AtomicBool,
    stream: Mutex<Stream>,
    time_map: Mutex<TimeMapCache>,
    waker: Arc<Waker>,
    flushing: AtomicBool,
    /// Frames left in the socket during a stall are released unseen.
    stale: Mutex<StaleFilter>,
}

impl Default for BufShareSrc {
    fn default() -> Self {
        BufShareSrc {
            settings: Mutex::new(Settings::default()),
            link: Mutex::new(Link::default()),
            connections: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            stream: Mutex::new(Stream::default()),
            time_map: Mutex::new(TimeMapCache::default()),
            stale: Mutex::new(StaleFilter::default()),
            waker: Arc::new(Waker::new().expect("eventfd")),
            flushing: AtomicBool::new(false),
        }
    }
}

#[glib::object_subclass]
impl ObjectSubclass for BufShareSrc {
    const NAME: &'static str = "GstBufShareSrc";
    type Type = super::BufShareSrc;
    type ParentType = gst_base::PushSrc;
}

impl ObjectImpl for BufShareSrc {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPS: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("socket")
                    .nick("Socket path")
                    .blurb("Path of the UNIX socket a bufsharesink serves on (required)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt64::builder("timeout")
                    .nick("Timeout (ms)")
                    .blurb("Milliseconds that start (READY to PAUSED) waits in total for a producer to appear on the socket, complete the handshake and send its caps; past it the element fails with an error saying which of these it was waiting for. It does not bound the wait for frames once streaming. With on-disconnect=reconnect, start does not wait and this bounds each handshake instead.")
                    .default_value(DEFAULT_TIMEOUT_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder::<OnDisconnect>("on-disconnect")
                    .nick("On disconnect")
                    .blurb("What to do when the producer goes away (closes the socket or dies): error = fail with an error naming the socket; eos = push EOS downstream; reconnect = post a warning, keep the pipeline running, poll for a new producer on the same path every reconnect-interval and go on with its caps (the first buffer after it is marked DISCONT). With reconnect, the element also starts without a producer and waits for one. The producer's own EOS is always forwarded as EOS. A producer that breaks the protocol or refuses us is an error in every mode.")
                    .default_value(OnDisconnect::default())
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt64::builder("reconnect-interval")
                    .nick("Reconnect interval (ms)")
                    .blurb("With on-disconnect=reconnect: milliseconds between attempts to connect while no producer listens on the socket")
                    .minimum(1)
                    .maximum(3_600_000)
                    .default_value(DEFAULT_RECONNECT_INTERVAL_MS)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt64::builder("reconnects")
                    .nick("Reconnects")
                    .blurb("Connections to a producer made since start, after the first one (producer restarts survived)")
                    .read_only()
                    .build(),
                glib::ParamSpecBoolean::builder("connected")
                    .nick("Connected")
                    .blurb("Whether a producer is connected now")
                    .read_only()
                    .build(),
            ]
        });
        PROPS.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = self.settings.lock().unwrap();
        match pspec.name() {
            "socket" => s.socket = value.get().expect("type checked upstream"),
            "timeout" => s.timeout_ms = value.get().expect("type checked upstream"),
            "on-disconnect" => s.on_disconnect = value.get().expect("type checked upstream"),
            "reconnect-interval" => {
                s.reconnect_interval_ms = value.get().expect("type checked upstream")
            }
            other => unreachable!("unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = self.settings.lock().unwrap();
        match pspec.name() {
            "socket" => s.socket.to_value(),
            "timeout" => s.timeout_ms.to_value(),
            "on-disconnect" => s.on_disconnect.to_value(),
            "reconnect-interval" => s.reconnect_interval_ms.to_value(),
            "reconnects" => self
                .connections
                .load(Ordering::SeqCst)
                .saturating_sub(1)
                .to_value(),
            "connected" => self.connected.load(Ordering::SeqCst).to_value(),
            other => unreachable!("unknown property {other}"),
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        obj.set_live(true);
        obj.set_format(gst::Format::Time);
    }
}

impl GstObjectImpl for BufShareSrc {}

impl ElementImpl for BufShareSrc {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "bufshare source",
                "Source/Network",
                "Receives buffers from a bufsharesink in another process over a UNIX socket, by fd, without copying",
                "bufshare developers",
            )
        });
        Some(&*META)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            vec![gst::PadTemplate::new(
                "src",
                gst::PadDirection::Src,
                gst::PadPresence::Always,
                &gst::Caps::new_any(),
            )
            .unwrap()]
        });
        TEMPLATES.as_ref()
    }
}

impl BufShareSrc {
    fn is_flushing(&self) -> bool {
        self.flushing.load(Ordering::SeqCst)
    }

    fn parse_caps(&self, caps: &str) -> Result<gst::Caps, ReceiveError> {
        caps.parse::<gst::Caps>().map_err(|_| {
            ReceiveError::Protocol(format!("unparsable caps from the producer: {caps}"))
        })
    }

    fn error_for(&self, e: &ReceiveError, socket: &str) -> gst::ErrorMessage {
        match e {
            ReceiveError::Timeout(_) => {
                gst::error_msg!(gst::ResourceError::OpenRead, ("Socket {}: {}", socket, e))
            }
            ReceiveError::ProducerGone => gst::error_msg!(
                gst::ResourceError::Read,
                ("Socket {}: the producer went away", socket)
            ),
            ReceiveError::Refused(_) => {
                gst::error_msg!(gst::ResourceError::OpenRead, ("Socket {}: {}", socket, e))
            }
            ReceiveError::Protocol(_) => {
                gst::error_msg!(gst::StreamError::Decode, ("Socket {}: {}", socket, e))
            }
            ReceiveError::Io(_) => {
                gst::error_msg!(gst::ResourceError::Read, ("Socket {}: {}", socket, e))
            }
            ReceiveError::Flushing => gst::error_msg!(
                gst::CoreError::StateChange,
                ("Socket {}: interrupted", socket)
            ),
        }
    }

    /// Reconnect mode, while no producer is connected: tries to connect
    /// every `reconnect-interval` until a producer answers the handshake.
    /// Returns at once when flushing (unlock), and with an error only for a
    /// producer that refuses us or breaks the protocol, or a path that cannot
    /// be a producer's socket.
    fn wait_for_producer(&self, link: &mut Link) -> Result<(), gst::FlowError> {
        let settings = self.settings.lock().unwrap().clone();
        let socket = settings.socket.clone().unwrap_or_default();
        let path = PathBuf::from(&socket);
        let flushing = || self.is_flushing();
        let first = self.connections.load(Ordering::SeqCst) == 0;
        let since = Instant::now();
        let mut announced = false;
        loop {
            if self.is_flushing() {
                return Err(gst::FlowError::Flushing);
            }
            let handshake_deadline = Instant::now() + Duration::from_millis(settings.timeout_ms);
            match Connection::try_connect(&path, handshake_deadline, self.waker.clone(), &flushing)
            {
                Ok(Attempt::Connected(conn)) => {
                    let n = self.connections.fetch_add(1, Ordering::SeqCst) + 1;
                    self.connected.store(true, Ordering::SeqCst);
                    link.connection = Some(conn);
                    link.awaiting_caps = true;
                    link.fresh = true;
                    // A new producer's frames are judged on their own lateness.
                    *self.stale.lock().unwrap() = StaleFilter::default();
                    if first {
                        gst::info!(
                            CAT,
                            imp = self,
                            "connected to {} after waiting {:?}",
                            socket,
                            since.elapsed()
                        );
                    } else {
                        gst::info!(
                            CAT,
                            imp = self,
                            "reconnected to {} (connection {}) after {:?}",
                            socket,
                            n,
                            since.elapsed()
                        );
                        gst::element_imp_info!(
                            self,
                            gst::ResourceError::Read,
                            ("Socket {}: reconnected to a new producer", socket)
                        );
                    }
                    return Ok(());
                }
                Ok(Attempt::NoProducer(e)) => {
                    if !announced {
                        gst::info!(CAT, imp = self, "no producer on {} yet ({})", socket, e);
                        announced = true;
                    }
                }
                Err(ReceiveError::Flushing) => return Err(gst::FlowError::Flushing),
                // A producer going away again, or one too slow to say HELLO: try again.
                Err(e @ (ReceiveError::ProducerGone | ReceiveError::Timeout(_))) => {
                    gst::warning!(CAT, imp = self, "connecting to {}: {}; retrying", socket, e);
                }
                Err(e) => {
                    gst::warning!(CAT, imp = self, "{}", e);
                    self.post_error_message(self.error_for(&e, &socket));
                    return Err(gst::FlowError::Error);
                }
            }
            // Sleep until the next attempt; unlock() wakes us. Wake-ups for
            // releases of an old connection's frames only shorten one sleep.
            let interval = Duration::from_millis(settings.reconnect_interval_ms);
            let waker_fd = [(self.waker.as_fd(), false)];
            if let Ok(revents) = wait(&waker_fd, Some(interval)) {
                if revents[0].contains(rustix::event::PollFlags::IN) {
                    self.waker.drain();
                }
            }
        }
    }

    /// The producer went away: error, EOS or reconnect, as `on-disconnect` says.
    fn producer_gone(&self, link: &mut Link, e: &ReceiveError) -> Result<(), gst::FlowError> {
        link.connection = None;
        self.connected.store(false, Ordering::SeqCst);
        let socket = self.socket_name();
        match self.settings.lock().unwrap().on_disconnect {
            OnDisconnect::Error => {
                gst::warning!(CAT, imp = self, "{}", e);
                self.post_error_message(self.error_for(e, &socket));
                Err(gst::FlowError::Error)
            }
            OnDisconnect::Eos => {
                gst::element_imp_warning!(
                    self,
                    gst::ResourceError::Read,
                    (
                        "Socket {}: the producer went away; ending the stream (on-disconnect=eos)",
                        socket
                    )
                );
                Err(gst::FlowError::Eos)
            }
            OnDisconnect::Reconnect => {
                gst::element_imp_warning!(
                    self,
                    gst::ResourceError::Read,
                    ("Socket {}: the producer went away; waiting for a new one (on-disconnect=reconnect)", socket)
                );
                Ok(())
            }
        }
    }

    fn socket_name(&self) -> String {
        self.settings
            .lock()
            .unwrap()
            .socket
            .clone()
            .unwrap_or_default()
    }
}

impl BaseSrcImpl for BufShareSrc {
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let settings = self.settings.lock().unwrap().clone();
        let Some(socket) = settings.socket.filter(|s| !s.is_empty()) else {
            return Err(gst::error_msg!(
                gst::ResourceError::Settings,
                ("No socket path set: set the 'socket' property to the path a bufsharesink serves on")
            ));
        };
        self.connections.store(0, Ordering::SeqCst);
        self.connected.store(false, Ordering::SeqCst);
        *self.stream.lock().unwrap() = Stream::default();
        *self.link.lock().unwrap() = Link::default();
        if settings.on_disconnect == OnDisconnect::Reconnect {
            // The producer may not exist yet: create() connects, and the caps
            // are negotiated when they come (a live source need not preroll).
            gst::info!(
                CAT,
                imp = self,
                "on-disconnect=reconnect: connecting to {} once streaming",
                socket
            );
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_millis(settings.timeout_ms);
        let flushing = || self.is_flushing();
        let result = (|| {
            let mut conn = Connection::connect(
                &PathBuf::from(&socket),
                deadline,
                self.waker.clone(),
                &flushing,
            )?;
            // The producer sends CAPS first; wait for them within the same deadline.
            match conn.next(Some(deadline), &flushing, "waiting for the producer's caps")? {
                Incoming::Caps { caps, latency } => Ok((conn, self.parse_caps(&caps)?, latency)),
                Incoming::Eos => Err(ReceiveError::Protocol(
                    "producer ended the stream before sending caps".into(),
                )),
                Incoming::Frame(..) => Err(ReceiveError::Protocol(
                    "producer sent a frame before caps".into(),
                )),
            }
        })();
        let (conn, caps, latency) = result.map_err(|e| self.error_for(&e, &socket))?;
        gst::info!(CAT, imp = self, "connected to {}, caps {}", socket, caps);
        *self.stream.lock().unwrap() = Stream {
            caps: Some(caps),
            pending_caps: None,
            latency,
        };
        self.link.lock().unwrap().connection = Some(conn);
        self.connections.store(1, Ordering::SeqCst);
        self.connected.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        *self.link.lock().unwrap() = Link::default();
        self.connected.store(false, Ordering::SeqCst);
        *self.stream.lock().unwrap() = Stream::default();
        *self.stale.lock().unwrap() = StaleFilter::default();
        Ok(())
    }

    fn caps(&self, filter: Option<&gst::Caps>) -> Option<gst::Caps> {
        let stream = self.stream.lock().unwrap();
        let caps = stream
            .pending_caps
            .clone()
            .or_else(|| stream.caps.clone())
            .unwrap_or_else(gst::Caps::new_any);
        Some(match filter {
            Some(f) => f.intersect_with_mode(&caps, gst::CapsIntersectMode::First),
            None => caps,
        })
    }

    fn query(&self, query: &mut gst::QueryRef) -> bool {
        if let gst::QueryViewMut::Latency(q) = query.view_mut() {
            let latency = gst::ClockTime::from_nseconds(self.stream.lock().unwrap().latency);
            q.set(true, latency, gst::ClockTime::NONE);
            return true;
        }
        BaseSrcImplExt::parent_query(self, query)
    }

    fn is_seekable(&self) -> bool {
        false
    }

    fn unlock(&self) -> Result<(), gst::ErrorMessage> {
        self.flushing.store(true, Ordering::SeqCst);
        self.waker.wake();
        Ok(())
    }

    fn unlock_stop(&self) -> Result<(), gst::ErrorMessage> {
        self.flushing.store(false, Ordering::SeqCst);
        Ok(())
    }
}

impl PushSrcImpl for BufShareSrc {
    fn create(
        &self,
        _buffer: Option<&mut gst::BufferRef>,
    ) -> Result<CreateSuccess, gst::FlowError> {
        loop {
            let pending = {
                let mut stream = self.stream.lock().unwrap();
                let pending = stream.pending_caps.take();
                if let Some(caps) = &pending {
                    stream.caps = Some(caps.clone());
                }
                pending
            };
            if let Some(caps) = pending {
                gst::info!(CAT, imp = self, "producer changed caps to {}", caps);
                self.obj().set_caps(&caps).map_err(|_| {
                    gst::element_imp_error!(
                        self,
                        gst::CoreError::Negotiation,
                        ("Downstream refused the producer's new caps {}", caps)
                    );
                    gst::FlowError::NotNegotiated
                })?;
                continue;
            }
            let flushing = || self.is_flushing();
            let mut link = self.link.lock().unwrap();
            if link.connection.is_none() {
                if self.settings.lock().unwrap().on_disconnect != OnDisconnect::Reconnect {
                    return Err(gst::FlowError::Flushing);
                }
                self.wait_for_producer(&mut link)?;
            }
            let conn = link.connection.as_mut().expect("connected");
            let incoming = conn.next(None, &flushing, "waiting for frames");
            match incoming {
                Ok(Incoming::Frame(..)) if link.awaiting_caps => {
                    link.connection = None;
                    self.connected.store(false, Ordering::SeqCst);
                    drop(link);
                    let e = ReceiveError::Protocol("producer sent a frame before caps".into());
                    self.post_error_message(self.error_for(&e, &self.socket_name()));
                    return Err(gst::FlowError::Error);
                }
                Ok(Incoming::Frame(buffer, frame))
                    if self
                        .stale
                        .lock()
                        .unwrap()
                        .is_stale(frame.pts, frame.duration) =>
                {
                    gst::debug!(
                        CAT,
                        imp = self,
                        "frame {} waited in the socket while we did not read: releasing it unseen",
                        frame.frame_id
                    );
                    drop(buffer);
                }
                Ok(Incoming::Frame(mut buffer, frame)) => {
                    let fresh = std::mem::take(&mut link.fresh);
                    drop(link);
                    let time_map = self.time_map.lock().unwrap().get(self.obj().upcast_ref());
                    let running = |t: u64| -> Option<gst::ClockTime> {
                        (t != protocol::NONE)
                            .then_some(time_map)
                            .flatten()
                            .map(|m| gst::ClockTime::from_nseconds(m.to_running_time(t)))
                    };
                    let b = buffer.get_mut().expect("fresh buffer");
                    b.set_pts(running(frame.pts));
                    b.set_dts(running(frame.dts));
                    b.set_duration(
                        (frame.duration != protocol::NONE)
                            .then(|| gst::ClockTime::from_nseconds(frame.duration)),
                    );
                    b.set_offset(frame.offset);
                    b.set_offset_end(frame.offset_end);
                    b.set_flags(
                        gst::BufferFlags::from_bits_truncate(frame.flags)
                            - gst::BufferFlags::TAG_MEMORY,
                    );
                    if fresh {
                        // A new producer: its stream does not follow the last one's.
                        b.set_flags(gst::BufferFlags::DISCONT);
                    }
                    for warning in crate::metas::apply(b, &frame.metas) {
                        gst::warning!(CAT, imp = self, "{}", warning);
                    }
                    return Ok(CreateSuccess::NewBuffer(buffer));
                }
                Ok(Incoming::Caps { caps, latency }) => {
                    link.awaiting_caps = false;
                    drop(link);
                    let caps = match self.parse_caps(&caps) {
                        Ok(c) => c,
                        Err(e) => {
                            let msg = self.error_for(&e, &self.socket_name());
                            self.post_error_message(msg);
                            return Err(gst::FlowError::Error);
                        }
                    };
                    let mut stream = self.stream.lock().unwrap();
                    let latency_changed = latency != stream.latency;
                    stream.latency = latency;
                    if stream.caps.as_ref() != Some(&caps) {
                        stream.pending_caps = Some(caps);
                    }
                    drop(stream);
                    if latency_changed {
                        let _ = self.obj().post_message(
                            gst::message::Latency::builder().src(&*self.obj()).build(),
                        );
                    }
                }
                Ok(Incoming::Eos) => {
                    gst::info!(CAT, imp = self, "producer sent EOS");
                    return Err(gst::FlowError::Eos);
                }
                Err(ReceiveError::Flushing) => return Err(gst::FlowError::Flushing),
                Err(e @ ReceiveError::ProducerGone) => {
                    self.producer_gone(&mut link, &e)?;
                }
                Err(e) => {
                    link.connection = None;
                    self.connected.store(false, Ordering::SeqCst);
                    drop(link);
                    gst::warning!(CAT, imp = self, "{}", e);
                    let msg = self.error_for(&e, &self.socket_name());
                    self.post_error_message(msg);
                    return Err(gst::FlowError::Error);
                }
            }
        }
    }
}
