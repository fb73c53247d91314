//! What `ucxsink` and `ucxsrc` share on their I/O threads: the UCX context, sleeping on the
//! worker's event fd together with the element's wake-up eventfd, and registered memory.
//!
//! **Registered memory.** Frames move between a GStreamer memfd (or dma-buf) memory and UCX
//! without a copy: the I/O thread maps the memory's fd *itself* (shared, whole file) and
//! registers that mapping once per memory (`MemoryRegion::register`), keyed by the memory's
//! [`memtag`] id. GStreamer's own mapping of the memory is not used, so the registration does
//! not depend on how (or whether) GStreamer keeps it mapped. When the memory dies, memtag tells
//! [`FreedQueue`] (from whatever thread frees it), which queues the id and wakes the I/O thread;
//! that drops the registration and unmaps. A memory is only freed once no send or receive uses
//! it any more: the I/O threads keep the `gst::Buffer` of every operation until UCX completes
//! it, and at shutdown the UCX worker is destroyed before [`Regions`] unmaps anything.
//!
//! memfds are sealed against resizing before they are registered (as bufsharesink does
//! before sharing one): a memory tagged by memtag counts as checked for every bufshare
//! element of the process, so `ucxsrc ! bufsharesink` can re-share it by fd as it is.

use std::collections::hash_map::Entry;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gst::glib;
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::memtag::{self, ForgetListener};
use crate::transport::unix::{wait_pair, Waker};

/// Starts the element's I/O thread `name`: `setup` builds its state on the thread itself (UCX
/// objects stay on the thread that made them), then `run` runs it. Returns once setup is
/// done, with setup's error if it failed.
pub fn spawn_io_thread<T>(
    name: &str,
    setup: impl FnOnce() -> Result<T, String> + Send + 'static,
    run: impl FnOnce(T) + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || match setup() {
            Ok(state) => {
                let _ = tx.send(Ok(()));
                run(state);
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        })
        .map_err(|e| format!("cannot start the I/O thread: {e}"))?;
    let started = match rx.recv() {
        Ok(result) => result,
        Err(_) => Err("the I/O thread ended at start".into()),
    };
    match started {
        Ok(()) => Ok(thread),
        Err(e) => {
            let _ = thread.join();
            Err(e)
        }
    }
}

/// A UCX context for an element: `transports` (UCX_TLS syntax, empty = UCX chooses) on top
/// of the process's `UCX_*` environment.
pub fn context(name: &str, transports: &str) -> ucx::Result<ucx::Context> {
    // UCX's log into GStreamer's from the first context on.
    crate::ucxwatch::install();
    let mut b = ucx::Context::builder().name(name);
    if !transports.trim().is_empty() {
        b = b.config("TLS", transports.trim());
    }
    b.build()
}

/// Progresses `worker`, then sleeps until it has events, `waker` is woken, or `timeout`.
pub fn sleep(worker: &ucx::Worker, waker: &Waker, timeout: Duration) {
    while worker.progress() > 0 {}
    match worker.arm() {
        Ok(ucx::Arm::Busy) => return,
        Ok(ucx::Arm::Armed) => {}
        Err(_) => {
            std::thread::sleep(timeout.min(Duration::from_millis(10)));
            return;
        }
    }
    if let Ok([_, w]) = wait_pair(worker.efd(), waker.as_fd(), Some(timeout)) {
        if w.contains(rustix::event::PollFlags::IN) {
            waker.drain();
        }
    }
}

/// Memory ids whose memory died, for the I/O thread to forget.
pub struct FreedQueue {
    freed: Mutex<Vec<u64>>,
    /// Ids this element subscribed to.
    known: Mutex<HashSet<u64>>,
    waker: Arc<Waker>,
}

impl FreedQueue {
    pub fn new(waker: Arc<Waker>) -> Arc<FreedQueue> {
        Arc::new(FreedQueue {
            freed: Mutex::new(Vec::new()),
            known: Mutex::new(HashSet::default()),
            waker,
        })
    }

    pub fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.freed.lock().unwrap())
    }
}

impl ForgetListener for FreedQueue {
    fn memory_freed(&self, mem_id: u64) {
        if self.known.lock().unwrap().remove(&mem_id) {
            self.freed.lock().unwrap().push(mem_id);
            self.waker.wake();
        }
    }
}

/// Our own shared mapping of a memory's fd, registered with UCX.
struct Mapped {
    region: Option<ucx::MemoryRegion>,
    ptr: *mut libc::c_void,
    len: usize,
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // Unregister first (ucp_mem_unmap), then unmap.
        self.region.take();
        // SAFETY: our own mapping of len bytes, unmapped once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Registrations of memories, one per memory, for as long as the memory lives.
pub struct Regions {
    map: HashMap<u64, Mapped>,
    queue: Arc<FreedQueue>,
    listener: Arc<dyn ForgetListener>,
}

/// Where a memory's bytes are in its registration.
pub struct Slice {
    pub region: ucx::MemoryRegion,
    pub offset: usize,
    pub len: usize,
}

impl Slice {
    pub fn get(&self) -> ucx::RegionSlice {
        self.region.slice(self.offset..self.offset + self.len)
    }
}

impl Regions {
    pub fn new(queue: Arc<FreedQueue>) -> Regions {
        let listener: Arc<dyn ForgetListener> = queue.clone();
        Regions {
            map: HashMap::default(),
            queue,
            listener,
        }
    }

    /// Forgets the registrations of memories that died.
    pub fn reap(&mut self) {
        for id in self.queue.take() {
            self.map.remove(&id);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The registered bytes of `mem`, registering its fd on first sight. None: not fd memory,
    /// a memfd that cannot be sealed, or mapping/registering failed (`why` says; the caller
    /// copies instead).
    pub fn slice(
        &mut self,
        ctx: &ucx::Context,
        mem: &gst::MemoryRef,
        why: &mut String,
    ) -> Option<Slice> {
        let fd_mem = mem.downcast_memory_ref::<gst_allocators::FdMemory>()?;
        // SAFETY: the fd belongs to `mem`, alive during this call.
        let fd = unsafe { BorrowedFd::borrow_raw(fd_mem.fd()) };
        let dmabuf = mem.is_memory_type::<gst_allocators::DmaBufMemory>();
        let tagged = memtag::is_tagged(mem);
        if !dmabuf && !tagged {
            if let Err(e) = bufshare_backends::share::seal_against_resize(fd) {
                *why = format!("memfd cannot be sealed against resizing ({e})");
                return None;
            }
        }
        let known = &self.queue.known;
        let mem_id = memtag::tag_memory(mem, &self.listener, |id| known.lock().unwrap().insert(id));
        let m = match self.map.entry(mem_id) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => match map_and_register(ctx, fd) {
                Ok(m) => v.insert(m),
                Err(e) => {
                    *why = e;
                    return None;
                }
            },
        };
        let offset = mem.offset();
        let len = mem.size();
        if offset.checked_add(len).is_none_or(|end| end > m.len) {
            *why = format!(
                "memory range {offset}+{len} is outside its {}-byte file",
                m.len
            );
            return None;
        }
        Some(Slice {
            region: m.region.clone().expect("registered"),
            offset,
            len,
        })
    }
}

fn map_and_register(ctx: &ucx::Context, fd: BorrowedFd<'_>) -> Result<Mapped, String> {
    let len = bufshare_backends::fd_size(fd).map_err(|e| format!("fstat: {e}"))? as usize;
    if len == 0 {
        return Err("empty file".into());
    }
    let map = |prot| {
        // SAFETY: a shared mapping of a valid fd, whole file; we own the mapping.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        }
    };
    let mut ptr = map(libc::PROT_READ | libc::PROT_WRITE);
    if ptr == libc::MAP_FAILED {
        // A read-only fd (an import from another process): enough to send from.
        ptr = map(libc::PROT_READ);
    }
    if ptr == libc::MAP_FAILED {
        return Err(format!(
            "mmap of {len} bytes: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut mapped = Mapped {
        region: None,
        ptr,
        len,
    };
    // SAFETY: ptr..ptr+len is our mapping, unmapped only after the region is dropped (Mapped's
    // Drop), and the I/O threads drop it only once no operation uses it (module doc).
    let region = unsafe { ucx::MemoryRegion::register(ctx, ptr.cast(), len) }
        .map_err(|e| format!("registering {len} bytes with UCX: {e}"))?;
    mapped.region = Some(region);
    Ok(mapped)
}

/// Which side of the connection an element takes (`mode` property of both elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstBufShareUcxMode")]
pub enum Mode {
    #[enum_value(
        name = "Server: listen on exactly `address` and accept peers",
        nick = "server"
    )]
    Server,
    #[enum_value(
        name = "Client: connect to a peer listening on `address`",
        nick = "client"
    )]
    Client,
}
