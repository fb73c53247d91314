//! GStreamer metas <-> wire metas. The sink turns a buffer's metas into
//! [`protocol::Meta`]s; the src puts them back on the buffer it pushes.
//!
//! Carried today: GstVideoMeta (plane offsets and strides) and every
//! GstCustomMeta (name + structure). New kinds go here and in the codec; a
//! receiver that does not know a kind skips it.

use glib::translate::{from_glib, IntoGlib};
use gst::glib;

use crate::protocol::{self, Meta};

/// The metas of `buffer` that travel.
pub fn from_buffer(buffer: &gst::BufferRef) -> Vec<Meta> {
    let mut out = Vec::new();
    if let Some(vm) = buffer.meta::<gst_video::VideoMeta>() {
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
    }
    buffer.foreach_meta(|meta| {
        // SAFETY: `meta` is a live GstMeta of `buffer`; custom metas are GstCustomMeta.
        unsafe {
            let raw = meta.as_ptr() as *mut gst::ffi::GstMeta;
            let info = (*raw).info;
            if out.len() < protocol::MAX_METAS
                && gst::ffi::gst_meta_info_is_custom(info) != glib::ffi::GFALSE
            {
                let name = std::ffi::CStr::from_ptr(glib::gobject_ffi::g_type_name((*info).type_))
                    .to_string_lossy()
                    .into_owned();
                let s =
                    gst::ffi::gst_custom_meta_get_structure(raw as *mut gst::ffi::GstCustomMeta);
                let structure = gst::StructureRef::from_glib_borrow(s).to_string();
                out.push(Meta::Custom { name, structure });
            }
        }
        std::ops::ControlFlow::Continue(())
    });
    out
}

/// Adds `metas` to `buffer`. Metas that cannot be applied are returned as
/// warnings; unknown kinds are skipped silently (forward compatibility).
pub fn apply(buffer: &mut gst::BufferRef, metas: &[Meta]) -> Vec<String> {
    let mut warnings = Vec::new();
    for meta in metas {
        match meta {
            Meta::Video(v) => {
                // SAFETY: any u32 is a valid GstVideoFormat value to convert; unknown ones map to Unknown.
                let format: gst_video::VideoFormat = unsafe { from_glib(v.format as i32) };
                let offsets: Vec<usize> = v.offsets.iter().map(|o| *o as usize).collect();
                if let Err(e) = gst_video::VideoMeta::add_full(
                    buffer,
                    gst_video::VideoFrameFlags::from_bits_truncate(v.flags),
                    format,
                    v.width,
                    v.height,
                    &offsets,
                    &v.strides,
                ) {
                    warnings.push(format!("video meta not applied: {e}"));
                }
            }
            Meta::Custom { name, structure } => {
                let parsed = match structure.parse::<gst::Structure>() {
                    Ok(s) => s,
                    Err(_) => {
                        warnings.push(format!("custom meta {name}: unparsable structure"));
                        continue;
                    }
                };
                if !gst::meta::CustomMeta::is_registered(name) {
                    gst::meta::CustomMeta::register_simple(name);
                }
                match gst::meta::CustomMeta::add(buffer, name) {
                    Ok(mut m) => {
                        let s = m.mut_structure();
                        for (field, value) in parsed.iter() {
                            s.set_value(field, value.clone());
                        }
                    }
                    Err(e) => warnings.push(format!("custom meta {name}: {e}")),
                }
            }
            Meta::Unknown { .. } => {}
        }
    }
    warnings
}
