//! GStreamer metas <-> wire metas. The sink turns a buffer's metas into
//! [`protocol::Meta`]s ([`from_buffer`]); the src puts them back on the buffer
//! it pushes ([`apply`]).
//!
//! Carried (wire layouts in `docs/protocol.md`, section 6.2):
//!
//! * GstVideoMeta: format, flags, size, plane offsets and strides (not its id
//!   or alignment).
//! * GstAudioMeta: the GstAudioInfo (format, layout, flags, rate, channels,
//!   channel positions), samples and the per-channel plane offsets of planar
//!   audio.
//! * GstVideoRegionOfInterestMeta: type, id, parent id, rectangle and each
//!   parameter GstStructure (as a string). Every ROI of the buffer travels.
//! * GstVideoTimeCodeMeta: the whole GstVideoTimeCode. Its latest daily jam
//!   travels as ISO 8601 text (`2024-05-06T07:08:09.123456+02:00`): the instant,
//!   to the microsecond, and its UTC offset survive; a named time zone becomes
//!   a fixed offset.
//! * GstReferenceTimestampMeta: reference caps, timestamp and duration,
//!   verbatim (they are on the reference clock, not running times).
//! * GstCustomMeta: its registered name and its structure (as a string).
//!
//! Everything else stays behind. A receiver that does not know a kind skips it.
//! Video and audio metas are required to read the data; the others are
//! optional and the sink drops them, biggest first, when a frame would not fit
//! in a datagram ([`protocol::Frame::drop_metas_to_fit`]).
//!
//! Adding a meta: a struct and a `Meta` variant in `protocol/mod.rs`, a kind
//! number with its encoder and decoder in `protocol/codec.rs`, its golden bytes
//! and generator in `protocol/tests.rs`, its table in `docs/protocol.md`, then
//! a branch in [`from_buffer`] and one in [`apply`] here. Values that come off
//! the wire are hostile: check them before they reach an API that asserts,
//! panics or transmutes.

use std::sync::LazyLock;

use glib::translate::{from_glib, IntoGlib};
use gst::glib;

use crate::protocol::{self, Meta};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "bufsharemetas",
        gst::DebugColorFlags::empty(),
        Some("bufshare meta conversion"),
    )
});

/// The metas of `buffer` that travel, in the buffer's order. There may be
/// more than [`protocol::MAX_METAS`]; the sink trims them.
pub fn from_buffer(buffer: &gst::BufferRef) -> Vec<Meta> {
    let mut out = Vec::new();
    for meta in buffer.iter_meta::<gst::Meta>() {
        if let Some(vm) = meta.downcast_ref::<gst_video::VideoMeta>() {
            let n = (vm.n_planes() as usize).min(protocol::MAX_PLANES);
            // A meta with no planes describes nothing; receivers would reject it.
            if n > 0 {
                out.push(Meta::Video(protocol::VideoMeta {
                    format: vm.format().into_glib() as u32,
                    flags: vm.video_frame_flags().bits(),
                    width: vm.width(),
                    height: vm.height(),
                    offsets: vm.offset()[..n].iter().map(|o| *o as u64).collect(),
                    strides: vm.stride()[..n].to_vec(),
                }));
            }
        } else if let Some(am) = meta.downcast_ref::<gst_audio::AudioMeta>() {
            out.extend(audio_from(am));
        } else if let Some(roi) = meta.downcast_ref::<gst_video::VideoRegionOfInterestMeta>() {
            out.push(Meta::Roi(roi_from(roi)));
        } else if let Some(tc) = meta.downcast_ref::<gst_video::VideoTimeCodeMeta>() {
            out.push(Meta::TimeCode(time_code_from(tc)));
        } else if let Some(rt) = meta.downcast_ref::<gst::meta::ReferenceTimestampMeta>() {
            // SAFETY: `rt` is a live GstReferenceTimestampMeta of `buffer`. The raw
            // fields are read because the safe getter panics on a NONE timestamp.
            let (timestamp, duration) = unsafe {
                let raw = rt.as_ptr();
                ((*raw).timestamp, (*raw).duration)
            };
            out.push(Meta::ReferenceTimestamp(protocol::ReferenceTimestampMeta {
                reference: rt.reference().to_string(),
                timestamp,
                duration,
            }));
        } else if let Some(custom) = meta.try_as_custom_meta() {
            out.push(Meta::Custom {
                name: custom.type_().name().to_string(),
                structure: custom.structure().to_string(),
            });
        }
    }
    out
}

fn audio_from(am: &gst::MetaRef<gst_audio::AudioMeta>) -> Option<Meta> {
    let info = am.info();
    let channels = info.channels();
    if channels == 0 || channels as usize > protocol::MAX_AUDIO_CHANNELS {
        gst::warning!(CAT, "audio meta with {channels} channels not sent");
        return None;
    }
    Some(Meta::Audio(protocol::AudioMeta {
        format: info.format().into_glib() as u32,
        layout: info.layout().into_glib() as u32,
        flags: info.flags().bits(),
        rate: info.rate(),
        channels,
        samples: am.samples() as u64,
        positions: (info.positions().unwrap_or_default().iter())
            .map(|p| p.into_glib())
            .collect(),
        offsets: am.offsets().iter().map(|o| *o as u64).collect(),
    }))
}

fn roi_from(roi: &gst::MetaRef<gst_video::VideoRegionOfInterestMeta>) -> protocol::RoiMeta {
    // SAFETY: `roi` is a live GstVideoRegionOfInterestMeta of the buffer. Quark 0
    // (a ROI added with a NULL type) has no string; the safe getter would
    // dereference NULL, so it is checked here first.
    let roi_type = match unsafe { (*roi.as_ptr()).roi_type } {
        0 => String::new(),
        _ => roi.roi_type().to_string(),
    };
    let mut params: Vec<String> = roi.params().map(|s| s.to_string()).collect();
    if params.len() > protocol::MAX_ROI_PARAMS {
        gst::warning!(
            CAT,
            "region of interest {} has {} params: only the first {} are sent",
            roi.id(),
            params.len(),
            protocol::MAX_ROI_PARAMS
        );
        params.truncate(protocol::MAX_ROI_PARAMS);
    }
    let (x, y, w, h) = roi.rect();
    protocol::RoiMeta {
        roi_type,
        id: roi.id(),
        parent_id: roi.parent_id(),
        x,
        y,
        w,
        h,
        params,
    }
}

/// ISO 8601 with microseconds and the UTC offset, as `g_date_time_format_iso8601`
/// writes it since GLib 2.66 (which gstreamer-rs does not expose without GLib 2.62
/// features); `g_date_time_new_from_iso8601` reads it back.
const ISO8601: &str = "%Y-%m-%dT%H:%M:%S.%f%:z";

fn time_code_from(meta: &gst::MetaRef<gst_video::VideoTimeCodeMeta>) -> protocol::TimeCodeMeta {
    let tc = meta.tc();
    // SAFETY: `meta` is a live GstVideoTimeCodeMeta of the buffer. The frame rate
    // is read raw: the safe getter reduces it (60/2 becomes 30/1) and panics
    // on a zero denominator.
    let (fps_n, fps_d) = unsafe {
        let config = &(*meta.as_ptr()).tc.config;
        (config.fps_n, config.fps_d)
    };
    protocol::TimeCodeMeta {
        fps_n,
        fps_d,
        flags: tc.flags().bits(),
        hours: tc.hours(),
        minutes: tc.minutes(),
        seconds: tc.seconds(),
        frames: tc.frames(),
        field_count: tc.field_count(),
        latest_daily_jam: (tc.latest_daily_jam())
            .and_then(|d| d.format(ISO8601).ok())
            .map(String::from)
            .unwrap_or_default(),
    }
}

/// Adds `metas` to `buffer`. Metas that cannot be applied are returned as
/// warnings; unknown kinds are skipped silently (forward compatibility).
pub fn apply(buffer: &mut gst::BufferRef, metas: &[Meta]) -> Vec<String> {
    let mut warnings = Vec::new();
    for meta in metas {
        let result = match meta {
            Meta::Video(v) => apply_video(buffer, v),
            Meta::Audio(a) => apply_audio(buffer, a),
            Meta::Roi(r) => apply_roi(buffer, r, &mut warnings),
            Meta::TimeCode(t) => apply_time_code(buffer, t, &mut warnings),
            Meta::ReferenceTimestamp(r) => apply_reference_timestamp(buffer, r),
            Meta::Custom { name, structure } => apply_custom(buffer, name, structure),
            Meta::Unknown { .. } => Ok(()),
        };
        if let Err(e) = result {
            warnings.push(format!("{} not applied: {e}", meta.name()));
        }
    }
    warnings
}

/// Strings from the wire go to C as NUL-terminated strings: an inner NUL would
/// cut them (or panic in a debug build).
fn no_nul<'a>(what: &str, s: &'a str) -> Result<&'a str, String> {
    match s.contains('\0') {
        true => Err(format!("{what} contains a NUL byte")),
        false => Ok(s),
    }
}

fn apply_video(buffer: &mut gst::BufferRef, v: &protocol::VideoMeta) -> Result<(), String> {
    // SAFETY: any u32 is a valid GstVideoFormat value to convert; unknown ones map to Unknown.
    let format: gst_video::VideoFormat = unsafe { from_glib(v.format as i32) };
    let offsets: Vec<usize> = v.offsets.iter().map(|o| *o as usize).collect();
    gst_video::VideoMeta::add_full(
        buffer,
        gst_video::VideoFrameFlags::from_bits_truncate(v.flags),
        format,
        v.width,
        v.height,
        &offsets,
        &v.strides,
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

fn apply_audio(buffer: &mut gst::BufferRef, a: &protocol::AudioMeta) -> Result<(), String> {
    // SAFETY: GstAudioFormat has an unknown-value variant: any i32 converts.
    let format: gst_audio::AudioFormat = unsafe { from_glib(a.format as i32) };
    // gst_audio_info_set_format leaves the info uninitialised for UNKNOWN: only
    // formats this GStreamer knows go further.
    if !gst_audio::AudioFormat::iter_raw().any(|f| f == format) {
        return Err(format!("unknown audio format {}", a.format));
    }
    let layout = match a.layout {
        0 => gst_audio::AudioLayout::Interleaved,
        1 => gst_audio::AudioLayout::NonInterleaved,
        other => return Err(format!("unknown audio layout {other}")),
    };
    let positions = (a.positions.iter())
        .map(|p| match *p {
            // SAFETY: GstAudioChannelPosition is a repr(i32) enum with every value
            // from NONE (-3) to 64; from_glib transmutes, so the range is checked first.
            p @ gst_audio::ffi::GST_AUDIO_CHANNEL_POSITION_NONE..=64 => Ok(unsafe { from_glib(p) }),
            p => Err(format!("invalid channel position {p}")),
        })
        .collect::<Result<Vec<gst_audio::AudioChannelPosition>, String>>()?;
    let info = gst_audio::AudioInfo::builder(format, a.rate, a.channels)
        .positions_if(&positions, !positions.is_empty())
        .layout(layout)
        .flags(gst_audio::AudioFlags::from_bits_truncate(a.flags))
        .build()
        .map_err(|e| e.to_string())?;
    let samples = usize::try_from(a.samples).map_err(|_| "too many samples".to_string())?;
    let offsets: Vec<usize> = a.offsets.iter().map(|o| *o as usize).collect();
    // gst_audio::AudioMeta::add checks the planes against the buffer with
    // unchecked arithmetic (a debug build panics on overflow): check first.
    if layout == gst_audio::AudioLayout::NonInterleaved {
        let plane = samples
            .checked_mul(info.width() as usize / 8)
            .ok_or("plane size overflows")?;
        // Where the last byte of each plane (or of all of them) ends.
        let ends: Vec<Option<usize>> = match offsets.is_empty() {
            true => vec![plane.checked_mul(a.channels as usize)],
            false => offsets.iter().map(|o| o.checked_add(plane)).collect(),
        };
        if ends
            .iter()
            .any(|end| end.is_none_or(|end| end > buffer.size()))
        {
            return Err(format!(
                "channel planes of {plane} bytes at {:?} do not fit in the {}-byte buffer",
                a.offsets,
                buffer.size()
            ));
        }
    }
    gst_audio::AudioMeta::add(buffer, &info, samples, &offsets)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn apply_roi(
    buffer: &mut gst::BufferRef,
    r: &protocol::RoiMeta,
    warnings: &mut Vec<String>,
) -> Result<(), String> {
    let roi_type = no_nul("type", &r.roi_type)?;
    let mut params = Vec::with_capacity(r.params.len());
    for p in &r.params {
        match no_nul("param", p).and_then(|p| p.parse::<gst::Structure>().map_err(|_| p.into())) {
            Ok(s) => params.push(s),
            Err(e) => warnings.push(format!(
                "region of interest {}: unparsable param dropped: {e}",
                r.id
            )),
        }
    }
    let mut meta =
        gst_video::VideoRegionOfInterestMeta::add(buffer, roi_type, (r.x, r.y, r.w, r.h));
    meta.set_id(r.id);
    meta.set_parent_id(r.parent_id);
    for s in params {
        meta.add_param(s);
    }
    Ok(())
}

fn apply_time_code(
    buffer: &mut gst::BufferRef,
    t: &protocol::TimeCodeMeta,
    warnings: &mut Vec<String>,
) -> Result<(), String> {
    let jam = match t.latest_daily_jam.as_str() {
        "" => None,
        text => {
            let parsed = no_nul("daily jam", text).and_then(|text| {
                glib::DateTime::from_iso8601(text, None).map_err(|e| e.to_string())
            });
            match parsed {
                Ok(d) => Some(d),
                Err(e) => {
                    warnings.push(format!("time code daily jam {text:?} dropped: {e}"));
                    None
                }
            }
        }
    };
    // new_raw: no reduction (the raw values go to gst_video_time_code_init) and
    // no panic on a zero denominator (the time code is then invalid, below).
    let tc = gst_video::VideoTimeCode::new(
        gst::Fraction::new_raw(t.fps_n as i32, t.fps_d as i32),
        jam.as_ref(),
        gst_video::VideoTimeCodeFlags::from_bits_truncate(t.flags),
        t.hours,
        t.minutes,
        t.seconds,
        t.frames,
        t.field_count,
    );
    // Not formatted with {:?}: its Debug reduces the frame rate, which panics
    // on a zero denominator.
    let tc = gst_video::ValidVideoTimeCode::try_from(tc)
        .map_err(|_| format!("invalid time code {t:?}"))?;
    gst_video::VideoTimeCodeMeta::add(buffer, &tc);
    Ok(())
}

fn apply_reference_timestamp(
    buffer: &mut gst::BufferRef,
    r: &protocol::ReferenceTimestampMeta,
) -> Result<(), String> {
    let caps = no_nul("reference", &r.reference)?
        .parse::<gst::Caps>()
        .map_err(|_| format!("unparsable reference caps {:?}", r.reference))?;
    if r.timestamp == protocol::NONE {
        return Err("no timestamp".into());
    }
    let duration =
        (r.duration != protocol::NONE).then(|| gst::ClockTime::from_nseconds(r.duration));
    gst::meta::ReferenceTimestampMeta::add(
        buffer,
        &caps,
        gst::ClockTime::from_nseconds(r.timestamp),
        duration,
    );
    Ok(())
}

fn apply_custom(buffer: &mut gst::BufferRef, name: &str, structure: &str) -> Result<(), String> {
    let name = no_nul("name", name)?;
    let parsed = no_nul("structure", structure)?
        .parse::<gst::Structure>()
        .map_err(|_| "unparsable structure".to_string())?;
    if !gst::meta::CustomMeta::is_registered(name) {
        gst::meta::CustomMeta::register_simple(name);
    }
    let mut m = gst::meta::CustomMeta::add(buffer, name).map_err(|e| e.to_string())?;
    let s = m.mut_structure();
    for (field, value) in parsed.iter() {
        s.set_value(field, value.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{Frame, Message};

    /// The metas of `buffer` after a trip over the wire: from_buffer, a FRAME
    /// encoded and decoded, then applied to a fresh buffer with the same bytes.
    fn over_the_wire(buffer: &gst::Buffer) -> gst::Buffer {
        let frame = Frame {
            frame_id: 1,
            pts: protocol::NONE,
            dts: protocol::NONE,
            duration: protocol::NONE,
            offset: protocol::NONE,
            offset_end: protocol::NONE,
            flags: 0,
            memories: vec![],
            metas: from_buffer(buffer),
        };
        let bytes = protocol::encode(&Message::Frame(frame));
        let Ok(Message::Frame(frame)) = protocol::decode(&bytes, 0) else {
            panic!("FRAME does not decode")
        };
        let mut out = gst::Buffer::with_size(buffer.size()).unwrap();
        let warnings = apply(out.get_mut().unwrap(), &frame.metas);
        assert!(warnings.is_empty(), "{warnings:?}");
        // Whatever went in comes out, wire value for wire value.
        assert_eq!(from_buffer(&out), from_buffer(buffer));
        out
    }

    /// Applies `meta` to a buffer of `size` bytes; returns the warnings and
    /// whether a meta was added.
    fn apply_one(size: usize, meta: Meta) -> (Vec<String>, bool) {
        let mut b = gst::Buffer::with_size(size).unwrap();
        let warnings = apply(b.get_mut().unwrap(), &[meta]);
        (warnings, b.iter_meta::<gst::Meta>().count() > 0)
    }

    #[test]
    fn planar_audio_meta_keeps_format_samples_and_offsets() {
        gst::init().unwrap();
        use gst_audio::AudioChannelPosition::*;
        let positions = [FrontLeft, FrontRight, FrontCenter];
        let info = gst_audio::AudioInfo::builder(gst_audio::AudioFormat::F32le, 44100, 3)
            .positions(&positions)
            .layout(gst_audio::AudioLayout::NonInterleaved)
            .build()
            .unwrap();
        // 1024 samples of 4 bytes per plane, planes not where the default puts them.
        let offsets = [8704, 0, 4352];
        let mut buffer = gst::Buffer::with_size(3 * 4096 + 512).unwrap();
        gst_audio::AudioMeta::add(buffer.get_mut().unwrap(), &info, 1024, &offsets).unwrap();
        let wire = from_buffer(&buffer);
        assert!(
            matches!(&wire[..], [Meta::Audio(a)] if a.format == 28 && a.layout == 1
                && a.positions == [0, 1, 2] && a.offsets == [8704, 0, 4352]),
            "{wire:?}"
        );

        let out = over_the_wire(&buffer);
        let m = out.meta::<gst_audio::AudioMeta>().expect("audio meta");
        assert_eq!(m.info(), &info);
        assert_eq!(m.info().positions(), Some(&positions[..]));
        assert_eq!(m.samples(), 1024);
        assert_eq!(m.offsets(), &offsets);
    }

    #[test]
    fn interleaved_and_unpositioned_audio_metas_travel() {
        gst::init().unwrap();
        let info = gst_audio::AudioInfo::builder(gst_audio::AudioFormat::S16le, 8000, 2)
            .build()
            .unwrap();
        let mut buffer = gst::Buffer::with_size(400).unwrap();
        gst_audio::AudioMeta::add(buffer.get_mut().unwrap(), &info, 100, &[]).unwrap();
        let out = over_the_wire(&buffer);
        let m = out.meta::<gst_audio::AudioMeta>().unwrap();
        assert_eq!(m.info(), &info);
        assert!(m.offsets().is_empty());

        let info = gst_audio::AudioInfo::builder(gst_audio::AudioFormat::U8, 8000, 4)
            .layout(gst_audio::AudioLayout::NonInterleaved)
            .flags(gst_audio::AudioFlags::UNPOSITIONED)
            .build()
            .unwrap();
        let mut buffer = gst::Buffer::with_size(400).unwrap();
        gst_audio::AudioMeta::add(buffer.get_mut().unwrap(), &info, 100, &[]).unwrap();
        let out = over_the_wire(&buffer);
        let m = out.meta::<gst_audio::AudioMeta>().unwrap();
        assert!(m.info().is_unpositioned());
        assert_eq!(m.offsets(), &[0, 100, 200, 300]);
    }

    #[test]
    fn region_of_interest_metas_keep_ids_rectangles_and_params() {
        gst::init().unwrap();
        let mut buffer = gst::Buffer::with_size(16).unwrap();
        let detection = gst::Structure::builder("detection")
            .field("confidence", 0.875f64)
            .field("label", "person; \"quoted\"")
            .field("box", gst::Array::new([1i32, 2, 3]))
            .build();
        let tracking = gst::Structure::builder("object-tracking")
            .field("id", 42u64)
            .build();
        let classification = gst::Structure::builder("classification")
            .field("class", "glasses")
            .field("scores", gst::Array::new([0.25f32, 0.75]))
            .build();
        {
            let b = buffer.get_mut().unwrap();
            let mut face = gst_video::VideoRegionOfInterestMeta::add(b, "face", (10, 20, 300, 400));
            face.set_id(7);
            face.set_parent_id(-1);
            face.add_param(detection.clone());
            face.add_param(tracking.clone());
            let mut eyes = gst_video::VideoRegionOfInterestMeta::add(b, "eyes", (50, 60, 70, 8));
            eyes.set_id(8);
            eyes.set_parent_id(7);
            eyes.add_param(classification.clone());
            gst_video::VideoRegionOfInterestMeta::add(b, "plain", (0, 0, 1, 1));
        }
        let out = over_the_wire(&buffer);
        let rois: Vec<_> = out
            .iter_meta::<gst_video::VideoRegionOfInterestMeta>()
            .collect();
        assert_eq!(rois.len(), 3);
        assert_eq!(
            (rois[0].roi_type(), rois[0].id(), rois[0].parent_id()),
            ("face", 7, -1)
        );
        assert_eq!(rois[0].rect(), (10, 20, 300, 400));
        let params: Vec<gst::Structure> = rois[0].params().map(|s| s.to_owned()).collect();
        assert_eq!(params, [detection, tracking]);
        assert_eq!(
            (rois[1].roi_type(), rois[1].id(), rois[1].parent_id()),
            ("eyes", 8, 7)
        );
        assert_eq!(
            rois[1].param("classification"),
            Some(classification.as_ref())
        );
        assert_eq!(rois[2].params().count(), 0);
    }

    #[test]
    fn time_code_meta_keeps_the_whole_time_code_and_its_daily_jam() {
        gst::init().unwrap();
        #[allow(deprecated)]
        let tz = glib::TimeZone::new(Some("+02:00"));
        let jam = glib::DateTime::new(&tz, 2024, 5, 6, 7, 8, 9.123456).unwrap();
        let tc = gst_video::VideoTimeCode::new(
            gst::Fraction::new(30000, 1001),
            Some(&jam),
            gst_video::VideoTimeCodeFlags::DROP_FRAME | gst_video::VideoTimeCodeFlags::INTERLACED,
            10,
            20,
            30,
            4,
            2,
        );
        let tc = gst_video::ValidVideoTimeCode::try_from(tc).unwrap();
        let mut buffer = gst::Buffer::with_size(16).unwrap();
        gst_video::VideoTimeCodeMeta::add(buffer.get_mut().unwrap(), &tc);
        let wire = from_buffer(&buffer);
        assert!(
            matches!(&wire[..], [Meta::TimeCode(t)]
                if t.latest_daily_jam == "2024-05-06T07:08:09.123456+02:00"),
            "{wire:?}"
        );

        let out = over_the_wire(&buffer);
        let got = out.meta::<gst_video::VideoTimeCodeMeta>().unwrap().tc();
        assert_eq!(got, tc);
        assert_eq!(got.to_string(), "10:20:30;04");
        assert_eq!(got.field_count(), 2);
        assert_eq!(got.fps(), gst::Fraction::new(30000, 1001));
        assert_eq!(got.flags(), tc.flags());
        let got_jam = got.latest_daily_jam().unwrap();
        assert_eq!(got_jam.to_unix(), jam.to_unix());
        assert_eq!(got_jam.microsecond(), 123456);
        assert_eq!(got_jam.utc_offset(), jam.utc_offset());

        // Without a daily jam, and with a frame rate that reduces (60/2).
        let tc = gst_video::VideoTimeCode::new(
            gst::Fraction::new_raw(60, 2),
            None,
            gst_video::VideoTimeCodeFlags::empty(),
            0,
            0,
            1,
            29,
            0,
        );
        let tc = gst_video::ValidVideoTimeCode::try_from(tc).unwrap();
        let mut buffer = gst::Buffer::with_size(16).unwrap();
        gst_video::VideoTimeCodeMeta::add(buffer.get_mut().unwrap(), &tc);
        let wire = from_buffer(&buffer);
        assert!(
            matches!(&wire[..], [Meta::TimeCode(t)] if (t.fps_n, t.fps_d) == (60, 2)
                && t.latest_daily_jam.is_empty()),
            "{wire:?}"
        );
        let got = over_the_wire(&buffer);
        let got = got.meta::<gst_video::VideoTimeCodeMeta>().unwrap().tc();
        assert_eq!(got, tc);
        assert!(got.latest_daily_jam().is_none());
    }

    #[test]
    fn reference_timestamp_metas_are_carried_verbatim() {
        gst::init().unwrap();
        let ntp = gst::Caps::new_empty_simple("timestamp/x-ntp");
        let unix = gst::Caps::builder("timestamp/x-unix")
            .field("source", "ptp")
            .build();
        // NTP times since 1900: far beyond any running time.
        let t1 = gst::ClockTime::from_nseconds(3_924_000_000_123_456_789);
        let t2 = gst::ClockTime::from_nseconds(1_700_000_000_000_000_001);
        let d = gst::ClockTime::from_mseconds(20);
        let mut buffer = gst::Buffer::with_size(16).unwrap();
        {
            let b = buffer.get_mut().unwrap();
            gst::meta::ReferenceTimestampMeta::add(b, &ntp, t1, d);
            gst::meta::ReferenceTimestampMeta::add(b, &unix, t2, None);
        }
        let out = over_the_wire(&buffer);
        let got: Vec<_> = out
            .iter_meta::<gst::meta::ReferenceTimestampMeta>()
            .map(|m| (m.reference_owned(), m.timestamp(), m.duration()))
            .collect();
        assert_eq!(got, [(ntp, t1, Some(d)), (unix, t2, None)]);
    }

    #[test]
    fn video_and_custom_metas_still_travel_with_the_new_ones() {
        gst::init().unwrap();
        gst::meta::CustomMeta::register_simple("bufshare-test-metas");
        let mut buffer = gst::Buffer::with_size(64 * 48 * 3 / 2).unwrap();
        {
            let b = buffer.get_mut().unwrap();
            gst_video::VideoMeta::add_full(
                b,
                gst_video::VideoFrameFlags::empty(),
                gst_video::VideoFormat::I420,
                64,
                48,
                &[0, 3072, 3840],
                &[64, 32, 32],
            )
            .unwrap();
            gst_video::VideoRegionOfInterestMeta::add(b, "car", (1, 2, 3, 4));
            let mut c = gst::meta::CustomMeta::add(b, "bufshare-test-metas").unwrap();
            c.mut_structure().set("answer", 42i32);
        }
        let out = over_the_wire(&buffer);
        let vm = out.meta::<gst_video::VideoMeta>().unwrap();
        assert_eq!(vm.offset(), &[0, 3072, 3840]);
        let c = gst::meta::CustomMeta::from_buffer(&out, "bufshare-test-metas").unwrap();
        assert_eq!(c.structure().get::<i32>("answer"), Ok(42));
        assert_eq!(from_buffer(&out).len(), 3);
    }

    #[test]
    #[rustfmt::skip]
    fn hostile_metas_are_refused_with_a_warning() {
        gst::init().unwrap();
        let audio = |format, layout, channels, samples, positions: &[i32], offsets: &[u64]| {
            Meta::Audio(protocol::AudioMeta {
                format, layout, flags: 0, rate: 48000, channels, samples,
                positions: positions.to_vec(), offsets: offsets.to_vec(),
            })
        };
        let refused = [
            // Plane past the end, overflowing offsets and sizes, overlapping planes.
            audio(28, 1, 2, 1024, &[], &[0, 4096]),
            audio(28, 1, 2, 1, &[], &[u64::MAX, 0]),
            audio(28, 1, 2, u64::MAX / 2, &[], &[]),
            audio(28, 1, 2, u64::MAX, &[], &[0, 4]),
            audio(28, 1, 2, 16, &[], &[0, 4]),
            // Unknown format, layout or positions; positions that are not a layout.
            audio(0, 1, 2, 16, &[], &[]),
            audio(9999, 1, 2, 16, &[], &[]),
            audio(u32::MAX, 1, 2, 16, &[], &[]),
            audio(28, 2, 2, 16, &[], &[]),
            audio(28, 1, 2, 16, &[0, 999], &[]),
            audio(28, 1, 2, 16, &[i32::MIN, 0], &[]),
            audio(28, 1, 2, 16, &[0, 0], &[]),
            audio(28, 0, 2, 16, &[], &[0, 64]),
            // Zero rate.
            Meta::Audio(protocol::AudioMeta { rate: 0, ..match audio(28, 0, 1, 1, &[], &[]) {
                Meta::Audio(a) => a, _ => unreachable!() } }),
            Meta::Roi(protocol::RoiMeta {
                roi_type: "a\0b".into(), id: 0, parent_id: 0, x: 0, y: 0, w: 0, h: 0, params: vec![],
            }),
            Meta::TimeCode(protocol::TimeCodeMeta {
                fps_n: 30, fps_d: 0, flags: 0, hours: 0, minutes: 0, seconds: 0, frames: 0,
                field_count: 0, latest_daily_jam: String::new(),
            }),
            Meta::TimeCode(protocol::TimeCodeMeta {
                fps_n: 25, fps_d: 1, flags: 0, hours: 24, minutes: 0, seconds: 0, frames: 0,
                field_count: 0, latest_daily_jam: String::new(),
            }),
            Meta::ReferenceTimestamp(protocol::ReferenceTimestampMeta {
                reference: "timestamp/x-ntp".into(), timestamp: protocol::NONE, duration: 0,
            }),
            Meta::ReferenceTimestamp(protocol::ReferenceTimestampMeta {
                reference: "not caps ((".into(), timestamp: 1, duration: 0,
            }),
            Meta::ReferenceTimestamp(protocol::ReferenceTimestampMeta {
                reference: "a\0".into(), timestamp: 1, duration: 0,
            }),
            Meta::Custom { name: "x\0y".into(), structure: "s;".into() },
            Meta::Custom { name: "bufshare-test-hostile".into(), structure: "((".into() },
        ];
        for meta in refused {
            let (warnings, added) = apply_one(4096, meta.clone());
            assert_eq!(warnings.len(), 1, "{meta:?}: {warnings:?}");
            assert!(!added, "{meta:?} was added");
        }
        // Partly usable: the meta goes on, what is wrong is dropped with a warning.
        let roi = Meta::Roi(protocol::RoiMeta {
            roi_type: "face".into(), id: 1, parent_id: 0, x: 0, y: 0, w: 1, h: 1,
            params: vec!["good, a=(int)1;".into(), "((".into(), "nul\0;".into()],
        });
        let (warnings, added) = apply_one(16, roi);
        assert_eq!((warnings.len(), added), (2, true), "{warnings:?}");
        let tc = Meta::TimeCode(protocol::TimeCodeMeta {
            fps_n: 25, fps_d: 1, flags: 0, hours: 1, minutes: 2, seconds: 3, frames: 4,
            field_count: 0, latest_daily_jam: "yesterday".into(),
        });
        let (warnings, added) = apply_one(16, tc);
        assert_eq!((warnings.len(), added), (1, true), "{warnings:?}");
        assert!(warnings[0].contains("daily jam"), "{warnings:?}");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            /// Any audio meta off the wire, on any buffer size: applied or
            /// refused with a warning, never a panic.
            #[test]
            fn apply_audio_never_panics(
                format in prop_oneof![0..40u32, any::<u32>()],
                layout in 0..3u32,
                flags in any::<u32>(),
                rate in prop_oneof![Just(48000u32), any::<u32>()],
                channels in 1..=protocol::MAX_AUDIO_CHANNELS as u32,
                samples in prop_oneof![0..2048u64, any::<u64>()],
                positioned in any::<bool>(),
                planar in any::<bool>(),
                values in prop::collection::vec((-4..70i32, prop_oneof![0..16384u64, any::<u64>()]), 64),
                size in 0..20000usize,
            ) {
                gst::init().unwrap();
                let n = channels as usize;
                let positions = match positioned {
                    true => values[..n].iter().map(|v| v.0).collect(),
                    false => vec![],
                };
                let offsets = match planar {
                    true => values[..n].iter().map(|v| v.1).collect(),
                    false => vec![],
                };
                let meta = Meta::Audio(protocol::AudioMeta {
                    format, layout, flags, rate, channels, samples, positions, offsets,
                });
                let (warnings, added) = apply_one(size, meta);
                prop_assert_eq!(warnings.is_empty(), added);
            }
        }
    }
}
