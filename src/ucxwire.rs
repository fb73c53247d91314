//! The wire of `ucxsink`/`ucxsrc`: bufshare protocol messages carried in UCX active messages.
//!
//! Pure: no UCX, no I/O, no GStreamer, so it is unit-tested (and built) without the `ucx`
//! feature. The messages are those of [`crate::protocol`] (HELLO, REFUSE, CAPS, FRAME, EOS,
//! RELEASE, DISCONNECT, MAX_INFLIGHT), encoded by its codec; what UCX adds is how they travel
//! (docs/protocol.md, section 12):
//!
//! * **AM [`AM_CTRL`]**: header = the connection id (u64 LE, see below); payload = one encoded
//!   protocol message (eager). Every message but FRAME goes this way.
//! * **AM [`AM_FRAME`]**: header = the connection id, then the encoded FRAME message (metas,
//!   timestamps on the sender's CLOCK_MONOTONIC, flags, duration, offsets); payload = the
//!   buffer's bytes, all its memories one after another (a sender copies a buffer of several
//!   memories into one). The FRAME names exactly one memory, `Registered { mem_id: 0, offset:
//!   0, size }`: "the payload", whose size must equal the AM's data length. Large frames go by
//!   rendezvous (the receiver pulls them into its own memory), small ones eagerly.
//! * **AM [`AM_TIME`]**: header = the connection id; payload = 16 bytes, two u64 LE: the
//!   receiver's CLOCK_MONOTONIC when it asked, and the sender's when it answered (0 in the
//!   request). The receiver measures the clock offset from the exchange with the shortest round
//!   trip ([`ClockSync`]).
//!
//! AM handlers are per worker, not per endpoint, so a sender with many receivers tells them
//! apart by the **connection id**: the sender picks it (never reused while it runs), sends it
//! in the header of its HELLO, and the receiver puts it in the header of everything it sends.
//! A message with an unknown id is dropped.
//!
//! Session: the sender sends HELLO(producer) first; the receiver answers HELLO(consumer) and
//! MAX_INFLIGHT (its wish, 0 = the sender's default) and asks the time. A receiver of another
//! version gets REFUSE naming both versions; a sender of another version makes the receiver
//! fail with an error naming both. Then CAPS (again on every change), FRAMEs, EOS. The
//! receiver sends RELEASE for every frame once it has handed it downstream (or dropped it):
//! frames sent and not released are the receiver's in-flight frames, at most its grant.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use crate::protocol::{self, Frame, Hello, MemoryRef, Message, Role};

/// Control messages (every protocol message but FRAME), payload = the encoded message.
pub const AM_CTRL: u16 = 1;
/// One frame: header = connection id + encoded FRAME, payload = the buffer's bytes.
pub const AM_FRAME: u16 = 2;
/// Clock offset measurement.
pub const AM_TIME: u16 = 3;
/// Bytes of the connection id at the start of every header.
pub const CONN_ID_LEN: usize = 8;
/// The default address both elements use.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:7174";

/// Why an active message could not be understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Header shorter than the connection id.
    ShortHeader(usize),
    Decode(protocol::DecodeError),
    /// A message that does not belong in the control channel (FRAME).
    Misplaced(&'static str),
    /// The FRAME does not describe its payload as one memory of the payload's length.
    BadFrameLayout(String),
    /// A TIME payload that is not 16 bytes.
    BadTime(usize),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::ShortHeader(n) => write!(
                f,
                "active message header of {n} bytes, shorter than the {CONN_ID_LEN}-byte connection id"
            ),
            WireError::Decode(e) => write!(f, "{e}"),
            WireError::Misplaced(k) => write!(f, "{k} sent as a control message"),
            WireError::BadFrameLayout(s) => write!(f, "FRAME layout: {s}"),
            WireError::BadTime(n) => write!(f, "TIME payload of {n} bytes, not 16"),
        }
    }
}

impl std::error::Error for WireError {}

/// The header of a control or time message.
pub fn conn_header(conn_id: u64) -> [u8; CONN_ID_LEN] {
    conn_id.to_le_bytes()
}

/// Splits a header into its connection id and the rest.
pub fn split_header(header: &[u8]) -> Result<(u64, &[u8]), WireError> {
    if header.len() < CONN_ID_LEN {
        return Err(WireError::ShortHeader(header.len()));
    }
    let (id, rest) = header.split_at(CONN_ID_LEN);
    Ok((u64::from_le_bytes(id.try_into().expect("8 bytes")), rest))
}

/// Encodes a control message's payload.
pub fn encode_ctrl(msg: &Message) -> Vec<u8> {
    debug_assert!(!matches!(msg, Message::Frame(_)));
    protocol::encode(msg)
}

/// Decodes a control message: its connection id and message.
pub fn decode_ctrl(header: &[u8], payload: &[u8]) -> Result<(u64, Message), WireError> {
    let (conn_id, _) = split_header(header)?;
    let msg = protocol::decode(payload, 0).map_err(WireError::Decode)?;
    if let Message::Frame(_) = msg {
        return Err(WireError::Misplaced("FRAME"));
    }
    Ok((conn_id, msg))
}

/// Sets `frame`'s memories to the one memory an [`AM_FRAME`] payload of `len` bytes is.
pub fn describe_payload(frame: &mut Frame, len: usize) {
    frame.memories = vec![MemoryRef::Registered {
        mem_id: 0,
        offset: 0,
        size: len as u64,
    }];
}

/// The header of an [`AM_FRAME`]: connection id and the encoded FRAME, into `out`.
pub fn encode_frame_header(conn_id: u64, frame: &Frame, out: &mut Vec<u8>) {
    let mut body = Vec::new();
    protocol::encode_frame_into(frame, &mut body);
    out.clear();
    out.extend_from_slice(&conn_id.to_le_bytes());
    out.extend_from_slice(&body);
}

/// Replaces the connection id of an encoded [`AM_FRAME`] header (the streaming thread
/// encodes a frame once; each receiver's copy gets its own id).
pub fn set_conn_id(header: &mut [u8], conn_id: u64) {
    header[..CONN_ID_LEN].copy_from_slice(&conn_id.to_le_bytes());
}

/// Decodes an [`AM_FRAME`] header whose payload has `data_len` bytes.
pub fn decode_frame(header: &[u8], data_len: usize) -> Result<(u64, Frame), WireError> {
    let (conn_id, rest) = split_header(header)?;
    let frame = match protocol::decode(rest, 0).map_err(WireError::Decode)? {
        Message::Frame(f) => f,
        other => {
            return Err(WireError::BadFrameLayout(format!(
                "{} in a frame message",
                other.name()
            )))
        }
    };
    match frame.memories.as_slice() {
        [MemoryRef::Registered {
            mem_id: 0,
            offset: 0,
            size,
        }] if *size == data_len as u64 => Ok((conn_id, frame)),
        m => Err(WireError::BadFrameLayout(format!(
            "expected one memory of the payload's {data_len} bytes, got {m:?}"
        ))),
    }
}

/// A TIME payload.
pub fn encode_time(receiver_time: u64, sender_time: u64) -> Vec<u8> {
    let mut v = receiver_time.to_le_bytes().to_vec();
    v.extend_from_slice(&sender_time.to_le_bytes());
    v
}

pub fn decode_time(payload: &[u8]) -> Result<(u64, u64), WireError> {
    if payload.len() != 16 {
        return Err(WireError::BadTime(payload.len()));
    }
    Ok((
        u64::from_le_bytes(payload[..8].try_into().expect("8")),
        u64::from_le_bytes(payload[8..].try_into().expect("8")),
    ))
}

/// The offset between the sender's CLOCK_MONOTONIC and the receiver's, from TIME exchanges:
/// the sample with the shortest round trip wins (its error is at most half of it).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClockSync {
    best: Option<(u64, i128)>,
    samples: u32,
}

impl ClockSync {
    /// A reply: the receiver asked at `asked`, the sender said `sender`, the reply came at `now`.
    pub fn add(&mut self, asked: u64, sender: u64, now: u64) {
        if now < asked {
            return;
        }
        let rtt = now - asked;
        let mid = asked as i128 + (rtt / 2) as i128;
        let offset = sender as i128 - mid;
        self.samples += 1;
        if self.best.is_none_or(|(r, _)| rtt < r) {
            self.best = Some((rtt, offset));
        }
    }

    /// Sender time minus receiver time, in ns (0 before any sample).
    pub fn offset(&self) -> i128 {
        self.best.map_or(0, |(_, o)| o)
    }

    /// The round trip of the best sample.
    pub fn rtt(&self) -> Option<u64> {
        self.best.map(|(r, _)| r)
    }

    pub fn samples(&self) -> u32 {
        self.samples
    }

    /// A time on the sender's clock moved onto the receiver's (NONE stays NONE).
    pub fn to_receiver(&self, sender_time: u64) -> u64 {
        if sender_time == protocol::NONE {
            return protocol::NONE;
        }
        (sender_time as i128 - self.offset()).clamp(0, u64::MAX as i128 - 1) as u64
    }
}

/// Our HELLO.
pub fn hello(role: Role) -> Message {
    Message::Hello(Hello {
        version: protocol::VERSION,
        role,
        features: 0,
    })
}

/// What a sender says to a receiver's HELLO: None = welcome, Some(reason) = REFUSE.
pub fn check_consumer_hello(h: &Hello) -> Option<String> {
    if h.role != Role::Consumer {
        return Some(format!(
            "protocol error: expected a consumer's HELLO, got role {:?}",
            h.role
        ));
    }
    (h.version != protocol::VERSION).then(|| {
        format!(
            "protocol version mismatch: consumer speaks version {}, producer speaks version {}",
            h.version,
            protocol::VERSION
        )
    })
}

/// What a receiver makes of a sender's HELLO: Err(error for the user).
pub fn check_producer_hello(h: &Hello) -> Result<(), String> {
    if h.role != Role::Producer {
        return Err(format!(
            "protocol error: expected a producer's HELLO, got role {:?}",
            h.role
        ));
    }
    if h.version != protocol::VERSION {
        return Err(format!(
            "protocol version mismatch: producer speaks version {}, this consumer speaks version {}",
            h.version,
            protocol::VERSION
        ));
    }
    Ok(())
}

/// `host:port` as given to the `address` property: an IP address (v4, or v6 in brackets) or
/// a host name that resolves, and a port.
pub fn parse_address(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if !s.contains(':') {
        return Err(format!("address '{s}' has no port (expected host:port)"));
    }
    s.to_socket_addrs()
        .map_err(|e| format!("address '{s}': {e}"))?
        .next()
        .ok_or_else(|| format!("address '{s}' resolves to nothing"))
}

/// The `allowed-hosts` property: peer IP addresses a server accepts (empty: any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Vec<IpAddr>);

impl AllowList {
    /// Comma-separated IP addresses; empty or blank: anyone.
    pub fn parse(s: &str) -> Result<AllowList, String> {
        let mut v = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let ip = part
                .parse::<IpAddr>()
                .map_err(|_| format!("allowed-hosts: '{part}' is not an IP address"))?;
            v.push(ip);
        }
        Ok(AllowList(v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a peer at `ip` may connect (an IPv4-mapped IPv6 address counts as its IPv4).
    pub fn allows(&self, ip: Option<IpAddr>) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let Some(ip) = ip else { return false };
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.contains(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> Frame {
        Frame {
            frame_id: 7,
            pts: 1_000,
            dts: protocol::NONE,
            duration: 40,
            offset: 3,
            offset_end: 4,
            flags: 0x40,
            memories: vec![],
            metas: vec![protocol::Meta::Custom {
                name: "a".into(),
                structure: "b;".into(),
            }],
        }
    }

    #[test]
    fn frame_header_round_trips_with_its_payload_length() {
        let mut f = frame();
        describe_payload(&mut f, 3072);
        let mut h = Vec::new();
        encode_frame_header(5, &f, &mut h);
        set_conn_id(&mut h, 9);
        let (id, back) = decode_frame(&h, 3072).unwrap();
        assert_eq!(id, 9);
        assert_eq!(back, f);
        assert!(matches!(
            decode_frame(&h, 3071),
            Err(WireError::BadFrameLayout(_))
        ));
        assert_eq!(decode_frame(&h[..5], 0), Err(WireError::ShortHeader(5)));
    }

    #[test]
    fn control_messages_round_trip_and_frames_are_refused_there() {
        let (id, m) = decode_ctrl(&conn_header(3), &encode_ctrl(&Message::Eos)).unwrap();
        assert_eq!((id, m), (3, Message::Eos));
        let mut f = frame();
        describe_payload(&mut f, 0);
        let bytes = protocol::encode(&Message::Frame(f));
        assert_eq!(
            decode_ctrl(&conn_header(3), &bytes),
            Err(WireError::Misplaced("FRAME"))
        );
        assert!(matches!(
            decode_ctrl(&conn_header(3), b"junk"),
            Err(WireError::Decode(_))
        ));
    }

    #[test]
    fn versions_are_named_on_both_sides() {
        let old = Hello {
            version: 1,
            role: Role::Consumer,
            features: 0,
        };
        let r = check_consumer_hello(&old).unwrap();
        assert!(r.contains("consumer speaks version 1") && r.contains("producer speaks version 2"));
        let p = Hello {
            version: 9,
            role: Role::Producer,
            features: 0,
        };
        let e = check_producer_hello(&p).unwrap_err();
        assert!(e.contains("producer speaks version 9") && e.contains("consumer speaks version 2"));
        assert!(check_producer_hello(&Hello {
            version: protocol::VERSION,
            ..p
        })
        .is_ok());
    }

    #[test]
    fn clock_sync_keeps_the_shortest_round_trip() {
        let mut c = ClockSync::default();
        assert_eq!(c.offset(), 0);
        // Sender 1000 ns ahead; first reply took 400 ns (asymmetric), second 20 ns.
        c.add(10_000, 11_300, 10_400);
        c.add(20_000, 21_010, 20_020);
        assert_eq!(c.offset(), 1000);
        assert_eq!(c.rtt(), Some(20));
        assert_eq!(c.to_receiver(5_000), 4_000);
        assert_eq!(c.to_receiver(protocol::NONE), protocol::NONE);
        assert_eq!(decode_time(&encode_time(1, 2)), Ok((1, 2)));
        assert_eq!(decode_time(&[0; 3]), Err(WireError::BadTime(3)));
    }

    #[test]
    fn addresses_and_allow_lists() {
        assert_eq!(
            parse_address("127.0.0.1:7174").unwrap(),
            "127.0.0.1:7174".parse().unwrap()
        );
        assert!(parse_address("10.0.0.1").unwrap_err().contains("no port"));
        let a = AllowList::parse(" 10.0.0.2, 127.0.0.1 ").unwrap();
        assert!(a.allows(Some("127.0.0.1".parse().unwrap())));
        assert!(a.allows(Some("::ffff:10.0.0.2".parse().unwrap())));
        assert!(!a.allows(Some("10.0.0.3".parse().unwrap())));
        assert!(!a.allows(None));
        assert!(AllowList::parse("").unwrap().allows(None));
        assert!(AllowList::parse("foo").is_err());
    }
}
