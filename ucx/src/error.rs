use std::ffi::CStr;
use std::fmt;

use ucx_sys as sys;

/// A UCX status code (`ucs_status_t`), printed with UCX's own text.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Status(pub sys::ucs_status_t);

impl Status {
    pub const OK: Status = Status(sys::UCS_OK as sys::ucs_status_t);
    pub const IN_PROGRESS: Status = Status(sys::UCS_INPROGRESS as sys::ucs_status_t);

    /// UCX's description, e.g. "Destination is unreachable".
    pub fn text(self) -> &'static str {
        // SAFETY: ucs_status_string returns a pointer to a static string for any value.
        unsafe { CStr::from_ptr(sys::ucs_status_string(self.0)) }
            .to_str()
            .unwrap_or("?")
    }

    pub fn is_ok(self) -> bool {
        self.0 == sys::UCS_OK as sys::ucs_status_t
    }

    pub(crate) fn check(status: sys::ucs_status_t, op: &'static str) -> Result<()> {
        if status == sys::UCS_OK as sys::ucs_status_t {
            Ok(())
        } else {
            Err(Error::Ucs {
                op,
                status: Status(status),
            })
        }
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.text(), self.0)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.text())
    }
}

/// What went wrong, and in which operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A UCX call (or a request, or an endpoint) failed with this status.
    Ucs { op: &'static str, status: Status },
    /// The operation did not complete within the caller's timeout.
    Timeout { op: &'static str },
    /// The arguments cannot work (wrong sizes, ranges outside a region, ...).
    Invalid(String),
    /// The operation is not allowed from inside a worker callback; queue it.
    InCallback { op: &'static str },
}

impl Error {
    /// The UCX status, when the error is one.
    pub fn status(&self) -> Option<Status> {
        match self {
            Error::Ucs { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Ucs { op, status } => write!(f, "{op}: {status} (UCX status {})", status.0),
            Error::Timeout { op } => write!(f, "{op}: timed out"),
            Error::Invalid(s) => write!(f, "{s}"),
            Error::InCallback { op } => write!(f, "{op}: not allowed inside a UCX callback"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
