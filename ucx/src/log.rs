//! UCX's own log (libucs), forwarded to a Rust function.
//!
//! UCX reports some failures only on its log (by default printed on stdout): a bind that
//! failed, a connection manager that could not read a client's data, a request leaked at exit.
//! [`set_handler`] installs one process-wide handler with `ucs_log_push_handler`; it receives
//! every message UCX dispatches, i.e. those at or above `UCX_LOG_LEVEL` (default `warn`), from
//! whatever thread logs it (often UCX's async thread). Assertion failures and other fatal
//! errors do not go through the handlers (`ucs_fatal_error_message` prints and aborts).
//!
//! When a message names a socket (`fd=N` or `fd N`), the handler resolves the socket's local
//! and peer addresses *while UCX still holds it open* (the message is logged before UCX closes
//! it), so an application can say which peer a failure was about. This is best effort: a
//! socket already reset has no peer address any more.

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::net::SocketAddr;
use std::sync::{Once, RwLock};

use ucx_sys as sys;

/// A UCX log level (`ucs_log_level_t`), most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Fatal,
    Error,
    Warn,
    Diag,
    Info,
    Debug,
    /// Any of the trace levels.
    Trace,
}

impl LogLevel {
    fn from_raw(level: sys::ucs_log_level_t) -> LogLevel {
        match level {
            sys::UCS_LOG_LEVEL_FATAL => LogLevel::Fatal,
            sys::UCS_LOG_LEVEL_ERROR => LogLevel::Error,
            sys::UCS_LOG_LEVEL_WARN => LogLevel::Warn,
            sys::UCS_LOG_LEVEL_DIAG => LogLevel::Diag,
            sys::UCS_LOG_LEVEL_INFO | sys::UCS_LOG_LEVEL_PRINT => LogLevel::Info,
            sys::UCS_LOG_LEVEL_DEBUG => LogLevel::Debug,
            _ => LogLevel::Trace,
        }
    }
}

/// One message of UCX's log.
#[derive(Debug, Clone)]
pub struct LogRecord<'a> {
    pub level: LogLevel,
    /// UCX's source file and line (`tcp_sockcm_ep.c`, 825).
    pub file: &'a str,
    pub line: u32,
    pub function: &'a str,
    /// The formatted message (cut at 1 KiB).
    pub message: &'a str,
    /// The socket the message names (`fd=N`), if any and still open.
    pub fd: Option<i32>,
    /// That socket's local and peer addresses, where they could be read.
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
}

/// What UCX does with a message after the handler saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogAction {
    /// Pass it on to UCX's default handler (which prints it).
    Continue,
    /// Do not print it.
    Stop,
}

type Handler = Box<dyn Fn(&LogRecord<'_>) -> LogAction + Send + Sync>;

static HANDLER: RwLock<Option<Handler>> = RwLock::new(None);
static PUSH: Once = Once::new();

/// Sets the process's UCX log handler, replacing the previous one (`None`: UCX logs as
/// before). The handler runs on UCX's threads, must be quick, and must not call UCX.
pub fn set_handler(handler: Option<Handler>) {
    *HANDLER.write().unwrap_or_else(|e| e.into_inner()) = handler;
    PUSH.call_once(|| {
        // SAFETY: a valid `extern "C"` handler that lives as long as the process.
        unsafe { sys::ucs_log_push_handler(Some(dispatch)) };
    });
}

extern "C" {
    fn vsnprintf(
        s: *mut c_char,
        n: usize,
        format: *const c_char,
        ap: *mut sys::__va_list_tag,
    ) -> c_int;
}

unsafe fn str_of<'a>(p: *const c_char) -> &'a str {
    if p.is_null() {
        ""
    } else {
        CStr::from_ptr(p).to_str().unwrap_or("?")
    }
}

/// The fd a message names: "fd=12", "fd 12", "fd: 12".
fn fd_in(message: &str) -> Option<i32> {
    let at = message.find("fd")?;
    let rest = message[at + 2..].trim_start_matches([' ', '=', ':']);
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok().filter(|fd| *fd >= 0)
}

unsafe extern "C" fn dispatch(
    file: *const c_char,
    line: c_uint,
    function: *const c_char,
    level: sys::ucs_log_level_t,
    _comp: *const sys::ucs_log_component_config_t,
    format: *const c_char,
    ap: *mut sys::__va_list_tag,
) -> sys::ucs_log_func_rc_t {
    // UCX's default handler formats the message again after us, `%m` included: keep errno.
    let errno = *libc::__errno_location();
    let action = handle(file, line, function, level, format, ap);
    *libc::__errno_location() = errno;
    action
}

unsafe fn handle(
    file: *const c_char,
    line: c_uint,
    function: *const c_char,
    level: sys::ucs_log_level_t,
    format: *const c_char,
    ap: *mut sys::__va_list_tag,
) -> sys::ucs_log_func_rc_t {
    let guard = match HANDLER.read() {
        Ok(g) => g,
        Err(_) => return sys::UCS_LOG_FUNC_RC_CONTINUE,
    };
    let Some(handler) = guard.as_ref() else {
        return sys::UCS_LOG_FUNC_RC_CONTINUE;
    };
    let mut buf = [0 as c_char; 1024];
    // SAFETY: buf is 1024 bytes; format and ap are UCX's, consumed once (ucs_log_dispatch
    // starts a fresh va_list for each handler).
    let n = vsnprintf(buf.as_mut_ptr(), buf.len(), format, ap);
    if n < 0 {
        return sys::UCS_LOG_FUNC_RC_CONTINUE;
    }
    let message = String::from_utf8_lossy(CStr::from_ptr(buf.as_ptr()).to_bytes());
    let file = str_of(file);
    let file = file.rsplit('/').next().unwrap_or(file);
    let fd = fd_in(&message);
    let record = LogRecord {
        level: LogLevel::from_raw(level),
        file,
        line,
        function: str_of(function),
        message: &message,
        fd,
        local: fd.and_then(|fd| crate::socket_address(fd, false)),
        peer: fd.and_then(|fd| crate::socket_address(fd, true)),
    };
    // A panic must not unwind into C.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(&record))) {
        Ok(LogAction::Stop) => sys::UCS_LOG_FUNC_RC_STOP,
        _ => sys::UCS_LOG_FUNC_RC_CONTINUE,
    }
}

#[cfg(test)]
mod tests {
    use super::fd_in;

    #[test]
    fn finds_the_fd_a_message_names() {
        assert_eq!(
            fd_in("ep 0x55 (fd=17) failed to recv client's data"),
            Some(17)
        );
        assert_eq!(fd_in("failed to remove event handler for fd 9: x"), Some(9));
        assert_eq!(fd_in("fd: 3 peer"), Some(3));
        assert_eq!(fd_in("no socket here"), None);
        assert_eq!(fd_in("fdx"), None);
    }
}
