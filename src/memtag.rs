//! Stable ids for producer memories, and word when they die.
//!
//! The sink registers each producer memory with a consumer once, under an id,
//! and must say FORGET when the memory is freed. We must not hold a reference
//! to find out (that would keep pool buffers from being recycled), so the id
//! lives as qdata on the root GstMemory, and its destroy notify tells every
//! sink that registered it. Ids are unique in the process for its lifetime.

use gst::glib;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use glib::translate::IntoGlib;

/// Told when a tagged memory is freed. Called from whatever thread frees the
/// memory, possibly with GStreamer locks held: implementations only queue.
pub trait ForgetListener: Send + Sync {
    fn memory_freed(&self, mem_id: u64);
}

struct Tag {
    id: u64,
    listeners: Mutex<Vec<Weak<dyn ForgetListener>>>,
}

static QUARK: LazyLock<glib::Quark> =
    LazyLock::new(|| glib::Quark::from_str("bufshare-memory-tag"));
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// Serializes get-or-create of tags between sinks tagging the same memory.
static TAG_LOCK: Mutex<()> = Mutex::new(());

unsafe extern "C" fn tag_destroyed(data: glib::ffi::gpointer) {
    // SAFETY: `data` is the Box<Tag> leaked in `tag_memory`, given back exactly once.
    let tag = unsafe { Box::from_raw(data as *mut Tag) };
    let listeners = std::mem::take(&mut *tag.listeners.lock().unwrap_or_else(|e| e.into_inner()));
    for listener in listeners.iter().filter_map(Weak::upgrade) {
        listener.memory_freed(tag.id);
    }
}

/// The memory that owns the bytes: shares point at a parent.
pub fn root_memory(mem: &gst::MemoryRef) -> &gst::MemoryRef {
    let mut root = mem;
    while let Some(parent) = root.parent() {
        root = parent;
    }
    root
}

/// Whether `mem`'s root memory already has an id: a sink has shared it before.
pub fn is_tagged(mem: &gst::MemoryRef) -> bool {
    let root = root_memory(mem);
    // SAFETY: `root` is a live mini object (we hold a reference through `mem`);
    // only the pointer's presence is read, never what it points to.
    !unsafe {
        gst::ffi::gst_mini_object_get_qdata(
            root.as_ptr() as *mut gst::ffi::GstMiniObject,
            QUARK.into_glib(),
        )
    }
    .is_null()
}

/// Returns the id of `mem`'s root memory, tagging it on first sight.
/// `listener` is told when the memory is freed, if `subscribe` is set (a sink
/// subscribes the first time it sees the memory).
pub fn tag_memory(
    mem: &gst::MemoryRef,
    listener: &Arc<dyn ForgetListener>,
    subscribe: impl FnOnce(u64) -> bool,
) -> u64 {
    let root = root_memory(mem);
    let obj = root.as_ptr() as *mut gst::ffi::GstMiniObject;
    let quark = QUARK.into_glib();
    let _guard = TAG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: `obj` is a live mini object (we hold a reference through `mem`);
    // the qdata we store is a Box<Tag> owned by the memory until its destroy notify.
    let existing = unsafe { gst::ffi::gst_mini_object_get_qdata(obj, quark) } as *const Tag;
    let tag: &Tag = if existing.is_null() {
        let tag = Box::into_raw(Box::new(Tag {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            listeners: Mutex::new(Vec::new()),
        }));
        unsafe {
            gst::ffi::gst_mini_object_set_qdata(
                obj,
                quark,
                tag as glib::ffi::gpointer,
                Some(tag_destroyed),
            );
            &*tag
        }
    } else {
        unsafe { &*existing }
    };
    if subscribe(tag.id) {
        tag.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(listener));
    }
    tag.id
}
