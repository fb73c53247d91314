//! The bufshare wire protocol: message types and their byte encoding.
//!
//! This module is pure: no I/O, no GStreamer, no file descriptors. It turns
//! [`Message`] values into bytes and back. File descriptors travel out of band
//! (SCM_RIGHTS on the same datagram); a message only says how many it carries,
//! and [`decode`] checks that count against what the datagram really brought.
//!
//! Every message is one datagram of a `SOCK_SEQPACKET` socket:
//!
//! ```text
//! offset 0  u16 kind      message kind (see `Kind`)
//! offset 2  u16 n_fds     number of fds attached to this datagram
//! offset 4  u32 body_len  length of the body that follows
//! offset 8  body          kind-specific, little endian, bounded
//! ```
//!
//! The full specification, with the body of every message, is
//! `docs/protocol.md`. The decoder never panics on any input: every read is
//! bounds-checked and every count is capped before anything is allocated.

mod codec;
pub mod frame_ring;
pub mod release_ring;

pub use codec::{decode, encode, encode_frame_into, encode_into, DecodeError};

/// Magic bytes at the start of every HELLO body.
pub const MAGIC: [u8; 8] = *b"BUFSHARE";
/// Protocol version spoken by this build. Peers with another version are refused.
pub const VERSION: u16 = 2;
/// Size of the fixed header in front of every message.
pub const HEADER_LEN: usize = 8;
/// Largest datagram either side sends or accepts (header included).
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;
/// Most fds one datagram may carry.
pub const MAX_FDS_PER_MESSAGE: usize = 1;
/// Most memories in one frame (GStreamer's own limit per buffer is 16).
pub const MAX_MEMORIES: usize = 16;
/// Most metas in one frame.
pub const MAX_METAS: usize = 32;
/// Most memories a producer may have registered with one consumer at once
/// (registered and not yet forgotten); a producer that goes past it is dropped.
pub const MAX_REGISTERED_MEMORIES: usize = 1024;
/// Most frame ids in one RELEASE message.
pub const MAX_RELEASE_IDS: usize = 1024;
/// Most planes in a video meta (GST_VIDEO_MAX_PLANES).
pub const MAX_PLANES: usize = 4;
/// Most channels in an audio meta (the size of GstAudioInfo's position array).
pub const MAX_AUDIO_CHANNELS: usize = 64;
/// Most parameter structures in one region-of-interest meta.
pub const MAX_ROI_PARAMS: usize = 32;
/// Value of a timestamp, duration or offset field that means "none".
pub const NONE: u64 = u64::MAX;
/// HELLO feature bit set by a producer that serves monitors (role 3, STATS).
/// Bit 0x1 belongs to the release ring.
pub const FEATURE_MONITOR: u32 = 0x2;
/// Most per-consumer records in one STATS message.
pub const MAX_STATS_CONSUMERS: usize = 256;
/// Most bytes of the caps string in STATS (a producer cuts longer caps).
pub const MAX_STATS_CAPS_LEN: usize = 4096;
/// Most bytes of the backend name and of a consumer's process name in STATS.
pub const MAX_STATS_NAME_LEN: usize = 64;

/// Which side of the connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Producer = 1,
    Consumer = 2,
    /// Watches a producer: gets HELLO and then STATS, never fds or frames.
    Monitor = 3,
}

/// What kind of memory a registered fd refers to; the consumer picks its
/// importer from this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// A memfd or other mmap-able file (wrapped as GstFdMemory).
    Memfd = 1,
    /// A dma-buf (wrapped as GstDmaBufMemory).
    DmaBuf = 2,
}

/// First message in both directions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub role: Role,
    /// Feature bits ([`FEATURE_MONITOR`]); receivers ignore unknown bits.
    pub features: u32,
}

/// A producer memory announced once, with its fd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    pub mem_id: u64,
    pub kind: MemoryKind,
    /// Bytes of the fd that frames may refer to (from offset 0).
    pub size: u64,
}

/// Where one memory of a frame lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryRef {
    /// A range of a registered memory.
    Registered { mem_id: u64, offset: u64, size: u64 },
    /// Small payloads travel inside the message, with no fd.
    Inline(Vec<u8>),
}

/// GstVideoMeta: the plane layout of a video frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoMeta {
    /// GstVideoFormat numeric value.
    pub format: u32,
    /// GstVideoFrameFlags bits.
    pub flags: u32,
    pub width: u32,
    pub height: u32,
    pub offsets: Vec<u64>,
    pub strides: Vec<i32>,
}

/// GstAudioMeta: the audio format of the buffer and, for planar
/// (non-interleaved) audio, where each channel's plane starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioMeta {
    /// GstAudioFormat numeric value.
    pub format: u32,
    /// GstAudioLayout: 0 interleaved, 1 non-interleaved.
    pub layout: u32,
    /// GstAudioFlags bits.
    pub flags: u32,
    pub rate: u32,
    /// 1 ..= MAX_AUDIO_CHANNELS.
    pub channels: u32,
    /// Samples per channel in the buffer.
    pub samples: u64,
    /// GstAudioChannelPosition per channel, or empty (unpositioned).
    pub positions: Vec<i32>,
    /// Byte offset of each channel's plane in the buffer, or empty (interleaved).
    pub offsets: Vec<u64>,
}

/// GstVideoRegionOfInterestMeta: a rectangle of the frame with a type, ids and
/// parameter structures (detections, classifications...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoiMeta {
    /// The roi_type quark, as its string.
    pub roi_type: String,
    pub id: i32,
    pub parent_id: i32,
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
    /// Each parameter GstStructure serialized as a string; at most MAX_ROI_PARAMS.
    pub params: Vec<String>,
}

/// GstVideoTimeCodeMeta: a GstVideoTimeCode, field by field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeCodeMeta {
    pub fps_n: u32,
    pub fps_d: u32,
    /// GstVideoTimeCodeFlags bits.
    pub flags: u32,
    pub hours: u32,
    pub minutes: u32,
    pub seconds: u32,
    pub frames: u32,
    pub field_count: u32,
    /// The config's latest daily jam as ISO 8601 (`g_date_time_format_iso8601`),
    /// or empty when there is none.
    pub latest_daily_jam: String,
}

/// GstReferenceTimestampMeta: a timestamp on some reference clock, carried
/// verbatim (not converted like the frame's own timestamps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceTimestampMeta {
    /// The reference caps (e.g. `timestamp/x-ntp`), serialized as a string.
    pub reference: String,
    pub timestamp: u64,
    /// ns, or NONE.
    pub duration: u64,
}

/// A meta that travels with a frame. Unknown kinds are skipped by receivers,
/// so new kinds can be added without a version change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Meta {
    Video(VideoMeta),
    Audio(AudioMeta),
    Roi(RoiMeta),
    TimeCode(TimeCodeMeta),
    ReferenceTimestamp(ReferenceTimestampMeta),
    /// A GstCustomMeta: its registered name and its structure serialized as a string.
    Custom {
        name: String,
        structure: String,
    },
    /// A meta kind this build does not know; kept as raw bytes.
    Unknown {
        kind: u16,
        data: Vec<u8>,
    },
}

impl Meta {
    /// The GStreamer meta this stands for, for logs.
    pub fn name(&self) -> String {
        match self {
            Meta::Video(_) => "GstVideoMeta".into(),
            Meta::Audio(_) => "GstAudioMeta".into(),
            Meta::Roi(_) => "GstVideoRegionOfInterestMeta".into(),
            Meta::TimeCode(_) => "GstVideoTimeCodeMeta".into(),
            Meta::ReferenceTimestamp(_) => "GstReferenceTimestampMeta".into(),
            Meta::Custom { name, .. } => format!("custom meta {name}"),
            Meta::Unknown { kind, .. } => format!("meta of kind {kind}"),
        }
    }

    /// Whether the buffer can be used without this meta. Video and audio metas
    /// say where the data is (plane offsets): without them a consumer reads
    /// the bytes wrongly, so they are never dropped to make a frame fit.
    pub fn is_optional(&self) -> bool {
        !matches!(self, Meta::Video(_) | Meta::Audio(_))
    }
}

/// One buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Producer-chosen id, echoed back in RELEASE.
    pub frame_id: u64,
    /// Presentation time as an absolute CLOCK_MONOTONIC time in ns, or NONE.
    pub pts: u64,
    /// Decoding time as an absolute CLOCK_MONOTONIC time in ns, or NONE.
    pub dts: u64,
    pub duration: u64,
    pub offset: u64,
    pub offset_end: u64,
    /// GstBufferFlags bits.
    pub flags: u32,
    pub memories: Vec<MemoryRef>,
    pub metas: Vec<Meta>,
}

impl Frame {
    /// Drops optional metas ([`Meta::is_optional`]), biggest encoding first,
    /// until the FRAME has at most [`MAX_METAS`] metas and its datagram is at
    /// most `max_len` bytes. Returns what it dropped; the metas left keep their
    /// order. The frame may still be too big if its required part is.
    pub fn drop_metas_to_fit(&mut self, max_len: usize) -> Vec<Meta> {
        let mut len = codec::encoded_len(self);
        let mut sizes: Vec<(usize, usize)> = (self.metas.iter().enumerate())
            .filter(|(_, m)| m.is_optional())
            .map(|(i, m)| (codec::meta_record_len(m), i))
            .collect();
        // Biggest first; among equals, the last one first.
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let mut drop = vec![false; self.metas.len()];
        let mut count = self.metas.len();
        for (size, i) in sizes {
            if len <= max_len && count <= MAX_METAS {
                break;
            }
            drop[i] = true;
            len -= size;
            count -= 1;
        }
        let mut dropped = Vec::new();
        let mut kept = Vec::with_capacity(count);
        for (meta, d) in std::mem::take(&mut self.metas).into_iter().zip(drop) {
            if d {
                dropped.push(meta);
            } else {
                kept.push(meta);
            }
        }
        self.metas = kept;
        dropped
    }

    /// Whether the consumer must send RELEASE for this frame: only frames that
    /// refer to registered memory hold anything on the producer side.
    pub fn needs_release(&self) -> bool {
        self.memories
            .iter()
            .any(|m| matches!(m, MemoryRef::Registered { .. }))
    }
}

/// One consumer in a STATS snapshot. Rates and release latencies cover the
/// snapshot's interval; counters are totals since the consumer connected.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConsumerStats {
    /// The producer's id of this connection.
    pub client_id: u64,
    /// SO_PEERCRED pid as the producer sees it; 0: unknown.
    pub pid: u32,
    /// SO_PEERCRED uid; u32::MAX: unknown.
    pub uid: u32,
    /// Frames sent to it.
    pub frames: u64,
    /// Frames per second sent to it over the interval, times 1000.
    pub fps_milli: u32,
    /// Frames it holds now (sent, not released).
    pub held: u32,
    /// Frames it may hold at once (its MAX_INFLIGHT grant).
    pub granted: u32,
    /// Frames skipped for it (latest wins: it was full, its socket was, or the held bound).
    pub skipped: u64,
    /// Releases that measured the latencies below.
    pub releases: u32,
    /// Median time from sending a frame to its RELEASE, ns; NONE without releases.
    pub release_p50: u64,
    /// 99th percentile of the same, ns; NONE without releases.
    pub release_p99: u64,
    /// Its process name (/proc/PID/comm on the producer's side); empty if unknown.
    pub name: String,
}

/// A producer's snapshot for monitors (STATS).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stats {
    /// CLOCK_MONOTONIC ns when the snapshot was taken.
    pub time: u64,
    /// Length in ns of the interval that the rates and latencies cover; 0:
    /// none measured yet (rates 0, latencies NONE).
    pub interval: u64,
    /// [`STATS_EOS`] and reserved bits.
    pub flags: u32,
    /// Frames rendered by the producer.
    pub frames: u64,
    /// Frames per second rendered over the interval, times 1000.
    pub fps_milli: u32,
    /// Frames that had to be copied into shareable memory.
    pub copies: u64,
    /// Distinct frames held by consumers now.
    pub held: u32,
    /// The bound on frames held by all consumers (`max-held` or the pool's); 0: none.
    pub max_held: u32,
    /// Consumers past the handshake (monitors not counted); may exceed `consumers.len()`.
    pub num_consumers: u32,
    /// Current caps, at most MAX_STATS_CAPS_LEN bytes; empty before the first.
    pub caps: String,
    /// Memory backend in use (memfd, dma-heap, drm, v4l2).
    pub backend: String,
    /// At most MAX_STATS_CONSUMERS records.
    pub consumers: Vec<ConsumerStats>,
}

/// STATS flag: the producer's stream is at EOS.
pub const STATS_EOS: u32 = 0x1;

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    /// The producer refuses this consumer (bad version, ...); the reason is for humans.
    Refuse {
        reason: String,
    },
    /// New stream format. `latency` is the producer's pipeline latency in ns.
    Caps {
        caps: String,
        latency: u64,
    },
    Register(Register),
    Forget {
        mem_id: u64,
    },
    Frame(Frame),
    Release {
        frame_ids: Vec<u64>,
    },
    Eos,
    /// The producer drops this consumer and says why, before it closes the
    /// connection (stalled, too many queued messages, shutting down...).
    Disconnect {
        reason: String,
    },
    /// How many frames a consumer holds at once (frames sent and not yet
    /// released). Consumer -> producer: what it asks for (0: the producer's
    /// default). Producer -> consumer: the limit in force for it, sent after
    /// the handshake and whenever it changes.
    MaxInflight {
        frames: u32,
    },
    /// Producer -> consumer, with one fd: a release ring (a sealed memfd of
    /// [`release_ring::ring_len`]`(capacity)` bytes) for a consumer that said
    /// [`release_ring::FEATURE_RELEASE_RING`]. See [`release_ring`].
    ReleaseRing {
        capacity: u32,
    },
    /// Producer -> consumer, with one fd: a frame ring (a sealed memfd of
    /// [`frame_ring::ring_len`]`(capacity, slot_len)` bytes) for a consumer
    /// that said [`frame_ring::FEATURE_FRAME_RING`]. See [`frame_ring`].
    FrameRing {
        capacity: u32,
        slot_len: u32,
    },
    /// Producer -> consumer, with one fd: the frame ring's doorbell (one end
    /// of a stream socket pair; readable when the producer rang). Sent right
    /// after FRAME_RING. See [`frame_ring`].
    Doorbell,
    /// Producer -> monitor: a snapshot of the producer and its consumers.
    Stats(Stats),
}

impl Message {
    /// Number of fds that must travel with this message.
    pub fn fd_count(&self) -> usize {
        match self {
            Message::Register(_)
            | Message::ReleaseRing { .. }
            | Message::FrameRing { .. }
            | Message::Doorbell => 1,
            _ => 0,
        }
    }

    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "HELLO",
            Message::Refuse { .. } => "REFUSE",
            Message::Caps { .. } => "CAPS",
            Message::Register(_) => "REGISTER",
            Message::Forget { .. } => "FORGET",
            Message::Frame(_) => "FRAME",
            Message::Release { .. } => "RELEASE",
            Message::Eos => "EOS",
            Message::Disconnect { .. } => "DISCONNECT",
            Message::MaxInflight { .. } => "MAX_INFLIGHT",
            Message::ReleaseRing { .. } => "RELEASE_RING",
            Message::FrameRing { .. } => "FRAME_RING",
            Message::Doorbell => "DOORBELL",
            Message::Stats(_) => "STATS",
        }
    }
}

#[cfg(test)]
mod tests;
