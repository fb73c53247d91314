//! The ucxsink element: settings, start/stop (the I/O thread), a memfd pool proposed upstream
//! (so frames are sent from registered memory without a copy), and each rendered buffer turned
//! into a FRAME for the I/O thread. `render` never blocks.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bufshare_backends::memfd::MemfdBackend;
use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::prelude::*;

use super::io::{Config, OutFrame, Server};
use crate::clock::{to_wire, TimeMapCache};
use crate::pool::BackendBufferPool;
use crate::protocol;
use crate::ucxio::Mode;
use crate::ucxwire::{self, AllowList};

pub(crate) static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "ucxsink",
        gst::DebugColorFlags::empty(),
        Some("bufshare UCX sender: frames to receivers on other hosts"),
    )
});

const DEFAULT_MAX_INFLIGHT: u32 = 8;
const DEFAULT_CLIENT_TIMEOUT_MS: u32 = 3000;

#[derive(Debug, Clone)]
struct Settings {
    address: String,
    mode: Mode,
    transports: String,
    allowed_hosts: String,
    max_inflight: u32,
    client_timeout_ms: u32,
    when_full: WhenFull,
}

/// What `render` does with a frame when no receiver can take one now (`when-full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstBufShareUcxWhenFull")]
pub enum WhenFull {
    #[enum_value(
        name = "Auto: wait if upstream is not live (a file, sync=false), else drop-oldest",
        nick = "auto"
    )]
    Auto,
    #[enum_value(
        name = "Drop-oldest: never wait; at most 4 frames queue, the oldest is dropped, and a receiver at its grant skips frames",
        nick = "drop-oldest"
    )]
    DropOldest,
    #[enum_value(
        name = "Wait: hold the streaming thread until a receiver has room in its grant (or there is no receiver)",
        nick = "wait"
    )]
    Wait,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            address: ucxwire::DEFAULT_ADDRESS.into(),
            mode: Mode::Server,
            transports: String::new(),
            allowed_hosts: String::new(),
            max_inflight: DEFAULT_MAX_INFLIGHT,
            client_timeout_ms: DEFAULT_CLIENT_TIMEOUT_MS,
            when_full: WhenFull::Auto,
        }
    }
}

#[derive(Default)]
struct State {
    server: Option<Arc<Server>>,
    segment: Option<gst::FormattedSegment<gst::ClockTime>>,
    next_frame_id: u64,
    frames_rendered: u64,
    time_map: TimeMapCache,
    /// Whether render waits for room (`when-full`, upstream's liveness asked once).
    wait_for_room: Option<bool>,
}

#[derive(Default)]
pub struct UcxSink {
    settings: Mutex<Settings>,
    state: Mutex<State>,
    /// unlock() was called: a render waiting for room returns.
    unlocked: std::sync::atomic::AtomicBool,
}

#[glib::object_subclass]
impl ObjectSubclass for UcxSink {
    const NAME: &'static str = "GstBufShareUcxSink";
    type Type = super::UcxSink;
    type ParentType = gst_base::BaseSink;
}

impl ObjectImpl for UcxSink {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPS: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("address")
                    .nick("Address")
                    .blurb("host:port. mode=server: listen on exactly this address (an IP of one interface; 0.0.0.0 listens on all, which UCX's lack of authentication makes unwise); mode=client: the receiver (ucxsrc mode=server) to connect to")
                    .default_value(Some(ucxwire::DEFAULT_ADDRESS))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("mode", Mode::Server)
                    .nick("Mode")
                    .blurb("server (default): listen on address, any number of receivers (ucxsrc mode=client) connect; client: connect to one receiver listening on address (ucxsrc mode=server), retrying every second while it is not there")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("transports")
                    .nick("UCX transports")
                    .blurb("UCX transports to use, as UCX_TLS takes them (e.g. 'tcp', 'rc,sm', '^sm'); empty (default): UCX chooses (RDMA when there is an RDMA NIC, shared memory on one host, else TCP). Added on top of the UCX_* environment")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("allowed-hosts")
                    .nick("Allowed hosts")
                    .blurb("mode=server: comma-separated IP addresses of the receivers accepted; others are rejected with a warning. Empty (default): any. UCX has no authentication: bind address to one interface and list the hosts")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("max-inflight")
                    .nick("Max frames in flight per receiver")
                    .blurb("Frames sent to one receiver and not yet released by it; past this the receiver is skipped for new frames (the latest frame wins) and the others are not affected. A receiver may ask for fewer")
                    .minimum(1)
                    .maximum(64)
                    .default_value(DEFAULT_MAX_INFLIGHT)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("client-timeout")
                    .nick("Stalled receiver timeout (ms)")
                    .blurb("A receiver that holds frames and releases none for this many milliseconds (stopped, hung, cut off) is disconnected with a warning, and the frames it held are let go. 0: never")
                    .default_value(DEFAULT_CLIENT_TIMEOUT_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("when-full", WhenFull::Auto)
                    .nick("When no receiver has room")
                    .blurb("What a frame does when every receiver holds its grant (max-inflight) of frames: wait for room (the sender goes at the link's pace, no frame is dropped for a lack of room: right for files and sync=false), or drop-oldest (the streaming thread never waits: right for live sources). auto: wait unless upstream is live")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("num-clients")
                    .nick("Number of receivers")
                    .blurb("Receivers connected and past the handshake")
                    .read_only()
                    .build(),
                glib::ParamSpecBoxed::builder::<gst::Structure>("stats")
                    .nick("Statistics")
                    .blurb("frames-rendered, frames-dropped-queue (the I/O thread was behind: oldest dropped), frames-staged (copied once into registered memory: not in one fd memory), sends-zero-copy and sends-copied (frame sends to all receivers, from the frame's own memory or from a copy), clients-refused, clients-timed-out, registered-memories, and per receiver (clients): client-id, address, frames-sent, frames-skipped (it held its grant: latest wins), frames-in-flight, max-inflight (its grant), frames-zero-copy, frames-copied")
                    .read_only()
                    .build(),
            ]
        });
        PROPS.as_ref()
    }

    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        obj.set_enable_last_sample(false);
        obj.set_processing_deadline(gst::ClockTime::ZERO);
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = self.settings.lock().unwrap();
        match pspec.name() {
            "address" => {
                s.address = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .unwrap_or_else(|| ucxwire::DEFAULT_ADDRESS.into())
            }
            "mode" => s.mode = value.get().expect("type checked upstream"),
            "transports" => {
                s.transports = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .unwrap_or_default()
            }
            "allowed-hosts" => {
                s.allowed_hosts = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .unwrap_or_default()
            }
            "max-inflight" => s.max_inflight = value.get().expect("type checked upstream"),
            "client-timeout" => s.client_timeout_ms = value.get().expect("type checked upstream"),
            "when-full" => s.when_full = value.get().expect("type checked upstream"),
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
            "max-inflight" => s.max_inflight.to_value(),
            "client-timeout" => s.client_timeout_ms.to_value(),
            "when-full" => s.when_full.to_value(),
            "num-clients" => {
                drop(s);
                let state = self.state.lock().unwrap();
                (state
                    .server
                    .as_ref()
                    .map_or(0, |srv| srv.status().clients.len()) as u32)
                    .to_value()
            }
            "stats" => {
                drop(s);
                self.stats().to_value()
            }
            other => unreachable!("unknown property {other}"),
        }
    }
}

impl GstObjectImpl for UcxSink {}

impl ElementImpl for UcxSink {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "bufshare UCX sink",
                "Sink/Network",
                "Sends buffers (caps, timestamps, metas) to any number of ucxsrc receivers on other hosts over UCX (RDMA, TCP or shared memory), from registered memory without a copy; slow receivers are skipped, never waited for",
                "bufshare developers",
            )
        });
        Some(&*META)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            vec![gst::PadTemplate::new(
                "sink",
                gst::PadDirection::Sink,
                gst::PadPresence::Always,
                &gst::Caps::new_any(),
            )
            .unwrap()]
        });
        TEMPLATES.as_ref()
    }
}

impl BaseSinkImpl for UcxSink {
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let s = self.settings.lock().unwrap().clone();
        let address = ucxwire::parse_address(&s.address)
            .map_err(|e| gst::error_msg!(gst::ResourceError::Settings, ("{}", e)))?;
        let allowed = AllowList::parse(&s.allowed_hosts)
            .map_err(|e| gst::error_msg!(gst::ResourceError::Settings, ("{}", e)))?;
        let cfg = Config {
            address,
            mode: s.mode,
            transports: s.transports.clone(),
            allowed,
            max_inflight: s.max_inflight,
            client_timeout: (s.client_timeout_ms > 0)
                .then(|| Duration::from_millis(s.client_timeout_ms.into())),
        };
        let element = self.obj().upcast_ref::<gst::Element>().downgrade();
        let server = Server::start(cfg, element)
            .map_err(|e| gst::error_msg!(gst::ResourceError::OpenWrite, ("{}", e)))?;
        gst::info!(
            CAT,
            imp = self,
            "{} {}",
            if s.mode == Mode::Server {
                "serving on"
            } else {
                "sending to"
            },
            address
        );
        *self.state.lock().unwrap() = State {
            server: Some(Arc::new(server)),
            ..Default::default()
        };
        Ok(())
    }

    fn unlock(&self) -> Result<(), gst::ErrorMessage> {
        self.unlocked
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(server) = &self.state.lock().unwrap().server {
            server.wake_waiters();
        }
        Ok(())
    }

    fn unlock_stop(&self) -> Result<(), gst::ErrorMessage> {
        self.unlocked
            .store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        let state = std::mem::take(&mut *self.state.lock().unwrap());
        drop(state);
        self.obj().notify("num-clients");
        Ok(())
    }

    fn set_caps(&self, caps: &gst::Caps) -> Result<(), gst::LoggableError> {
        gst::debug!(CAT, imp = self, "caps {}", caps);
        let latency = self.obj().latency().nseconds();
        if let Some(server) = &self.state.lock().unwrap().server {
            server.set_caps(caps.to_string(), latency);
        }
        Ok(())
    }

    fn event(&self, event: gst::Event) -> bool {
        match event.view() {
            gst::EventView::Eos(_) => {
                let server = self.state.lock().unwrap().server.clone();
                if let Some(server) = server {
                    if !server.send_eos() {
                        gst::info!(
                            CAT,
                            imp = self,
                            "EOS: some receivers did not take it in time"
                        );
                    }
                }
            }
            gst::EventView::Segment(s) => {
                self.state.lock().unwrap().segment =
                    s.segment().downcast_ref::<gst::ClockTime>().cloned();
            }
            gst::EventView::FlushStop(_) | gst::EventView::StreamStart(_) => {
                if let Some(server) = &self.state.lock().unwrap().server {
                    server.clear_eos();
                }
            }
            _ => {}
        }
        self.parent_event(event)
    }

    fn propose_allocation(
        &self,
        query: &mut gst::query::Allocation,
    ) -> Result<(), gst::LoggableError> {
        let (caps, need_pool) = query.get_owned();
        let Some(caps) = caps else {
            return Ok(());
        };
        // Raw video gets a memfd pool: frames are then sent from memory registered once.
        if let (Some(info), true) = (crate::bufsharesink::raw_video_info(&caps), need_pool) {
            let pool = BackendBufferPool::configured(
                Arc::new(MemfdBackend::new()),
                Some(&caps),
                info.size() as u32,
                0,
                0,
            )
            .map_err(|e| gst::loggable_error!(CAT, "pool for {}: {}", caps, e))?;
            let config = pool.config();
            if let Some((_, size, min, max)) = config.params() {
                query.add_allocation_pool(Some(&pool), size, min, max);
            }
        }
        query.add_allocation_meta::<gst_video::VideoMeta>(None);
        Ok(())
    }

    fn render(&self, buffer: &gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        // Neither lock is held while asking upstream (a pad query).
        let (server, decided) = {
            let state = self.state.lock().unwrap();
            (state.server.clone(), state.wait_for_room)
        };
        let Some(server) = server else {
            return Err(gst::FlowError::Flushing);
        };
        let wait = match decided {
            Some(w) => w,
            None => {
                let when_full = self.settings.lock().unwrap().when_full;
                let w = match when_full {
                    WhenFull::Wait => true,
                    WhenFull::DropOldest => false,
                    WhenFull::Auto => {
                        let upstream_live = self
                            .obj()
                            .query_latency()
                            .map(|(_, upstream_live, _, _)| upstream_live)
                            .unwrap_or(true);
                        gst::info!(
                            CAT,
                            imp = self,
                            "upstream is {}live: {}",
                            if upstream_live { "" } else { "not " },
                            if upstream_live {
                                "drop-oldest"
                            } else {
                                "waiting for room"
                            }
                        );
                        !upstream_live
                    }
                };
                self.state.lock().unwrap().wait_for_room = Some(w);
                w
            }
        };
        let wait = wait.then_some(server);
        if let Some(server) = wait {
            if !server.wait_for_room(&self.unlocked) {
                return Err(gst::FlowError::Flushing);
            }
        }
        let mut state = self.state.lock().unwrap();
        if state.server.is_none() {
            return Err(gst::FlowError::Flushing);
        }
        state.next_frame_id += 1;
        state.frames_rendered += 1;
        let frame_id = state.next_frame_id;
        let map = state.time_map.get(self.obj().upcast_ref());
        let segment = state.segment.clone();
        let frame = protocol::Frame {
            frame_id,
            pts: to_wire(segment.as_ref(), map, buffer.pts()),
            dts: to_wire(segment.as_ref(), map, buffer.dts()),
            duration: buffer.duration().map_or(protocol::NONE, |d| d.nseconds()),
            offset: buffer.offset(),
            offset_end: buffer.offset_end(),
            flags: buffer.flags().bits(),
            memories: Vec::new(),
            metas: crate::metas::from_buffer(buffer),
        };
        let server = state.server.as_ref().expect("checked");
        server.send_frame(OutFrame {
            frame,
            buffer: buffer.clone(),
        });
        Ok(gst::FlowSuccess::Ok)
    }
}

impl UcxSink {
    fn stats(&self) -> gst::Structure {
        let state = self.state.lock().unwrap();
        let status = state
            .server
            .as_ref()
            .map(|s| s.status())
            .unwrap_or_default();
        let clients: Vec<glib::SendValue> = status
            .clients
            .iter()
            .map(|c| {
                gst::Structure::builder("client")
                    .field("client-id", c.client_id)
                    .field("address", &c.address)
                    .field("frames-sent", c.frames_sent)
                    .field("frames-skipped", c.frames_skipped)
                    .field("frames-in-flight", c.frames_in_flight)
                    .field("max-inflight", c.max_inflight)
                    .field("frames-zero-copy", c.zero_copy)
                    .field("frames-copied", c.copied)
                    .build()
                    .to_send_value()
            })
            .collect();
        gst::Structure::builder("application/x-bufshare-ucxsink-stats")
            .field("num-clients", status.clients.len() as u32)
            .field("frames-rendered", state.frames_rendered)
            .field("frames-dropped-queue", status.frames_dropped_queue)
            .field("frames-staged", status.frames_staged)
            .field("clients-refused", status.clients_refused)
            .field("clients-timed-out", status.clients_timed_out)
            .field("registered-memories", status.registered_memories)
            .field("sends-zero-copy", status.sends_zero_copy)
            .field("sends-copied", status.sends_copied)
            .field("clients", gst::Array::from_values(clients))
            .build()
    }
}
