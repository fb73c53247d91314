//! bufshare: zero-copy fan-out of GStreamer buffers between processes.
//!
//! `bufsharesink` serves frames on a UNIX socket; any number of `bufsharesrc`
//! consumers connect, receive each producer memory's fd once, and then only
//! small per-frame messages. See `docs/protocol.md` for the wire format and
//! README.md for usage.
//!
//! Layout: [`protocol`] (pure wire format), [`transport`] (sockets),
//! [`bufsharesink`] and [`bufsharesrc`] (the elements), [`pool`] (buffer pool
//! over a memory backend), [`memtag`], [`metas`] and [`clock`] (helpers the
//! elements share). Memory backends live in the `bufshare-backends` crate.
//!
//! With the cargo feature `ucx`: [`ucxsink`] and [`ucxsrc`], the same frames across hosts over
//! UCX active messages ([`ucxwire`] is their pure wire format, always built; [`ucxio`] what
//! their I/O threads share).

use gst::glib;

pub mod bufsharesink;
pub mod bufsharesrc;
pub mod clock;
pub mod memtag;
pub mod metas;
pub mod pool;
pub mod protocol;
pub mod transport;
#[cfg(feature = "ucx")]
pub mod ucxio;
#[cfg(feature = "ucx")]
pub mod ucxsink;
#[cfg(feature = "ucx")]
pub mod ucxsrc;
#[cfg(feature = "ucx")]
pub mod ucxwatch;
pub mod ucxwire;

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    bufsharesink::register(plugin)?;
    bufsharesrc::register(plugin)?;
    // The cross-host pair only exists in builds with the `ucx` feature (docs/ucx.md says why
    // it is not on by default).
    #[cfg(feature = "ucx")]
    {
        ucxsink::register(plugin)?;
        ucxsrc::register(plugin)?;
    }
    Ok(())
}

gst::plugin_define!(
    bufshare,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("CARGO_PKG_NAME")),
    "MPL",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    "https://example.invalid/bufshare",
    "2026-11-21"
);
