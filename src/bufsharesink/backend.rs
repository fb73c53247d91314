//! Which memory backend bufsharesink uses: the `backend`, `heap` and `device`
//! properties turned into a [`MemoryBackend`], and `auto`'s fallback to memfd.
//!
//! Every enum value exists in every build, so a pipeline string means the same
//! everywhere; choosing a backend that was not compiled in is an error at start
//! that names the cargo feature. `auto` tries the preset's order (imx8:
//! dma-heap, drm, v4l2; qcs: dma-heap, v4l2; no preset: dma-heap, drm) and
//! falls back to memfd, saying why each one failed.

use std::sync::Arc;

use bufshare_backends::memfd::MemfdBackend;
use bufshare_backends::{BackendError, MemoryBackend};
use gst::glib;

/// The `backend` property.
#[derive(Debug, Eq, PartialEq, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstBufShareBackend")]
pub enum BackendKind {
    #[enum_value(
        name = "Auto: the preset's hardware backends in order, else memfd (with a warning)",
        nick = "auto"
    )]
    Auto,
    #[default]
    #[enum_value(
        name = "memfd: sealed anonymous memory (CPU only, works everywhere)",
        nick = "memfd"
    )]
    Memfd,
    #[enum_value(
        name = "dma-heap: dma-bufs from /dev/dma_heap/<heap>",
        nick = "dma-heap"
    )]
    DmaHeap,
    #[enum_value(
        name = "drm: DRM dumb buffers exported as dma-bufs (PRIME)",
        nick = "drm"
    )]
    Drm,
    #[enum_value(
        name = "v4l2: exported buffers of a V4L2 device queue (a mem2mem device's OUTPUT queue)",
        nick = "v4l2"
    )]
    V4l2,
}

impl BackendKind {
    pub fn nick(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Memfd => "memfd",
            BackendKind::DmaHeap => "dma-heap",
            BackendKind::Drm => "drm",
            BackendKind::V4l2 => "v4l2",
        }
    }
}

/// The board preset compiled in, if any (imx8 wins when both are enabled).
pub fn preset() -> Option<&'static str> {
    if cfg!(feature = "imx8") {
        Some("imx8")
    } else if cfg!(feature = "qcs") {
        Some("qcs")
    } else {
        None
    }
}

/// The default `heap`: the preset's heap, else `system`.
pub fn default_heap() -> &'static str {
    match preset() {
        Some("imx8") => "linux,cma",
        Some("qcs") => "qcom,system",
        _ => "system",
    }
}

/// What `auto` tries, in order, before memfd.
pub fn auto_order() -> &'static [BackendKind] {
    match preset() {
        Some("imx8") => &[BackendKind::DmaHeap, BackendKind::Drm, BackendKind::V4l2],
        Some("qcs") => &[BackendKind::DmaHeap, BackendKind::V4l2],
        _ => &[BackendKind::DmaHeap, BackendKind::Drm],
    }
}

/// A concrete backend choice: enough to open a fresh instance for each pool
/// (a V4L2 instance owns a device queue, so pools cannot share one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub kind: BackendKind,
    pub heap: String,
    pub device: Option<String>,
}

impl Choice {
    /// Opens the backend. Errors name the heap or device path and the reason.
    pub fn open(&self) -> Result<Arc<dyn MemoryBackend>, String> {
        #[allow(unused_variables)]
        let not_built = |feature: &str| {
            format!(
                "backend '{}' is not built into this plugin: rebuild gst-plugin-bufshare with --features {feature}",
                self.kind.nick()
            )
        };
        let err = |e: BackendError| e.to_string();
        match self.kind {
            BackendKind::Memfd | BackendKind::Auto => Ok(Arc::new(MemfdBackend::new())),
            BackendKind::DmaHeap => {
                #[cfg(feature = "dma-heap")]
                {
                    Ok(Arc::new(
                        bufshare_backends::dma_heap::DmaHeapBackend::open(&self.heap)
                            .map_err(err)?,
                    ))
                }
                #[cfg(not(feature = "dma-heap"))]
                {
                    let _ = err;
                    Err(not_built("dma-heap"))
                }
            }
            BackendKind::Drm => {
                #[cfg(feature = "drm")]
                {
                    use bufshare_backends::drm::DrmDumbBackend;
                    let b = match &self.device {
                        Some(d) => DrmDumbBackend::open(std::path::Path::new(d)),
                        None => DrmDumbBackend::open_first(),
                    };
                    Ok(Arc::new(b.map_err(err)?))
                }
                #[cfg(not(feature = "drm"))]
                {
                    let _ = err;
                    Err(not_built("drm"))
                }
            }
            BackendKind::V4l2 => {
                #[cfg(feature = "v4l2")]
                {
                    use bufshare_backends::v4l2::V4l2Backend;
                    let b = match &self.device {
                        Some(d) => V4l2Backend::open(std::path::Path::new(d)),
                        None => V4l2Backend::open_first_mem2mem(),
                    };
                    Ok(Arc::new(b.map_err(err)?))
                }
                #[cfg(not(feature = "v4l2"))]
                {
                    let _ = err;
                    Err(not_built("v4l2"))
                }
            }
        }
    }

    /// Where the memory comes from, for logs and stats: the heap path or the
    /// device (or "auto" when the backend picks it).
    pub fn describe(&self) -> String {
        match self.kind {
            BackendKind::DmaHeap => {
                if self.heap.starts_with('/') {
                    self.heap.clone()
                } else {
                    format!("/dev/dma_heap/{}", self.heap)
                }
            }
            BackendKind::Drm | BackendKind::V4l2 => self
                .device
                .clone()
                .unwrap_or_else(|| "first usable device".into()),
            _ => String::new(),
        }
    }
}

/// The outcome of resolving the `backend` property at start.
pub struct Resolved {
    pub choice: Choice,
    pub backend: Arc<dyn MemoryBackend>,
    /// Under `auto`, why each backend tried before the one chosen failed.
    pub fallback_reasons: Vec<String>,
}

/// Resolves `kind` (trying `auto`'s order) into an opened backend.
/// Explicit choices fail with the reason; `auto` never fails (memfd is last).
pub fn resolve(kind: BackendKind, heap: &str, device: Option<&str>) -> Result<Resolved, String> {
    let choice = |kind| Choice {
        kind,
        heap: heap.to_string(),
        device: device.map(str::to_string),
    };
    if kind != BackendKind::Auto {
        let choice = choice(kind);
        let backend = choice.open()?;
        return Ok(Resolved {
            choice,
            backend,
            fallback_reasons: Vec::new(),
        });
    }
    let mut reasons = Vec::new();
    for kind in auto_order() {
        let c = choice(*kind);
        match c.open() {
            Ok(backend) => {
                return Ok(Resolved {
                    choice: c,
                    backend,
                    fallback_reasons: reasons,
                })
            }
            Err(e) => reasons.push(format!("{}: {e}", kind.nick())),
        }
    }
    Ok(Resolved {
        choice: choice(BackendKind::Memfd),
        backend: Arc::new(MemfdBackend::new()),
        fallback_reasons: reasons,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_heap_is_an_error_naming_the_path() {
        let err = resolve(BackendKind::DmaHeap, "/nonexistent", None)
            .err()
            .expect("a missing heap fails");
        if cfg!(feature = "dma-heap") {
            assert!(
                err.contains("/nonexistent") && err.contains("No such file"),
                "{err}"
            );
        } else {
            assert!(err.contains("--features dma-heap"), "{err}");
        }
    }

    #[test]
    fn auto_falls_back_to_memfd_with_reasons_when_devices_are_missing() {
        // A heap and a device that exist nowhere: every hardware backend fails.
        let r = resolve(BackendKind::Auto, "nope-heap", Some("/dev/nope-device")).unwrap();
        assert_eq!(r.choice.kind, BackendKind::Memfd);
        assert_eq!(r.backend.name(), "memfd");
        assert_eq!(r.fallback_reasons.len(), auto_order().len());
        let all = r.fallback_reasons.join("; ");
        if cfg!(feature = "dma-heap") {
            assert!(all.contains("/dev/dma_heap/nope-heap"), "{all}");
        }
        if cfg!(feature = "drm") {
            assert!(all.contains("/dev/nope-device"), "{all}");
        }
    }

    #[test]
    fn memfd_is_always_available() {
        let r = resolve(BackendKind::Memfd, default_heap(), None).unwrap();
        assert_eq!(r.backend.name(), "memfd");
        assert!(r.fallback_reasons.is_empty());
    }
}
