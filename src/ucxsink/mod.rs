//! `ucxsink`: sends every buffer it renders to any number of `ucxsrc` receivers on other
//! hosts over UCX active messages (RDMA where there is an RDMA NIC, TCP or shared memory
//! otherwise). Cargo feature `ucx`.
//!
//! `imp.rs` is the element (properties, GstBaseSink vfuncs, each buffer turned into a FRAME
//! with timestamps on CLOCK_MONOTONIC and metas); `io.rs` is the I/O thread that owns UCX and
//! fans frames out (handshake, grants, latest wins, stall timeout). The wire is in
//! [`crate::ucxwire`]; registered memory in [`crate::ucxio`].

use gst::glib;
use gst::prelude::*;

mod imp;
pub mod io;

glib::wrapper! {
    pub struct UcxSink(ObjectSubclass<imp::UcxSink>)
        @extends gst_base::BaseSink, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    crate::ucxio::Mode::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    imp::WhenFull::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    gst::Element::register(
        Some(plugin),
        "ucxsink",
        gst::Rank::NONE,
        UcxSink::static_type(),
    )
}
