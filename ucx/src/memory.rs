use std::ops::Range;
use std::ptr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ucx_sys as sys;

use crate::context::{Context, ContextInner};
use crate::error::{Error, Result, Status};

/// Registrations (`ucp_mem_map`) of this process not yet unmapped, over all contexts.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// How many memory registrations made through this crate are live in the process (mapped
/// with `ucp_mem_map`, not yet `ucp_mem_unmap`ped): for leak checks.
pub fn live_registrations() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Memory registered with UCX (`ucp_mem_map`), so that sends and rendezvous receives skip the
/// per-operation registration. Cheap to clone; unmapped (`ucp_mem_unmap`) when the last clone
/// and the last request using it are gone.
#[derive(Clone)]
pub struct MemoryRegion {
    inner: Rc<RegionInner>,
}

struct RegionInner {
    ctx: Rc<ContextInner>,
    memh: sys::ucp_mem_h,
    ptr: *mut u8,
    len: usize,
    /// Memory this region allocated (mmap), unmapped after ucp_mem_unmap.
    owned: bool,
}

impl Drop for RegionInner {
    fn drop(&mut self) {
        // SAFETY: memh from ucp_mem_map on ctx, still alive (we hold it); no request uses the
        // region any more (requests hold a clone).
        unsafe { sys::ucp_mem_unmap(self.ctx.h, self.memh) };
        LIVE.fetch_sub(1, Ordering::Relaxed);
        if self.owned {
            // SAFETY: our own anonymous mapping of len bytes.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }
}

impl MemoryRegion {
    /// Allocates `len` bytes of zeroed, page-aligned memory (anonymous mmap) and registers it.
    pub fn allocate(ctx: &Context, len: usize) -> Result<MemoryRegion> {
        if len == 0 {
            return Err(Error::Invalid("MemoryRegion::allocate: zero length".into()));
        }
        // SAFETY: anonymous private mapping, no fd.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Invalid(format!(
                "mmap {len} bytes: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: p..p+len is our mapping; on failure we unmap it ourselves.
        match unsafe { Self::map(ctx, p.cast(), len, true) } {
            Ok(r) => Ok(r),
            Err(e) => {
                // SAFETY: our mapping, not registered.
                unsafe { libc::munmap(p, len) };
                Err(e)
            }
        }
    }

    /// Registers memory the caller owns (a pool's mapping, a mapped dma-buf, ...).
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped, readable and writable, and must not be moved or freed,
    /// until the region and every request that uses it are dropped. The caller must not read
    /// or write a range while a receive (resp. write while a send) into it is in flight.
    pub unsafe fn register(ctx: &Context, ptr: *mut u8, len: usize) -> Result<MemoryRegion> {
        if len == 0 || ptr.is_null() {
            return Err(Error::Invalid("MemoryRegion::register: empty range".into()));
        }
        Self::map(ctx, ptr, len, false)
    }

    unsafe fn map(ctx: &Context, ptr: *mut u8, len: usize, owned: bool) -> Result<MemoryRegion> {
        // SAFETY (zeroed): all-zero ucp_mem_map_params_t is valid; mask set below.
        let mut params: sys::ucp_mem_map_params_t = std::mem::zeroed();
        params.field_mask =
            (sys::UCP_MEM_MAP_PARAM_FIELD_ADDRESS | sys::UCP_MEM_MAP_PARAM_FIELD_LENGTH) as u64;
        params.address = ptr.cast();
        params.length = len;
        let mut memh: sys::ucp_mem_h = ptr::null_mut();
        Status::check(
            sys::ucp_mem_map(ctx.inner.h, &params, &mut memh),
            "ucp_mem_map",
        )?;
        LIVE.fetch_add(1, Ordering::Relaxed);
        Ok(MemoryRegion {
            inner: Rc::new(RegionInner {
                ctx: ctx.inner.clone(),
                memh,
                ptr,
                len,
                owned,
            }),
        })
    }

    pub fn len(&self) -> usize {
        self.inner.len
    }

    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.inner.ptr
    }

    pub(crate) fn memh(&self) -> sys::ucp_mem_h {
        self.inner.memh
    }

    /// A sub-range, to send from or receive into. Panics if `range` is outside the region.
    pub fn slice(&self, range: Range<usize>) -> RegionSlice {
        assert!(
            range.start <= range.end && range.end <= self.len(),
            "MemoryRegion::slice {range:?} outside 0..{}",
            self.len()
        );
        RegionSlice {
            region: self.clone(),
            offset: range.start,
            len: range.end - range.start,
        }
    }

    /// Copies `data` into the region at `offset` (panics if it does not fit). Do not overwrite
    /// a range an in-flight send reads or a receive writes: the bytes would be torn.
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset
            .checked_add(data.len())
            .is_some_and(|e| e <= self.len()));
        // SAFETY: in bounds (checked); raw copy, no reference into memory UCX may access.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), self.inner.ptr.add(offset), data.len()) };
    }

    /// Copies `out.len()` bytes from `offset` (panics if out of range).
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(offset
            .checked_add(out.len())
            .is_some_and(|e| e <= self.len()));
        // SAFETY: in bounds (checked); raw copy.
        unsafe {
            ptr::copy_nonoverlapping(self.inner.ptr.add(offset), out.as_mut_ptr(), out.len())
        };
    }

    /// The region's bytes.
    ///
    /// # Safety
    /// No receive into the region may be in flight while the slice lives (UCX would write
    /// under a shared reference).
    pub unsafe fn as_slice(&self) -> &[u8] {
        std::slice::from_raw_parts(self.inner.ptr, self.inner.len)
    }
}

/// A range of a [`MemoryRegion`]; keeps the region alive.
#[derive(Clone)]
pub struct RegionSlice {
    region: MemoryRegion,
    offset: usize,
    len: usize,
}

impl RegionSlice {
    pub fn region(&self) -> &MemoryRegion {
        &self.region
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub(crate) fn ptr(&self) -> *mut u8 {
        // SAFETY: offset <= region length (checked in slice()).
        unsafe { self.region.as_ptr().add(self.offset) }
    }
}
