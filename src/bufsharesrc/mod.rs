//! `bufsharesrc`: a live source that receives frames from a `bufsharesink` in
//! another process and pushes them as GstFdMemory/GstDmaBufMemory, without
//! copying. Caps come from the producer.
//!
//! `imp.rs` is the element; `receiver.rs` is one connection (handshake,
//! imported memories, release back to the producer); `stale.rs` spots frames
//! left in the socket while the consumer did not read; `delivery.rs` decides,
//! frame by frame, whether to push, copy or drop (pure policy).

use gst::glib;
use gst::prelude::*;

pub(crate) mod delivery;
mod imp;
#[cfg(feature = "ucx")]
pub(crate) use imp::OnDisconnect;
pub mod receiver;
mod stale;

glib::wrapper! {
    pub struct BufShareSrc(ObjectSubclass<imp::BufShareSrc>)
        @extends gst_base::PushSrc, gst_base::BaseSrc, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "bufsharesrc",
        gst::Rank::NONE,
        BufShareSrc::static_type(),
    )
}
