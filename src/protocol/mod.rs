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

pub use codec::{decode, encode, DecodeError};

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
/// Value of a timestamp, duration or offset field that means "none".
pub const NONE: u64 = u64::MAX;

/// Which side of the connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Producer = 1,
    Consumer = 2,
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
    /// Feature bits; none are defined in version 1, receivers ignore unknown bits.
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

/// A meta that travels with a frame. Unknown kinds are skipped by receivers,
/// so new kinds can be added without a version change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Meta {
    Video(VideoMeta),
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
    /// Whether the consumer must send RELEASE for this frame: only frames that
    /// refer to registered memory hold anything on the producer side.
    pub fn needs_release(&self) -> bool {
        self.memories
            .iter()
            .any(|m| matches!(m, MemoryRef::Registered { .. }))
    }
}

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
}

impl Message {
    /// Number of fds that must travel with this message.
    pub fn fd_count(&self) -> usize {
        match self {
            Message::Register(_) => 1,
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
        }
    }
}

#[cfg(test)]
mod tests;
