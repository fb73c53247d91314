//! The committed bindings against the UCX headers and library installed now.
//!
//! bindgen's own layout assertions (in src/bindings.rs) check the Rust structs against the
//! headers the file was generated from, at compile time. This test checks them against the
//! headers installed on this machine: it compiles a C program with `pkg-config --cflags ucx`
//! that prints sizeof/offsetof and constant values, and compares with the Rust side. A UCX
//! upgrade that moves a field or renumbers a flag fails here; regenerate with
//! scripts/gen-ucx-bindings.sh.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::process::Command;

use ucx_sys::*;

macro_rules! facts {
    ($( size $st:ident: $($field:ident),* ;)* $( const $c:ident;)*) => {{
        let mut c = String::new();
        let mut rust = BTreeMap::new();
        $(
            c += &format!("printf(\"sizeof {0} %zu\\n\", sizeof({0}));\n", stringify!($st));
            rust.insert(format!("sizeof {}", stringify!($st)), size_of::<$st>() as i128);
            $(
                c += &format!(
                    "printf(\"offsetof {0}.{1} %zu\\n\", offsetof({0}, {1}));\n",
                    stringify!($st), stringify!($field)
                );
                rust.insert(
                    format!("offsetof {}.{}", stringify!($st), stringify!($field)),
                    offset_of!($st, $field) as i128,
                );
            )*
        )*
        $(
            c += &format!("printf(\"const {0} %lld\\n\", (long long)({0}));\n", stringify!($c));
            rust.insert(format!("const {}", stringify!($c)), $c as i128);
        )*
        (c, rust)
    }};
}

#[test]
fn bindings_match_installed_headers() {
    let (body, rust) = facts! {
        size ucp_params_t: field_mask, features, mt_workers_shared, name;
        size ucp_worker_params_t: field_mask, thread_mode;
        size ucp_worker_attr_t: field_mask, max_am_header;
        size ucp_ep_params_t: field_mask, err_mode, err_handler, flags, sockaddr, conn_request;
        size ucp_err_handler_t: cb, arg;
        size ucs_sock_addr_t: addr, addrlen;
        size ucp_listener_params_t: field_mask, sockaddr, conn_handler;
        size ucp_listener_conn_handler_t: cb, arg;
        size ucp_listener_attr_t: field_mask, sockaddr;
        size ucp_conn_request_attr_t: field_mask, client_address;
        size ucp_mem_map_params_t: field_mask, address, length;
        size ucp_request_param_t: op_attr_mask, flags, request, cb, user_data, memh;
        size ucp_am_handler_param_t: field_mask, id, flags, cb, arg;
        size ucp_am_recv_param_t: recv_attr, reply_ep;
        size ucs_log_component_config_t: log_level, name, file_filter;
        const UCP_API_MAJOR;
        const UCP_API_MINOR;
        const UCS_OK;
        const UCS_INPROGRESS;
        const UCS_ERR_BUSY;
        const UCS_ERR_LAST;
        const UCS_THREAD_MODE_SINGLE;
        const UCP_FEATURE_AM;
        const UCP_FEATURE_WAKEUP;
        const UCP_PARAM_FIELD_FEATURES;
        const UCP_PARAM_FIELD_MT_WORKERS_SHARED;
        const UCP_PARAM_FIELD_NAME;
        const UCP_WORKER_PARAM_FIELD_THREAD_MODE;
        const UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER;
        const UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
        const UCP_EP_PARAM_FIELD_ERR_HANDLER;
        const UCP_EP_PARAM_FIELD_FLAGS;
        const UCP_EP_PARAM_FIELD_SOCK_ADDR;
        const UCP_EP_PARAM_FIELD_CONN_REQUEST;
        const UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
        const UCP_ERR_HANDLING_MODE_PEER;
        const UCP_EP_CLOSE_FLAG_FORCE;
        const UCP_LISTENER_PARAM_FIELD_SOCK_ADDR;
        const UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
        const UCP_LISTENER_ATTR_FIELD_SOCKADDR;
        const UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR;
        const UCP_MEM_MAP_PARAM_FIELD_ADDRESS;
        const UCP_MEM_MAP_PARAM_FIELD_LENGTH;
        const UCP_OP_ATTR_FIELD_FLAGS;
        const UCP_OP_ATTR_FIELD_MEMH;
        const UCP_AM_SEND_FLAG_EAGER;
        const UCP_AM_SEND_FLAG_RNDV;
        const UCP_AM_RECV_ATTR_FLAG_RNDV;
        const UCP_AM_RECV_ATTR_FLAG_DATA;
        const UCP_AM_HANDLER_PARAM_FIELD_ID;
        const UCP_AM_HANDLER_PARAM_FIELD_CB;
        const UCP_AM_HANDLER_PARAM_FIELD_ARG;
        const UCS_LOG_LEVEL_FATAL;
        const UCS_LOG_LEVEL_ERROR;
        const UCS_LOG_LEVEL_WARN;
        const UCS_LOG_LEVEL_DIAG;
        const UCS_LOG_LEVEL_INFO;
        const UCS_LOG_LEVEL_DEBUG;
        const UCS_LOG_FUNC_RC_STOP;
        const UCS_LOG_FUNC_RC_CONTINUE;
    };
    let dir = std::env::temp_dir().join(format!("ucx-sys-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("layout.c");
    let exe = dir.join("layout");
    std::fs::write(
        &src,
        format!(
            "#include <stddef.h>\n#include <stdio.h>\n#include <ucp/api/ucp.h>\n#include <ucs/debug/log_def.h>\n\
             int main(void) {{\n{body}return 0;\n}}\n"
        ),
    )
    .unwrap();
    let cflags = Command::new("pkg-config")
        .args(["--cflags", "ucx"])
        .output();
    let cflags = match cflags {
        Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap(),
        _ => panic!("pkg-config --cflags ucx failed: install libucx-dev"),
    };
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let compiled = Command::new(&cc)
        .args(cflags.split_whitespace())
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .status();
    match compiled {
        Err(e) => {
            eprintln!("SKIP: no C compiler ({cc}: {e}); the layout is only checked against the generation-time headers");
            return;
        }
        Ok(s) => assert!(s.success(), "{cc} failed on {}", src.display()),
    }
    let out = Command::new(&exe).output().expect("run layout probe");
    assert!(out.status.success());
    let c: BTreeMap<String, i128> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect();
    std::fs::remove_dir_all(&dir).ok();
    let diffs: Vec<String> = rust
        .iter()
        .filter(|(k, v)| c.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: Rust {v}, C {:?}", c.get(k)))
        .collect();
    assert!(
        diffs.is_empty(),
        "bindings differ from the installed UCX headers (rerun scripts/gen-ucx-bindings.sh):\n{}",
        diffs.join("\n")
    );
    eprintln!(
        "{} sizes, offsets and constants match the installed headers",
        rust.len()
    );
}

#[test]
fn library_matches_header_api_version() {
    let (mut major, mut minor, mut release) = (0, 0, 0);
    // SAFETY: three out-pointers.
    unsafe { ucp_get_version(&mut major, &mut minor, &mut release) };
    eprintln!("libucp {major}.{minor}.{release}, bindings from UCX {UCX_HEADERS_VERSION}");
    assert_eq!(major, UCP_API_MAJOR, "libucp major version");
    assert!(
        minor >= UCP_API_MINOR,
        "libucp {major}.{minor} is older than the bindings' headers"
    );
}

#[test]
fn status_pointer_helpers() {
    use core::ffi::c_void;
    let null: *const c_void = core::ptr::null();
    assert!(!UCS_PTR_IS_ERR(null) && !UCS_PTR_IS_PTR(null));
    assert_eq!(UCS_PTR_STATUS(null), UCS_OK);
    let err = UCS_ERR_BUSY as isize as *const c_void;
    assert!(UCS_PTR_IS_ERR(err) && !UCS_PTR_IS_PTR(err));
    assert_eq!(UCS_PTR_STATUS(err), UCS_ERR_BUSY);
    let req = 0x1000 as *const c_void;
    assert!(UCS_PTR_IS_PTR(req) && !UCS_PTR_IS_ERR(req));
    // SAFETY: ucs_status_string accepts any status.
    let s = unsafe { std::ffi::CStr::from_ptr(ucs_status_string(UCS_ERR_BUSY)) };
    assert_eq!(s.to_str().unwrap(), "Device is busy");
}
