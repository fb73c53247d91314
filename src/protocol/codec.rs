//! Byte encoding of [`Message`]s. Layouts are specified in `docs/protocol.md`;
//! keep the two in step.

use super::*;

const KIND_HELLO: u16 = 1;
const KIND_REFUSE: u16 = 2;
const KIND_CAPS: u16 = 3;
const KIND_REGISTER: u16 = 4;
const KIND_FORGET: u16 = 5;
const KIND_FRAME: u16 = 6;
const KIND_RELEASE: u16 = 7;
const KIND_EOS: u16 = 8;
const KIND_DISCONNECT: u16 = 9;
const KIND_MAX_INFLIGHT: u16 = 10;
const KIND_RELEASE_RING: u16 = 12;
const KIND_STATS: u16 = 11;
const KIND_FRAME_RING: u16 = 13;
const KIND_DOORBELL: u16 = 14;

const MEM_REGISTERED: u32 = 1;
const MEM_INLINE: u32 = 2;

const META_VIDEO: u16 = 1;
const META_CUSTOM: u16 = 2;
const META_AUDIO: u16 = 3;
const META_ROI: u16 = 4;
const META_TIME_CODE: u16 = 5;
const META_REFERENCE_TIMESTAMP: u16 = 6;

/// Bytes of the fixed FRAME fields, before memories and metas.
const FRAME_FIXED_LEN: usize = 56;

/// Why a datagram could not be decoded. Each names the fault, for the warning
/// that goes with dropping the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the fixed header.
    ShortHeader(usize),
    /// The datagram is larger than [`MAX_MESSAGE_LEN`].
    TooLong(usize),
    /// The header's body length disagrees with the datagram's length.
    LengthMismatch {
        header: usize,
        actual: usize,
    },
    /// The header's fd count disagrees with the fds that came with the datagram,
    /// or with what the message kind carries.
    FdCountMismatch {
        header: usize,
        received: usize,
        expected: usize,
    },
    UnknownKind(u16),
    /// The body ended before a field.
    Truncated {
        kind: &'static str,
        field: &'static str,
    },
    /// Bytes left over after the last field.
    TrailingBytes {
        kind: &'static str,
        extra: usize,
    },
    BadMagic,
    BadValue {
        kind: &'static str,
        field: &'static str,
        value: u64,
    },
    TooMany {
        kind: &'static str,
        field: &'static str,
        count: usize,
        max: usize,
    },
    BadUtf8 {
        kind: &'static str,
        field: &'static str,
    },
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use DecodeError::*;
        match self {
            ShortHeader(n) => write!(f, "message of {n} bytes is shorter than the {HEADER_LEN}-byte header"),
            TooLong(n) => write!(f, "message of {n} bytes exceeds the limit of {MAX_MESSAGE_LEN}"),
            LengthMismatch { header, actual } => {
                write!(f, "header says the body has {header} bytes but {actual} arrived")
            }
            FdCountMismatch { header, received, expected } => write!(
                f,
                "fd count mismatch: header says {header}, {received} arrived, message kind carries {expected}"
            ),
            UnknownKind(k) => write!(f, "unknown message kind {k}"),
            Truncated { kind, field } => write!(f, "{kind} message truncated at field {field}"),
            TrailingBytes { kind, extra } => write!(f, "{kind} message has {extra} trailing bytes"),
            BadMagic => write!(f, "HELLO does not start with the bufshare magic (not a bufshare peer?)"),
            BadValue { kind, field, value } => write!(f, "{kind} message has invalid {field} {value}"),
            TooMany { kind, field, count, max } => {
                write!(f, "{kind} message has {count} {field}, more than the limit of {max}")
            }
            BadUtf8 { kind, field } => write!(f, "{kind} message field {field} is not UTF-8"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Encodes `msg` into one datagram. The caller attaches `msg.fd_count()` fds.
///
/// Encoding never fails; [`crate::protocol`] users keep payloads within
/// [`MAX_MESSAGE_LEN`] (inline data and caps strings are bounded by the sender).
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    encode_into(msg, &mut out);
    out
}

/// Encodes `msg` into `out` (cleared first), reusing its allocation: the
/// producer encodes every frame into the same buffer.
pub fn encode_into(msg: &Message, out: &mut Vec<u8>) {
    out.clear();
    // The header's body length is written once the body is there.
    out.resize(HEADER_LEN, 0);
    let mut w = Writer(std::mem::take(out));
    let kind = match msg {
        Message::Hello(h) => {
            w.bytes(&MAGIC);
            w.u16(h.version);
            w.u8(h.role as u8);
            w.u8(0);
            w.u32(h.features);
            KIND_HELLO
        }
        Message::Refuse { reason } => {
            w.string(reason);
            KIND_REFUSE
        }
        Message::Caps { caps, latency } => {
            w.u64(*latency);
            w.string(caps);
            KIND_CAPS
        }
        Message::Register(r) => {
            w.u64(r.mem_id);
            w.u32(r.kind as u32);
            w.u64(r.size);
            KIND_REGISTER
        }
        Message::Forget { mem_id } => {
            w.u64(*mem_id);
            KIND_FORGET
        }
        Message::Frame(fr) => {
            encode_frame(&mut w, fr);
            KIND_FRAME
        }
        Message::Release { frame_ids } => {
            w.u32(frame_ids.len() as u32);
            for id in frame_ids {
                w.u64(*id);
            }
            KIND_RELEASE
        }
        Message::Eos => KIND_EOS,
        Message::Disconnect { reason } => {
            w.string(reason);
            KIND_DISCONNECT
        }
        Message::MaxInflight { frames } => {
            w.u32(*frames);
            KIND_MAX_INFLIGHT
        }
        Message::ReleaseRing { capacity } => {
            w.u32(*capacity);
            KIND_RELEASE_RING
        }
        Message::FrameRing { capacity, slot_len } => {
            w.u32(*capacity);
            w.u32(*slot_len);
            KIND_FRAME_RING
        }
        Message::Doorbell => KIND_DOORBELL,
        Message::Stats(s) => {
            encode_stats(&mut w, s);
            KIND_STATS
        }
    };
    *out = w.0;
    write_header(out, kind, msg.fd_count());
}

/// Encodes FRAME `fr` into `out` (cleared first) without building a
/// [`Message`]: the same bytes as `encode(&Message::Frame(fr.clone()))`.
pub fn encode_frame_into(fr: &Frame, out: &mut Vec<u8>) {
    out.clear();
    out.resize(HEADER_LEN, 0);
    let mut w = Writer(std::mem::take(out));
    encode_frame(&mut w, fr);
    *out = w.0;
    write_header(out, KIND_FRAME, 0);
}

/// Fills in the header at the start of `out`, whose body follows it.
fn write_header(out: &mut [u8], kind: u16, fds: usize) {
    let body_len = (out.len() - HEADER_LEN) as u32;
    out[0..2].copy_from_slice(&kind.to_le_bytes());
    out[2..4].copy_from_slice(&(fds as u16).to_le_bytes());
    out[4..8].copy_from_slice(&body_len.to_le_bytes());
}

fn encode_stats(w: &mut Writer, s: &Stats) {
    w.u64(s.time);
    w.u64(s.interval);
    w.u32(s.flags);
    w.u64(s.frames);
    w.u32(s.fps_milli);
    w.u64(s.copies);
    w.u32(s.held);
    w.u32(s.max_held);
    w.u32(s.num_consumers);
    w.string(&s.caps);
    w.string(&s.backend);
    w.u32(s.consumers.len() as u32);
    for c in &s.consumers {
        w.u64(c.client_id);
        w.u32(c.pid);
        w.u32(c.uid);
        w.u64(c.frames);
        w.u32(c.fps_milli);
        w.u32(c.held);
        w.u32(c.granted);
        w.u64(c.skipped);
        w.u32(c.releases);
        w.u64(c.release_p50);
        w.u64(c.release_p99);
        w.string(&c.name);
    }
}

fn decode_stats(r: &mut Reader) -> Result<Stats, DecodeError> {
    let time = r.u64("time")?;
    let interval = r.u64("interval")?;
    let flags = r.u32("flags")?;
    let frames = r.u64("frames")?;
    let fps_milli = r.u32("fps")?;
    let copies = r.u64("copies")?;
    let held = r.u32("held")?;
    let max_held = r.u32("max_held")?;
    let num_consumers = r.u32("consumer count")?;
    let caps = r.bounded_string("caps", "bytes of caps", MAX_STATS_CAPS_LEN)?;
    let backend = r.bounded_string("backend", "bytes of backend", MAX_STATS_NAME_LEN)?;
    let n = r.u32("record count")? as usize;
    if n > MAX_STATS_CONSUMERS {
        return Err(r.too_many("consumer records", n, MAX_STATS_CONSUMERS));
    }
    let mut consumers = Vec::with_capacity(n);
    for _ in 0..n {
        consumers.push(ConsumerStats {
            client_id: r.u64("client_id")?,
            pid: r.u32("pid")?,
            uid: r.u32("uid")?,
            frames: r.u64("consumer frames")?,
            fps_milli: r.u32("consumer fps")?,
            held: r.u32("consumer held")?,
            granted: r.u32("granted")?,
            skipped: r.u64("skipped")?,
            releases: r.u32("releases")?,
            release_p50: r.u64("release_p50")?,
            release_p99: r.u64("release_p99")?,
            name: r.bounded_string("name", "bytes of name", MAX_STATS_NAME_LEN)?,
        });
    }
    Ok(Stats {
        time,
        interval,
        flags,
        frames,
        fps_milli,
        copies,
        held,
        max_held,
        num_consumers,
        caps,
        backend,
        consumers,
    })
}

fn encode_frame(w: &mut Writer, fr: &Frame) {
    w.u64(fr.frame_id);
    w.u64(fr.pts);
    w.u64(fr.dts);
    w.u64(fr.duration);
    w.u64(fr.offset);
    w.u64(fr.offset_end);
    w.u32(fr.flags);
    w.u16(fr.memories.len() as u16);
    w.u16(fr.metas.len() as u16);
    for m in &fr.memories {
        match m {
            MemoryRef::Registered {
                mem_id,
                offset,
                size,
            } => {
                w.u32(MEM_REGISTERED);
                w.u64(*mem_id);
                w.u64(*offset);
                w.u64(*size);
            }
            MemoryRef::Inline(data) => {
                w.u32(MEM_INLINE);
                w.u32(data.len() as u32);
                w.bytes(data);
            }
        }
    }
    for meta in &fr.metas {
        encode_meta(w, meta);
    }
}

/// Appends one meta record (TLV header and body).
fn encode_meta(w: &mut Writer, meta: &Meta) {
    // The record's header goes first, its body length patched in after the body.
    let start = w.0.len();
    w.0.resize(start + 8, 0);
    let body = w;
    let kind = match meta {
        Meta::Video(v) => {
            body.u32(v.format);
            body.u32(v.flags);
            body.u32(v.width);
            body.u32(v.height);
            body.u32(v.offsets.len() as u32);
            for (o, s) in v.offsets.iter().zip(&v.strides) {
                body.u64(*o);
                body.u32(*s as u32);
            }
            META_VIDEO
        }
        Meta::Custom { name, structure } => {
            body.string(name);
            body.string(structure);
            META_CUSTOM
        }
        Meta::Audio(a) => {
            body.u32(a.format);
            body.u32(a.layout);
            body.u32(a.flags);
            body.u32(a.rate);
            body.u32(a.channels);
            body.u64(a.samples);
            body.u32(a.positions.len() as u32);
            for p in &a.positions {
                body.u32(*p as u32);
            }
            body.u32(a.offsets.len() as u32);
            for o in &a.offsets {
                body.u64(*o);
            }
            META_AUDIO
        }
        Meta::Roi(r) => {
            body.string(&r.roi_type);
            body.u32(r.id as u32);
            body.u32(r.parent_id as u32);
            body.u32(r.x);
            body.u32(r.y);
            body.u32(r.w);
            body.u32(r.h);
            body.u32(r.params.len() as u32);
            for p in &r.params {
                body.string(p);
            }
            META_ROI
        }
        Meta::TimeCode(t) => {
            body.u32(t.fps_n);
            body.u32(t.fps_d);
            body.u32(t.flags);
            body.u32(t.hours);
            body.u32(t.minutes);
            body.u32(t.seconds);
            body.u32(t.frames);
            body.u32(t.field_count);
            body.string(&t.latest_daily_jam);
            META_TIME_CODE
        }
        Meta::ReferenceTimestamp(r) => {
            body.u64(r.timestamp);
            body.u64(r.duration);
            body.string(&r.reference);
            META_REFERENCE_TIMESTAMP
        }
        Meta::Unknown { kind, data } => {
            body.bytes(data);
            *kind
        }
    };
    let body_len = (body.0.len() - start - 8) as u32;
    body.0[start..start + 2].copy_from_slice(&kind.to_le_bytes());
    body.0[start + 2..start + 4].copy_from_slice(&0u16.to_le_bytes());
    body.0[start + 4..start + 8].copy_from_slice(&body_len.to_le_bytes());
}

/// Bytes that `meta` takes in a FRAME, its TLV header included.
pub(super) fn meta_record_len(meta: &Meta) -> usize {
    let mut w = Writer(Vec::new());
    encode_meta(&mut w, meta);
    w.0.len()
}

/// Bytes of the datagram [`encode`] makes of FRAME `fr`, header included.
pub(super) fn encoded_len(fr: &Frame) -> usize {
    let memories: usize = (fr.memories.iter())
        .map(|m| match m {
            MemoryRef::Registered { .. } => 28,
            MemoryRef::Inline(data) => 8 + data.len(),
        })
        .sum();
    let metas: usize = fr.metas.iter().map(meta_record_len).sum();
    HEADER_LEN + FRAME_FIXED_LEN + memories + metas
}

/// Decodes one datagram that arrived with `received_fds` file descriptors.
pub fn decode(datagram: &[u8], received_fds: usize) -> Result<Message, DecodeError> {
    if datagram.len() > MAX_MESSAGE_LEN {
        return Err(DecodeError::TooLong(datagram.len()));
    }
    if datagram.len() < HEADER_LEN {
        return Err(DecodeError::ShortHeader(datagram.len()));
    }
    let kind = u16::from_le_bytes([datagram[0], datagram[1]]);
    let header_fds = u16::from_le_bytes([datagram[2], datagram[3]]) as usize;
    let body_len =
        u32::from_le_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]) as usize;
    let body = &datagram[HEADER_LEN..];
    if body_len != body.len() {
        return Err(DecodeError::LengthMismatch {
            header: body_len,
            actual: body.len(),
        });
    }
    let expected_fds = usize::from(matches!(
        kind,
        KIND_REGISTER | KIND_RELEASE_RING | KIND_FRAME_RING | KIND_DOORBELL
    ));
    if header_fds != received_fds || header_fds != expected_fds {
        return Err(DecodeError::FdCountMismatch {
            header: header_fds,
            received: received_fds,
            expected: expected_fds,
        });
    }
    let (r, msg) = match kind {
        KIND_HELLO => {
            let mut r = Reader::new(body, "HELLO");
            if r.take(8, "magic")? != MAGIC {
                return Err(DecodeError::BadMagic);
            }
            let version = r.u16("version")?;
            let role = match r.u8("role")? {
                1 => Role::Producer,
                2 => Role::Consumer,
                3 => Role::Monitor,
                v => return Err(r.bad("role", v as u64)),
            };
            r.u8("reserved")?;
            let features = r.u32("features")?;
            r.finish()?;
            return Ok(Message::Hello(Hello {
                version,
                role,
                features,
            }));
        }
        KIND_REFUSE => {
            let mut r = Reader::new(body, "REFUSE");
            let reason = r.string("reason")?;
            (r, Message::Refuse { reason })
        }
        KIND_CAPS => {
            let mut r = Reader::new(body, "CAPS");
            let latency = r.u64("latency")?;
            let caps = r.string("caps")?;
            (r, Message::Caps { caps, latency })
        }
        KIND_REGISTER => {
            let mut r = Reader::new(body, "REGISTER");
            let mem_id = r.u64("mem_id")?;
            let kind = match r.u32("memory kind")? {
                1 => MemoryKind::Memfd,
                2 => MemoryKind::DmaBuf,
                v => return Err(r.bad("memory kind", v as u64)),
            };
            let size = r.u64("size")?;
            (r, Message::Register(Register { mem_id, kind, size }))
        }
        KIND_FORGET => {
            let mut r = Reader::new(body, "FORGET");
            let mem_id = r.u64("mem_id")?;
            (r, Message::Forget { mem_id })
        }
        KIND_FRAME => {
            let mut r = Reader::new(body, "FRAME");
            let frame = decode_frame(&mut r)?;
            (r, Message::Frame(frame))
        }
        KIND_RELEASE => {
            let mut r = Reader::new(body, "RELEASE");
            let n = r.u32("count")? as usize;
            if n > MAX_RELEASE_IDS {
                return Err(r.too_many("frame ids", n, MAX_RELEASE_IDS));
            }
            let mut frame_ids = Vec::with_capacity(n);
            for _ in 0..n {
                frame_ids.push(r.u64("frame id")?);
            }
            (r, Message::Release { frame_ids })
        }
        KIND_EOS => (Reader::new(body, "EOS"), Message::Eos),
        KIND_DISCONNECT => {
            let mut r = Reader::new(body, "DISCONNECT");
            let reason = r.string("reason")?;
            (r, Message::Disconnect { reason })
        }
        KIND_MAX_INFLIGHT => {
            let mut r = Reader::new(body, "MAX_INFLIGHT");
            let frames = r.u32("frames")?;
            (r, Message::MaxInflight { frames })
        }
        KIND_RELEASE_RING => {
            let mut r = Reader::new(body, "RELEASE_RING");
            let capacity = r.u32("capacity")?;
            if !release_ring::valid_capacity(capacity) {
                return Err(r.bad("capacity", capacity as u64));
            }
            (r, Message::ReleaseRing { capacity })
        }
        KIND_FRAME_RING => {
            let mut r = Reader::new(body, "FRAME_RING");
            let capacity = r.u32("capacity")?;
            let slot_len = r.u32("slot length")?;
            if !frame_ring::valid_geometry(capacity, slot_len) {
                return Err(
                    if frame_ring::valid_geometry(capacity, frame_ring::MIN_SLOT_LEN) {
                        r.bad("slot length", slot_len as u64)
                    } else {
                        r.bad("capacity", capacity as u64)
                    },
                );
            }
            (r, Message::FrameRing { capacity, slot_len })
        }
        KIND_DOORBELL => (Reader::new(body, "DOORBELL"), Message::Doorbell),
        KIND_STATS => {
            let mut r = Reader::new(body, "STATS");
            let stats = decode_stats(&mut r)?;
            (r, Message::Stats(stats))
        }
        other => return Err(DecodeError::UnknownKind(other)),
    };
    r.finish()?;
    Ok(msg)
}

fn decode_frame(r: &mut Reader) -> Result<Frame, DecodeError> {
    let frame_id = r.u64("frame_id")?;
    let pts = r.u64("pts")?;
    let dts = r.u64("dts")?;
    let duration = r.u64("duration")?;
    let offset = r.u64("offset")?;
    let offset_end = r.u64("offset_end")?;
    let flags = r.u32("flags")?;
    let n_mem = r.u16("memory count")? as usize;
    let n_meta = r.u16("meta count")? as usize;
    if n_mem > MAX_MEMORIES {
        return Err(r.too_many("memories", n_mem, MAX_MEMORIES));
    }
    if n_meta > MAX_METAS {
        return Err(r.too_many("metas", n_meta, MAX_METAS));
    }
    let mut memories = Vec::with_capacity(n_mem);
    for _ in 0..n_mem {
        memories.push(match r.u32("memory tag")? {
            MEM_REGISTERED => {
                let mem_id = r.u64("mem_id")?;
                let offset = r.u64("memory offset")?;
                let size = r.u64("memory size")?;
                if offset.checked_add(size).is_none() {
                    return Err(r.bad("memory offset+size", offset));
                }
                MemoryRef::Registered {
                    mem_id,
                    offset,
                    size,
                }
            }
            MEM_INLINE => {
                let len = r.u32("inline length")? as usize;
                MemoryRef::Inline(r.take(len, "inline data")?.to_vec())
            }
            v => return Err(r.bad("memory tag", v as u64)),
        });
    }
    let mut metas = Vec::with_capacity(n_meta);
    for _ in 0..n_meta {
        let kind = r.u16("meta kind")?;
        r.u16("meta reserved")?;
        let len = r.u32("meta length")? as usize;
        let data = r.take(len, "meta data")?;
        metas.push(decode_meta(kind, data)?);
    }
    Ok(Frame {
        frame_id,
        pts,
        dts,
        duration,
        offset,
        offset_end,
        flags,
        memories,
        metas,
    })
}

fn decode_meta(kind: u16, data: &[u8]) -> Result<Meta, DecodeError> {
    match kind {
        META_VIDEO => {
            let mut r = Reader::new(data, "video meta");
            let format = r.u32("format")?;
            let flags = r.u32("flags")?;
            let width = r.u32("width")?;
            let height = r.u32("height")?;
            let n_planes = r.u32("plane count")? as usize;
            if n_planes == 0 || n_planes > MAX_PLANES {
                return Err(r.bad("plane count", n_planes as u64));
            }
            let mut offsets = Vec::with_capacity(n_planes);
            let mut strides = Vec::with_capacity(n_planes);
            for _ in 0..n_planes {
                offsets.push(r.u64("plane offset")?);
                strides.push(r.u32("plane stride")? as i32);
            }
            r.finish()?;
            Ok(Meta::Video(VideoMeta {
                format,
                flags,
                width,
                height,
                offsets,
                strides,
            }))
        }
        META_CUSTOM => {
            let mut r = Reader::new(data, "custom meta");
            let name = r.string("name")?;
            let structure = r.string("structure")?;
            r.finish()?;
            Ok(Meta::Custom { name, structure })
        }
        META_AUDIO => {
            let mut r = Reader::new(data, "audio meta");
            let format = r.u32("format")?;
            let layout = r.u32("layout")?;
            let flags = r.u32("flags")?;
            let rate = r.u32("rate")?;
            let channels = r.u32("channels")?;
            if channels == 0 || channels as usize > MAX_AUDIO_CHANNELS {
                return Err(r.bad("channels", channels as u64));
            }
            let samples = r.u64("samples")?;
            // Each list is empty or has one entry per channel.
            let n = r.u32("position count")?;
            if n != 0 && n != channels {
                return Err(r.bad("position count", n as u64));
            }
            let mut positions = Vec::with_capacity(n as usize);
            for _ in 0..n {
                positions.push(r.u32("position")? as i32);
            }
            let n = r.u32("offset count")?;
            if n != 0 && n != channels {
                return Err(r.bad("offset count", n as u64));
            }
            let mut offsets = Vec::with_capacity(n as usize);
            for _ in 0..n {
                offsets.push(r.u64("channel offset")?);
            }
            r.finish()?;
            Ok(Meta::Audio(AudioMeta {
                format,
                layout,
                flags,
                rate,
                channels,
                samples,
                positions,
                offsets,
            }))
        }
        META_ROI => {
            let mut r = Reader::new(data, "region of interest meta");
            let roi_type = r.string("roi_type")?;
            let id = r.u32("id")? as i32;
            let parent_id = r.u32("parent_id")? as i32;
            let x = r.u32("x")?;
            let y = r.u32("y")?;
            let w = r.u32("w")?;
            let h = r.u32("h")?;
            let n = r.u32("param count")? as usize;
            if n > MAX_ROI_PARAMS {
                return Err(r.too_many("params", n, MAX_ROI_PARAMS));
            }
            let mut params = Vec::with_capacity(n);
            for _ in 0..n {
                params.push(r.string("param")?);
            }
            r.finish()?;
            Ok(Meta::Roi(RoiMeta {
                roi_type,
                id,
                parent_id,
                x,
                y,
                w,
                h,
                params,
            }))
        }
        META_TIME_CODE => {
            let mut r = Reader::new(data, "time code meta");
            let tc = TimeCodeMeta {
                fps_n: r.u32("fps_n")?,
                fps_d: r.u32("fps_d")?,
                flags: r.u32("flags")?,
                hours: r.u32("hours")?,
                minutes: r.u32("minutes")?,
                seconds: r.u32("seconds")?,
                frames: r.u32("frames")?,
                field_count: r.u32("field_count")?,
                latest_daily_jam: r.string("latest_daily_jam")?,
            };
            r.finish()?;
            Ok(Meta::TimeCode(tc))
        }
        META_REFERENCE_TIMESTAMP => {
            let mut r = Reader::new(data, "reference timestamp meta");
            let timestamp = r.u64("timestamp")?;
            let duration = r.u64("duration")?;
            let reference = r.string("reference")?;
            r.finish()?;
            Ok(Meta::ReferenceTimestamp(ReferenceTimestampMeta {
                reference,
                timestamp,
                duration,
            }))
        }
        kind => Ok(Meta::Unknown {
            kind,
            data: data.to_vec(),
        }),
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    fn string(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.bytes(s.as_bytes());
    }
}

struct Reader<'a> {
    data: &'a [u8],
    kind: &'static str,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8], kind: &'static str) -> Self {
        Reader { data, kind }
    }
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.data.len() < n {
            return Err(DecodeError::Truncated {
                kind: self.kind,
                field,
            });
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = self.u32(field)? as usize;
        let bytes = self.take(len, field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::BadUtf8 {
            kind: self.kind,
            field,
        })
    }
    /// A string of at most `max` bytes; a longer length is refused before
    /// anything is read.
    fn bounded_string(
        &mut self,
        field: &'static str,
        bytes_of: &'static str,
        max: usize,
    ) -> Result<String, DecodeError> {
        let len = u32::from_le_bytes(self.array(field)?) as usize;
        if len > max {
            return Err(self.too_many(bytes_of, len, max));
        }
        let bytes = self.take(len, field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::BadUtf8 {
            kind: self.kind,
            field,
        })
    }
    fn bad(&self, field: &'static str, value: u64) -> DecodeError {
        DecodeError::BadValue {
            kind: self.kind,
            field,
            value,
        }
    }
    fn too_many(&self, field: &'static str, count: usize, max: usize) -> DecodeError {
        DecodeError::TooMany {
            kind: self.kind,
            field,
            count,
            max,
        }
    }
    fn finish(self) -> Result<(), DecodeError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                kind: self.kind,
                extra: self.data.len(),
            })
        }
    }
}
