use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::net::SocketAddr;
use std::ptr;
use std::rc::{Rc, Weak};
use std::time::Duration;

use ucx_sys as sys;

use crate::error::{Error, Result, Status};
use crate::sockaddr;
use crate::worker::{guard, Orphan, Payload, Proto, Request, Worker, WorkerInner};

type ErrorFn = Box<dyn FnMut(Error)>;

/// Callback state of an endpoint; UCX holds its address (`err_handler.arg`) until the endpoint
/// is destroyed, so it is freed only after the close request completes.
struct EpShared {
    worker: Weak<WorkerInner>,
    on_error: RefCell<ErrorFn>,
    failed: Cell<Option<Status>>,
    /// The wrapper is gone: errors are no longer reported to the user.
    closed: Cell<bool>,
}

/// A connection to a peer (client side from [`Endpoint::connect`], server side from
/// [`ConnRequest::accept`]), with peer error handling (`UCP_ERR_HANDLING_MODE_PEER`).
pub struct Endpoint {
    worker: Rc<WorkerInner>,
    h: sys::ucp_ep_h,
    shared: Option<Box<EpShared>>,
}

unsafe extern "C" fn ep_error_trampoline(
    arg: *mut c_void,
    _ep: sys::ucp_ep_h,
    status: sys::ucs_status_t,
) {
    // SAFETY: arg is the EpShared box of this endpoint, alive until the endpoint is destroyed.
    let shared = &*(arg as *const EpShared);
    shared.failed.set(Some(Status(status)));
    if shared.closed.get() {
        return;
    }
    guard(&shared.worker, || {
        if let Ok(mut f) = shared.on_error.try_borrow_mut() {
            f(Error::Ucs {
                op: "endpoint",
                status: Status(status),
            });
        }
    });
}

impl Endpoint {
    fn create(
        worker: &Rc<WorkerInner>,
        fill: impl FnOnce(&mut sys::ucp_ep_params_t),
        on_error: ErrorFn,
    ) -> Result<Endpoint> {
        let shared = Box::new(EpShared {
            worker: Rc::downgrade(worker),
            on_error: RefCell::new(on_error),
            failed: Cell::new(None),
            closed: Cell::new(false),
        });
        // SAFETY: zeroed params; every field set is named in field_mask (here and in fill).
        let mut params: sys::ucp_ep_params_t = unsafe { std::mem::zeroed() };
        params.field_mask = (sys::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
            | sys::UCP_EP_PARAM_FIELD_ERR_HANDLER) as u64;
        params.err_mode = sys::UCP_ERR_HANDLING_MODE_PEER;
        params.err_handler.cb = Some(ep_error_trampoline);
        params.err_handler.arg = &*shared as *const EpShared as *mut c_void;
        fill(&mut params);
        let mut h: sys::ucp_ep_h = ptr::null_mut();
        // SAFETY: valid worker, params (the sockaddr they point to lives in the caller's frame
        // during the call; UCX copies it), out-pointer.
        Status::check(
            unsafe { sys::ucp_ep_create(worker.h, &params, &mut h) },
            "ucp_ep_create",
        )?;
        Ok(Endpoint {
            worker: worker.clone(),
            h,
            shared: Some(shared),
        })
    }

    /// Starts connecting to a listener at `addr` (client-server mode). Returns at once; a
    /// failure (refused, unreachable, peer gone later) is reported to `on_error` from
    /// `progress`, and by [`Endpoint::error`]. [`Endpoint::connect_timeout`] waits.
    pub fn connect(
        worker: &Worker,
        addr: SocketAddr,
        on_error: impl FnMut(Error) + 'static,
    ) -> Result<Endpoint> {
        let (ss, len) = sockaddr::to_storage(&addr);
        Self::create(
            &worker.inner,
            |p| {
                p.field_mask |=
                    (sys::UCP_EP_PARAM_FIELD_FLAGS | sys::UCP_EP_PARAM_FIELD_SOCK_ADDR) as u64;
                p.flags = sys::UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
                p.sockaddr.addr = &ss as *const libc::sockaddr_storage as *const sys::sockaddr;
                p.sockaddr.addrlen = len;
            },
            Box::new(on_error),
        )
    }

    /// Connects and waits until the connection is usable (a flush completes), the peer
    /// refuses, or `timeout` passes: a clear error instead of a hang on an unreachable host.
    pub fn connect_timeout(
        worker: &Worker,
        addr: SocketAddr,
        timeout: Duration,
        on_error: impl FnMut(Error) + 'static,
    ) -> Result<Endpoint> {
        let ep = Self::connect(worker, addr, on_error)?;
        let mut flush = ep.flush()?;
        let done = worker.wait_until(timeout, || flush.is_complete() || ep.error().is_some())?;
        if let Some(e) = ep.error() {
            return Err(Error::Ucs {
                op: "connect",
                status: e,
            });
        }
        if !done {
            return Err(Error::Timeout { op: "connect" });
        }
        flush.poll().expect("complete").map_err(|e| match e {
            Error::Ucs { status, .. } => Error::Ucs {
                op: "connect",
                status,
            },
            e => e,
        })?;
        Ok(ep)
    }

    /// The status the error callback reported, if the endpoint failed.
    pub fn error(&self) -> Option<Status> {
        self.shared.as_ref().and_then(|s| s.failed.get())
    }

    /// The raw handle, valid while `self` lives.
    pub fn as_raw(&self) -> sys::ucp_ep_h {
        self.h
    }

    /// `ucp_ep_flush_nbx`: completes when everything sent before has completed remotely (and,
    /// on a new client endpoint, once the connection is established).
    pub fn flush(&self) -> Result<Request> {
        // SAFETY: zeroed params, no fields.
        let param: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid endpoint and params.
        let ret = unsafe { sys::ucp_ep_flush_nbx(self.h, &param) };
        Request::from_ret(&self.worker, ret, Box::new(()), "ucp_ep_flush_nbx")
    }

    /// Sends an active message (`ucp_am_send_nbx`) to the handler `id` of the peer's worker.
    /// The header is copied into the request and, like the payload, kept until completion.
    /// A [`Payload::Region`] is sent with its memory handle (`UCP_OP_ATTR_FIELD_MEMH`).
    pub fn am_send(
        &self,
        id: u16,
        header: &[u8],
        payload: Payload,
        proto: Proto,
    ) -> Result<Request> {
        let header: Box<[u8]> = header.into();
        // SAFETY: zeroed params; the mask names the fields set.
        let mut param: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
        param.op_attr_mask = sys::UCP_OP_ATTR_FIELD_FLAGS;
        param.flags = match proto {
            Proto::Auto => 0,
            Proto::Eager => sys::UCP_AM_SEND_FLAG_EAGER,
            Proto::Rndv => sys::UCP_AM_SEND_FLAG_RNDV,
        };
        let (ptr, len): (*const u8, usize) = match &payload {
            Payload::None => (ptr::null(), 0),
            Payload::Bytes(v) => (v.as_ptr(), v.len()),
            Payload::Region(s) => {
                param.op_attr_mask |= sys::UCP_OP_ATTR_FIELD_MEMH;
                param.memh = s.region().memh();
                (s.ptr().cast_const(), s.len())
            }
        };
        let hptr = if header.is_empty() {
            ptr::null()
        } else {
            header.as_ptr()
        };
        // SAFETY: valid endpoint; header and payload memory do not move (boxed / Vec heap /
        // region) and are owned by the returned request until UCX completes it.
        let ret = unsafe {
            sys::ucp_am_send_nbx(
                self.h,
                id as u32,
                hptr.cast(),
                header.len(),
                ptr.cast(),
                len,
                &param,
            )
        };
        Request::from_ret(
            &self.worker,
            ret,
            Box::new((header, payload)),
            "ucp_am_send_nbx",
        )
    }

    /// Closes the endpoint and waits (at most `timeout`) for the close to complete: a flush
    /// close if the endpoint is healthy, a forced one if it failed.
    pub fn close(mut self, timeout: Duration) -> Result<()> {
        let req = self.start_close(self.error().is_some());
        let worker = Worker {
            inner: self.worker.clone(),
        };
        match req {
            Ok(mut r) => {
                let done = worker.wait_until(timeout, || r.is_complete())?;
                if !done {
                    return Err(Error::Timeout {
                        op: "ucp_ep_close_nbx",
                    });
                }
                match r.poll().expect("complete") {
                    // A peer that left first: the close completes with its error; the endpoint is gone.
                    Err(Error::Ucs { .. }) | Ok(()) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    fn start_close(&mut self, force: bool) -> Result<Request> {
        let shared = self.shared.take().expect("not closed yet");
        shared.closed.set(true);
        // SAFETY: zeroed params; mask names flags.
        let mut param: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
        param.op_attr_mask = sys::UCP_OP_ATTR_FIELD_FLAGS;
        param.flags = if force {
            sys::UCP_EP_CLOSE_FLAG_FORCE
        } else {
            0
        };
        // SAFETY: valid endpoint, closed once (shared taken); the callback state is kept by
        // the request (and parked in the worker if the request is dropped early).
        let ret = unsafe { sys::ucp_ep_close_nbx(self.h, &param) };
        let keep: Box<dyn std::any::Any> = shared;
        match Request::from_ret(&self.worker, ret, keep, "ucp_ep_close_nbx") {
            Ok(r) => Ok(r),
            Err(e) => {
                // The endpoint may still call us back: keep the state until the worker dies.
                Err(e)
            }
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if self.shared.is_none() {
            return;
        }
        // A forced close that completes in the background; inside a callback, after it.
        let h = self.h;
        let shared = self.shared.take();
        if let Some(s) = &shared {
            s.closed.set(true);
        }
        let worker = Rc::downgrade(&self.worker);
        self.worker.defer_or_run(Box::new(move || {
            let Some(w) = worker.upgrade() else {
                // The worker is being destroyed and will destroy the endpoint with it; UCX may
                // still hold the callback state's address until then: leak it (tiny, rare).
                std::mem::forget(shared);
                return;
            };
            // SAFETY: zeroed params; mask names flags.
            let mut param: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
            param.op_attr_mask = sys::UCP_OP_ATTR_FIELD_FLAGS;
            param.flags = sys::UCP_EP_CLOSE_FLAG_FORCE;
            // SAFETY: valid endpoint, closed once.
            let ret = unsafe { sys::ucp_ep_close_nbx(h, &param) };
            let req = if sys::UCS_PTR_IS_PTR(ret) {
                ret
            } else {
                ptr::null_mut()
            };
            w.adopt(Orphan {
                req,
                keep: shared.map(|s| s as Box<dyn std::any::Any>),
            });
        }));
    }
}

struct ListenerShared {
    worker: Weak<WorkerInner>,
    listener: RefCell<Weak<ListenerInner>>,
    on_conn: RefCell<Box<dyn FnMut(ConnRequest)>>,
}

struct ListenerInner {
    worker: Rc<WorkerInner>,
    h: sys::ucp_listener_h,
    _shared: Box<ListenerShared>,
}

impl Drop for ListenerInner {
    fn drop(&mut self) {
        // SAFETY: created by ucp_listener_create; no ConnRequest is left (they hold an Rc).
        unsafe { sys::ucp_listener_destroy(self.h) };
    }
}

/// A UCX listener bound to an exact address (no fallback to another port or interface).
pub struct Listener {
    inner: Rc<ListenerInner>,
}

/// A connection request, handed to the listener's callback. Accept it or reject it; dropping
/// it rejects it. It may be kept and decided after `progress` returns.
pub struct ConnRequest {
    listener: Rc<ListenerInner>,
    h: sys::ucp_conn_request_h,
    peer: Option<SocketAddr>,
}

unsafe extern "C" fn conn_trampoline(req: sys::ucp_conn_request_h, arg: *mut c_void) {
    // SAFETY: arg is the ListenerShared box, alive until the listener is destroyed.
    let shared = &*(arg as *const ListenerShared);
    let Some(listener) = shared.listener.borrow().upgrade() else {
        return;
    };
    // SAFETY: zeroed attr; mask names the field queried.
    let mut attr: sys::ucp_conn_request_attr_t = std::mem::zeroed();
    attr.field_mask = sys::UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR as u64;
    let peer = if sys::ucp_conn_request_query(req, &mut attr) == sys::UCS_OK as sys::ucs_status_t {
        sockaddr::from_ptr(
            &attr.client_address as *const sys::sockaddr_storage as *const libc::sockaddr_storage,
        )
    } else {
        None
    };
    let conn = ConnRequest {
        listener,
        h: req,
        peer,
    };
    guard(&shared.worker, || {
        if let Ok(mut f) = shared.on_conn.try_borrow_mut() {
            f(conn);
        }
        // else: dropped, hence rejected
    });
}

impl Listener {
    /// `ucp_listener_create` on exactly `addr` (port 0: any free port, see
    /// [`Listener::local_addr`]). `on_conn` runs inside `progress` for each client.
    pub fn bind(
        worker: &Worker,
        addr: SocketAddr,
        on_conn: impl FnMut(ConnRequest) + 'static,
    ) -> Result<Listener> {
        let shared = Box::new(ListenerShared {
            worker: Rc::downgrade(&worker.inner),
            listener: RefCell::new(Weak::new()),
            on_conn: RefCell::new(Box::new(on_conn)),
        });
        let (ss, len) = sockaddr::to_storage(&addr);
        // SAFETY: zeroed params; mask names the fields set.
        let mut params: sys::ucp_listener_params_t = unsafe { std::mem::zeroed() };
        params.field_mask = (sys::UCP_LISTENER_PARAM_FIELD_SOCK_ADDR
            | sys::UCP_LISTENER_PARAM_FIELD_CONN_HANDLER) as u64;
        params.sockaddr.addr = &ss as *const libc::sockaddr_storage as *const sys::sockaddr;
        params.sockaddr.addrlen = len;
        params.conn_handler.cb = Some(conn_trampoline);
        params.conn_handler.arg = &*shared as *const ListenerShared as *mut c_void;
        let mut h: sys::ucp_listener_h = ptr::null_mut();
        // SAFETY: valid worker and params; UCX copies the address; the shared box outlives
        // the listener (dropped after ucp_listener_destroy).
        let st = unsafe { sys::ucp_listener_create(worker.inner.h, &params, &mut h) };
        if st != sys::UCS_OK as sys::ucs_status_t {
            return Err(Error::Ucs {
                op: if st == sys::UCS_ERR_BUSY as sys::ucs_status_t {
                    "ucp_listener_create (address in use)"
                } else {
                    "ucp_listener_create"
                },
                status: Status(st),
            });
        }
        let inner = Rc::new(ListenerInner {
            worker: worker.inner.clone(),
            h,
            _shared: shared,
        });
        *inner._shared.listener.borrow_mut() = Rc::downgrade(&inner);
        Ok(Listener { inner })
    }

    /// The address the listener is bound to (the real port when bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        // SAFETY: zeroed attr; mask names the field queried.
        let mut attr: sys::ucp_listener_attr_t = unsafe { std::mem::zeroed() };
        attr.field_mask = sys::UCP_LISTENER_ATTR_FIELD_SOCKADDR as u64;
        // SAFETY: valid listener and attr.
        Status::check(
            unsafe { sys::ucp_listener_query(self.inner.h, &mut attr) },
            "ucp_listener_query",
        )?;
        // SAFETY: UCX filled a sockaddr of its family.
        unsafe {
            sockaddr::from_ptr(
                &attr.sockaddr as *const sys::sockaddr_storage as *const libc::sockaddr_storage,
            )
        }
        .ok_or_else(|| Error::Invalid("listener address of an unknown family".into()))
    }
}

impl ConnRequest {
    /// The client's address (for an allow list); `None` if UCX could not say.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// Accepts: creates the server-side endpoint. Not allowed inside the listener callback:
    /// keep the request and accept after `progress` returns.
    pub fn accept(mut self, on_error: impl FnMut(Error) + 'static) -> Result<Endpoint> {
        if self.listener.worker.in_callback() {
            return Err(Error::InCallback { op: "accept" });
        }
        let req = std::mem::replace(&mut self.h, ptr::null_mut());
        Endpoint::create(
            &self.listener.worker,
            |p| {
                p.field_mask |= sys::UCP_EP_PARAM_FIELD_CONN_REQUEST as u64;
                p.conn_request = req;
            },
            Box::new(on_error),
        )
    }

    /// Rejects the client (`ucp_listener_reject`); its endpoint gets an error.
    pub fn reject(self) {
        drop(self)
    }
}

impl Drop for ConnRequest {
    fn drop(&mut self) {
        if self.h.is_null() {
            return;
        }
        let (l, h) = (self.listener.clone(), self.h);
        self.listener.worker.clone().defer_or_run(Box::new(move || {
            // SAFETY: a conn request of this listener, answered once.
            unsafe { sys::ucp_listener_reject(l.h, h) };
        }));
    }
}
