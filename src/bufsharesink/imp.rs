//! The bufsharesink element: settings, start/stop, allocation, and turning
//! each rendered buffer into an [`Outgoing`] frame for the server.

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

use bufshare_backends::memfd::MemfdBackend;
use bufshare_backends::MemoryBackend;
use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::prelude::*;

use super::backend::{self, BackendKind, Choice};
use super::server::{self, Config, Event, InflightLimits, Outgoing, Server, SharedMemory};
use crate::clock::TimeMapCache;
use crate::memtag;
use crate::pool::BackendBufferPool;
use crate::protocol::{self, MemoryRef};
use crate::transport::unix::{Listener, PeerPolicy};

pub(crate) static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "bufsharesink",
        gst::DebugColorFlags::empty(),
        Some("bufshare producer: zero-copy fan-out over a UNIX socket"),
    )
});

const DEFAULT_MAX_INFLIGHT: u32 = 8;
const DEFAULT_MAX_INFLIGHT_LIMIT: u32 = 64;
const DEFAULT_MAX_PENDING_CONNECTIONS: u32 = 16;
const DEFAULT_CLIENT_TIMEOUT_MS: u32 = 3000;
/// 0: derive the bound from a fixed upstream pool.
const DEFAULT_MAX_HELD: u32 = 0;
/// Buffers of a fixed upstream pool kept out of the consumers' reach: one
/// being filled and one spare (a V4L2 driver needs a queued buffer to capture).
const POOL_BUFFERS_KEPT_FREE: u32 = 2;
const DEFAULT_INLINE_THRESHOLD: u32 = 4096;
/// Inline payloads must leave room for the frame header in one datagram.
const MAX_INLINE_THRESHOLD: u32 = 32 * 1024;
/// Owner only: other users (other containers) get in only when asked for.
const DEFAULT_SOCKET_MODE: u32 = 0o600;

#[derive(Debug, Clone)]
struct Settings {
    socket: Option<String>,
    max_inflight: u32,
    max_inflight_limit: u32,
    max_pending_connections: u32,
    inline_threshold: u32,
    socket_mode: u32,
    allowed_uid: i32,
    allowed_gid: i32,
    backend: BackendKind,
    heap: String,
    device: Option<String>,
    client_timeout_ms: u32,
    max_held: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            socket: None,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            max_inflight_limit: DEFAULT_MAX_INFLIGHT_LIMIT,
            max_pending_connections: DEFAULT_MAX_PENDING_CONNECTIONS,
            inline_threshold: DEFAULT_INLINE_THRESHOLD,
            socket_mode: DEFAULT_SOCKET_MODE,
            allowed_uid: -1,
            allowed_gid: -1,
            backend: BackendKind::default(),
            heap: backend::default_heap().to_string(),
            device: None,
            client_timeout_ms: DEFAULT_CLIENT_TIMEOUT_MS,
            max_held: DEFAULT_MAX_HELD,
        }
    }
}

/// The backend in use since start: its choice (to open fresh instances, one
/// per V4L2 pool) and an opened instance (shared by the pools of the others).
struct InUse {
    choice: Choice,
    backend: Arc<dyn MemoryBackend>,
    /// Under `auto`: the reasons the preferred backends were passed over.
    auto: bool,
}

/// Memory for buffers that arrive without an fd: one copy each, into a pool.
struct CopyPool {
    pool: BackendBufferPool,
    size: usize,
}

#[derive(Default)]
struct Started {
    /// Shared with a streaming thread waiting for consumers to take EOS.
    server: Option<Arc<Server>>,
    memory: Option<InUse>,
    copy_pool: Option<CopyPool>,
    segment: Option<gst::FormattedSegment<gst::ClockTime>>,
    next_frame_id: u64,
    frames_copied: u64,
    time_map: TimeMapCache,
    /// The held bound of the upstream pool last seen, kept with a reference
    /// to that pool (so its address cannot be reused by another): reading a
    /// pool's config copies a structure, too much to do per frame. Cleared on
    /// caps and allocation queries, when a pool may be reconfigured.
    pool_bound: Option<(gst::BufferPool, Option<usize>)>,
    /// The FRAME datagram of the last frame, kept for its allocation.
    frame_buf: Vec<u8>,
}

#[derive(Default)]
pub struct BufShareSink {
    settings: Mutex<Settings>,
    state: Mutex<Started>,
}

#[glib::object_subclass]
impl ObjectSubclass for BufShareSink {
    const NAME: &'static str = "GstBufShareSink";
    type Type = super::BufShareSink;
    type ParentType = gst_base::BaseSink;
}

impl ObjectImpl for BufShareSink {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPS: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("socket")
                    .nick("Socket path")
                    .blurb("Path of the UNIX socket to serve consumers on (required). A socket file left by a dead producer is replaced; a live producer's is never taken over.")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("max-inflight")
                    .nick("Max frames in flight per consumer")
                    .blurb("Frames one consumer may hold at once, unless it asks for another number (MAX_INFLIGHT, see max-inflight-limit). Past this, frames are skipped for that consumer only (the latest frame wins) and counted as dropped. 8 leaves room for a hardware encoder that queues several frames.")
                    .minimum(1)
                    .maximum(1024)
                    .default_value(DEFAULT_MAX_INFLIGHT)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("max-inflight-limit")
                    .nick("Most frames a consumer may ask to hold")
                    .blurb("A consumer may ask to hold more or fewer frames at once than max-inflight (bufsharesrc's own max-inflight property; 0 there takes this element's max-inflight); it gets what it asked for, up to this many. Each frame held pins one buffer of the producer. Consumers are told their grant, again when this changes.")
                    .minimum(1)
                    .maximum(1024)
                    .default_value(DEFAULT_MAX_INFLIGHT_LIMIT)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("max-pending-connections")
                    .nick("Max connections before HELLO")
                    .blurb("Connections that have not completed the handshake (HELLO) yet, each an fd of the producer. Past this many, the oldest is closed (logged, rate-limited), so that idle connections cannot use up the producer's fds. Consumers say HELLO at once; 16 leaves room for many starting together.")
                    .minimum(1)
                    .maximum(65536)
                    .default_value(DEFAULT_MAX_PENDING_CONNECTIONS)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("inline-threshold")
                    .nick("Inline threshold")
                    .blurb("Buffers of at most this many bytes travel inside the message, with no fd (text, small audio). 0 sends everything by fd.")
                    .maximum(MAX_INLINE_THRESHOLD)
                    .default_value(DEFAULT_INLINE_THRESHOLD)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("socket-mode")
                    .nick("Socket file mode")
                    .blurb("Permission bits of the socket file, set before any consumer can connect (gst-launch takes octal: socket-mode=0660). Connecting needs write permission, so the default 0600 (384) lets only the producer's own user (and root) in; 0660 adds the socket's group, for consumers running as other users.")
                    .maximum(0o777)
                    .default_value(DEFAULT_SOCKET_MODE)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecInt::builder("allowed-uid")
                    .nick("Allowed consumer uid")
                    .blurb("If not -1, only consumers whose uid (SO_PEERCRED, at connect time) is this one are served; others get REFUSE with the reason and are dropped with a warning. Root is not special: it is refused too unless allowed. -1: anyone who can open the socket.")
                    .minimum(-1)
                    .default_value(-1)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecInt::builder("allowed-gid")
                    .nick("Allowed consumer gid")
                    .blurb("If not -1, only consumers whose effective gid (SO_PEERCRED, at connect time; supplementary groups do not count) is this one are served; others get REFUSE with the reason. With allowed-uid, both must match. -1: any group.")
                    .minimum(-1)
                    .default_value(-1)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("backend", BackendKind::default())
                    .nick("Memory backend")
                    .blurb("Where shared frame memory comes from (the pool proposed upstream and copies): memfd (default, CPU memory), dma-heap (/dev/dma_heap/<heap>), drm (dumb buffers on a DRM device, PRIME-exported), v4l2 (exported buffers of a V4L2 device queue; a mem2mem device's OUTPUT queue), or auto (the build's preset order: imx8 dma-heap, drm, v4l2; qcs dma-heap, v4l2; else dma-heap, drm; then memfd with a warning saying why). A backend not compiled in, or a heap/device that cannot be used, is an error at start naming the path")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("heap")
                    .nick("DMA heap")
                    .blurb("dma-heap backend: a heap name in /dev/dma_heap (system, linux,cma, qcom,system, reserved) or an absolute path. Default: the preset's heap (linux,cma for imx8, qcom,system for qcs), else system")
                    .default_value(Some(backend::default_heap()))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("device")
                    .nick("Device")
                    .blurb("drm/v4l2 backends: device path (/dev/dri/cardN, /dev/videoN). Unset: drm uses the first /dev/dri/card* that creates and exports dumb buffers; v4l2 the first mem2mem /dev/video* whose OUTPUT queue takes the caps' format")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("client-timeout")
                    .nick("Stalled consumer timeout (ms)")
                    .blurb("A consumer that leaves messages unread in its socket and sends nothing for this many milliseconds (a stopped, hung or blocked process) is disconnected with a warning naming its pid, and every frame it held goes back upstream. A consumer that has not released a frame yet (still starting) gets at least 10 s. 0 never disconnects for this (a consumer that lets 512 control messages pile up is still dropped).")
                    .default_value(DEFAULT_CLIENT_TIMEOUT_MS)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("max-held")
                    .nick("Max frames held by all consumers")
                    .blurb("Distinct frames all consumers together may hold (each pins one upstream buffer). 0: when buffers come from an upstream pool with a fixed maximum (v4l2src), that maximum minus 2, otherwise no bound. A frame goes to no consumer if that would pin more than this. A consumer holding frames older than the 2 newest sent (a greedy one) gets a new frame only while 3 frames of the bound stay free for the consumers that keep up, so greedy consumers lose frames first and upstream never runs out of buffers.")
                    .default_value(DEFAULT_MAX_HELD)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("num-clients")
                    .nick("Number of consumers")
                    .blurb("Consumers connected and past the handshake")
                    .read_only()
                    .build(),
                glib::ParamSpecBoxed::builder::<gst::Structure>("stats")
                    .nick("Statistics")
                    .blurb("backend (memory backend in use: memfd, dma-heap, drm, v4l2), backend-source (heap or device path), frames-rendered, frames-copied (buffers that arrived without an fd, or in memfds that cannot be sealed), max-held (bound in use, 0: none), frames-held (distinct frames consumers hold), frames-held-peak, clients-timed-out, and per consumer (clients): client-id, pid, frames-sent, frames-dropped, frames-dropped-held (by the max-held bound), frames-in-flight, frames-in-flight-peak, memories-registered, max-inflight (frames it may hold: its grant), released-by-ring and released-by-message (frames it released through its release ring, and in RELEASE messages on the socket), frames-by-ring (of frames-sent, those written to its frame ring rather than sent on the socket)")
                    .read_only()
                    .build(),
            ]
        });
        PROPS.as_ref()
    }

    fn signals() -> &'static [glib::subclass::Signal] {
        static SIGNALS: LazyLock<Vec<glib::subclass::Signal>> = LazyLock::new(|| {
            vec![
                glib::subclass::Signal::builder("client-connected")
                    .param_types([u64::static_type()])
                    .build(),
                glib::subclass::Signal::builder("client-disconnected")
                    .param_types([u64::static_type()])
                    .build(),
            ]
        });
        SIGNALS.as_ref()
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
            "socket" => s.socket = value.get().expect("type checked upstream"),
            "max-inflight" => {
                s.max_inflight = value.get().expect("type checked upstream");
                if let Some(server) = &self.state.lock().unwrap().server {
                    server.set_inflight_limits(inflight_limits(&s));
                }
            }
            "max-inflight-limit" => {
                s.max_inflight_limit = value.get().expect("type checked upstream");
                if let Some(server) = &self.state.lock().unwrap().server {
                    server.set_inflight_limits(inflight_limits(&s));
                }
            }
            "max-pending-connections" => {
                s.max_pending_connections = value.get().expect("type checked upstream");
                if let Some(server) = &self.state.lock().unwrap().server {
                    server.set_max_pending(s.max_pending_connections as usize);
                }
            }
            "inline-threshold" => s.inline_threshold = value.get().expect("type checked upstream"),
            "socket-mode" => s.socket_mode = value.get().expect("type checked upstream"),
            "allowed-uid" => s.allowed_uid = value.get().expect("type checked upstream"),
            "allowed-gid" => s.allowed_gid = value.get().expect("type checked upstream"),
            "backend" => s.backend = value.get().expect("type checked upstream"),
            "heap" => {
                s.heap = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| backend::default_heap().to_string())
            }
            "device" => {
                s.device = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .filter(|d| !d.is_empty())
            }
            "client-timeout" => {
                s.client_timeout_ms = value.get().expect("type checked upstream");
                if let Some(server) = &self.state.lock().unwrap().server {
                    server.set_client_timeout(client_timeout(s.client_timeout_ms));
                }
            }
            "max-held" => s.max_held = value.get().expect("type checked upstream"),
            other => unreachable!("unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        match pspec.name() {
            "socket" => self.settings.lock().unwrap().socket.to_value(),
            "max-inflight" => self.settings.lock().unwrap().max_inflight.to_value(),
            "max-inflight-limit" => self.settings.lock().unwrap().max_inflight_limit.to_value(),
            "max-pending-connections" => self
                .settings
                .lock()
                .unwrap()
                .max_pending_connections
                .to_value(),
            "inline-threshold" => self.settings.lock().unwrap().inline_threshold.to_value(),
            "socket-mode" => self.settings.lock().unwrap().socket_mode.to_value(),
            "allowed-uid" => self.settings.lock().unwrap().allowed_uid.to_value(),
            "allowed-gid" => self.settings.lock().unwrap().allowed_gid.to_value(),
            "backend" => self.settings.lock().unwrap().backend.to_value(),
            "heap" => self.settings.lock().unwrap().heap.to_value(),
            "device" => self.settings.lock().unwrap().device.to_value(),
            "client-timeout" => self.settings.lock().unwrap().client_timeout_ms.to_value(),
            "max-held" => self.settings.lock().unwrap().max_held.to_value(),
            "num-clients" => {
                let state = self.state.lock().unwrap();
                (state.server.as_ref().map_or(0, |s| s.num_clients()) as u32).to_value()
            }
            "stats" => self.stats().to_value(),
            other => unreachable!("unknown property {other}"),
        }
    }
}

impl GstObjectImpl for BufShareSink {}

// Defaults that differ from GstBaseSink's, set in `constructed`:
// - enable-last-sample=false: keeping the last buffer would pin one upstream
//   pool buffer for nothing;
// - processing-deadline=0: render never blocks, so no extra latency is needed.

impl ElementImpl for BufShareSink {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "bufshare sink",
                "Sink/Network",
                "Shares buffers with any number of bufsharesrc consumers in other processes over a UNIX socket, by fd, without copying",
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

fn inflight_limits(s: &Settings) -> InflightLimits {
    InflightLimits {
        default: s.max_inflight,
        limit: s.max_inflight_limit,
    }
}

fn client_timeout(ms: u32) -> Option<std::time::Duration> {
    (ms > 0).then(|| std::time::Duration::from_millis(ms.into()))
}

/// The bound on distinct frames all consumers hold: `max-held` if set, else
/// from the pool `buffer` came from when that pool has a fixed maximum
/// (looked up once per pool: `cache`).
fn held_bound(
    max_held: u32,
    buffer: &gst::BufferRef,
    cache: &mut Option<(gst::BufferPool, Option<usize>)>,
) -> Option<usize> {
    if max_held > 0 {
        return Some(max_held as usize);
    }
    // SAFETY: reading the pool field of a live buffer; a buffer acquired from
    // a pool keeps a reference to it until it goes back.
    let pool_ptr = unsafe { (*buffer.as_ptr()).pool };
    if pool_ptr.is_null() {
        return None;
    }
    if let Some((pool, bound)) = cache {
        if pool.as_ptr() == pool_ptr {
            return *bound;
        }
    }
    // SAFETY: a valid pool pointer, see above; from_glib_none takes a reference.
    let pool: gst::BufferPool = unsafe { glib::translate::from_glib_none(pool_ptr) };
    let bound = pool.config().params().and_then(|(_, _, _, max)| {
        (max > 0).then(|| max.saturating_sub(POOL_BUFFERS_KEPT_FREE).max(1) as usize)
    });
    *cache = Some((pool, bound));
    bound
}

/// Tells the server (for monitors) which backend is in use: it changes when a
/// V4L2 queue is set up or `auto` falls back to memfd (`make_pool`).
fn publish_backend(state: &Started) {
    if let (Some(server), Some(memory)) = (&state.server, &state.memory) {
        server.set_backend(memory.backend.name());
    }
}

/// The video info of raw video caps with a real format and a size; None for
/// anything else (encoded video, images, audio, ...), which gets no pool.
pub(crate) fn raw_video_info(caps: &gst::CapsRef) -> Option<gst_video::VideoInfo> {
    let s = caps.structure(0)?;
    if s.name() != "video/x-raw" {
        return None;
    }
    let info = gst_video::VideoInfo::from_caps(caps).ok()?;
    let real_format = !matches!(
        info.format(),
        gst_video::VideoFormat::Encoded | gst_video::VideoFormat::Unknown
    );
    (real_format && info.size() > 0).then_some(info)
}

/// Checks the socket's directory before binding, for errors that say what is wrong.
fn check_socket_dir(path: &Path) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match std::fs::metadata(&dir) {
        Err(e) => Err(format!(
            "directory {} of socket {}: {e}",
            dir.display(),
            path.display()
        )),
        Ok(m) if !m.is_dir() => Err(format!(
            "{} (directory of socket {}) is not a directory",
            dir.display(),
            path.display()
        )),
        Ok(_) => rustix::fs::access(
            &dir,
            rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
        )
        .map_err(|e| {
            format!(
                "directory {} of socket {} is not writable: {e}",
                dir.display(),
                path.display()
            )
        }),
    }
}

impl BaseSinkImpl for BufShareSink {
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let settings = self.settings.lock().unwrap().clone();
        let Some(socket) = settings.socket.clone().filter(|s| !s.is_empty()) else {
            return Err(gst::error_msg!(
                gst::ResourceError::Settings,
                ("No socket path set: set the 'socket' property to the UNIX socket path to serve on")
            ));
        };
        let memory = self.choose_backend(&settings)?;
        let path = PathBuf::from(&socket);
        check_socket_dir(&path)
            .map_err(|e| gst::error_msg!(gst::ResourceError::OpenWrite, ("{}", e)))?;
        let mut listener = Listener::bind_with_mode(&path, Some(settings.socket_mode))
            .map_err(|e| gst::error_msg!(gst::ResourceError::OpenWrite, ("{}", e)))?;
        listener.set_peer_policy(PeerPolicy {
            uid: u32::try_from(settings.allowed_uid).ok(),
            gid: u32::try_from(settings.allowed_gid).ok(),
        });
        let weak = self.obj().downgrade();
        let server = Server::start(
            listener,
            Config {
                inflight: inflight_limits(&settings),
                client_timeout: client_timeout(settings.client_timeout_ms),
                max_pending: settings.max_pending_connections as usize,
            },
            move |events| {
                if let Some(obj) = weak.upgrade() {
                    obj.imp().report(events);
                }
            },
        )
        .map_err(|e| {
            gst::error_msg!(
                gst::ResourceError::OpenWrite,
                ("Cannot start serving {}: {}", socket, e)
            )
        })?;
        gst::info!(CAT, imp = self, "serving on {}", socket);
        server.set_backend(memory.backend.name());
        *self.state.lock().unwrap() = Started {
            server: Some(Arc::new(server)),
            memory: Some(memory),
            ..Default::default()
        };
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        let started = std::mem::take(&mut *self.state.lock().unwrap());
        // Dropping the server disconnects consumers and releases what they held.
        drop(started);
        self.obj().notify("num-clients");
        gst::info!(CAT, imp = self, "stopped");
        Ok(())
    }

    fn set_caps(&self, caps: &gst::Caps) -> Result<(), gst::LoggableError> {
        gst::debug!(CAT, imp = self, "caps {}", caps);
        // Upstream may reconfigure its pool for the new caps.
        self.state.lock().unwrap().pool_bound = None;
        let latency = self.obj().latency().nseconds();
        let caps_string = caps.to_string();
        let encoded = protocol::encode(&protocol::Message::Caps {
            caps: caps_string.clone(),
            latency,
        });
        if encoded.len() > protocol::MAX_MESSAGE_LEN {
            gst::element_imp_error!(
                self,
                gst::CoreError::Negotiation,
                (
                    "Caps of {} bytes do not fit in one message (limit {} bytes)",
                    caps_string.len(),
                    protocol::MAX_MESSAGE_LEN
                )
            );
            return Err(gst::loggable_error!(CAT, "caps too long to send"));
        }
        let mut state = self.state.lock().unwrap();
        // New caps: memory for copies is sized anew on the next buffer.
        state.copy_pool = None;
        if let Some(server) = &state.server {
            server.set_caps(Some(caps_string), latency);
        }
        Ok(())
    }

    fn event(&self, event: gst::Event) -> bool {
        match event.view() {
            gst::EventView::Eos(_) => {
                let server = self.state.lock().unwrap().server.clone();
                if let Some(server) = server {
                    gst::debug!(CAT, imp = self, "EOS: telling consumers");
                    server.send_eos();
                    // The pipeline may stop right after EOS (gst-launch -e): wait
                    // (bounded) until every consumer has the EOS in its socket,
                    // also those whose socket is full now.
                    if !server.wait_flushed(server::FLUSH_LIMIT) {
                        gst::info!(
                            CAT,
                            imp = self,
                            "EOS: some consumers still did not take it after {} ms",
                            server::FLUSH_LIMIT.as_millis()
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
        self.state.lock().unwrap().pool_bound = None;
        let (caps, need_pool) = query.get_owned();
        let Some(caps) = caps else {
            return Ok(());
        };
        // Only raw video gets the backend's video pool. Encoded video (H.264,
        // VP8, ...), image/jpeg, audio, text, tensors and the rest get no pool:
        // upstream allocates as it likes and each buffer is shared by its fd, or
        // copied once into memory for copies. gst_video_info_from_caps accepts
        // encoded video caps too (format ENCODED, size 0), so check both.
        let Some(info) = raw_video_info(&caps) else {
            gst::debug!(
                CAT,
                imp = self,
                "not raw video, proposing no pool: {}",
                caps
            );
            return Ok(());
        };
        // Before start there is no backend yet: no pool to offer.
        let started = self.state.lock().unwrap().memory.is_some();
        if need_pool && started {
            let pool = {
                let mut state = self.state.lock().unwrap();
                let pool = self.make_pool(&mut state.memory, Some(&caps), info.size() as u32);
                publish_backend(&state);
                pool
            }
            .map_err(|e| {
                gst::element_imp_error!(
                    self,
                    gst::ResourceError::OpenWrite,
                    ("Cannot set up a buffer pool for {}: {}", caps, e)
                );
                gst::loggable_error!(CAT, "pool for {}: {}", caps, e)
            })?;
            let config = pool.config();
            let (_, size, min, max) = config
                .params()
                .ok_or_else(|| gst::loggable_error!(CAT, "pool without params"))?;
            query.add_allocation_pool(Some(&pool), size, min, max);
            gst::debug!(
                CAT,
                imp = self,
                "proposing a {} pool of {} byte buffers (min {}, max {})",
                pool.backend_name(),
                size,
                min,
                max
            );
        }
        query.add_allocation_meta::<gst_video::VideoMeta>(None);
        Ok(())
    }

    fn render(&self, buffer: &gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        let (inline_threshold, max_held) = {
            let s = self.settings.lock().unwrap();
            (s.inline_threshold as usize, s.max_held)
        };
        let mut state = self.state.lock().unwrap();
        let mut out = self.prepare(&mut state, buffer, inline_threshold)?;
        out.max_held = held_bound(max_held, &out.buffer, &mut state.pool_bound);
        let Some(server) = &state.server else {
            return Err(gst::FlowError::Flushing);
        };
        // Tell consumers if the pipeline latency changed since the caps went out.
        let latency = self.obj().latency().nseconds();
        if latency != server.latency() {
            if let Some(caps) = self.obj().sink_pad().current_caps() {
                server.set_caps(Some(caps.to_string()), latency);
            }
        }
        server.send_frame(&out);
        state.frame_buf = out.frame_bytes;
        Ok(gst::FlowSuccess::Ok)
    }
}

impl BufShareSink {
    /// Turns a rendered buffer into a frame: memory by fd (copying once if it
    /// has no fd), or inline bytes for small buffers; timestamps onto CLOCK_MONOTONIC.
    fn prepare(
        &self,
        state: &mut Started,
        buffer: &gst::Buffer,
        inline_threshold: usize,
    ) -> Result<Outgoing, gst::FlowError> {
        if state.server.is_none() {
            return Err(gst::FlowError::Flushing);
        }
        state.next_frame_id += 1;
        let frame_id = state.next_frame_id;
        let size = buffer.size();
        // Metas come from the buffer as it arrived; a copy keeps its layout byte for byte.
        let metas = crate::metas::from_buffer(buffer);

        let (buffer, memories, refs) = if size <= inline_threshold {
            let map = buffer.map_readable().map_err(|_| {
                gst::element_imp_error!(
                    self,
                    gst::StreamError::Failed,
                    ("Cannot map a buffer to read it")
                );
                gst::FlowError::Error
            })?;
            (
                buffer.clone(),
                Vec::new(),
                vec![MemoryRef::Inline(map.to_vec())],
            )
        } else {
            let shareable =
                buffer.n_memory() > 0 && buffer.iter_memories().all(|m| self.can_share(m));
            let buffer = if shareable {
                buffer.clone()
            } else {
                state.frames_copied += 1;
                let copy =
                    self.copy_into_shareable(&mut state.copy_pool, &mut state.memory, buffer);
                publish_backend(state);
                if let Some(server) = &state.server {
                    server.note_copy();
                }
                copy?
            };
            let server = state.server.as_ref().ok_or(gst::FlowError::Flushing)?;
            let mut memories = Vec::with_capacity(buffer.n_memory());
            let mut refs = Vec::with_capacity(buffer.n_memory());
            for mem in buffer.iter_memories() {
                let fd_mem = mem
                    .downcast_memory_ref::<gst_allocators::FdMemory>()
                    .ok_or(gst::FlowError::Error)?;
                let root = memtag::root_memory(mem);
                let mem_id =
                    memtag::tag_memory(mem, server.forget_listener(), |id| server.note_memory(id));
                let kind = if mem.is_memory_type::<gst_allocators::DmaBufMemory>() {
                    protocol::MemoryKind::DmaBuf
                } else {
                    protocol::MemoryKind::Memfd
                };
                memories.push(SharedMemory {
                    mem_id,
                    kind,
                    fd_size: (root.offset() + root.maxsize()) as u64,
                    raw_fd: fd_mem.fd(),
                });
                refs.push(MemoryRef::Registered {
                    mem_id,
                    offset: mem.offset() as u64,
                    size: mem.size() as u64,
                });
            }
            (buffer, memories, refs)
        };

        let time_map = state.time_map.get(self.obj().upcast_ref());
        // A time before the segment start has a negative running time: an
        // encoder's DTS ahead of its first PTS (x264enc's defaults reorder
        // frames). It goes as an instant before the base time; dropping it
        // would leave muxers (mp4mux) without the DTS of the first frames.
        let to_wire = |t: Option<gst::ClockTime>| -> u64 {
            let running = t.and_then(|t| state.segment.as_ref()?.to_running_time_full(t));
            match (running, time_map) {
                (Some(gst::Signed::Positive(rt)), Some(map)) => map.to_monotonic(rt.nseconds()),
                (Some(gst::Signed::Negative(before)), Some(map)) => {
                    map.to_monotonic(0).saturating_sub(before.nseconds())
                }
                _ => protocol::NONE,
            }
        };
        let mut frame = protocol::Frame {
            frame_id,
            pts: to_wire(buffer.pts()),
            dts: to_wire(buffer.dts()),
            duration: buffer.duration().map_or(protocol::NONE, |d| d.nseconds()),
            offset: buffer.offset(),
            offset_end: buffer.offset_end(),
            flags: buffer.flags().bits(),
            memories: refs,
            metas,
        };
        let mut frame_bytes = std::mem::take(&mut state.frame_buf);
        protocol::encode_frame_into(&frame, &mut frame_bytes);
        if frame_bytes.len() > protocol::MAX_MESSAGE_LEN || frame.metas.len() > protocol::MAX_METAS
        {
            // Optional metas go, biggest first; video and audio metas stay.
            let dropped = frame.drop_metas_to_fit(protocol::MAX_MESSAGE_LEN);
            let names: Vec<String> = dropped.iter().map(|m| m.name()).collect();
            gst::warning!(
                CAT,
                imp = self,
                "frame {} with its {} metas is {} bytes, over the limit of {} metas or {} bytes: dropping {}",
                frame_id,
                frame.metas.len() + dropped.len(),
                frame_bytes.len(),
                protocol::MAX_METAS,
                protocol::MAX_MESSAGE_LEN,
                names.join(", ")
            );
            protocol::encode_frame_into(&frame, &mut frame_bytes);
        }
        Ok(Outgoing {
            buffer,
            frame_id,
            needs_release: frame.needs_release(),
            frame_bytes,
            memories,
            max_held: None,
        })
    }

    /// Whether `mem` can go to consumers by its fd: fd memory, and for memfd
    /// (non-dma-buf) memory a file whose size nobody can change, so that no
    /// consumer's mapping can ever fault. Upstream memfds are sealed here if
    /// they allow it; files that cannot be sealed are copied instead.
    fn can_share(&self, mem: &gst::MemoryRef) -> bool {
        let Some(fd_mem) = mem.downcast_memory_ref::<gst_allocators::FdMemory>() else {
            return false;
        };
        // dma-bufs have a size fixed by their exporter. A memory with an id was
        // checked (or sealed) the first time it was shared, and seals are permanent:
        // no syscall per frame for memory seen before.
        if mem.is_memory_type::<gst_allocators::DmaBufMemory>() || memtag::is_tagged(mem) {
            return true;
        }
        // SAFETY: the fd belongs to `mem`, alive for this call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd_mem.fd()) };
        match bufshare_backends::share::seal_against_resize(fd) {
            Ok(()) => true,
            Err(e) => {
                gst::debug!(
                    CAT,
                    imp = self,
                    "fd memory that cannot be sealed against resizing ({}): copying it",
                    e
                );
                false
            }
        }
    }

    /// One copy of a buffer without fds into backend memory, keeping its
    /// timestamps and flags (metas are taken from the original by the caller).
    fn copy_into_shareable(
        &self,
        copy_pool: &mut Option<CopyPool>,
        memory: &mut Option<InUse>,
        buffer: &gst::Buffer,
    ) -> Result<gst::Buffer, gst::FlowError> {
        let size = buffer.size();
        if copy_pool.as_ref().is_none_or(|p| p.size < size) {
            if let Some(old) = copy_pool.take() {
                let _ = old.pool.set_active(false);
            }
            let needs_video = memory
                .as_ref()
                .is_some_and(|m| m.backend.needs_video_format());
            // Round up so that slowly growing sizes (audio, tensors) do not make a new pool
            // each time. A device queue (V4L2) is set up for the caps' frames instead.
            let (caps, pool_size) = if needs_video {
                (self.obj().sink_pad().current_caps(), size)
            } else {
                (None, size.next_power_of_two().max(64 * 1024))
            };
            let pool = self
                .make_pool(memory, caps.as_ref(), pool_size as u32)
                .map_err(|e| {
                    gst::element_imp_error!(
                        self,
                        gst::ResourceError::NoSpaceLeft,
                        ("Cannot set up memory for copies: {}", e)
                    );
                    gst::FlowError::Error
                })?;
            pool.set_active(true).map_err(|e| {
                gst::element_imp_error!(
                    self,
                    gst::ResourceError::NoSpaceLeft,
                    (
                        "Cannot allocate {} memory for copies: {}",
                        pool.backend_name(),
                        e
                    )
                );
                gst::FlowError::Error
            })?;
            gst::debug!(
                CAT,
                imp = self,
                "copy pool of {} byte buffers for memory without fds",
                pool_size
            );
            *copy_pool = Some(CopyPool {
                pool,
                size: pool_size,
            });
        }
        let pool = &copy_pool.as_ref().expect("set above").pool;
        let mut out = pool.acquire_buffer(None)?;
        if out.maxsize() < size {
            // A device queue's buffers (V4L2) are sized for the caps, not for any bytes.
            gst::element_imp_error!(
                self,
                gst::ResourceError::NoSpaceLeft,
                (
                    "A {} byte buffer does not fit the {} backend's {} byte buffers",
                    size,
                    pool.backend_name(),
                    out.maxsize()
                )
            );
            return Err(gst::FlowError::Error);
        }
        {
            let out = out.get_mut().ok_or(gst::FlowError::Error)?;
            out.set_size(size);
            {
                let mut map = out.map_writable().map_err(|_| gst::FlowError::Error)?;
                buffer
                    .copy_to_slice(0, &mut map[..])
                    .map_err(|_| gst::FlowError::Error)?;
            }
            buffer
                .copy_into(
                    out,
                    gst::BufferCopyFlags::FLAGS | gst::BufferCopyFlags::TIMESTAMPS,
                    ..,
                )
                .map_err(|_| gst::FlowError::Error)?;
        }
        Ok(out)
    }

    /// Opens the backend the settings ask for. Under `auto`, passing over a
    /// backend is a warning (log and element message) that says why.
    fn choose_backend(&self, settings: &Settings) -> Result<InUse, gst::ErrorMessage> {
        let resolved =
            backend::resolve(settings.backend, &settings.heap, settings.device.as_deref())
                .map_err(|e| {
                    gst::error_msg!(
                        gst::ResourceError::OpenReadWrite,
                        (
                            "Cannot use memory backend '{}': {}",
                            settings.backend.nick(),
                            e
                        )
                    )
                })?;
        let auto = settings.backend == BackendKind::Auto;
        if auto && resolved.choice.kind == BackendKind::Memfd {
            self.warn_fallback(&resolved.fallback_reasons.join("; "));
        } else if !resolved.fallback_reasons.is_empty() {
            gst::info!(
                CAT,
                imp = self,
                "auto passed over: {}",
                resolved.fallback_reasons.join("; ")
            );
        }
        gst::info!(
            CAT,
            imp = self,
            "memory backend {} {}",
            resolved.backend.name(),
            resolved
                .backend
                .source()
                .unwrap_or_else(|| resolved.choice.describe())
        );
        Ok(InUse {
            choice: resolved.choice,
            backend: resolved.backend,
            auto,
        })
    }

    fn warn_fallback(&self, reasons: &str) {
        gst::warning!(
            CAT,
            imp = self,
            "backend=auto: no hardware backend usable, falling back to memfd: {}",
            reasons
        );
        gst::element_imp_warning!(
            self,
            gst::ResourceError::OpenReadWrite,
            (
                "backend=auto: falling back to memfd (CPU memory, no dma-buf): {}",
                reasons
            )
        );
    }

    /// A pool over the backend in use, configured for `caps`. A V4L2 backend
    /// gets a fresh instance (each pool owns a device queue). Under `auto`, a
    /// backend that cannot hold the caps gives way to memfd, with a warning.
    fn make_pool(
        &self,
        memory: &mut Option<InUse>,
        caps: Option<&gst::Caps>,
        size: u32,
    ) -> Result<BackendBufferPool, String> {
        let m = memory.as_mut().ok_or("the element is not started")?;
        let backend = if m.backend.needs_video_format() {
            m.choice.open()?
        } else {
            m.backend.clone()
        };
        match BackendBufferPool::configured(backend.clone(), caps, size, 0, 0) {
            Ok(pool) => {
                if backend.needs_video_format() {
                    gst::info!(
                        CAT,
                        imp = self,
                        "v4l2 queue set up on {}",
                        backend.source().unwrap_or_default()
                    );
                    // Stats then name the device whose queue is in use.
                    m.backend = backend;
                }
                Ok(pool)
            }
            Err(e) if m.auto && m.choice.kind != BackendKind::Memfd => {
                self.warn_fallback(&format!("{}: {e}", m.choice.kind.nick()));
                m.choice.kind = BackendKind::Memfd;
                m.backend = Arc::new(MemfdBackend::new());
                BackendBufferPool::configured(m.backend.clone(), caps, size, 0, 0)
            }
            Err(e) => Err(format!(
                "{} backend ({}): {e}",
                m.choice.kind.nick(),
                m.choice.describe()
            )),
        }
    }

    fn report(&self, events: Vec<Event>) {
        let mut changed = false;
        for event in events {
            match event {
                Event::Connected { client_id, pid } => {
                    gst::info!(
                        CAT,
                        imp = self,
                        "consumer {} connected (pid {:?})",
                        client_id,
                        pid
                    );
                    self.obj()
                        .emit_by_name::<()>("client-connected", &[&client_id]);
                    changed = true;
                }
                Event::Disconnected {
                    client_id,
                    reason,
                    warn,
                    active,
                } => {
                    if warn {
                        gst::warning!(
                            CAT,
                            imp = self,
                            "dropping consumer {}: {}",
                            client_id,
                            reason
                        );
                        gst::element_imp_warning!(
                            self,
                            gst::ResourceError::Read,
                            ("Dropped consumer {}: {}", client_id, reason)
                        );
                    } else {
                        gst::info!(CAT, imp = self, "consumer {} left: {}", client_id, reason);
                    }
                    // Only consumers that were reported connected are reported
                    // gone; a connection dropped before its HELLO is only logged.
                    if active {
                        self.obj()
                            .emit_by_name::<()>("client-disconnected", &[&client_id]);
                        changed = true;
                    }
                }
            }
        }
        if changed {
            self.obj().notify("num-clients");
        }
    }

    fn stats(&self) -> gst::Structure {
        let state = self.state.lock().unwrap();
        let (clients, rendered, held) = match &state.server {
            Some(s) => (s.client_stats(), s.frames_rendered(), s.held_stats()),
            None => (Vec::new(), 0, Default::default()),
        };
        let per_client: Vec<glib::SendValue> = clients
            .iter()
            .map(|c| {
                gst::Structure::builder("client")
                    .field("client-id", c.client_id)
                    .field("pid", c.pid.unwrap_or(0))
                    .field("frames-sent", c.frames_sent)
                    .field("frames-dropped", c.frames_dropped)
                    .field("frames-dropped-held", c.frames_dropped_held)
                    .field("frames-in-flight", c.frames_in_flight)
                    .field("frames-in-flight-peak", c.frames_in_flight_peak)
                    .field("memories-registered", c.memories_registered)
                    .field("released-by-ring", c.released_by_ring)
                    .field("frames-by-ring", c.frames_by_ring)
                    .field("released-by-message", c.released_by_message)
                    .field("max-inflight", c.max_inflight)
                    .build()
                    .to_send_value()
            })
            .collect();
        let (backend_name, backend_source) = match &state.memory {
            Some(m) => (
                m.backend.name().to_string(),
                m.backend.source().unwrap_or_else(|| m.choice.describe()),
            ),
            None => (String::new(), String::new()),
        };
        gst::Structure::builder("application/x-bufshare-sink-stats")
            .field("backend", backend_name)
            .field("backend-source", backend_source)
            .field("num-clients", clients.len() as u32)
            .field("frames-rendered", rendered)
            .field("frames-copied", state.frames_copied)
            .field("max-held", held.max_held)
            .field("frames-held", held.frames_held)
            .field("frames-held-peak", held.frames_held_peak)
            .field("clients-timed-out", held.clients_timed_out)
            .field("clients", gst::Array::from_values(per_client))
            .build()
    }
}
