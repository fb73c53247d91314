//! UNIX `SOCK_SEQPACKET` sockets: the listener the sink serves on, the
//! connection the src opens, and a small eventfd to wake a poll loop.
//!
//! Binding follows one rule: a socket file left by a dead producer is replaced,
//! a live producer's socket is never taken over. We find out which by trying
//! to connect to it.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use super::{Channel, Received};
use crate::protocol::MAX_FDS_PER_MESSAGE;

/// Kernel send buffer we ask for: room for many small frame messages so that a
/// consumer that is briefly slow to read does not make sends fail.
const SEND_BUFFER: usize = 1 << 20;

/// Why the sink could not serve on its socket path. Each names the path.
#[derive(Debug)]
pub enum BindError {
    /// A live producer answers on this path.
    InUse(PathBuf),
    /// The path exists and is not a socket; we never delete it.
    NotASocket(PathBuf),
    /// The directory is missing or not writable, or the path is too long.
    Io(PathBuf, io::Error),
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindError::InUse(p) => write!(
                f,
                "socket {} is in use by a live producer; refusing to take it over",
                p.display()
            ),
            BindError::NotASocket(p) => write!(
                f,
                "{} exists and is not a socket; refusing to replace it",
                p.display()
            ),
            BindError::Io(p, e) => write!(f, "cannot serve on socket {}: {e}", p.display()),
        }
    }
}

impl std::error::Error for BindError {}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?)
}

fn unix_addr(path: &Path) -> io::Result<SocketAddrUnix> {
    SocketAddrUnix::new(path).map_err(|e| {
        if e == rustix::io::Errno::NAMETOOLONG || e == rustix::io::Errno::INVAL {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "path too long for a UNIX socket (108 bytes at most)",
            )
        } else {
            e.into()
        }
    })
}

/// The sink's listening socket. Removes its socket file when dropped, if the
/// path still names the file it created: after someone removed it and another
/// producer bound the same path, that producer's socket is left alone.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
    policy: PeerPolicy,
    /// (device, inode) of the socket file this listener created.
    file_id: Option<(u64, u64)>,
}

/// (device, inode) of the file `path` names, without following a symlink.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Who may talk to the sink, checked with SO_PEERCRED when a peer connects.
/// `None` lets anyone who can open the socket file through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl PeerPolicy {
    /// Ok when the connected peer passes every check that is set; otherwise
    /// why not, for the REFUSE message and the producer's warning.
    pub fn check(&self, channel: &UnixChannel) -> Result<(), String> {
        if self.uid.is_none() && self.gid.is_none() {
            return Ok(());
        }
        let cred = rustix::net::sockopt::socket_peercred(&channel.fd)
            .map_err(|e| format!("cannot read the peer's credentials (SO_PEERCRED): {e}"))?;
        let (uid, gid) = (cred.uid.as_raw(), cred.gid.as_raw());
        if let Some(allowed) = self.uid.filter(|a| *a != uid) {
            return Err(format!("uid {uid} is not allowed (allowed-uid={allowed})"));
        }
        if let Some(allowed) = self.gid.filter(|a| *a != gid) {
            return Err(format!("gid {gid} is not allowed (allowed-gid={allowed})"));
        }
        Ok(())
    }
}

impl Listener {
    /// Binds `path`, replacing a stale socket file but never a live one.
    pub fn bind(path: &Path) -> Result<Listener, BindError> {
        Self::bind_with_mode(path, None)
    }

    /// Like [`Listener::bind`], and sets the socket file's permission bits to
    /// `mode` before anyone can connect (between bind and listen, when a
    /// connect is refused anyway), so there is no window with wider access.
    pub fn bind_with_mode(path: &Path, mode: Option<u32>) -> Result<Listener, BindError> {
        let io_err = |e: io::Error| BindError::Io(path.to_owned(), e);
        let addr = unix_addr(path).map_err(io_err)?;
        match std::fs::symlink_metadata(path) {
            Ok(meta) => {
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    return Err(BindError::NotASocket(path.to_owned()));
                }
                // Somebody answers: a live producer. Nobody: a stale file.
                let probe = seqpacket_socket().map_err(io_err)?;
                rustix::io::ioctl_fionbio(&probe, false).map_err(|e| io_err(e.into()))?;
                match rustix::net::connect(&probe, &addr) {
                    Ok(()) => return Err(BindError::InUse(path.to_owned())),
                    Err(rustix::io::Errno::CONNREFUSED) | Err(rustix::io::Errno::NOENT) => {
                        std::fs::remove_file(path).map_err(io_err)?;
                    }
                    // A full backlog still means someone is listening.
                    Err(rustix::io::Errno::AGAIN) => return Err(BindError::InUse(path.to_owned())),
                    Err(e) => return Err(io_err(e.into())),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let fd = seqpacket_socket().map_err(io_err)?;
        rustix::net::bind(&fd, &addr).map_err(|e| io_err(e.into()))?;
        if let Some(mode) = mode {
            if let Err(e) = rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(mode & 0o777)) {
                let _ = std::fs::remove_file(path);
                return Err(io_err(e.into()));
            }
        }
        if let Err(e) = rustix::net::listen(&fd, 64) {
            let _ = std::fs::remove_file(path);
            return Err(io_err(e.into()));
        }
        Ok(Listener {
            fd,
            path: path.to_owned(),
            policy: PeerPolicy::default(),
            file_id: file_id(path),
        })
    }

    /// Accepts one pending connection, if any.
    pub fn accept(&self) -> io::Result<Option<UnixChannel>> {
        match rustix::net::accept_with(&self.fd, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK) {
            Ok(fd) => {
                let _ = rustix::net::sockopt::set_socket_send_buffer_size(&fd, SEND_BUFFER);
                Ok(Some(UnixChannel { fd }))
            }
            Err(rustix::io::Errno::AGAIN) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Who may connect; checked by the server on each accepted peer.
    pub fn set_peer_policy(&mut self, policy: PeerPolicy) {
        self.policy = policy;
    }

    pub fn peer_policy(&self) -> PeerPolicy {
        self.policy
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Only our own file: a socket another producer bound on this path
        // since ours was removed has another inode.
        if self.file_id.is_some() && file_id(&self.path) == self.file_id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A connected SEQPACKET socket.
#[derive(Debug)]
pub struct UnixChannel {
    fd: OwnedFd,
}

impl UnixChannel {
    /// Connects to `path` once, without waiting. `NotFound` and
    /// `ConnectionRefused` mean "no producer yet": callers retry.
    pub fn connect(path: &Path) -> io::Result<UnixChannel> {
        let addr = unix_addr(path)?;
        let fd = seqpacket_socket()?;
        // Connecting a UNIX socket completes at once, or fails at once.
        rustix::io::ioctl_fionbio(&fd, false)?;
        rustix::net::connect(&fd, &addr)?;
        rustix::io::ioctl_fionbio(&fd, true)?;
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&fd, SEND_BUFFER);
        Ok(UnixChannel { fd })
    }

    /// Process id of the peer, for logs.
    pub fn peer_pid(&self) -> Option<i32> {
        rustix::net::sockopt::socket_peercred(&self.fd)
            .ok()
            .map(|c| c.pid.as_raw_nonzero().get())
    }

    /// User id of the peer (SO_PEERCRED), for monitors.
    pub fn peer_uid(&self) -> Option<u32> {
        rustix::net::sockopt::socket_peercred(&self.fd)
            .ok()
            .map(|c| c.uid.as_raw())
    }

    /// Connects to `path` without ever blocking: a producer whose backlog is
    /// full answers `WouldBlock` instead of keeping the caller waiting.
    pub fn try_connect(path: &Path) -> io::Result<UnixChannel> {
        let addr = unix_addr(path)?;
        let fd = seqpacket_socket()?;
        rustix::net::connect(&fd, &addr)?;
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&fd, SEND_BUFFER);
        Ok(UnixChannel { fd })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Stops both directions, so the peer sees the connection end.
    pub fn shutdown(&self) {
        let _ = rustix::net::shutdown(&self.fd, rustix::net::Shutdown::Both);
    }

    /// Closes the connection so that the peer can still read every datagram
    /// already sent, then sees the end. Closing a socket with unread
    /// datagrams in its own receive queue would make the peer's next read
    /// fail with ECONNRESET before it got what was queued for it; so: shut
    /// down (the peer can send nothing more), then read and discard what the
    /// peer sent (fds included), then close.
    pub fn close(self) {
        self.shutdown();
        let mut buf = [0u8; 64];
        for _ in 0..100_000 {
            match self.recv(&mut buf) {
                Ok(Received::Message { .. }) => {}
                // Oversized or fd-laden datagrams are consumed too.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {}
                _ => break,
            }
        }
    }
}

impl AsFd for UnixChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Channel for UnixChannel {
    fn can_pass_fds(&self) -> bool {
        true
    }

    fn send(&self, datagram: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let iov = [io::IoSlice::new(datagram)];
        let mut space =
            [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many fds for one message",
            ));
        }
        let sent = rustix::net::sendmsg(
            &self.fd,
            &iov,
            &mut control,
            SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
        )?;
        debug_assert_eq!(sent, datagram.len());
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        // Room for more fds than allowed, so that an excess is seen (and closed) rather than cut.
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [io::IoSliceMut::new(buf)];
        let msg = rustix::net::recvmsg(
            &self.fd,
            &mut iov,
            &mut control,
            RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for cmsg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = cmsg {
                fds.extend(received);
            }
        }
        if msg.flags.contains(ReturnFlags::CTRUNC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "peer sent more fds than a message may carry",
            ));
        }
        if msg.flags.contains(ReturnFlags::TRUNC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("peer sent a message larger than {} bytes", buf.len()),
            ));
        }
        if msg.bytes == 0 && fds.is_empty() {
            return Ok(Received::Closed);
        }
        Ok(Received::Message {
            len: msg.bytes,
            fds,
        })
    }
}

/// An eventfd that wakes a thread blocked in `poll`.
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    pub fn new() -> io::Result<Waker> {
        let fd = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        Ok(Waker { fd })
    }

    pub fn wake(&self) {
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Clears pending wake-ups.
    pub fn drain(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut buf);
    }
}

impl AsFd for Waker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Waits until one of `fds` is readable (or, where `want_write` is set,
/// writable), or `timeout` passes. Returns the revents of each fd.
pub fn wait(
    fds: &[(BorrowedFd<'_>, bool)],
    timeout: Option<std::time::Duration>,
) -> io::Result<Vec<rustix::event::PollFlags>> {
    use rustix::event::PollFlags;
    let fds: Vec<(BorrowedFd<'_>, PollFlags)> = fds
        .iter()
        .map(|(fd, want_write)| {
            let mut flags = PollFlags::IN;
            if *want_write {
                flags |= PollFlags::OUT;
            }
            (*fd, flags)
        })
        .collect();
    wait_for(&fds, timeout)
}

/// Waits until `a` or `b` is readable, or `timeout` passes, and returns their
/// revents: [`wait`] without its allocations, for a consumer's every frame.
pub fn wait_pair(
    a: BorrowedFd<'_>,
    b: BorrowedFd<'_>,
    timeout: Option<std::time::Duration>,
) -> io::Result<[rustix::event::PollFlags; 2]> {
    use rustix::event::{PollFd, PollFlags};
    let mut pfds = [
        PollFd::from_borrowed_fd(a, PollFlags::IN),
        PollFd::from_borrowed_fd(b, PollFlags::IN),
    ];
    poll_fds(&mut pfds, timeout)?;
    Ok([pfds[0].revents(), pfds[1].revents()])
}

/// Waits until one of `fds` has one of the events asked for it (an fd asked
/// for none is only reported on errors), or `timeout` passes. Returns the
/// revents of each fd.
pub fn wait_for(
    fds: &[(BorrowedFd<'_>, rustix::event::PollFlags)],
    timeout: Option<std::time::Duration>,
) -> io::Result<Vec<rustix::event::PollFlags>> {
    use rustix::event::PollFd;
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|(fd, flags)| PollFd::from_borrowed_fd(*fd, *flags))
        .collect();
    poll_fds(&mut pfds, timeout)?;
    Ok(pfds.iter().map(|p| p.revents()).collect())
}

/// poll(2) on `pfds` until an event or `timeout`, retrying when interrupted.
fn poll_fds(
    pfds: &mut [rustix::event::PollFd<'_>],
    timeout: Option<std::time::Duration>,
) -> io::Result<()> {
    let ts = timeout.map(|t| rustix::time::Timespec {
        tv_sec: t.as_secs() as i64,
        tv_nsec: t.subsec_nanos() as _,
    });
    loop {
        match rustix::event::poll(pfds, ts.as_ref()) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path in a fresh directory; the directory goes when the guard drops.
    struct TmpDir(PathBuf);

    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmp_path(name: &str) -> (TmpDir, PathBuf) {
        let dir = std::env::temp_dir().join(format!("bufshare-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        (TmpDir(dir), path)
    }

    #[test]
    fn stale_socket_is_replaced_live_one_is_not() {
        let (_dir, path) = tmp_path("stale.sock");
        let first = Listener::bind(&path).unwrap();
        assert!(matches!(Listener::bind(&path), Err(BindError::InUse(_))));
        drop(first);
        // A socket file nobody listens on, as a killed producer leaves it.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let _ = Listener::bind(&path).unwrap();
    }

    #[test]
    fn a_stopping_listener_leaves_another_producers_socket_alone() {
        let (_dir, path) = tmp_path("reused.sock");
        let a = Listener::bind(&path).unwrap();
        // Someone removes A's socket file; B binds the same path.
        std::fs::remove_file(&path).unwrap();
        let b = Listener::bind(&path).unwrap();
        drop(a);
        assert!(path.exists(), "A removed B's socket file");
        UnixChannel::connect(&path).expect("B no longer reachable");
        drop(b);
        assert!(!path.exists(), "B did not remove its own socket file");
    }

    /// What a consumer finds after the producer closes: every datagram sent
    /// before, then the end, also when the producer had unread datagrams
    /// from it (a plain close would reset the connection then).
    #[test]
    fn datagrams_sent_before_close_stay_readable() {
        let (_dir, path) = tmp_path("close.sock");
        let listener = Listener::bind(&path).unwrap();
        for unread_from_peer in [false, true] {
            let client = UnixChannel::connect(&path).unwrap();
            let server = listener.accept().unwrap().unwrap();
            if unread_from_peer {
                client.send(b"release", &[]).unwrap();
            }
            for m in [&b"one"[..], b"two", b"eos"] {
                server.send(m, &[]).unwrap();
            }
            server.close();
            let mut buf = [0u8; 64];
            for m in [&b"one"[..], b"two", b"eos"] {
                match client.recv(&mut buf) {
                    Ok(Received::Message { len, .. }) => assert_eq!(&buf[..len], m),
                    other => panic!("unread_from_peer={unread_from_peer}: {other:?}"),
                }
            }
            assert!(matches!(client.recv(&mut buf), Ok(Received::Closed)));
        }
    }

    /// The reason for [`UnixChannel::close`]: dropping a socket that has
    /// unread datagrams resets the connection, and the peer loses what was
    /// queued for it. If this ever stops failing, `close` is still harmless.
    #[test]
    fn a_plain_drop_with_unread_datagrams_resets_the_peer() {
        let (_dir, path) = tmp_path("reset.sock");
        let listener = Listener::bind(&path).unwrap();
        let client = UnixChannel::connect(&path).unwrap();
        let server = listener.accept().unwrap().unwrap();
        client.send(b"release", &[]).unwrap();
        server.send(b"eos", &[]).unwrap();
        drop(server);
        let mut buf = [0u8; 64];
        let first = client.recv(&mut buf);
        println!("after a plain drop the peer reads: {first:?}");
        assert!(first.is_err_and(|e| e.kind() == io::ErrorKind::ConnectionReset));
    }

    #[test]
    fn regular_file_is_never_replaced() {
        let (_dir, path) = tmp_path("regular");
        std::fs::write(&path, b"keep me").unwrap();
        assert!(matches!(
            Listener::bind(&path),
            Err(BindError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn datagrams_and_fds_round_trip() {
        let (_dir, path) = tmp_path("rt.sock");
        let listener = Listener::bind(&path).unwrap();
        let client = UnixChannel::connect(&path).unwrap();
        let server = listener.accept().unwrap().unwrap();
        let (r, _w) = rustix::pipe::pipe().unwrap();
        client.send(b"hello", &[r.as_fd()]).unwrap();
        let mut buf = [0u8; 64];
        match server.recv(&mut buf).unwrap() {
            Received::Message { len, fds } => {
                assert_eq!(&buf[..len], b"hello");
                assert_eq!(fds.len(), 1);
            }
            Received::Closed => panic!("closed"),
        }
        drop(client);
        assert!(matches!(server.recv(&mut buf).unwrap(), Received::Closed));
    }
}
