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

use super::server::{Event, Outgoing, Server, SharedMemory};
use crate::clock::TimeMapCache;
use crate::memtag;
use crate::pool::BackendBufferPool;
use crate::protocol::{self, MemoryRef};
use crate::transport::unix::Listener;

pub(crate) static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "bufsharesink",
        gst::DebugColorFlags::empty(),
        Some("bufshare producer: zero-copy fan-out over a UNIX socket"),
    )
});

const DEFAULT_MAX_INFLIGHT: u32 = 8;
const DEFAULT_CLIENT_TIMEOUT_MS: u32 = 3000;
/// 0: derive the bound from a fixed upstream pool.
const DEFAULT_MAX_HELD: u32 = 0;
/// Buffers of a fixed upstream pool kept out of the consumers' reach: one
/// being filled and one spare (a V4L2 driver needs a queued buffer to capture).
const POOL_BUFFERS_KEPT_FREE: u32 = 2;
const DEFAULT_INLINE_THRESHOLD: u32 = 4096;
/// Inline payloads must leave room for the frame header in one datagram.
const MAX_INLINE_THRESHOLD: u32 = 32 * 1024;

#[derive(Debug, Clone)]
struct Settings {
    socket: Option<String>,
    max_inflight: u32,
    inline_threshold: u32,
    client_timeout_ms: u32,
    max_held: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            socket: None,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            inline_threshold: DEFAULT_INLINE_THRESHOLD,
            client_timeout_ms: DEFAULT_CLIENT_TIMEOUT_MS,
            max_held: DEFAULT_MAX_HELD,
        }
    }
}

/// Memory for buffers that arrive without an fd: one copy each, into a pool.
struct CopyPool {
    pool: BackendBufferPool,
    size: usize,
}

#[derive(Default)]
struct Started {
    server: Option<Server>,
    copy_pool: Option<CopyPool>,
    segment: Option<gst::FormattedSegment<gst::ClockTime>>,
    next_frame_id: u64,
    frames_copied: u64,
    time_map: TimeMapCache,
}

pub struct BufShareSink {
    settings: Mutex<Settings>,
    state: Mutex<Started>,
    backend: Arc<dyn MemoryBackend>,
}

impl Default for BufShareSink {
    fn default() -> Self {
        BufShareSink {
            settings: Mutex::new(Settings::default()),
            state: Mutex::new(Started::default()),
            backend: Arc::new(MemfdBackend::new()),
        }
    }
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
                    .blurb("Frames one consumer may hold at once. Past this, frames are skipped for that consumer only (the latest frame wins) and counted as dropped. 8 leaves room for a hardware encoder that queues several frames.")
                    .minimum(1)
                    .maximum(1024)
                    .default_value(DEFAULT_MAX_INFLIGHT)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("inline-threshold")
                    .nick("Inline threshold")
                    .blurb("Buffers of at most this many bytes travel inside the message, with no fd (text, small audio). 0 sends everything by fd.")
                    .maximum(MAX_INLINE_THRESHOLD)
                    .default_value(DEFAULT_INLINE_THRESHOLD)
                    .mutable_playing()
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
                    .blurb("frames-rendered, frames-copied (buffers that arrived without an fd), max-held (bound in use, 0: none), frames-held (distinct frames consumers hold), frames-held-peak, clients-timed-out, and per consumer (clients): client-id, pid, frames-sent, frames-dropped, frames-dropped-held (by the max-held bound), frames-in-flight, frames-in-flight-peak, memories-registered")
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
                    server.set_max_inflight(s.max_inflight as usize);
                }
            }
            "inline-threshold" => s.inline_threshold = value.get().expect("type checked upstream"),
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
            "inline-threshold" => self.settings.lock().unwrap().inline_threshold.to_value(),
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

fn client_timeout(ms: u32) -> Option<std::time::Duration> {
    (ms > 0).then(|| std::time::Duration::from_millis(ms.into()))
}

/// The bound on distinct frames all consumers hold: `max-held` if set, else
/// from the pool `buffer` came from when that pool has a fixed maximum.
fn held_bound(max_held: u32, buffer: &gst::BufferRef) -> Option<usize> {
    if max_held > 0 {
        return Some(max_held as usize);
    }
    // SAFETY: reading the pool field of a live buffer; a buffer acquired from
    // a pool keeps a reference to it until it goes back.
    let pool_ptr = unsafe { (*buffer.as_ptr()).pool };
    if pool_ptr.is_null() {
        return None;
    }
    // SAFETY: a valid pool pointer, see above; from_glib_none takes a reference.
    let pool: gst::BufferPool = unsafe { glib::translate::from_glib_none(pool_ptr) };
    let (_, _, _, max) = pool.config().params()?;
    (max > 0).then(|| max.saturating_sub(POOL_BUFFERS_KEPT_FREE).max(1) as usize)
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
        let Some(socket) = settings.socket.filter(|s| !s.is_empty()) else {
            return Err(gst::error_msg!(
                gst::ResourceError::Settings,
                ("No socket path set: set the 'socket' property to the UNIX socket path to serve on")
            ));
        };
        let path = PathBuf::from(&socket);
        check_socket_dir(&path)
            .map_err(|e| gst::error_msg!(gst::ResourceError::OpenWrite, ("{}", e)))?;
        let listener = Listener::bind(&path)
            .map_err(|e| gst::error_msg!(gst::ResourceError::OpenWrite, ("{}", e)))?;
        let weak = self.obj().downgrade();
        let server = Server::start(
            listener,
            settings.max_inflight as usize,
            client_timeout(settings.client_timeout_ms),
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
        *self.state.lock().unwrap() = Started {
            server: Some(server),
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
                if let Some(server) = &self.state.lock().unwrap().server {
                    gst::debug!(CAT, imp = self, "EOS: telling consumers");
                    server.send_eos();
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
        if let Some(caps) = caps {
            if let Ok(info) = gst_video::VideoInfo::from_caps(&caps) {
                if need_pool {
                    let size = info.size() as u32;
                    let pool = BackendBufferPool::configured(
                        self.backend.clone(),
                        Some(&caps),
                        size,
                        0,
                        0,
                    )
                    .map_err(|e| gst::loggable_error!(CAT, "configuring pool: {}", e))?;
                    query.add_allocation_pool(Some(&pool), size, 0, 0);
                    gst::debug!(
                        CAT,
                        imp = self,
                        "proposing a {} pool of {} byte buffers",
                        self.backend.name(),
                        size
                    );
                }
                query.add_allocation_meta::<gst_video::VideoMeta>(None);
            }
        }
        Ok(())
    }

    fn render(&self, buffer: &gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        let (inline_threshold, max_held) = {
            let s = self.settings.lock().unwrap();
            (s.inline_threshold as usize, s.max_held)
        };
        let mut state = self.state.lock().unwrap();
        let mut out = self.prepare(&mut state, buffer, inline_threshold)?;
        out.max_held = held_bound(max_held, &out.buffer);
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
        server.send_frame(out);
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
            let shareable = buffer.n_memory() > 0
                && buffer
                    .iter_memories()
                    .all(|m| m.is_memory_type::<gst_allocators::FdMemory>());
            let buffer = if shareable {
                buffer.clone()
            } else {
                state.frames_copied += 1;
                self.copy_into_shareable(&mut state.copy_pool, buffer)?
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
        let to_wire = |t: Option<gst::ClockTime>| -> u64 {
            let running = t.and_then(|t| state.segment.as_ref()?.to_running_time(t));
            match (running, time_map) {
                (Some(rt), Some(map)) => map.to_monotonic(rt.nseconds()),
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
        let mut frame_bytes = protocol::encode(&protocol::Message::Frame(frame.clone()));
        if frame_bytes.len() > protocol::MAX_MESSAGE_LEN {
            // Only custom metas can grow this large; a frame without them still goes.
            gst::warning!(
                CAT,
                imp = self,
                "frame {} with its metas is {} bytes, over the {} byte message limit: dropping its custom metas",
                frame_id,
                frame_bytes.len(),
                protocol::MAX_MESSAGE_LEN
            );
            frame
                .metas
                .retain(|m| !matches!(m, protocol::Meta::Custom { .. }));
            frame_bytes = protocol::encode(&protocol::Message::Frame(frame.clone()));
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

    /// One copy of a buffer without fds into backend memory, keeping its
    /// timestamps and flags (metas are taken from the original by the caller).
    fn copy_into_shareable(
        &self,
        copy_pool: &mut Option<CopyPool>,
        buffer: &gst::Buffer,
    ) -> Result<gst::Buffer, gst::FlowError> {
        let size = buffer.size();
        if copy_pool.as_ref().is_none_or(|p| p.size < size) {
            if let Some(old) = copy_pool.take() {
                let _ = old.pool.set_active(false);
            }
            // Round up so that slowly growing sizes (audio, tensors) do not make a new pool each time.
            let pool_size = size.next_power_of_two().max(64 * 1024);
            let pool =
                BackendBufferPool::configured(self.backend.clone(), None, pool_size as u32, 0, 0)
                    .and_then(|p| p.set_active(true).map(|_| p))
                    .map_err(|e| {
                        gst::element_imp_error!(
                            self,
                            gst::ResourceError::NoSpaceLeft,
                            (
                                "Cannot set up {} memory for copies: {}",
                                self.backend.name(),
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
                pool: pool.upcast_ref::<BackendBufferPool>().clone(),
                size: pool_size,
            });
        }
        let pool = &copy_pool.as_ref().expect("set above").pool;
        let mut out = pool.acquire_buffer(None)?;
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
                    self.obj()
                        .emit_by_name::<()>("client-disconnected", &[&client_id]);
                    changed = true;
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
                    .build()
                    .to_send_value()
            })
            .collect();
        gst::Structure::builder("application/x-bufshare-sink-stats")
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
