use std::any::Any;
use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::os::fd::{BorrowedFd, RawFd};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use ucx_sys as sys;

use crate::context::Context;
use crate::error::{Error, Result, Status};
use crate::memory::RegionSlice;

/// A UCP worker in single-thread mode: the progress engine, its event fd, and the
/// active-message handlers. Cheap to clone; destroyed when the last clone, listener, endpoint
/// and request made from it are gone.
#[derive(Clone)]
pub struct Worker {
    pub(crate) inner: Rc<WorkerInner>,
}

/// What [`Worker::arm`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    /// Armed: nothing pending, the event fd will become readable on the next event. Sleep.
    Armed,
    /// Events are already pending (UCS_ERR_BUSY): call `progress` again before sleeping.
    Busy,
}

pub(crate) struct WorkerInner {
    pub(crate) h: sys::ucp_worker_h,
    efd: RawFd,
    /// True while ucp_worker_progress runs (callbacks are being called).
    in_progress: Cell<bool>,
    /// Work that must not run inside a callback (close, release, reject): run after progress.
    deferred: RefCell<Vec<Box<dyn FnOnce()>>>,
    /// Requests dropped before completion, with the memory and state they still use.
    orphans: RefCell<Vec<Orphan>>,
    /// AM handler closures; UCX holds raw pointers to them until the worker is destroyed,
    /// so each is boxed (its address must not move when the Vec grows).
    #[allow(clippy::vec_box)]
    handlers: RefCell<Vec<Box<AmSlot>>>,
    /// A panic caught in a callback, resumed when progress returns.
    panic: Cell<Option<Box<dyn Any + Send>>>,
    _ctx: Context,
}

pub(crate) struct Orphan {
    pub(crate) req: *mut c_void,
    pub(crate) keep: Option<Box<dyn Any>>,
}

impl WorkerInner {
    pub(crate) fn in_callback(&self) -> bool {
        self.in_progress.get()
    }

    /// Runs `f` now, or after the current progress call if inside a callback.
    pub(crate) fn defer_or_run(&self, f: Box<dyn FnOnce()>) {
        if self.in_progress.get() {
            self.deferred.borrow_mut().push(f);
        } else {
            f();
        }
    }

    pub(crate) fn adopt(&self, orphan: Orphan) {
        self.orphans.borrow_mut().push(orphan);
    }

    /// Stores the payload of a panic caught at the C boundary (the first one wins).
    pub(crate) fn store_panic(&self, p: Box<dyn Any + Send>) {
        let old = self.panic.take();
        self.panic.set(Some(old.unwrap_or(p)));
    }

    fn raw_progress(&self) -> u32 {
        if self.in_progress.replace(true) {
            return 0; // called from a callback: UCX forbids recursion
        }
        // SAFETY: valid worker, used from its own thread only (!Send types).
        let n = unsafe { sys::ucp_worker_progress(self.h) };
        self.in_progress.set(false);
        loop {
            let work: Vec<_> = std::mem::take(&mut *self.deferred.borrow_mut());
            if work.is_empty() {
                break;
            }
            for f in work {
                f();
            }
        }
        self.reap();
        n
    }

    fn reap(&self) {
        let mut orphans = self.orphans.borrow_mut();
        if orphans.is_empty() {
            return;
        }
        let mut done = Vec::new();
        orphans.retain_mut(|o| {
            if o.req.is_null() {
                done.push(o.keep.take());
                return false;
            }
            // SAFETY: a live request of this worker (not yet freed).
            let st = unsafe { sys::ucp_request_check_status(o.req) };
            if st == sys::UCS_INPROGRESS as sys::ucs_status_t {
                true
            } else {
                // SAFETY: completed request, freed once.
                unsafe { sys::ucp_request_free(o.req) };
                done.push(o.keep.take());
                false
            }
        });
        drop(orphans);
        drop(done); // after the borrow: dropping state may queue more orphans
    }
}

impl Drop for WorkerInner {
    fn drop(&mut self) {
        // Give parked requests (endpoint closes, sends dropped early) a short chance to finish.
        let deadline = Instant::now() + Duration::from_millis(200);
        while !self.orphans.borrow().is_empty() && Instant::now() < deadline {
            self.raw_progress();
        }
        let pending = std::mem::take(&mut *self.orphans.borrow_mut());
        // SAFETY: every listener and endpoint wrapper is gone (they hold an Rc to us); UCX
        // destroys the endpoints still closing and frees their requests with the worker.
        unsafe { sys::ucp_worker_destroy(self.h) };
        // Only now that UCX can no longer touch them: buffers and callback state.
        drop(pending);
        self.handlers.borrow_mut().clear();
    }
}

impl Worker {
    /// Creates a worker in `UCS_THREAD_MODE_SINGLE`.
    pub fn new(ctx: &Context) -> Result<Worker> {
        // SAFETY: zeroed params are valid; the mask names the one field we set.
        let mut params: sys::ucp_worker_params_t = unsafe { std::mem::zeroed() };
        params.field_mask = sys::UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64;
        params.thread_mode = sys::UCS_THREAD_MODE_SINGLE;
        let mut h: sys::ucp_worker_h = ptr::null_mut();
        // SAFETY: valid context, params, out-pointer.
        Status::check(
            unsafe { sys::ucp_worker_create(ctx.inner.h, &params, &mut h) },
            "ucp_worker_create",
        )?;
        let mut efd: libc::c_int = -1;
        // SAFETY: valid worker with UCP_FEATURE_WAKEUP; the fd belongs to the worker.
        let st = unsafe { sys::ucp_worker_get_efd(h, &mut efd) };
        if let Err(e) = Status::check(st, "ucp_worker_get_efd") {
            // SAFETY: created above, nothing uses it.
            unsafe { sys::ucp_worker_destroy(h) };
            return Err(e);
        }
        Ok(Worker {
            inner: Rc::new(WorkerInner {
                h,
                efd,
                in_progress: Cell::new(false),
                deferred: RefCell::new(Vec::new()),
                orphans: RefCell::new(Vec::new()),
                handlers: RefCell::new(Vec::new()),
                panic: Cell::new(None),
                _ctx: ctx.clone(),
            }),
        })
    }

    /// The raw handle, valid while `self` lives.
    pub fn as_raw(&self) -> sys::ucp_worker_h {
        self.inner.h
    }

    /// The worker's event fd (`ucp_worker_get_efd`): poll it for POLLIN after [`Worker::arm`]
    /// returned [`Arm::Armed`]. Owned by the worker; do not close it.
    pub fn efd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd lives as long as the worker, which outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(self.inner.efd) }
    }

    /// `ucp_worker_arm`: arms the event fd if no event is pending.
    pub fn arm(&self) -> Result<Arm> {
        // SAFETY: valid worker.
        let st = unsafe { sys::ucp_worker_arm(self.inner.h) };
        if st == sys::UCS_ERR_BUSY as sys::ucs_status_t {
            Ok(Arm::Busy)
        } else {
            Status::check(st, "ucp_worker_arm").map(|_| Arm::Armed)
        }
    }

    /// `ucp_worker_progress`: runs callbacks; returns how many events it handled (non-zero:
    /// call again). Then runs the work callbacks deferred and frees completed parked requests.
    /// Resumes a panic raised in a callback. Does nothing when called from a callback.
    pub fn progress(&self) -> u32 {
        let n = self.inner.raw_progress();
        if let Some(p) = self.inner.panic.take() {
            resume_unwind(p);
        }
        n
    }

    /// Progresses until `done()` holds or `timeout` passes, sleeping in poll(2) on the event fd
    /// in between (no busy loop). Returns whether `done()` held.
    pub fn wait_until(&self, timeout: Duration, mut done: impl FnMut() -> bool) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            while self.progress() > 0 {}
            if done() {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            if self.arm()? == Arm::Busy {
                continue;
            }
            let left = deadline - now;
            let ms = left.as_millis().min(i32::MAX as u128) as i32 + 1;
            let mut pfd = libc::pollfd {
                fd: self.inner.efd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(Error::Invalid(format!("poll on the worker's efd: {e}")));
                }
            }
        }
    }

    /// Sleeps until the worker has events or `timeout` passes, then progresses them.
    pub fn wait(&self, timeout: Duration) -> Result<()> {
        let mut first = true;
        self.wait_until(timeout, || !std::mem::replace(&mut first, false))
            .map(|_| ())
    }

    /// The largest active-message header this worker can send (`ucp_worker_query`).
    pub fn max_am_header(&self) -> Result<usize> {
        // SAFETY: zeroed attr, mask names the one field queried.
        let mut attr: sys::ucp_worker_attr_t = unsafe { std::mem::zeroed() };
        attr.field_mask = sys::UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER as u64;
        Status::check(
            // SAFETY: valid worker and attr.
            unsafe { sys::ucp_worker_query(self.inner.h, &mut attr) },
            "ucp_worker_query",
        )?;
        Ok(attr.max_am_header)
    }

    /// Registers `handler` for active messages with `id` (replacing an earlier one). It is
    /// called inside [`Worker::progress`] with the header and either the eager data or a
    /// rendezvous descriptor ([`AmMessage::take_rndv`]).
    pub fn set_am_handler<F>(&self, id: u16, handler: F) -> Result<()>
    where
        F: FnMut(&mut AmMessage<'_>) + 'static,
    {
        let slot = Box::new(AmSlot {
            worker: Rc::downgrade(&self.inner),
            f: RefCell::new(Box::new(handler)),
        });
        // SAFETY: zeroed params; the mask names every field set.
        let mut params: sys::ucp_am_handler_param_t = unsafe { std::mem::zeroed() };
        params.field_mask = (sys::UCP_AM_HANDLER_PARAM_FIELD_ID
            | sys::UCP_AM_HANDLER_PARAM_FIELD_CB
            | sys::UCP_AM_HANDLER_PARAM_FIELD_ARG) as u64;
        params.id = id as u32;
        params.cb = Some(am_trampoline);
        params.arg = &*slot as *const AmSlot as *mut c_void;
        // SAFETY: the slot's box is kept in `handlers` until after ucp_worker_destroy.
        Status::check(
            unsafe { sys::ucp_worker_set_am_recv_handler(self.inner.h, &params) },
            "ucp_worker_set_am_recv_handler",
        )?;
        self.inner.handlers.borrow_mut().push(slot);
        Ok(())
    }

    /// Receives a rendezvous message's data into `dest` (`ucp_am_recv_data_nbx`, with the
    /// region's memory handle). `dest` must be at least `data.len()` bytes; exactly that many
    /// are written. Not allowed inside a callback: queue the [`RndvData`] and call this after
    /// `progress` returns. Completion: [`Request`].
    pub fn am_recv(&self, mut data: RndvData, dest: RegionSlice) -> Result<Request> {
        if self.inner.in_callback() {
            return Err(Error::InCallback {
                op: "ucp_am_recv_data_nbx",
            });
        }
        if !Rc::ptr_eq(&data.worker, &self.inner) {
            return Err(Error::Invalid(
                "am_recv: the descriptor belongs to another worker".into(),
            ));
        }
        if dest.len() < data.len {
            return Err(Error::Invalid(format!(
                "am_recv: destination of {} bytes for a {}-byte message",
                dest.len(),
                data.len
            )));
        }
        // SAFETY: zeroed params, the mask names the memh field set.
        let mut param: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
        param.op_attr_mask = sys::UCP_OP_ATTR_FIELD_MEMH;
        param.memh = dest.region().memh();
        let desc = std::mem::replace(&mut data.desc, ptr::null_mut());
        // SAFETY: desc from this worker's AM callback that returned UCS_INPROGRESS, handed to
        // UCX exactly once (data.desc cleared); dest's memory is kept alive by the request.
        let ret = unsafe {
            sys::ucp_am_recv_data_nbx(self.inner.h, desc, dest.ptr().cast(), data.len, &param)
        };
        Request::from_ret(&self.inner, ret, Box::new(dest), "ucp_am_recv_data_nbx")
    }
}

type AmHandler = Box<dyn FnMut(&mut AmMessage<'_>)>;

struct AmSlot {
    worker: Weak<WorkerInner>,
    f: RefCell<AmHandler>,
}

/// An incoming active message, valid during the handler call.
pub struct AmMessage<'a> {
    header: &'a [u8],
    eager: Option<&'a [u8]>,
    len: usize,
    rndv: Option<RndvData>,
}

impl AmMessage<'_> {
    /// The sender's header bytes.
    pub fn header(&self) -> &[u8] {
        self.header
    }

    /// The payload, when it arrived eagerly (inline); `None` for rendezvous.
    pub fn data(&self) -> Option<&[u8]> {
        self.eager
    }

    /// The payload length (eager or rendezvous).
    pub fn data_len(&self) -> usize {
        self.len
    }

    pub fn is_rndv(&self) -> bool {
        self.eager.is_none()
    }

    /// Takes the rendezvous descriptor, to receive the data with [`Worker::am_recv`] after
    /// progress returns. If the handler does not take it, the message's data is dropped and
    /// the sender's request completes.
    pub fn take_rndv(&mut self) -> Option<RndvData> {
        self.rndv.take()
    }
}

/// A rendezvous message whose data has not been fetched yet. Dropping it releases the
/// descriptor (`ucp_am_data_release`); [`Worker::am_recv`] fetches the data.
pub struct RndvData {
    desc: *mut c_void,
    len: usize,
    worker: Rc<WorkerInner>,
}

impl RndvData {
    /// How many bytes the sender sends.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for RndvData {
    fn drop(&mut self) {
        if self.desc.is_null() {
            return;
        }
        let (h, desc) = (self.worker.h, self.desc);
        // SAFETY: a descriptor kept by returning UCS_INPROGRESS, released once; deferred when
        // dropped inside the callback that is about to return UCS_INPROGRESS.
        self.worker.defer_or_run(Box::new(move || unsafe {
            sys::ucp_am_data_release(h, desc)
        }));
    }
}

unsafe extern "C" fn am_trampoline(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    let ok = sys::UCS_OK as sys::ucs_status_t;
    // SAFETY: arg is the AmSlot box registered with this handler, alive until worker destroy.
    let slot = &*(arg as *const AmSlot);
    let Some(worker) = slot.worker.upgrade() else {
        return ok; // the worker is being destroyed
    };
    let rndv = (*param).recv_attr & sys::UCP_AM_RECV_ATTR_FLAG_RNDV as u64 != 0;
    let header = if header_length == 0 || header.is_null() {
        &[][..]
    } else {
        std::slice::from_raw_parts(header.cast::<u8>(), header_length)
    };
    let eager = if rndv {
        None
    } else if length == 0 || data.is_null() {
        Some(&[][..])
    } else {
        Some(std::slice::from_raw_parts(
            data.cast::<u8>().cast_const(),
            length,
        ))
    };
    let mut msg = AmMessage {
        header,
        eager,
        len: length,
        rndv: rndv.then(|| RndvData {
            desc: data,
            len: length,
            worker: worker.clone(),
        }),
    };
    let Ok(mut f) = slot.f.try_borrow_mut() else {
        if let Some(mut r) = msg.rndv.take() {
            r.desc = ptr::null_mut();
        }
        return ok;
    };
    let r = catch_unwind(AssertUnwindSafe(|| f(&mut msg)));
    drop(f);
    if let Err(p) = r {
        worker.store_panic(p);
    }
    match msg.rndv.take() {
        // Not taken: UCX drops the descriptor when we return UCS_OK.
        Some(mut r) => {
            r.desc = ptr::null_mut();
            ok
        }
        None if rndv => sys::UCS_INPROGRESS as sys::ucs_status_t,
        None => ok,
    }
}

/// The payload of an active message.
pub enum Payload {
    /// Header only.
    None,
    /// Bytes the request owns until it completes (unregistered: UCX registers per send or
    /// copies).
    Bytes(Vec<u8>),
    /// A range of registered memory, sent with its memory handle.
    Region(RegionSlice),
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Self {
        Payload::Bytes(v)
    }
}

impl From<RegionSlice> for Payload {
    fn from(s: RegionSlice) -> Self {
        Payload::Region(s)
    }
}

/// Which protocol `ucp_am_send_nbx` may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// UCX chooses by size (`UCX_RNDV_THRESH`).
    Auto,
    /// `UCP_AM_SEND_FLAG_EAGER`.
    Eager,
    /// `UCP_AM_SEND_FLAG_RNDV`: the receiver pulls the data; completion means it has.
    Rndv,
}

/// An operation in flight (send, receive, flush). Owns the memory the operation uses until
/// UCX completes it. Dropping a request before completion does not cancel it: it is parked
/// in the worker, and its memory freed once it completes.
pub struct Request {
    worker: Rc<WorkerInner>,
    req: *mut c_void,
    result: Option<Result<()>>,
    keep: Option<Box<dyn Any>>,
    op: &'static str,
}

impl Request {
    /// Wraps the return value of an `_nbx` call.
    pub(crate) fn from_ret(
        worker: &Rc<WorkerInner>,
        ret: sys::ucs_status_ptr_t,
        keep: Box<dyn Any>,
        op: &'static str,
    ) -> Result<Request> {
        let (req, result, keep) = if ret.is_null() {
            (ptr::null_mut(), Some(Ok(())), None)
        } else if sys::UCS_PTR_IS_ERR(ret) {
            return Err(Error::Ucs {
                op,
                status: Status(sys::UCS_PTR_STATUS(ret)),
            });
        } else {
            (ret, None, Some(keep))
        };
        Ok(Request {
            worker: worker.clone(),
            req,
            result,
            keep,
            op,
        })
    }

    /// Checks for completion (`ucp_request_check_status`) without progressing the worker;
    /// once complete, frees the UCX request and the memory it held, and keeps the result.
    pub fn poll(&mut self) -> Option<Result<()>> {
        if self.result.is_none() {
            // SAFETY: a live request of this worker.
            let st = unsafe { sys::ucp_request_check_status(self.req) };
            if st == sys::UCS_INPROGRESS as sys::ucs_status_t {
                return None;
            }
            // SAFETY: completed, freed once.
            unsafe { sys::ucp_request_free(self.req) };
            self.req = ptr::null_mut();
            self.keep = None;
            self.result = Some(Status::check(st, self.op));
        }
        self.result.clone()
    }

    pub fn is_complete(&mut self) -> bool {
        self.poll().is_some()
    }

    /// Progresses the worker (sleeping on its event fd) until this request completes.
    pub fn wait(mut self, timeout: Duration) -> Result<()> {
        let worker = Worker {
            inner: self.worker.clone(),
        };
        if worker.wait_until(timeout, || self.is_complete())? {
            self.poll().expect("complete")
        } else {
            Err(Error::Timeout { op: self.op })
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if !self.req.is_null() {
            self.worker.adopt(Orphan {
                req: self.req,
                keep: self.keep.take(),
            });
        }
    }
}

/// Runs a callback body at the C boundary: a panic is stored in the worker (when it still
/// exists) and resumed by `progress`.
pub(crate) fn guard(worker: &Weak<WorkerInner>, f: impl FnOnce()) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(f)) {
        if let Some(w) = worker.upgrade() {
            w.store_panic(p);
        }
    }
}
