//! The ucxsrc element: settings, start (the I/O thread; in client mode, wait for the sender's
//! HELLO within `timeout`), create (one frame: timestamps onto our running time, metas,
//! DISCONT after skipped frames), caps from the sender, latency, unlock, and `on-disconnect`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::base_src::CreateSuccess;
use gst_base::subclass::prelude::*;

use super::io::{Config, Item, Receiver};
use crate::bufsharesrc::delivery::{Decision, Delivery, FrameFacts};
use crate::bufsharesrc::OnDisconnect;
use crate::clock::TimeMapCache;
use crate::protocol;
use crate::ucxio::Mode;
use crate::ucxwire::{self, AllowList, ClockSync};

pub(crate) static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "ucxsrc",
        gst::DebugColorFlags::empty(),
        Some("bufshare UCX receiver: frames from a ucxsink on another host"),
    )
});

const DEFAULT_TIMEOUT_MS: u64 = 3000;
/// Added to the sender's latency: the time a frame takes to cross (a 1080p frame takes a
/// few ms over 10 GbE TCP).
const TRANSFER_ALLOWANCE: gst::ClockTime = gst::ClockTime::from_mseconds(20);

#[derive(Debug, Clone)]
struct Settings {
    address: String,
    mode: Mode,
    transports: String,
    allowed_hosts: String,
    on_disconnect: OnDisconnect,
    timeout_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            address: ucxwire::DEFAULT_ADDRESS.into(),
            mode: Mode::Client,
            transports: String::new(),
            allowed_hosts: String::new(),
            on_disconnect: OnDisconnect::Error,
            timeout_ms: DEFAULT_TIMEOUT_MS,
        }
    }
}

#[derive(Default)]
struct Stream {
    caps: Option<gst::Caps>,
    pending_caps: Option<gst::Caps>,
    latency: u64,
    awaiting_caps: bool,
}

#[derive(Default)]
pub struct UcxSrc {
    settings: Mutex<Settings>,
    receiver: Mutex<Option<Receiver>>,
    stream: Mutex<Stream>,
    delivery: Mutex<Delivery>,
    time_map: Mutex<TimeMapCache>,
    flushing: AtomicBool,
}

#[glib::object_subclass]
impl ObjectSubclass for UcxSrc {
    const NAME: &'static str = "GstBufShareUcxSrc";
    type Type = super::UcxSrc;
    type ParentType = gst_base::PushSrc;
}

impl ObjectImpl for UcxSrc {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPS: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("address")
                    .nick("Address")
                    .blurb("host:port. mode=client: the sender (ucxsink mode=server) to connect to; mode=server: listen on exactly this address for one sender (ucxsink mode=client)")
                    .default_value(Some(ucxwire::DEFAULT_ADDRESS))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("mode", Mode::Client)
                    .nick("Mode")
                    .blurb("client (default): connect to a ucxsink listening on address; server: listen on address and take one ucxsink that connects (others are rejected while it is connected)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("transports")
                    .nick("UCX transports")
                    .blurb("UCX transports to use, as UCX_TLS takes them (e.g. 'tcp', 'rc,sm'); empty (default): UCX chooses. Added on top of the UCX_* environment")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("allowed-hosts")
                    .nick("Allowed hosts")
                    .blurb("mode=server: comma-separated IP addresses of the senders accepted; others are rejected with a warning. Empty (default): any. UCX has no authentication")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("on-disconnect", OnDisconnect::Error)
                    .nick("On disconnect")
                    .blurb("What to do when the sender goes away: error = fail with an error naming the address and the cause; eos = push EOS downstream; reconnect = post a warning, keep the pipeline running and wait for a sender again (client mode: connect again every 500 ms; server mode: accept the next one), going on with its caps (the first buffer after it is DISCONT). With reconnect the element also starts without a sender. A sender that refuses us, speaks another protocol version or breaks the protocol is an error in every mode")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt64::builder("timeout")
                    .nick("Timeout (ms)")
                    .blurb("mode=client: milliseconds start (READY to PAUSED) waits for the sender to answer the handshake; past it, or when the address cannot be reached, the element fails with an error naming the address and the cause. Also bounds each later connection attempt")
                    .minimum(1)
                    .default_value(DEFAULT_TIMEOUT_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoxed::builder::<gst::Structure>("stats")
                    .nick("Statistics")
                    .blurb("frames-received, frames-rendezvous (pulled straight into our memory), frames-pushed, frames-skipped (by the sender: gaps in frame ids; the next buffer is DISCONT), frames-dropped-late, connections, connected, clock-offset (sender's CLOCK_MONOTONIC minus ours, ns), round-trip (ns, of the best clock measurement), registered-memories, frames-queued (received or being received, not yet pushed)")
                    .read_only()
                    .build(),
            ]
        });
        PROPS.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = self.settings.lock().unwrap();
        let string = |v: &glib::Value| {
            v.get::<Option<String>>()
                .expect("type checked upstream")
                .unwrap_or_default()
        };
        match pspec.name() {
            "address" => {
                s.address = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .unwrap_or_else(|| ucxwire::DEFAULT_ADDRESS.into())
            }
            "mode" => s.mode = value.get().expect("type checked upstream"),
            "transports" => s.transports = string(value),
            "allowed-hosts" => s.allowed_hosts = string(value),
            "on-disconnect" => s.on_disconnect = value.get().expect("type checked upstream"),
            "timeout" => s.timeout_ms = value.get().expect("type checked upstream"),
            other => unreachable!("unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = self.settings.lock().unwrap();
        match pspec.name() {
            "address" => s.address.to_value(),
            "mode" => s.mode.to_value(),
            "transports" => s.transports.to_value(),
            "allowed-hosts" => s.allowed_hosts.to_value(),
            "on-disconnect" => s.on_disconnect.to_value(),
            "timeout" => s.timeout_ms.to_value(),
            "stats" => {
                drop(s);
                self.stats().to_value()
            }
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

impl GstObjectImpl for UcxSrc {}

impl ElementImpl for UcxSrc {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "bufshare UCX source",
                "Source/Network",
                "Receives buffers (caps, timestamps, metas) from a ucxsink on another host over UCX (RDMA, TCP or shared memory), into memfd memory that bufsharesink can share further without a copy",
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

impl UcxSrc {
    fn address(&self) -> String {
        self.settings.lock().unwrap().address.clone()
    }

    fn stats(&self) -> gst::Structure {
        let status = self
            .receiver
            .lock()
            .unwrap()
            .as_ref()
            .map(|r| r.shared.status.lock().unwrap().clone())
            .unwrap_or_default();
        let c = self.delivery.lock().unwrap().counters;
        gst::Structure::builder("application/x-bufshare-ucxsrc-stats")
            .field("frames-received", status.frames_received)
            .field("frames-rendezvous", status.frames_rendezvous)
            .field("frames-pushed", c.pushed)
            .field("frames-skipped", c.skipped_by_producer)
            .field("frames-dropped-late", c.dropped_late)
            .field("connections", status.connections)
            .field("connected", status.connected)
            .field("clock-offset", status.clock_offset)
            .field("round-trip", status.rtt)
            .field("registered-memories", status.registered_memories)
            .field("frames-queued", status.frames_queued)
            .build()
    }

    /// Timestamps, flags and metas onto `buffer`; None when the frame is dropped (late).
    fn deliver(
        &self,
        mut buffer: gst::Buffer,
        frame: &protocol::Frame,
        clock: &ClockSync,
    ) -> Option<gst::Buffer> {
        let map = self.time_map.lock().unwrap().get(self.obj().upcast_ref());
        let order_time = [frame.dts, frame.pts]
            .into_iter()
            .find(|t| *t != protocol::NONE);
        let facts = FrameFacts {
            frame_id: frame.frame_id,
            time: order_time.and_then(|t| {
                let map = map.filter(|m| m.exact)?;
                Some(map.signed_running_time(clock.to_receiver(t)))
            }),
            stale: false,
            needs_release: false,
            held: 0,
            max_inflight: None,
        };
        let discont = match self.delivery.lock().unwrap().decide(&facts) {
            Decision::Drop(why) => {
                gst::debug!(
                    CAT,
                    imp = self,
                    "frame {} dropped: {:?}",
                    frame.frame_id,
                    why
                );
                return None;
            }
            Decision::Push { discont, .. } => discont,
        };
        let running = |t: u64| -> Option<gst::ClockTime> {
            (t != protocol::NONE)
                .then_some(map)
                .flatten()
                .map(|m| gst::ClockTime::from_nseconds(m.to_running_time(clock.to_receiver(t))))
        };
        let b = buffer.make_mut();
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
            flags |= gst::BufferFlags::DISCONT;
        }
        b.set_flags(flags);
        for warning in crate::metas::apply(b, &frame.metas) {
            gst::warning!(CAT, imp = self, "{}", warning);
        }
        Some(buffer)
    }

    /// The next item from the I/O thread; None when flushing.
    fn next_item(&self) -> Option<Item> {
        let guard = self.receiver.lock().unwrap();
        let shared = guard.as_ref()?.shared.clone();
        drop(guard);
        let mut items = shared.items.lock().unwrap();
        loop {
            if self.flushing.load(Ordering::SeqCst) {
                return None;
            }
            if let Some(item) = items.pop_front() {
                return Some(item);
            }
            items = shared
                .cond
                .wait_timeout(items, Duration::from_millis(200))
                .unwrap()
                .0;
        }
    }

    fn ack(&self, conn: u64, frame_id: u64) {
        if let Some(r) = self.receiver.lock().unwrap().as_ref() {
            r.shared.ack(conn, frame_id);
        }
    }
}

impl BaseSrcImpl for UcxSrc {
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let s = self.settings.lock().unwrap().clone();
        let address = ucxwire::parse_address(&s.address)
            .map_err(|e| gst::error_msg!(gst::ResourceError::Settings, ("{}", e)))?;
        let allowed = AllowList::parse(&s.allowed_hosts)
            .map_err(|e| gst::error_msg!(gst::ResourceError::Settings, ("{}", e)))?;
        *self.stream.lock().unwrap() = Stream {
            awaiting_caps: true,
            ..Default::default()
        };
        self.delivery.lock().unwrap().reset();
        let timeout = Duration::from_millis(s.timeout_ms);
        let receiver = Receiver::start(
            Config {
                address,
                mode: s.mode,
                transports: s.transports.clone(),
                allowed,
                timeout,
                max_inflight: 0,
            },
            self.obj().upcast_ref::<gst::Element>().downgrade(),
        )
        .map_err(|e| gst::error_msg!(gst::ResourceError::OpenRead, ("{}", e)))?;
        if s.mode == Mode::Client && s.on_disconnect != OnDisconnect::Reconnect {
            // Wait for the sender's HELLO, or the reason it did not come.
            let deadline = Instant::now() + timeout + Duration::from_millis(500);
            let shared = receiver.shared.clone();
            let mut st = shared.status.lock().unwrap();
            loop {
                if st.connected {
                    break;
                }
                if let Some(e) = st.last_error.clone() {
                    return Err(gst::error_msg!(
                        gst::ResourceError::OpenRead,
                        ("Cannot receive from {}: {}", address, e)
                    ));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(gst::error_msg!(
                        gst::ResourceError::OpenRead,
                        (
                            "Cannot receive from {}: no sender answered within {} ms",
                            address,
                            s.timeout_ms
                        )
                    ));
                }
                st = shared.status_cond.wait_timeout(st, left).unwrap().0;
            }
        }
        gst::info!(CAT, imp = self, "{:?} on {}", s.mode, address);
        *self.receiver.lock().unwrap() = Some(receiver);
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        let r = self.receiver.lock().unwrap().take();
        drop(r);
        *self.stream.lock().unwrap() = Stream::default();
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
            let latency = gst::ClockTime::from_nseconds(self.stream.lock().unwrap().latency)
                + TRANSFER_ALLOWANCE;
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
        if let Some(r) = self.receiver.lock().unwrap().as_ref() {
            r.shared.interrupt();
        }
        Ok(())
    }

    fn unlock_stop(&self) -> Result<(), gst::ErrorMessage> {
        self.flushing.store(false, Ordering::SeqCst);
        Ok(())
    }
}

impl PushSrcImpl for UcxSrc {
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
                gst::info!(CAT, imp = self, "sender's caps {}", caps);
                self.obj().set_caps(&caps).map_err(|_| {
                    gst::element_imp_error!(
                        self,
                        gst::CoreError::Negotiation,
                        ("Downstream refused the sender's caps {}", caps)
                    );
                    gst::FlowError::NotNegotiated
                })?;
                continue;
            }
            let Some(item) = self.next_item() else {
                return Err(gst::FlowError::Flushing);
            };
            match item {
                Item::Connected { peer } => {
                    gst::info!(CAT, imp = self, "receiving from {}", peer);
                    self.delivery.lock().unwrap().new_connection();
                    self.stream.lock().unwrap().awaiting_caps = true;
                }
                Item::Caps { caps, latency } => {
                    let Ok(caps) = caps.parse::<gst::Caps>() else {
                        gst::element_imp_error!(
                            self,
                            gst::StreamError::Decode,
                            (
                                "Unparsable caps from the sender at {}: {}",
                                self.address(),
                                caps
                            )
                        );
                        return Err(gst::FlowError::Error);
                    };
                    let mut stream = self.stream.lock().unwrap();
                    stream.awaiting_caps = false;
                    let latency_changed = stream.latency != latency;
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
                Item::Frame {
                    conn,
                    frame,
                    buffer,
                    clock,
                } => {
                    let frame_id = frame.frame_id;
                    if self.stream.lock().unwrap().awaiting_caps {
                        self.ack(conn, frame_id);
                        gst::element_imp_error!(
                            self,
                            gst::StreamError::Decode,
                            ("The sender at {} sent a frame before caps", self.address())
                        );
                        return Err(gst::FlowError::Error);
                    }
                    let out = self.deliver(buffer, &frame, &clock);
                    self.ack(conn, frame_id);
                    if let Some(b) = out {
                        return Ok(CreateSuccess::NewBuffer(b));
                    }
                }
                Item::Eos => {
                    gst::info!(CAT, imp = self, "the sender sent EOS");
                    return Err(gst::FlowError::Eos);
                }
                Item::Gone(e) => {
                    let addr = self.address();
                    match self.settings.lock().unwrap().on_disconnect {
                        OnDisconnect::Error => {
                            gst::element_imp_error!(
                                self,
                                gst::ResourceError::Read,
                                ("Address {}: {}", addr, e)
                            );
                            return Err(gst::FlowError::Error);
                        }
                        OnDisconnect::Eos => {
                            gst::element_imp_warning!(
                                self,
                                gst::ResourceError::Read,
                                (
                                    "Address {}: {}; ending the stream (on-disconnect=eos)",
                                    addr,
                                    e
                                )
                            );
                            return Err(gst::FlowError::Eos);
                        }
                        OnDisconnect::Reconnect => {
                            gst::element_imp_warning!(
                                self,
                                gst::ResourceError::Read,
                                (
                                    "Address {}: {}; waiting for a sender again (on-disconnect=reconnect)",
                                    addr,
                                    e
                                )
                            );
                        }
                    }
                }
                Item::Fatal(e) => {
                    gst::element_imp_error!(
                        self,
                        gst::ResourceError::Read,
                        ("Address {}: {}", self.address(), e)
                    );
                    return Err(gst::FlowError::Error);
                }
            }
        }
    }
}
