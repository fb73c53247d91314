//! Unit and property tests of the wire codec. Kind numbers and golden bytes are
//! written out literally (not taken from the codec) so that any change of the
//! wire format fails a test; see `docs/protocol.md`.

use super::*;
use proptest::prelude::*;
use DecodeError::*;

/// Bytes from hex text; whitespace and `|` are ignored.
fn hex(s: &str) -> Vec<u8> {
    let s: Vec<u8> = s.bytes().filter(|c| c.is_ascii_hexdigit()).collect();
    s.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// A datagram with a correct body_len.
fn dgram(kind: u16, n_fds: u16, body: &[u8]) -> Vec<u8> {
    let len = (body.len() as u32).to_le_bytes();
    [&kind.to_le_bytes()[..], &n_fds.to_le_bytes(), &len, body].concat()
}

/// The header of `enc` with only the first `n` body bytes.
fn cut_body(enc: &[u8], n: usize) -> Vec<u8> {
    let field = |i: usize| u16::from_le_bytes([enc[i], enc[i + 1]]);
    dgram(field(0), field(2), &enc[HEADER_LEN..HEADER_LEN + n])
}

/// Encodes, checks the header fields and the round trip, returns the bytes.
fn round_trip(m: &Message, kind: u16) -> Vec<u8> {
    let enc = encode(m);
    assert_eq!(u16::from_le_bytes([enc[0], enc[1]]), kind, "{}", m.name());
    assert_eq!(u16::from_le_bytes([enc[2], enc[3]]) as usize, m.fd_count());
    let body_len = u32::from_le_bytes([enc[4], enc[5], enc[6], enc[7]]) as usize;
    assert_eq!(body_len, enc.len() - HEADER_LEN);
    assert_eq!(decode(&enc, m.fd_count()), Ok(m.clone()));
    // Into a reused buffer that held something longer: the same bytes.
    let mut reused = vec![0xAA; enc.len() + 100];
    encode_into(m, &mut reused);
    assert_eq!(reused, enc, "encode_into of {}", m.name());
    if let Message::Frame(f) = m {
        encode_frame_into(f, &mut reused);
        assert_eq!(reused, enc, "encode_frame_into");
    }
    enc
}

// Constructors and error shorthands, kept compact.
#[rustfmt::skip]
mod mk {
    use super::*;
    pub fn hello(version: u16, role: Role, features: u32) -> Message {
        Message::Hello(Hello { version, role, features })
    }
    pub fn register(mem_id: u64, kind: MemoryKind, size: u64) -> Message {
        Message::Register(Register { mem_id, kind, size })
    }
    pub fn refuse(reason: &str) -> Message { Message::Refuse { reason: reason.into() } }
    pub fn caps(caps: &str, latency: u64) -> Message {
        Message::Caps { caps: caps.into(), latency }
    }
    pub fn release(frame_ids: Vec<u64>) -> Message { Message::Release { frame_ids } }
    /// A frame with pts 1 s, no dts, duration 40 ms, no offsets, flags DISCONT.
    pub fn frame(memories: Vec<MemoryRef>, metas: Vec<Meta>) -> Message {
        let (frame_id, pts, dts, duration, flags) = (1, 1_000_000_000, NONE, 40_000_000, 0x40);
        let (offset, offset_end) = (NONE, NONE);
        let f = Frame { frame_id, pts, dts, duration, offset, offset_end, flags, memories, metas };
        Message::Frame(f)
    }
    pub fn reg(mem_id: u64, offset: u64, size: u64) -> MemoryRef {
        MemoryRef::Registered { mem_id, offset, size }
    }
    pub fn inline(data: &[u8]) -> MemoryRef { MemoryRef::Inline(data.to_vec()) }
    /// A 64x48 I420 video meta with `planes` planes, 3072 bytes apart from `offset`.
    pub fn video(planes: usize, offset: u64, stride: i32) -> Meta {
        let offsets = (0..planes as u64).map(|i| offset.wrapping_add(i * 3072)).collect();
        let strides = vec![stride; planes];
        Meta::Video(VideoMeta { format: 2, flags: 0, width: 64, height: 48, offsets, strides })
    }
    pub fn custom(name: &str, structure: &str) -> Meta {
        Meta::Custom { name: name.into(), structure: structure.into() }
    }
    pub fn unknown(kind: u16, data: &[u8]) -> Meta { Meta::Unknown { kind, data: data.to_vec() } }
    /// F32LE (28) planar audio at 48 kHz, 1024 samples, `channels` channels at
    /// front-left, front-right, ... with planes 4096 bytes apart.
    pub fn audio(channels: u32, positioned: bool, planar: bool) -> Meta {
        let positions = if positioned { (0..channels as i32).collect() } else { vec![] };
        let offsets = if planar { (0..channels as u64).map(|i| i * 4096).collect() } else { vec![] };
        let (format, layout, flags, rate, samples) = (28, planar as u32, 0, 48000, 1024);
        Meta::Audio(AudioMeta { format, layout, flags, rate, channels, samples, positions, offsets })
    }
    /// A "face" at (10, 20) 30x40, id 1, no parent (-1), with `params`.
    pub fn roi(params: &[&str]) -> Meta {
        let params = params.iter().map(|p| p.to_string()).collect();
        let (roi_type, id, parent_id) = ("face".to_string(), 1, -1);
        Meta::Roi(RoiMeta { roi_type, id, parent_id, x: 10, y: 20, w: 30, h: 40, params })
    }
    /// 10:20:30;04 at 30000/1001 drop-frame, with `jam` as latest daily jam.
    pub fn time_code(jam: &str) -> Meta {
        let (fps_n, fps_d, flags, field_count) = (30000, 1001, 1, 0);
        let (hours, minutes, seconds, frames) = (10, 20, 30, 4);
        let latest_daily_jam = jam.to_string();
        Meta::TimeCode(TimeCodeMeta {
            fps_n, fps_d, flags, hours, minutes, seconds, frames, field_count, latest_daily_jam,
        })
    }
    pub fn reference(reference: &str, timestamp: u64, duration: u64) -> Meta {
        let reference = reference.to_string();
        Meta::ReferenceTimestamp(ReferenceTimestampMeta { reference, timestamp, duration })
    }
    type S = &'static str;
    pub fn trunc(kind: S, field: S) -> DecodeError { Truncated { kind, field } }
    pub fn bad(kind: S, field: S, value: u64) -> DecodeError { BadValue { kind, field, value } }
    pub fn fds(header: usize, received: usize, expected: usize) -> DecodeError {
        FdCountMismatch { header, received, expected }
    }
    pub fn trailing(kind: S, extra: usize) -> DecodeError { TrailingBytes { kind, extra } }
    pub fn utf8(kind: S, field: S) -> DecodeError { BadUtf8 { kind, field } }
    pub fn mismatch(header: usize, actual: usize) -> DecodeError {
        LengthMismatch { header, actual }
    }
    pub fn too_many(kind: S, field: S, count: usize, max: usize) -> DecodeError {
        TooMany { kind, field, count, max }
    }
}
use mk::*;

/// Asserts that `datagram`, arriving with `n_fds` fds, fails to decode with `err`.
#[track_caller]
fn fails(datagram: &[u8], n_fds: usize, err: DecodeError) {
    assert_eq!(decode(datagram, n_fds), Err(err));
}

// Golden encodings, `header | body`. docs/protocol.md shows EOS and FORGET.
const HELLO_V1_CONSUMER: &str = "0100 0000 10000000 | 4255465348415245 0100 02 00 00000000";
const EOS: &str = "0800 0000 00000000";
const DISCONNECT: &str = "0900 0000 06000000 | 02000000 6869";
const MAX_INFLIGHT: &str = "0a00 0000 04000000 | 40000000";
const RELEASE_RING: &str = "0c00 0100 04000000 | 00040000";
const FRAME_RING: &str = "0d00 0100 08000000 | 40000000 00040000";
const DOORBELL: &str = "0e00 0100 00000000";
const FORGET: &str = "0500 0000 08000000 | 0807060504030201";
const RELEASE: &str = "0700 0000 14000000 | 02000000 0100000000000000 0000000001000000";
const REGISTER: &str = "0400 0100 14000000 | 0700000000000000 02000000 0010000000000000";
const CAPS: &str = "0300 0000 0f000000 | 40420f0000000000 03000000 612f62";
const FRAME: &str = "0600 0000 ae000000 | 0100000000000000 00ca9a3b00000000 ffffffffffffffff
    005a620200000000 ffffffffffffffff ffffffffffffffff 40000000 0200 0300
    | 01000000 0500000000000000 1000000000000000 2000000000000000 | 02000000 02000000 aabb
    | 0100 0000 2c000000 02000000 00000000 40000000 30000000 02000000
      0000000000000000 40000000 000c000000000000 40000000
    | 0200 0000 0b000000 01000000 6e 02000000 733b | 3412 0000 01000000 09";

// Golden meta records (TLV header | body) of kinds 3 to 6, as they follow
// FRAME's fixed fields; docs/protocol.md shows them.
const AUDIO_RECORD: &str = "0300 0000 3c000000 | 1c000000 01000000 00000000 80bb0000 02000000
    0004000000000000 | 02000000 00000000 01000000 | 02000000 0000000000000000 0010000000000000";
const ROI_RECORD: &str = "0400 0000 34000000 | 04000000 66616365 | 01000000 ffffffff
    0a000000 14000000 1e000000 28000000 | 01000000 0c000000 612c20623d28696e7429313b";
const TIME_CODE_RECORD: &str = "0500 0000 24000000 | 30750000 e9030000 01000000
    0a000000 14000000 1e000000 04000000 00000000 | 00000000";
const REFERENCE_RECORD: &str = "0600 0000 23000000 | 0807060504030201 ffffffffffffffff
    0f000000 74696d657374616d702f782d6e7470";

/// The bytes of the only meta record of a FRAME without memories.
fn meta_record(meta: Meta) -> Vec<u8> {
    let enc = round_trip(&frame(vec![], vec![meta]), 6);
    enc[HEADER_LEN + 56..].to_vec()
}

#[test]
#[rustfmt::skip]
fn golden_meta_records() {
    assert_eq!(meta_record(audio(2, true, true)), hex(AUDIO_RECORD));
    assert_eq!(meta_record(roi(&["a, b=(int)1;"])), hex(ROI_RECORD));
    assert_eq!(meta_record(time_code("")), hex(TIME_CODE_RECORD));
    let r = reference("timestamp/x-ntp", 0x0102_0304_0506_0708, NONE);
    assert_eq!(meta_record(r), hex(REFERENCE_RECORD));
}

#[test]
#[rustfmt::skip]
fn new_meta_kinds_round_trip() {
    for (channels, positioned, planar) in [(1, false, false), (1, true, true), (64, true, true), (8, false, true), (6, true, false)] {
        meta_record(audio(channels, positioned, planar));
    }
    let mut a = audio(2, true, true);
    if let Meta::Audio(a) = &mut a {
        (a.format, a.layout, a.flags, a.rate, a.samples) = (u32::MAX, u32::MAX, u32::MAX, u32::MAX, u64::MAX);
        a.positions = vec![-3, i32::MAX];
        a.offsets = vec![u64::MAX, 0];
    }
    meta_record(a);
    meta_record(roi(&[]));
    let many: Vec<String> = (0..MAX_ROI_PARAMS).map(|i| format!("p{i}, v=(uint){i};")).collect();
    meta_record(roi(&many.iter().map(|p| p.as_str()).collect::<Vec<_>>()));
    let mut r = roi(&["", "\u{e9}t\u{e9}"]);
    if let Meta::Roi(r) = &mut r {
        (r.roi_type, r.id, r.parent_id) = (String::new(), i32::MIN, i32::MAX);
    }
    meta_record(r);
    meta_record(time_code("2024-05-06T07:08:09.123456+02:00"));
    let mut t = time_code("x");
    if let Meta::TimeCode(t) = &mut t {
        (t.fps_n, t.fps_d, t.flags, t.hours, t.field_count) = (u32::MAX, 0, u32::MAX, 99, 2);
    }
    meta_record(t);
    meta_record(reference("", 0, 0));
    meta_record(reference("timestamp/x-unix", NONE, 1));
    // All kinds together, in any order, among the old ones.
    let metas = vec![
        reference("a", 1, 2), video(2, 0, 64), time_code(""), audio(2, true, true),
        custom("n", "s;"), roi(&["a;"]), unknown(7, &[1, 2]),
    ];
    round_trip(&frame(vec![reg(1, 0, 8)], metas), 6);
}

#[test]
#[rustfmt::skip]
fn new_meta_kind_errors() {
    let body = |record: &str| [&[0u8; 52][..], &hex("0000 0100"), &hex(record)].concat();
    let check = |record: &str, err: DecodeError| fails(&dgram(6, 0, &body(record)), 0, err);
    // Audio: channel count 0 or above 64, lists neither empty nor one per channel.
    check("0300 0000 14000000 | 00000000 00000000 00000000 00000000 00000000", bad("audio meta", "channels", 0));
    check("0300 0000 14000000 | 00000000 00000000 00000000 00000000 41000000", bad("audio meta", "channels", 65));
    check("0300 0000 20000000 | 1c000000 00000000 00000000 80bb0000 02000000 0000000000000000 01000000",
        bad("audio meta", "position count", 1));
    check("0300 0000 24000000 | 1c000000 00000000 00000000 80bb0000 02000000 0000000000000000
        00000000 03000000", bad("audio meta", "offset count", 3));
    // A position count of u32::MAX is refused before anything is read or allocated.
    check("0300 0000 20000000 | 1c000000 00000000 00000000 80bb0000 02000000 0000000000000000 ffffffff",
        bad("audio meta", "position count", u32::MAX as u64));
    let a = hex(AUDIO_RECORD);
    let cut = |n: usize| [&a[..4], &((n - 8) as u32).to_le_bytes(), &a[8..n]].concat();
    let cuts = [(8, "format"), (27, "channels"), (35, "samples"), (38, "position count"),
        (44, "position"), (50, "offset count"), (60, "channel offset"), (67, "channel offset")];
    for (n, field) in cuts {
        let b = [&[0u8; 52][..], &hex("0000 0100"), &cut(n)].concat();
        fails(&dgram(6, 0, &b), 0, trunc("audio meta", field));
    }
    let mut long = a.clone();
    long[4] += 1;
    long.push(0);
    let b = [&[0u8; 52][..], &hex("0000 0100"), &long].concat();
    fails(&dgram(6, 0, &b), 0, trailing("audio meta", 1));
    // ROI: too many params (checked before reading them), bad UTF-8, cut.
    let kind = "region of interest meta";
    check("0400 0000 20000000 | 00000000 00000000 00000000 00000000 00000000 00000000 00000000 21000000",
        too_many(kind, "params", MAX_ROI_PARAMS + 1, MAX_ROI_PARAMS));
    check("0400 0000 20000000 | 00000000 00000000 00000000 00000000 00000000 00000000 00000000 ffffffff",
        too_many(kind, "params", u32::MAX as usize, MAX_ROI_PARAMS));
    check("0400 0000 05000000 | 01000000 ff", utf8(kind, "roi_type"));
    check("0400 0000 19000000 | 00000000 00000000 00000000 00000000 00000000 00000000 01",
        trunc(kind, "h"));
    check("0400 0000 25000000 | 00000000 00000000 00000000 00000000 00000000 00000000 00000000 01000000
        01000000 c3", utf8(kind, "param"));
    check("0400 0000 24000000 | 00000000 00000000 00000000 00000000 00000000 00000000 00000000 01000000
        02000000", trunc(kind, "param"));
    // Time code: cut before and inside the daily jam, trailing bytes.
    let t = &TIME_CODE_RECORD[..TIME_CODE_RECORD.len() - 10];
    check(&t.replace("24000000", "20000000"), trunc("time code meta", "latest_daily_jam"));
    check(&format!("{} 05000000 61", t.replace("24000000", "25000000")), trunc("time code meta", "latest_daily_jam"));
    check(&format!("{} 00000000 00", t.replace("24000000", "25000000")), trailing("time code meta", 1));
    check("0500 0000 03000000 | 000000", trunc("time code meta", "fps_n"));
    // Reference timestamp.
    let kind = "reference timestamp meta";
    check("0600 0000 0f000000 | 0000000000000000 00000000000000", trunc(kind, "duration"));
    check("0600 0000 15000000 | 0000000000000000 0000000000000000 01000000 80", utf8(kind, "reference"));
    check("0600 0000 10000000 | 0000000000000000 0000000000000000", trunc(kind, "reference"));
}

#[test]
#[rustfmt::skip]
fn optional_metas_are_dropped_biggest_first_to_fit() {
    let big = |n: usize| custom("big", &"x".repeat(n));
    let metas = vec![
        video(1, 0, 64), big(30_000), roi(&["a;"]), audio(2, true, true), big(40_000),
        time_code(""), reference("r", 1, 2),
    ];
    let Message::Frame(mut f) = frame(vec![reg(1, 0, 8)], metas.clone()) else { unreachable!() };
    assert!(encode(&Message::Frame(f.clone())).len() > MAX_MESSAGE_LEN);
    let dropped = f.drop_metas_to_fit(MAX_MESSAGE_LEN);
    assert_eq!(dropped, vec![metas[4].clone()]);
    assert_eq!(f.metas, [&metas[..4], &metas[5..]].concat());
    assert!(encode(&Message::Frame(f.clone())).len() <= MAX_MESSAGE_LEN);
    // A tighter limit takes the next biggest, never the video or audio meta.
    let dropped = f.drop_metas_to_fit(400);
    assert_eq!(dropped, vec![metas[1].clone()]);
    let dropped = f.drop_metas_to_fit(0);
    assert_eq!(dropped.len(), 3, "{dropped:?}");
    assert_eq!(f.metas, vec![metas[0].clone(), metas[3].clone()]);
    assert!(f.drop_metas_to_fit(0).is_empty());
    // Over MAX_METAS: the biggest optional ones go until the count fits.
    let mut metas: Vec<Meta> = (0..MAX_METAS + 3).map(|i| roi(&[&"p;".repeat(i)])).collect();
    metas.insert(5, audio(1, true, true));
    let Message::Frame(mut f) = frame(vec![], metas.clone()) else { unreachable!() };
    let dropped = f.drop_metas_to_fit(MAX_MESSAGE_LEN);
    assert_eq!(dropped, metas[MAX_METAS..].to_vec());
    assert_eq!(f.metas, metas[..MAX_METAS].to_vec());
    round_trip(&Message::Frame(f), 6);
}

#[test]
#[rustfmt::skip]
fn golden_encodings() {
    assert_eq!(round_trip(&hello(1, Role::Consumer, 0), 1), hex(HELLO_V1_CONSUMER));
    assert_eq!(round_trip(&Message::Eos, 8), hex(EOS));
    assert_eq!(round_trip(&Message::Disconnect { reason: "hi".into() }, 9), hex(DISCONNECT));
    assert_eq!(round_trip(&Message::MaxInflight { frames: 64 }, 10), hex(MAX_INFLIGHT));
    assert_eq!(round_trip(&Message::ReleaseRing { capacity: 1024 }, 12), hex(RELEASE_RING));
    assert_eq!(round_trip(&Message::FrameRing { capacity: 64, slot_len: 1024 }, 13), hex(FRAME_RING));
    assert_eq!(round_trip(&Message::Doorbell, 14), hex(DOORBELL));
    assert_eq!(round_trip(&Message::Forget { mem_id: 0x0102_0304_0506_0708 }, 5), hex(FORGET));
    assert_eq!(round_trip(&release(vec![1, 1 << 32]), 7), hex(RELEASE));
    assert_eq!(round_trip(&register(7, MemoryKind::DmaBuf, 4096), 4), hex(REGISTER));
    assert_eq!(round_trip(&caps("a/b", 1_000_000), 3), hex(CAPS));
    let metas = vec![video(2, 0, 64), custom("n", "s;"), unknown(0x1234, &[9])];
    let m = frame(vec![reg(5, 16, 32), inline(&[0xaa, 0xbb])], metas);
    assert_eq!(round_trip(&m, 6), hex(FRAME));
    assert!(matches!(&m, Message::Frame(f) if f.needs_release()));
}

#[test]
#[rustfmt::skip]
fn round_trips() {
    round_trip(&hello(1, Role::Producer, 0xdead_beef), 1);
    round_trip(&refuse("protocol version 2, expected 1"), 2);
    round_trip(&refuse(""), 2);
    round_trip(&caps("video/x-raw, format=(string)NV12, width=(int)64", NONE), 3);
    assert_eq!(round_trip(&register(0, MemoryKind::Memfd, u64::MAX), 4)[16], 1, "memfd is kind 1");
    round_trip(&release(vec![]), 7);
    round_trip(&release((0..MAX_RELEASE_IDS as u64).collect()), 7);
    let all_inline = frame(vec![inline(&[1; 3]), inline(&[])], vec![]);
    assert!(matches!(&all_inline, Message::Frame(f) if !f.needs_release()));
    round_trip(&all_inline, 6);
    round_trip(&frame(vec![], vec![]), 6);
    let metas = vec![video(1, u64::MAX, -64), video(4, 0, 1), custom("", "")];
    round_trip(&frame(vec![reg(1, u64::MAX - 1, 1); MAX_MEMORIES], metas), 6);
    let metas = vec![unknown(9, &[]); MAX_METAS];
    round_trip(&frame(vec![inline(&[0]); MAX_MEMORIES], metas), 6);
    // Exactly MAX_MESSAGE_LEN bytes: 8 header + 56 fixed frame fields + 8 inline header.
    let big = frame(vec![inline(&vec![0; MAX_MESSAGE_LEN - 72])], vec![]);
    assert_eq!(round_trip(&big, 6).len(), MAX_MESSAGE_LEN);
}

#[test]
fn version_2_hello_still_decodes() {
    // The codec accepts any version: the session layer refuses it, naming both.
    let v2 = hello(2, Role::Producer, 0);
    assert_eq!(decode(&encode(&v2), 0), Ok(v2));
    // The reserved byte (0x55 here) and unknown feature bits are ignored.
    let v2 = hex("0100 0000 10000000 | 4255465348415245 0200 02 55 ffffffff");
    assert_eq!(decode(&v2, 0), Ok(hello(2, Role::Consumer, u32::MAX)));
}

#[test]
#[rustfmt::skip]
fn unknown_meta_kind_is_kept() {
    // A frame with no memories and one meta of kind 0xbeef (reserved field 7 is ignored).
    let body = [&[0u8; 52][..], &hex("0000 0100 | efbe 0700 03000000 78797a")].concat();
    let Ok(Message::Frame(f)) = decode(&dgram(6, 0, &body), 0) else { panic!("not a frame") };
    assert_eq!(f.metas, vec![unknown(0xbeef, b"xyz")]);
    let metas = vec![video(1, 0, 8), unknown(0, &[]), unknown(u16::MAX, &[1; 40]), video(3, 0, 8)];
    round_trip(&frame(vec![], metas), 6);
}

#[test]
#[rustfmt::skip]
fn header_errors() {
    fails(&[], 0, ShortHeader(0));
    fails(&hex("0800 0000 000000"), 0, ShortHeader(7));
    fails(&hex("0800 0000 01000000"), 0, mismatch(1, 0));
    fails(&hex("0800 0000 00000000 00"), 0, mismatch(0, 1));
    fails(&hex("0500 0000 09000000 0000000000000000"), 0, mismatch(9, 8));
    fails(&hex("0500 0000 07000000 0000000000000000"), 0, mismatch(7, 8));
    fails(&hex("0500 0000 ffffffff 0000000000000000"), 0, mismatch(u32::MAX as usize, 8));
    for kind in [0, 15, 0xffff] {
        fails(&dgram(kind, 0, &[1]), 0, UnknownKind(kind));
    }
    fails(&vec![0; MAX_MESSAGE_LEN + 1], 0, TooLong(MAX_MESSAGE_LEN + 1));
    let big = frame(vec![inline(&vec![0; MAX_MESSAGE_LEN])], vec![]);
    fails(&encode(&big), 0, TooLong(MAX_MESSAGE_LEN + 72));
}

#[test]
#[rustfmt::skip]
fn fd_count_errors() {
    let (r, f) = (hex(REGISTER), hex(FRAME));
    fails(&r, 0, fds(1, 0, 1)); // REGISTER whose fd did not arrive
    fails(&r, 2, fds(1, 2, 1));
    fails(&[&hex("0400 0000")[..], &r[4..]].concat(), 0, fds(0, 0, 1)); // REGISTER, header says 0
    fails(&f, 1, fds(0, 1, 0)); // FRAME that came with an fd
    fails(&[&hex("0600 0100")[..], &f[4..]].concat(), 1, fds(1, 1, 0)); // FRAME, header says 1
    fails(&hex(EOS), 1, fds(0, 1, 0));
    fails(&hex(RELEASE_RING), 0, fds(1, 0, 1)); // RELEASE_RING whose fd did not arrive
    fails(&hex("0c00 0000 04000000 | 00040000"), 0, fds(0, 0, 1));
    for capacity in ["00000000", "08000000", "e8030000", "00000200", "ffffffff"] {
        let d = hex(&format!("0c00 0100 04000000 | {capacity}"));
        let value = u32::from_le_bytes(d[8..12].try_into().unwrap()) as u64;
        fails(&d, 1, bad("RELEASE_RING", "capacity", value));
    }
    fails(&hex("0c00 0100 02000000 | 0004"), 1, trunc("RELEASE_RING", "capacity"));
    fails(&hex("0c00 0100 05000000 | 00040000 00"), 1, trailing("RELEASE_RING", 1));
    fails(&hex(FRAME_RING), 0, fds(1, 0, 1)); // FRAME_RING whose fd did not arrive
    fails(&hex("0d00 0000 08000000 | 40000000 00040000"), 0, fds(0, 0, 1));
    for capacity in ["00000000", "03000000", "00200000", "ffffffff"] {
        let d = hex(&format!("0d00 0100 08000000 | {capacity} 00040000"));
        let value = u32::from_le_bytes(d[8..12].try_into().unwrap()) as u64;
        fails(&d, 1, bad("FRAME_RING", "capacity", value));
    }
    for slot_len in ["00000000", "40000000", "64000000", "00000200", "ffffffff"] {
        let d = hex(&format!("0d00 0100 08000000 | 40000000 {slot_len}"));
        let value = u32::from_le_bytes(d[12..16].try_into().unwrap()) as u64;
        fails(&d, 1, bad("FRAME_RING", "slot length", value));
    }
    fails(&hex("0d00 0100 04000000 | 40000000"), 1, trunc("FRAME_RING", "slot length"));
    fails(&hex(DOORBELL), 0, fds(1, 0, 1));
    fails(&hex("0e00 0100 01000000 | 00"), 1, trailing("DOORBELL", 1));
}

#[test]
#[rustfmt::skip]
fn hello_errors() {
    let enc = hex(HELLO_V1_CONSUMER);
    let mut magic = enc.clone();
    magic[8] = b'b';
    fails(&magic, 0, BadMagic);
    for role in [0u8, 4, 255] {
        let mut e = enc.clone();
        e[18] = role;
        fails(&e, 0, bad("HELLO", "role", role as u64));
    }
    let cuts = [(4, "magic"), (9, "version"), (10, "role"), (11, "reserved"), (15, "features")];
    for (n, field) in cuts {
        fails(&cut_body(&enc, n), 0, trunc("HELLO", field));
    }
    fails(&dgram(1, 0, &[&enc[HEADER_LEN..], &[0]].concat()), 0, trailing("HELLO", 1));
}

#[test]
#[rustfmt::skip]
fn body_errors() {
    let mut r = hex(REGISTER);
    for kind in [0u8, 3] {
        r[16] = kind;
        fails(&r, 1, bad("REGISTER", "memory kind", kind as u64));
    }
    fails(&cut_body(&hex(REGISTER), 8), 1, trunc("REGISTER", "memory kind"));
    fails(&cut_body(&hex(REGISTER), 19), 1, trunc("REGISTER", "size"));
    fails(&dgram(8, 0, &[0]), 0, trailing("EOS", 1));
    fails(&dgram(5, 0, &[0; 11]), 0, trailing("FORGET", 3));
    fails(&dgram(5, 0, &[0; 7]), 0, trunc("FORGET", "mem_id"));
    fails(&dgram(2, 0, &hex("05000000 61")), 0, trunc("REFUSE", "reason"));
    let c = hex("0000000000000000 02000000 fffe");
    fails(&dgram(3, 0, &c), 0, utf8("CAPS", "caps"));
    fails(&dgram(3, 0, &c[..10]), 0, trunc("CAPS", "caps"));
    fails(&dgram(3, 0, &c[..7]), 0, trunc("CAPS", "latency"));
    let c = hex("0000000000000000 03000000 e282 00"); // cut multi-byte sequence
    fails(&dgram(3, 0, &c), 0, utf8("CAPS", "caps"));
    fails(&dgram(2, 0, &c[8..]), 0, utf8("REFUSE", "reason"));
    fails(&cut_body(&hex(RELEASE), 12), 0, trunc("RELEASE", "frame id"));
    fails(&cut_body(&hex(RELEASE), 3), 0, trunc("RELEASE", "count"));
    let many = |n| too_many("RELEASE", "frame ids", n, MAX_RELEASE_IDS);
    fails(&encode(&release(vec![0; MAX_RELEASE_IDS + 1])), 0, many(MAX_RELEASE_IDS + 1));
    fails(&dgram(7, 0, &u32::MAX.to_le_bytes()), 0, many(u32::MAX as usize));
}

#[test]
#[rustfmt::skip]
fn frame_errors() {
    let enc = encode(&frame(vec![reg(1, 0, 8), inline(&[1, 2, 3])], vec![video(1, 0, 64)]));
    assert_eq!(enc.len(), HEADER_LEN + 135);
    let cuts = [
        (0, "frame_id"), (9, "pts"), (23, "dts"), (31, "duration"), (39, "offset"),
        (47, "offset_end"), (48, "flags"), (52, "memory count"), (54, "meta count"),
        (56, "memory tag"), (60, "mem_id"), (70, "memory offset"), (83, "memory size"),
        (84, "memory tag"), (88, "inline length"), (92, "inline data"), (94, "inline data"),
        (95, "meta kind"), (97, "meta reserved"), (99, "meta length"), (103, "meta data"),
        (134, "meta data"),
    ];
    for (n, field) in cuts {
        assert_eq!(decode(&cut_body(&enc, n), 0), Err(trunc("FRAME", field)), "cut at {n}");
    }
    let mut tag = enc.clone();
    tag[HEADER_LEN + 56] = 3;
    fails(&tag, 0, bad("FRAME", "memory tag", 3));
    fails(&dgram(6, 0, &[&enc[HEADER_LEN..], &[0, 0]].concat()), 0, trailing("FRAME", 2));
    let overflow = |off, size| encode(&frame(vec![reg(1, off, size)], vec![]));
    fails(&overflow(u64::MAX, 1), 0, bad("FRAME", "memory offset+size", u64::MAX));
    fails(&overflow(1 << 63, 1 << 63), 0, bad("FRAME", "memory offset+size", 1 << 63));
    let mems = encode(&frame(vec![inline(&[]); MAX_MEMORIES + 1], vec![]));
    fails(&mems, 0, too_many("FRAME", "memories", MAX_MEMORIES + 1, MAX_MEMORIES));
    let metas = encode(&frame(vec![], vec![unknown(9, &[]); MAX_METAS + 1]));
    fails(&metas, 0, too_many("FRAME", "metas", MAX_METAS + 1, MAX_METAS));
    for planes in [0, 5] {
        let enc = encode(&frame(vec![], vec![video(planes, 0, 64)]));
        fails(&enc, 0, bad("video meta", "plane count", planes as u64));
    }
    // A video meta TLV one byte longer than its one plane needs, then one byte shorter.
    let mut body = encode(&frame(vec![], vec![video(1, 0, 64)]))[HEADER_LEN..].to_vec();
    body[60] += 1;
    body.push(0);
    fails(&dgram(6, 0, &body), 0, trailing("video meta", 1));
    let short = [&body[..60], &hex("1f000000"), &body[64..95]].concat();
    fails(&dgram(6, 0, &short), 0, trunc("video meta", "plane stride"));
    let bad_name = [&[0u8; 54][..], &hex("0100 | 0200 0000 05000000 01000000 c3")].concat();
    fails(&dgram(6, 0, &bad_name), 0, utf8("custom meta", "name"));
    let trailing_custom = encode(&frame(vec![], vec![unknown(2, &hex("00000000 00000000 00"))]));
    fails(&trailing_custom, 0, trailing("custom meta", 1));
}

fn arb_ts() -> impl Strategy<Value = u64> {
    prop_oneof![Just(NONE), Just(0u64), any::<u64>()]
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn arb_memref() -> impl Strategy<Value = MemoryRef> {
    let registered = (any::<u64>(), any::<u64>())
        .prop_flat_map(|(id, off)| (Just(id), Just(off), 0..=u64::MAX - off))
        .prop_map(|(id, off, size)| reg(id, off, size));
    prop_oneof![registered, bytes(48).prop_map(MemoryRef::Inline)]
}

#[rustfmt::skip]
fn arb_metas() -> impl Strategy<Value = Vec<Meta>> {
    use prop::collection::vec;
    let planes = (1..=MAX_PLANES).prop_flat_map(|n| (vec(any::<u64>(), n), vec(any::<i32>(), n)));
    let video = (any::<[u32; 4]>(), planes).prop_map(|([format, flags, width, height], (o, s))| {
        Meta::Video(VideoMeta { format, flags, width, height, offsets: o, strides: s })
    });
    let custom = ("\\PC{0,12}", "\\PC{0,24}").prop_map(|(n, s)| custom(&n, &s));
    // Each list is empty or has one entry per channel.
    let channels = (1..=MAX_AUDIO_CHANNELS).prop_flat_map(|n| (
        Just(n as u32),
        prop_oneof![Just(vec![]), vec(any::<i32>(), n)],
        prop_oneof![Just(vec![]), vec(any::<u64>(), n)],
    ));
    let audio = (any::<[u32; 4]>(), any::<u64>(), channels).prop_map(
        |([format, layout, flags, rate], samples, (channels, positions, offsets))| {
            Meta::Audio(AudioMeta { format, layout, flags, rate, channels, samples, positions, offsets })
        },
    );
    let params = vec("\\PC{0,24}", 0..=MAX_ROI_PARAMS);
    let roi = ("\\PC{0,12}", any::<[i32; 2]>(), any::<[u32; 4]>(), params).prop_map(
        |(roi_type, [id, parent_id], [x, y, w, h], params)| {
            Meta::Roi(RoiMeta { roi_type, id, parent_id, x, y, w, h, params })
        },
    );
    let time_code = (any::<[u32; 8]>(), "\\PC{0,40}").prop_map(|(v, latest_daily_jam)| {
        let [fps_n, fps_d, flags, hours, minutes, seconds, frames, field_count] = v;
        Meta::TimeCode(TimeCodeMeta {
            fps_n, fps_d, flags, hours, minutes, seconds, frames, field_count, latest_daily_jam,
        })
    });
    let reference = ("\\PC{0,32}", arb_ts(), arb_ts()).prop_map(|(r, t, d)| reference(&r, t, d));
    // Kinds 1 to 6 are the known kinds: they never decode as Unknown.
    let kind = any::<u16>().prop_filter("known kind", |k| !(1..=6).contains(k));
    let unknown = (kind, bytes(32)).prop_map(|(k, d)| unknown(k, &d));
    let known = (vec(video, 0..=4), vec(custom, 0..=4), vec(audio, 0..=4), vec(roi, 0..=4));
    let others = (vec(time_code, 0..=4), vec(reference, 0..=4), vec(unknown, 0..=4));
    (known, others)
        .prop_map(|((a, b, c, d), (e, f, g))| [a, b, c, d, e, f, g].concat())
        .prop_shuffle()
}

#[rustfmt::skip]
fn arb_frame() -> impl Strategy<Value = Frame> {
    let ts = (any::<u64>(), [arb_ts(), arb_ts(), arb_ts(), arb_ts(), arb_ts()], any::<u32>());
    let memories = prop::collection::vec(arb_memref(), 0..=MAX_MEMORIES);
    (ts, memories, arb_metas()).prop_map(|((frame_id, ts, flags), memories, metas)| {
        let [pts, dts, duration, offset, offset_end] = ts;
        Frame { frame_id, pts, dts, duration, offset, offset_end, flags, memories, metas }
    })
}

#[rustfmt::skip]
fn arb_message() -> impl Strategy<Value = Message> {
    let role = prop_oneof![Just(Role::Producer), Just(Role::Consumer), Just(Role::Monitor)];
    let mem_kind = prop_oneof![Just(MemoryKind::Memfd), Just(MemoryKind::DmaBuf)];
    prop_oneof![
        1 => (any::<u16>(), role, any::<u32>()).prop_map(|(v, r, f)| hello(v, r, f)),
        1 => "\\PC{0,64}".prop_map(|reason| refuse(&reason)),
        1 => ("\\PC{0,128}", any::<u64>()).prop_map(|(c, latency)| caps(&c, latency)),
        1 => (any::<u64>(), mem_kind, any::<u64>()).prop_map(|(id, k, size)| register(id, k, size)),
        1 => any::<u64>().prop_map(|mem_id| Message::Forget { mem_id }),
        5 => arb_frame().prop_map(Message::Frame),
        1 => prop::collection::vec(any::<u64>(), 0..=MAX_RELEASE_IDS).prop_map(release),
        1 => Just(Message::Eos),
        1 => "\\PC{0,64}".prop_map(|reason| Message::Disconnect { reason }),
        1 => any::<u32>().prop_map(|frames| Message::MaxInflight { frames }),
        1 => (4..=16u32).prop_map(|bits| Message::ReleaseRing { capacity: 1 << bits }),
        1 => (2..=12u32, 2..=1024u32).prop_map(|(bits, lines)| Message::FrameRing { capacity: 1 << bits, slot_len: lines * 64 }),
        1 => Just(Message::Doorbell),
        2 => arb_stats().prop_map(Message::Stats),
    ]
}

#[rustfmt::skip]
fn arb_stats() -> impl Strategy<Value = Stats> {
    let record = (
        (any::<u64>(), any::<u32>(), any::<u32>(), any::<u64>(), any::<u32>(), any::<u32>()),
        (any::<u32>(), any::<u64>(), any::<u32>(), arb_ts(), arb_ts(), "\\PC{0,16}"),
    )
        .prop_map(|((client_id, pid, uid, frames, fps_milli, held), (granted, skipped, releases, release_p50, release_p99, name))| {
            ConsumerStats { client_id, pid, uid, frames, fps_milli, held, granted, skipped, releases, release_p50, release_p99, name }
        });
    (
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<u64>(), any::<u32>(), any::<u64>()),
        (any::<u32>(), any::<u32>(), any::<u32>(), "\\PC{0,128}", "\\PC{0,16}"),
        prop::collection::vec(record, 0..=8),
    )
        .prop_map(|((time, interval, flags, frames, fps_milli, copies), (held, max_held, num_consumers, caps, backend), consumers)| {
            Stats { time, interval, flags, frames, fps_milli, copies, held, max_held, num_consumers, caps, backend, consumers }
        })
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Extend(Vec<u8>),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => bytes(16).prop_map(Mutation::Extend),
    ]
}

proptest! {
    #[test]
    fn prop_round_trip(m in arb_message()) {
        let enc = encode(&m);
        prop_assert!(enc.len() <= MAX_MESSAGE_LEN);
        prop_assert_eq!(u16::from_le_bytes([enc[2], enc[3]]) as usize, m.fd_count());
        prop_assert_eq!(decode(&enc, m.fd_count()), Ok(m));
    }

    #[test]
    fn prop_random_bytes_never_panic(data in bytes(2048), n in 0..3usize) {
        if let Err(e) = decode(&data, n) {
            let _ = e.to_string();
        }
    }

    #[test]
    fn prop_random_stats_body_never_panics(body in bytes(2048)) {
        let _ = decode(&dgram(11, 0, &body), 0);
    }

    #[test]
    fn prop_random_body_never_panics(kind in 0..13u16, n in 0..3u16, body in bytes(2048)) {
        let _ = decode(&dgram(kind, n, &body), n as usize);
    }

    #[test]
    fn prop_mutations_never_panic(
        m in arb_message(),
        muts in prop::collection::vec(arb_mutation(), 1..8),
        fix_len in any::<bool>(),
        n in 0..3usize,
    ) {
        let mut enc = encode(&m);
        for mutation in muts {
            match mutation {
                Mutation::Flip(i, x) if !enc.is_empty() => {
                    let len = enc.len();
                    enc[i % len] ^= x
                }
                Mutation::Flip(..) => {}
                Mutation::Truncate(i) => enc.truncate(i % (enc.len() + 1)),
                Mutation::Extend(tail) => enc.extend_from_slice(&tail),
            }
        }
        if fix_len && enc.len() >= HEADER_LEN {
            // Keep body_len consistent so that the body decoders get exercised.
            let len = (enc.len() - HEADER_LEN) as u32;
            enc[4..8].copy_from_slice(&len.to_le_bytes());
        }
        for n in [n, m.fd_count()] {
            if let Err(e) = decode(&enc, n) {
                let _ = e.to_string();
            }
        }
    }
}

#[test]
fn hello_of_a_version_2_producer_matches_the_worked_example() {
    let features = release_ring::FEATURE_RELEASE_RING | FEATURE_MONITOR;
    let enc = encode(&hello(VERSION, Role::Producer, features));
    assert_eq!(
        enc,
        hex("0100 0000 10000000 | 4255465348415245 0200 01 00 03000000")
    );
}

// The monitor role and STATS (kind 11).

const HELLO_MONITOR: &str = "0100 0000 10000000 | 4255465348415245 0200 03 00 00000000";
const STATS: &str = "0b00 0000 8f000000 | 1000000000000000 00ca9a3b00000000 01000000
    2c01000000000000 30750000 0200000000000000 03000000 08000000 01000000
    | 03000000 612f62 | 05000000 6d656d6664 | 01000000
    | 0700000000000000 75130000 e8030000 2b01000000000000 30750000 02000000 08000000
      0100000000000000 1e000000 60e3160000000000 00093d0000000000 03000000 677374";

fn small_stats() -> Stats {
    Stats {
        time: 0x10,
        interval: 1_000_000_000,
        flags: STATS_EOS,
        frames: 300,
        fps_milli: 30_000,
        copies: 2,
        held: 3,
        max_held: 8,
        num_consumers: 1,
        caps: "a/b".into(),
        backend: "memfd".into(),
        consumers: vec![ConsumerStats {
            client_id: 7,
            pid: 4981,
            uid: 1000,
            frames: 299,
            fps_milli: 30_000,
            held: 2,
            granted: 8,
            skipped: 1,
            releases: 30,
            release_p50: 1_500_000,
            release_p99: 4_000_000,
            name: "gst".into(),
        }],
    }
}

#[test]
fn golden_monitor_encodings() {
    assert_eq!(
        round_trip(&hello(2, Role::Monitor, 0), 1),
        hex(HELLO_MONITOR)
    );
    assert_eq!(round_trip(&Message::Stats(small_stats()), 11), hex(STATS));
    assert_eq!(Message::Stats(small_stats()).fd_count(), 0);
    assert_eq!(Message::Stats(small_stats()).name(), "STATS");
}

#[test]
fn stats_round_trips_at_the_limits() {
    round_trip(&Message::Stats(Stats::default()), 11);
    let record = ConsumerStats {
        client_id: u64::MAX,
        pid: u32::MAX,
        uid: u32::MAX,
        frames: u64::MAX,
        fps_milli: u32::MAX,
        held: u32::MAX,
        granted: u32::MAX,
        skipped: u64::MAX,
        releases: u32::MAX,
        release_p50: NONE,
        release_p99: NONE,
        name: "n".repeat(MAX_STATS_NAME_LEN),
    };
    let full = Stats {
        time: u64::MAX,
        interval: u64::MAX,
        flags: u32::MAX,
        frames: u64::MAX,
        fps_milli: u32::MAX,
        copies: u64::MAX,
        held: u32::MAX,
        max_held: u32::MAX,
        num_consumers: u32::MAX,
        caps: "c".repeat(MAX_STATS_CAPS_LEN),
        backend: "b".repeat(MAX_STATS_NAME_LEN),
        consumers: vec![record; MAX_STATS_CONSUMERS],
    };
    // The largest STATS fits in one datagram.
    let enc = round_trip(&Message::Stats(full), 11);
    assert!(enc.len() <= MAX_MESSAGE_LEN, "{} bytes", enc.len());
}

#[test]
#[rustfmt::skip]
fn stats_errors() {
    let enc = hex(STATS);
    let cuts = [
        (0, "time"), (15, "interval"), (19, "flags"), (20, "frames"), (28, "fps"), (39, "copies"),
        (40, "held"), (44, "max_held"), (51, "consumer count"), (52, "caps"), (57, "caps"),
        (62, "backend"), (67, "backend"), (68, "record count"), (72, "client_id"), (80, "pid"),
        (87, "uid"), (88, "consumer frames"), (96, "consumer fps"), (100, "consumer held"),
        (104, "granted"), (108, "skipped"), (116, "releases"), (120, "release_p50"),
        (128, "release_p99"), (136, "name"), (142, "name"),
    ];
    for (n, field) in cuts {
        assert_eq!(decode(&cut_body(&enc, n), 0), Err(trunc("STATS", field)), "cut at {n}");
    }
    fails(&dgram(11, 0, &[&enc[HEADER_LEN..], &[0]].concat()), 0, trailing("STATS", 1));
    fails(&[&hex("0b00 0100")[..], &enc[4..]].concat(), 1, fds(1, 1, 0));
    // Counts and lengths are checked before anything is read or allocated.
    let mut many = enc[HEADER_LEN..].to_vec();
    many[68..72].copy_from_slice(&u32::MAX.to_le_bytes());
    let too_many_records = too_many("STATS", "consumer records", u32::MAX as usize, MAX_STATS_CONSUMERS);
    fails(&dgram(11, 0, &many), 0, too_many_records);
    let mut s = small_stats();
    s.consumers = vec![s.consumers[0].clone(); MAX_STATS_CONSUMERS + 1];
    let n = MAX_STATS_CONSUMERS + 1;
    fails(&encode(&Message::Stats(s)), 0, too_many("STATS", "consumer records", n, MAX_STATS_CONSUMERS));
    let mut s = small_stats();
    s.caps = "c".repeat(MAX_STATS_CAPS_LEN + 1);
    let n = MAX_STATS_CAPS_LEN + 1;
    fails(&encode(&Message::Stats(s)), 0, too_many("STATS", "bytes of caps", n, MAX_STATS_CAPS_LEN));
    let mut s = small_stats();
    s.backend = "b".repeat(MAX_STATS_NAME_LEN + 1);
    let n = MAX_STATS_NAME_LEN + 1;
    fails(&encode(&Message::Stats(s)), 0, too_many("STATS", "bytes of backend", n, MAX_STATS_NAME_LEN));
    let mut s = small_stats();
    s.consumers[0].name = "n".repeat(MAX_STATS_NAME_LEN + 1);
    let n = MAX_STATS_NAME_LEN + 1;
    fails(&encode(&Message::Stats(s)), 0, too_many("STATS", "bytes of name", n, MAX_STATS_NAME_LEN));
    let mut bad = enc[HEADER_LEN..].to_vec();
    bad[140] = 0xff; // the name's first byte
    fails(&dgram(11, 0, &bad), 0, utf8("STATS", "name"));
}
