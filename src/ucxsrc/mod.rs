//! `ucxsrc`: a live source that receives frames from a `ucxsink` on another host over UCX
//! active messages, into its own pool of memfd memory (so `ucxsrc ! bufsharesink` re-shares
//! them by fd without a further copy). Caps, timestamps (mapped onto this pipeline's running
//! time through a clock offset measured in the handshake), flags and metas come with the
//! frames. Cargo feature `ucx`.
//!
//! `imp.rs` is the element (properties, start, create, latency, `on-disconnect`); `io.rs` the
//! I/O thread that owns UCX, does the handshake and receives. The wire is in
//! [`crate::ucxwire`].

use gst::glib;
use gst::prelude::*;

mod imp;
pub mod io;

glib::wrapper! {
    pub struct UcxSrc(ObjectSubclass<imp::UcxSrc>)
        @extends gst_base::PushSrc, gst_base::BaseSrc, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "ucxsrc",
        gst::Rank::NONE,
        UcxSrc::static_type(),
    )
}
