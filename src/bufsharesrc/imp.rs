//! The bufsharesrc element: settings, start (connect + caps), create (one
//! frame), negotiation from the producer's caps, latency, unlock.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::base_src::CreateSuccess;
use gst_base::subclass::prelude::*;

use super::receiver::{Connection, Incoming, ReceiveError};
use super::stale::StaleFilter;
use crate::clock::TimeMapCache;
use crate::protocol;
use crate::transport::unix::Waker;

pub(crate) static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "bufsharesrc",
        gst::DebugColorFlags::empty(),
        Some("bufshare consumer: receives frames from a bufsharesink"),
    )
});

const DEFAULT_TIMEOUT_MS: u64 = 1000;
#[derive(Debug, Clone)]
struct Settings {
    socket: Option<String>,
    timeout_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            socket: None,
            timeout_ms: DEFAULT_TIMEOUT_MS,
        }
    }
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
    connection: Mutex<Option<Connection>>,
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
            connection: Mutex::new(None),
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
                    .blurb("Milliseconds that start (READY to PAUSED) waits in total for a producer to appear on the socket, complete the handshake and send its caps; past it the element fails with an error saying which of these it was waiting for. It does not bound the wait for frames once streaming.")
                    .default_value(DEFAULT_TIMEOUT_MS)
                    .mutable_ready()
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
            other => unreachable!("unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = self.settings.lock().unwrap();
        match pspec.name() {
            "socket" => s.socket.to_value(),
            "timeout" => s.timeout_ms.to_value(),
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
        *self.connection.lock().unwrap() = Some(conn);
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        *self.connection.lock().unwrap() = None;
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
            let mut connection = self.connection.lock().unwrap();
            let conn = connection.as_mut().ok_or(gst::FlowError::Flushing)?;
            let incoming = conn.next(None, &flushing, "waiting for frames");
            match incoming {
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
                    for warning in crate::metas::apply(b, &frame.metas) {
                        gst::warning!(CAT, imp = self, "{}", warning);
                    }
                    return Ok(CreateSuccess::NewBuffer(buffer));
                }
                Ok(Incoming::Caps { caps, latency }) => {
                    drop(connection);
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
                Err(e) => {
                    *connection = None;
                    drop(connection);
                    gst::warning!(CAT, imp = self, "{}", e);
                    let msg = self.error_for(&e, &self.socket_name());
                    self.post_error_message(msg);
                    return Err(gst::FlowError::Error);
                }
            }
        }
    }
}
