//! bufshare: zero-copy fan-out of GStreamer buffers between processes.
//!
//! `bufsharesink` serves frames on a UNIX socket; any number of `bufsharesrc`
//! consumers connect, receive each producer memory's fd once, and then only
//! small per-frame messages. See `docs/protocol.md` for the wire format and
//! README.md for usage.

pub mod protocol;
