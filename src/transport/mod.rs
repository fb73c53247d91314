//! Transports: how datagrams (and, where possible, fds) move between peers.
//!
//! The elements speak [`crate::protocol`] messages over a [`Channel`]. Today the
//! only channel is a UNIX `SOCK_SEQPACKET` socket ([`unix`]), which keeps message
//! boundaries, sends each message atomically (a non-blocking send never writes
//! half a message) and passes fds with SCM_RIGHTS. A cross-host transport
//! (UCX) will be a second `Channel` that cannot pass fds; `can_pass_fds` tells
//! the sink whether it must ship bytes instead of registering memory.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

pub mod frame_ring;
pub mod ring;
pub mod unix;

/// One datagram received, with the fds that came with it.
#[derive(Debug)]
pub enum Received {
    Message {
        len: usize,
        fds: Vec<OwnedFd>,
    },
    /// The peer closed its end.
    Closed,
}

/// A connected, message-oriented link to one peer.
pub trait Channel: Send + Sync {
    /// Whether fds can travel on this channel.
    fn can_pass_fds(&self) -> bool;
    /// Sends one datagram with `fds` attached. Never blocks: a full channel
    /// answers `io::ErrorKind::WouldBlock` and nothing is sent.
    fn send(&self, datagram: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()>;
    /// Receives one datagram into `buf`. Non-blocking: nothing pending answers
    /// `io::ErrorKind::WouldBlock`. A datagram larger than `buf`, or with more
    /// fds than the protocol allows, is an error (and its fds are closed).
    fn recv(&self, buf: &mut [u8]) -> io::Result<Received>;
}
