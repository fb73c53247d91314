//! The bufsharesrc element: settings, start (connect + caps), create (one
//! frame), negotiation from the producer's caps, latency, unlock, and what
//! happens when the producer goes away (`on-disconnect`: error, EOS, or wait
//! for a new producer on the same path and go on with its caps).

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::base_src::CreateSuccess;
use gst_base::subclass::prelude::*;

use super::delivery::{Decision, Delivery, DropReason, FrameFacts};
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

/// What the element does with its producer's EOS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstBufShareSrcOnEos")]
pub enum OnEos {
    #[default]
    #[enum_value(
        name = "wait with on-disconnect=reconnect, forward otherwise",
        nick = "auto"
    )]
    Auto,
    #[enum_value(name = "End the stream: push EOS downstream", nick = "forward")]
    Forward,
    #[enum_value(
        name = "End only that producer's stream: keep the pipeline running; when the producer leaves, on-disconnect applies (reconnect: go on with the next producer)",
        nick = "wait"
    )]
    Wait,
}

#[derive(Debug, Clone)]
struct Settings {
    socket: Option<String>,
    timeout_ms: u64,
    on_disconnect: OnDisconnect,
    on_eos: OnEos,
    reconnect_interval_ms: u64,
    max_inflight: u32,
    release_ring: bool,
    frame_ring: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            socket: None,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            on_disconnect: OnDisconnect::default(),
            on_eos: OnEos::default(),
            reconnect_interval_ms: DEFAULT_RECONNECT_INTERVAL_MS,
            max_inflight: 0,
            release_ring: true,
            frame_ring: true,
        }
    }
}

impl Settings {
    /// Whether a producer's EOS ends our stream (else we wait for the next producer).
    fn eos_ends_stream(&self) -> bool {
        match self.on_eos {
            OnEos::Forward => true,
            OnEos::Wait => false,
            OnEos::Auto => self.on_disconnect != OnDisconnect::Reconnect,
        }
    }
}

/// The current connection, if any, and where it stands. Held by `create`.
#[derive(Default)]
struct Link {
    connection: Option<Connection>,
    /// Connected, but the producer's caps have not come yet.
    awaiting_caps: bool,
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
    /// Push, copy or drop, frame by frame; its counters feed `stats`.
    delivery: Mutex<Delivery>,
    /// Frames of the current producer we hold (updated on release too).
    frames_held: Mutex<Arc<AtomicUsize>>,
    frames_held_peak: AtomicUsize,
    /// The grant the current producer gave (MAX_INFLIGHT), 0 before it said.
    granted: AtomicU64,
    /// Whether we warned that downstream holds so much that frames are copied.
    warned_copy: AtomicBool,
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
            delivery: Mutex::new(Delivery::default()),
            frames_held: Mutex::new(Arc::default()),
            frames_held_peak: AtomicUsize::new(0),
            granted: AtomicU64::new(0),
            warned_copy: AtomicBool::new(false),
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
                    .blurb("Milliseconds that start (READY to PAUSED) waits for a producer to appear on the socket and complete the handshake; past it the element fails with an error saying which of these it was waiting for. The producer's caps and frames are waited for in PLAYING, without limit (a producer that has not negotiated yet is fine). With on-disconnect=reconnect, start does not wait and this bounds each handshake instead.")
                    .default_value(DEFAULT_TIMEOUT_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder::<OnDisconnect>("on-disconnect")
                    .nick("On disconnect")
                    .blurb("What to do when the producer goes away (closes the socket or dies): error = fail with an error naming the socket; eos = push EOS downstream; reconnect = post a warning, keep the pipeline running, poll for a new producer on the same path every reconnect-interval and go on with its caps (the first buffer after it is marked DISCONT). With reconnect, the element also starts without a producer and waits for one. What the producer's EOS does is on-eos's business (by default it ends the stream, but not with reconnect). A producer that breaks the protocol or refuses us is an error in every mode.")
                    .default_value(OnDisconnect::default())
                    .mutable_playing()
                    .build(),
                glib::ParamSpecEnum::builder::<OnEos>("on-eos")
                    .nick("On the producer's EOS")
                    .blurb("What the producer's EOS does: forward = push EOS downstream (the stream ends); wait = end only that producer's stream: nothing is pushed, the pipeline keeps running, and when the producer leaves on-disconnect applies (with reconnect: go on with the next producer on the socket); auto (default) = wait with on-disconnect=reconnect, forward otherwise")
                    .default_value(OnEos::default())
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("max-inflight")
                    .nick("Frames to hold")
                    .blurb("How many of the producer's frames this consumer asks to hold at once, for downstream elements that keep many frames (an encoder's lookahead, a deep queue). 0 (default): the producer's max-inflight. The producer caps it at its max-inflight-limit; stats says what it granted. When downstream holds more than the grant less 2, newer frames are copied into this process's memory (once each, counted in stats frames-copied, with one warning), so the producer gets its frames back and this consumer still gets every frame. Applies from the next connection.")
                    .maximum(1024)
                    .default_value(0)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoolean::builder("release-ring")
                    .nick("Release ring")
                    .blurb("Release frames through a ring in memory shared with the producer when it offers one (docs/protocol.md 5.12): no system call per release on either side. The producer switches back to RELEASE messages on the socket while it must see releases at once (a bound on held frames, frames stopped). false: always send RELEASE messages. Applies from the next connection.")
                    .default_value(true)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoolean::builder("frame-ring")
                    .nick("Frame ring")
                    .blurb("Receive frames through a ring in memory shared with the producer when it offers one (docs/protocol.md 5.13, 5.14, 9.12), with a doorbell the producer rings only while this element waits: no sendmsg/recvmsg per frame, one wait (epoll_wait) per sleep. Caps, EOS, memory registrations and frames too large for a slot still come on the socket, in order. false: every FRAME on the socket. Applies from the next connection.")
                    .default_value(true)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoxed::builder::<gst::Structure>("stats")
                    .nick("Statistics")
                    .blurb("frames-received, frames-pushed, frames-skipped (frames the producer skipped for this consumer, from the gaps in frame ids; the next buffer is marked DISCONT), frames-dropped-stale (waited in the socket while we did not read), frames-dropped-late (earlier than a frame already pushed, e.g. left from before PAUSED), frames-copied (downstream held more than max-inflight allows), frames-held (producer frames held now) and frames-held-peak, max-inflight (what the producer granted; 0 before it said), reconnects, connected")
                    .read_only()
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
            "on-eos" => s.on_eos = value.get().expect("type checked upstream"),
            "max-inflight" => s.max_inflight = value.get().expect("type checked upstream"),
            "release-ring" => s.release_ring = value.get().expect("type checked upstream"),
            "frame-ring" => s.frame_ring = value.get().expect("type checked upstream"),
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
            "on-eos" => s.on_eos.to_value(),
            "max-inflight" => s.max_inflight.to_value(),
            "release-ring" => s.release_ring.to_value(),
            "frame-ring" => s.frame_ring.to_value(),
            "stats" => {
                drop(s);
                self.stats().to_value()
            }
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
            ReceiveError::Disconnected(_) => {
                gst::error_msg!(gst::ResourceError::Read, ("Socket {}: {}", socket, e))
            }
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
            match Connection::try_connect(
                &path,
                handshake_deadline,
                settings.max_inflight,
                settings.release_ring,
                settings.frame_ring,
                self.waker.clone(),
                &flushing,
            ) {
                Ok(Attempt::Connected(conn)) => {
                    let n = self.adopt(link, conn);
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
                Err(
                    e @ (ReceiveError::ProducerGone
                    | ReceiveError::Disconnected(_)
                    | ReceiveError::Timeout(_)),
                ) => {
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
                        "Socket {}: {}; ending the stream (on-disconnect=eos)",
                        socket,
                        e
                    )
                );
                Err(gst::FlowError::Eos)
            }
            OnDisconnect::Reconnect => {
                gst::element_imp_warning!(
                    self,
                    gst::ResourceError::Read,
                    (
                        "Socket {}: {}; waiting for a new one (on-disconnect=reconnect)",
                        socket,
                        e
                    )
                );
                Ok(())
            }
        }
    }

    /// Takes `conn` as the current connection: its frames are judged afresh
    /// (ids, staleness), its first buffer is DISCONT. Returns the number of
    /// connections made since start.
    fn adopt(&self, link: &mut Link, conn: Connection) -> u64 {
        *self.frames_held.lock().unwrap() = conn.frames_held();
        self.granted.store(0, Ordering::SeqCst);
        link.connection = Some(conn);
        link.awaiting_caps = true;
        self.delivery.lock().unwrap().new_connection();
        // A new producer's frames are judged on their own lateness.
        *self.stale.lock().unwrap() = StaleFilter::default();
        self.connected.store(true, Ordering::SeqCst);
        self.connections.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn stats(&self) -> gst::Structure {
        let c = self.delivery.lock().unwrap().counters;
        let held = self.frames_held.lock().unwrap().load(Ordering::SeqCst) as u64;
        gst::Structure::builder("application/x-bufshare-src-stats")
            .field("frames-received", c.received)
            .field("frames-pushed", c.pushed)
            .field("frames-skipped", c.skipped_by_producer)
            .field("frames-dropped-stale", c.dropped_stale)
            .field("frames-dropped-late", c.dropped_late)
            .field("frames-copied", c.copied)
            .field("frames-held", held)
            .field(
                "frames-held-peak",
                self.frames_held_peak.load(Ordering::SeqCst) as u64,
            )
            .field("max-inflight", self.granted.load(Ordering::SeqCst) as u32)
            .field(
                "reconnects",
                self.connections.load(Ordering::SeqCst).saturating_sub(1),
            )
            .field("connected", self.connected.load(Ordering::SeqCst))
            .build()
    }

    /// A frame goes downstream: timestamps mapped to our running time,
    /// flags, metas, DISCONT where frames were missed, and a copy into our
    /// own memory when downstream holds too many of the producer's frames.
    /// None: it was dropped (stale, or late) and is released unseen.
    fn deliver(
        &self,
        conn: &Connection,
        buffer: gst::Buffer,
        frame: &protocol::Frame,
    ) -> Result<Option<gst::Buffer>, gst::FlowError> {
        let time_map = self.time_map.lock().unwrap().get(self.obj().upcast_ref());
        let order_time = [frame.dts, frame.pts]
            .into_iter()
            .find(|t| *t != protocol::NONE);
        let held = conn.held_now();
        let granted = conn.max_inflight();
        if let Some(g) = granted {
            self.granted.store(g.into(), Ordering::SeqCst);
        }
        let facts = FrameFacts {
            frame_id: frame.frame_id,
            // Only an exact map orders frames: one paired with another clock
            // jitters, and a test clock does not advance.
            time: order_time.and_then(|t| {
                let map = time_map.filter(|m| m.exact)?;
                Some(map.signed_running_time(t))
            }),
            stale: self
                .stale
                .lock()
                .unwrap()
                .is_stale(frame.pts, frame.duration),
            needs_release: frame.needs_release(),
            held,
            max_inflight: granted,
        };
        let decision = self.delivery.lock().unwrap().decide(&facts);
        self.frames_held_peak.fetch_max(held, Ordering::SeqCst);
        let (copy, discont) = match decision {
            Decision::Drop(why) => {
                gst::debug!(
                    CAT,
                    imp = self,
                    "frame {} released unseen: {}",
                    frame.frame_id,
                    match why {
                        DropReason::Stale => "it waited in the socket while we did not read",
                        DropReason::Late =>
                            "its running time is before our base time or the last frame pushed",
                    }
                );
                return Ok(None);
            }
            Decision::Push { copy, discont } => (copy, discont),
        };
        let mut buffer = if copy {
            self.warn_copying(granted.unwrap_or(0));
            copy_into_own_memory(&buffer)?
        } else {
            buffer
        };
        let running = |t: u64| -> Option<gst::ClockTime> {
            (t != protocol::NONE)
                .then_some(time_map)
                .flatten()
                .map(|m| gst::ClockTime::from_nseconds(m.to_running_time(t)))
        };
        let b = buffer.get_mut().ok_or(gst::FlowError::Error)?;
        b.set_pts(running(frame.pts));
        b.set_dts(running(frame.dts));
        b.set_duration(
            (frame.duration != protocol::NONE)
                .then(|| gst::ClockTime::from_nseconds(frame.duration)),
        );
        b.set_offset(frame.offset);
        b.set_offset_end(frame.offset_end);
        let mut flags =
            gst::BufferFlags::from_bits_truncate(frame.flags) - gst::BufferFlags::TAG_MEMORY;
        if discont {
            // Frames were missed (skipped by the producer, dropped here, or a new producer).
            flags |= gst::BufferFlags::DISCONT;
        }
        b.set_flags(flags);
        for warning in crate::metas::apply(b, &frame.metas) {
            gst::warning!(CAT, imp = self, "{}", warning);
        }
        Ok(Some(buffer))
    }

    fn warn_copying(&self, granted: u32) {
        if self.warned_copy.swap(true, Ordering::SeqCst) {
            return;
        }
        let budget = super::delivery::zero_copy_budget(granted);
        gst::element_imp_warning!(
            self,
            gst::ResourceError::NoSpaceLeft,
            (
                "Downstream holds more than {} of the producer's frames (the producer grants this consumer {}): copying newer frames into this process's memory so that the producer gets its frames back. Set max-inflight on bufsharesrc (up to the producer's max-inflight-limit) to hold more frames without copying.",
                budget,
                granted
            )
        );
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
        self.delivery.lock().unwrap().reset();
        self.frames_held_peak.store(0, Ordering::SeqCst);
        self.warned_copy.store(false, Ordering::SeqCst);
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
        // Only the producer's presence and handshake are waited for here.
        // Its caps come with the stream, in PLAYING: waiting for them now
        // would hold this pipeline back until the producer's first frame, and
        // every frame rendered before our base time is dropped as late.
        let conn = Connection::connect(
            &PathBuf::from(&socket),
            deadline,
            settings.max_inflight,
            settings.release_ring,
            settings.frame_ring,
            self.waker.clone(),
            &flushing,
        )
        .map_err(|e| self.error_for(&e, &socket))?;
        self.adopt(&mut self.link.lock().unwrap(), conn);
        gst::info!(CAT, imp = self, "connected to {}", socket);
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        *self.link.lock().unwrap() = Link::default();
        self.connected.store(false, Ordering::SeqCst);
        *self.stream.lock().unwrap() = Stream::default();
        *self.stale.lock().unwrap() = StaleFilter::default();
        *self.frames_held.lock().unwrap() = Arc::default();
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
            let conn = link.connection.as_ref().expect("connected");
            match incoming {
                Ok(Incoming::Frame(..)) if link.awaiting_caps => {
                    link.connection = None;
                    self.connected.store(false, Ordering::SeqCst);
                    drop(link);
                    let e = ReceiveError::Protocol("producer sent a frame before caps".into());
                    self.post_error_message(self.error_for(&e, &self.socket_name()));
                    return Err(gst::FlowError::Error);
                }
                Ok(Incoming::Frame(buffer, frame)) => {
                    let delivered = self.deliver(conn, buffer, &frame)?;
                    if let Some(buffer) = delivered {
                        return Ok(CreateSuccess::NewBuffer(buffer));
                    }
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
                    if self.settings.lock().unwrap().eos_ends_stream() {
                        gst::info!(CAT, imp = self, "producer sent EOS");
                        return Err(gst::FlowError::Eos);
                    }
                    // on-eos=wait: only this producer's stream ended. Read on
                    // until it leaves; then on-disconnect says what comes next.
                    gst::info!(
                        CAT,
                        imp = self,
                        "producer sent EOS: waiting for it to leave (on-eos)"
                    );
                    gst::element_imp_info!(
                        self,
                        gst::ResourceError::Read,
                        (
                            "Socket {}: the producer ended its stream; waiting for the next producer (on-eos)",
                            self.socket_name()
                        )
                    );
                }
                Err(ReceiveError::Flushing) => return Err(gst::FlowError::Flushing),
                Err(e @ (ReceiveError::ProducerGone | ReceiveError::Disconnected(_))) => {
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

/// A copy of `buffer`'s bytes in this process's memory (one memory); the
/// caller sets timestamps, flags and metas on it. Dropping the original
/// releases the producer's frame.
fn copy_into_own_memory(buffer: &gst::Buffer) -> Result<gst::Buffer, gst::FlowError> {
    let mut copy = gst::Buffer::with_size(buffer.size()).map_err(|_| gst::FlowError::Error)?;
    {
        let copy = copy.get_mut().ok_or(gst::FlowError::Error)?;
        let mut map = copy.map_writable().map_err(|_| gst::FlowError::Error)?;
        buffer
            .copy_to_slice(0, &mut map[..])
            .map_err(|_| gst::FlowError::Error)?;
    }
    Ok(copy)
}
