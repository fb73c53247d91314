//! `bufsharesink`: serves every buffer it renders to any number of
//! `bufsharesrc` consumers on a UNIX socket, without copying frames.
//!
//! `imp.rs` is the element (properties, GstBaseSink vfuncs, preparing each
//! buffer); `server.rs` is the fan-out core and its I/O thread, which asks
//! `fanout.rs` (the pure policy) who gets each frame; `backend.rs` turns the
//! `backend`/`heap`/`device` properties into a memory backend. `monitor.rs`
//! (a child of `server.rs`) serves monitors (`bufshare ls/top/dump`) with
//! STATS, measured by the pure `stats.rs`.

use gst::glib;
use gst::prelude::*;

pub mod backend;
pub mod fanout;
mod imp;
#[cfg(feature = "ucx")]
pub(crate) use imp::raw_video_info;
pub mod server;
pub mod stats;

glib::wrapper! {
    pub struct BufShareSink(ObjectSubclass<imp::BufShareSink>)
        @extends gst_base::BaseSink, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    backend::BackendKind::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    gst::Element::register(
        Some(plugin),
        "bufsharesink",
        gst::Rank::NONE,
        BufShareSink::static_type(),
    )
}
