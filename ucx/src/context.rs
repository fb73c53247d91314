use std::ffi::CString;
use std::ptr;
use std::rc::Rc;

use ucx_sys as sys;

use crate::error::{Error, Result, Status};

/// A UCP context with the active-message and wakeup features.
///
/// Cheap to clone (reference counted); `ucp_cleanup` runs when the last clone, worker or
/// memory region made from it is gone.
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Rc<ContextInner>,
}

pub(crate) struct ContextInner {
    pub(crate) h: sys::ucp_context_h,
}

impl Drop for ContextInner {
    fn drop(&mut self) {
        // SAFETY: created by ucp_init; every user (worker, region) holds an Rc to this.
        unsafe { sys::ucp_cleanup(self.h) };
    }
}

/// Builds a [`Context`]. UCX reads its `UCX_*` environment variables first (as
/// `ucp_config_read` does); settings given with [`ContextBuilder::config`] override them for
/// this context only, which is what a process with several contexts needs (the environment is
/// process-wide).
#[derive(Default, Clone, Debug)]
pub struct ContextBuilder {
    config: Vec<(String, String)>,
    name: Option<String>,
}

impl ContextBuilder {
    /// Sets a UCX configuration variable without its `UCX_` prefix, e.g.
    /// `config("TLS", "tcp")`, `config("NET_DEVICES", "veth0")`. Settings of UCT's
    /// connection managers are not applied this way on 1.13 (`TCP_CM_REUSEADDR` is accepted
    /// and ignored): set those in the environment (docs/ucx.md).
    pub fn config(mut self, name: &str, value: &str) -> Self {
        self.config.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The context's name in UCX logs.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    pub fn build(self) -> Result<Context> {
        let cname = self
            .name
            .as_deref()
            .map(CString::new)
            .transpose()
            .map_err(|_| Error::Invalid("context name contains a NUL byte".into()))?;
        let mut config: *mut sys::ucp_config_t = ptr::null_mut();
        // SAFETY: null env prefix and file name = defaults; config receives a new object.
        Status::check(
            unsafe { sys::ucp_config_read(ptr::null(), ptr::null(), &mut config) },
            "ucp_config_read",
        )?;
        struct Config(*mut sys::ucp_config_t);
        impl Drop for Config {
            fn drop(&mut self) {
                // SAFETY: from ucp_config_read, released once.
                unsafe { sys::ucp_config_release(self.0) }
            }
        }
        let config = Config(config);
        for (name, value) in &self.config {
            let (n, v) = match (CString::new(name.as_str()), CString::new(value.as_str())) {
                (Ok(n), Ok(v)) => (n, v),
                _ => return Err(Error::Invalid(format!("UCX config {name}: NUL byte"))),
            };
            // SAFETY: valid config and NUL-terminated strings (copied by UCX).
            let status = unsafe { sys::ucp_config_modify(config.0, n.as_ptr(), v.as_ptr()) };
            if status != sys::UCS_OK as sys::ucs_status_t {
                return Err(Error::Invalid(format!(
                    "UCX config UCX_{name}={value}: {}",
                    Status(status)
                )));
            }
        }
        // SAFETY: all-zero is a valid ucp_params_t (no fields); we set the mask explicitly.
        let mut params: sys::ucp_params_t = unsafe { std::mem::zeroed() };
        params.field_mask =
            (sys::UCP_PARAM_FIELD_FEATURES | sys::UCP_PARAM_FIELD_MT_WORKERS_SHARED) as u64;
        params.features = (sys::UCP_FEATURE_AM | sys::UCP_FEATURE_WAKEUP) as u64;
        params.mt_workers_shared = 0;
        if let Some(n) = &cname {
            params.field_mask |= sys::UCP_PARAM_FIELD_NAME as u64;
            params.name = n.as_ptr();
        }
        let mut h: sys::ucp_context_h = ptr::null_mut();
        // SAFETY: params initialised as above, config valid, h an out-pointer. UCX copies name.
        Status::check(
            unsafe { sys::ucp_init(&params, config.0, &mut h) },
            "ucp_init",
        )?;
        Ok(Context {
            inner: Rc::new(ContextInner { h }),
        })
    }
}

impl Context {
    pub fn builder() -> ContextBuilder {
        ContextBuilder::default()
    }

    /// A context configured from the `UCX_*` environment only.
    pub fn new() -> Result<Context> {
        Self::builder().build()
    }

    /// The raw handle, for calls this wrapper does not cover. Valid while `self` lives.
    pub fn as_raw(&self) -> sys::ucp_context_h {
        self.inner.h
    }
}
