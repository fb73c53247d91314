//! Raw FFI bindings to the UCP API of the system UCX library (Debian 12 ships 1.13.1).
//!
//! `bindings.rs` is generated once by `scripts/gen-ucx-bindings.sh` (bindgen, restricted by
//! allowlists to what the `ucx` crate uses) and committed; `build.rs` only links with
//! `pkg-config ucx`. The layout assertions bindgen emits are compile-time checks against the
//! headers the file was generated from; `tests/layout.rs` compares them with the headers
//! installed now (C compiler, `sizeof`/`offsetof`), so a UCX upgrade that changes a struct
//! fails the tests instead of corrupting memory.
//!
//! Besides the generated items, this module re-implements the few C macros and inline
//! functions of the UCP API that bindgen cannot translate (`ucp_init`, `UCS_PTR_*`).
#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code
)]
#![allow(clippy::all)]

mod bindings;
pub use bindings::*;

use core::ffi::c_void;

/// `ucp_init` is a `static inline` in ucp.h: it passes the API version of the headers.
///
/// # Safety
/// As `ucp_init_version`: `params` must be a fully initialised `ucp_params_t` (zero it, then set
/// the fields named in `field_mask`), `config` null or from `ucp_config_read`, `context_p` valid.
pub unsafe fn ucp_init(
    params: *const ucp_params_t,
    config: *const ucp_config_t,
    context_p: *mut ucp_context_h,
) -> ucs_status_t {
    ucp_init_version(UCP_API_MAJOR, UCP_API_MINOR, params, config, context_p)
}

/// `UCS_PTR_IS_ERR`: the pointer returned by an `_nbx` call encodes an error status.
pub fn UCS_PTR_IS_ERR(ptr: *const c_void) -> bool {
    (ptr as usize) >= (UCS_ERR_LAST as isize as usize)
}

/// `UCS_PTR_IS_PTR`: a real request pointer (neither NULL = done, nor an error).
pub fn UCS_PTR_IS_PTR(ptr: *const c_void) -> bool {
    (ptr as usize).wrapping_sub(1) < (UCS_ERR_LAST as isize as usize).wrapping_sub(1)
}

/// `UCS_PTR_STATUS`: the status an `_nbx` return value encodes (UCS_OK for NULL).
pub fn UCS_PTR_STATUS(ptr: *const c_void) -> ucs_status_t {
    ptr as isize as ucs_status_t
}

/// `ucp_dt_make_contig(1)`: bytes, the default datatype.
pub const UCP_DATATYPE_CONTIG_BYTES: ucp_datatype_t = (1 << 3) | 0;
