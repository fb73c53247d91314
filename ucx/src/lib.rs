//! A small safe wrapper over the UCP API of the system UCX library (1.13 on Debian 12), with
//! only what bufshare's cross-host elements need: a [`Context`], a single-threaded [`Worker`]
//! driven by its event fd, a [`Listener`] bound to an exact address, [`Endpoint`]s, active
//! messages (eager and rendezvous) and registered memory ([`MemoryRegion`]).
//!
//! # Threading
//! Every object here is `!Send`: a context, its worker, listeners, endpoints, regions and
//! requests live on the one thread that created them (the worker runs in
//! `UCS_THREAD_MODE_SINGLE`). An element creates its whole UCX stack inside its I/O thread.
//!
//! # Event loop
//! No async runtime: the caller polls [`Worker::efd`] and runs this loop (what [`Worker::wait`]
//! does):
//! ```text
//! loop { while worker.progress() > 0 {}  /* handle what the callbacks queued */
//!        if worker.arm()? == Arm::Busy { continue }   /* events pending: progress again */
//!        poll(efd, timeout) }
//! ```
//! Callbacks (active-message handlers, connection requests, endpoint errors) run inside
//! [`Worker::progress`]. They must not call `progress` (it does nothing there) nor start a
//! rendezvous receive ([`Worker::am_recv`] refuses): queue the work and do it after `progress`
//! returns. A panic in a callback is caught at the C boundary and resumed when `progress`
//! returns.
//!
//! # Unsafe invariants kept here
//! * Every UCX parameter struct is zeroed, then its `field_mask`/`op_attr_mask` names exactly
//!   the fields set (uninitialised parameter structs are what broke the `async-ucx` crate).
//! * Handles are destroyed after everything that uses them: a worker holds its context; every
//!   listener, endpoint, request and region holds what it was made from (reference counting).
//! * Memory that UCX reads or writes asynchronously (AM header and payload, receive buffers)
//!   is owned by the [`Request`] until UCX reports completion. A request dropped before that is
//!   parked in its worker and freed when it completes, or after the worker is destroyed.
//! * Callback state (closures) lives in boxes whose address is given to UCX as `arg`; a box is
//!   freed only once UCX can no longer call it (listener destroyed, endpoint closed, worker
//!   destroyed).

mod context;
mod endpoint;
mod error;
pub mod log;
mod memory;
mod sockaddr;
mod worker;

pub use context::{Context, ContextBuilder};
pub use endpoint::{ConnRequest, Endpoint, Listener};
pub use error::{Error, Result, Status};
pub use memory::{live_registrations, MemoryRegion, RegionSlice};
pub use sockaddr::socket_address;
pub use worker::{AmMessage, Arm, Payload, Proto, Request, RndvData, Worker};

/// The version of the UCX library loaded at run time, as (major, minor, release).
pub fn library_version() -> (u32, u32, u32) {
    let (mut major, mut minor, mut release) = (0, 0, 0);
    // SAFETY: three valid out-pointers.
    unsafe { ucx_sys::ucp_get_version(&mut major, &mut minor, &mut release) };
    (major, minor, release)
}
