//! Large host buffers (`Pages`: a private anonymous mapping of their own)
//! and a small per-process cache of freed ones, so that the next buffer of
//! the same size reuses one instead of mapping fresh memory: the kernel
//! zeroes every freshly mapped page, and for a gathered full parameter that
//! zeroing took longer than the all_gather itself (profile of a 2-rank
//! 256 MiB unshard + reshard: 59% of the time in `clear_page`).
//!
//! At most `FLATSHARD_HOST_CACHE_BYTES` (default 512 MiB, 0 = off) are
//! kept; only buffers of at least `LARGE` bytes are cached. The newest
//! quarter of that stays resident: an FSDP step cycles a few full
//! parameters through the cache (the layer just resharded becomes the next
//! layer's gather), and reusing warm memory is what makes that cheap. Older
//! cached buffers are returned to the kernel with `MADV_FREE`: they stay
//! mapped, but the kernel may reclaim their pages at any time without I/O
//! (they then read as zeros), so resharding still gives the memory up under
//! memory pressure; until then they count in the RSS. (Writing a released
//! buffer again cost 0.1 ms per 4 MiB more than writing a resident one
//! here, a quarter of a 4 MiB all_gather.)
//!
//! Buffers that must read as zeros (a full gradient) come from the cache
//! too and are zeroed with a memset (`Buf::zeroed`).

use std::ptr::NonNull;
use std::sync::Mutex;

/// Host buffers of at least this many bytes get a mapping of their own.
pub(crate) const LARGE: usize = 1 << 20;
const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;

/// A private anonymous mapping of `len` bytes (a multiple of the page size),
/// owned: unmapped on drop. Reads as zeros when created.
pub struct Pages {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: Pages owns its mapping exclusively (like a Vec<u8>); nothing in it
// is tied to a thread.
unsafe impl Send for Pages {}
// SAFETY: shared references only read the pointer and length.
unsafe impl Sync for Pages {}

impl Pages {
    /// A fresh zero-filled mapping of at least `bytes` bytes; None if the
    /// kernel refuses (the caller reports OUT_OF_MEMORY). From 4 MiB on it
    /// starts on a 2 MiB boundary and asks for transparent huge pages: a
    /// first write then takes one page fault per 2 MiB instead of one per
    /// 4 KiB (2 ms per 4 MiB here; the kernel's default THP mode is often
    /// `madvise`).
    pub fn new(bytes: usize) -> Option<Pages> {
        let len = bytes.max(1).checked_next_multiple_of(PAGE)?;
        let huge = len >= 2 * HUGE;
        let reserve = if huge { len.checked_add(HUGE)? } else { len };
        // SAFETY: an anonymous private mapping at an address of the kernel's
        // choosing touches no existing memory; the result is checked.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), reserve, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        if p == libc::MAP_FAILED {
            return None;
        }
        let addr = p as usize;
        let start = if huge { addr.next_multiple_of(HUGE) } else { addr };
        if huge {
            // SAFETY: the head [addr, start) and the tail [start + len,
            // addr + reserve) are page-aligned parts of the mapping just made,
            // not used by anyone; unmapping them leaves [start, start + len).
            unsafe {
                if start > addr {
                    libc::munmap(p, start - addr);
                }
                if addr + reserve > start + len {
                    libc::munmap((start + len) as *mut libc::c_void, addr + reserve - start - len);
                }
                #[cfg(target_os = "linux")]
                libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            }
        }
        Some(Pages { ptr: NonNull::new(start as *mut u8)?, len })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Mapped bytes (the requested size rounded up to a page; never 0).
    pub fn mapped_bytes(&self) -> usize {
        self.len
    }

    /// MADV_FREE: the kernel may take the pages back (they then read as
    /// zeros); false where that is not supported.
    fn lazy_free(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: our whole mapping; after MADV_FREE its pages read either
            // as before or as zeros, and a cached buffer is handed out only
            // to callers that overwrite it or zero it first.
            unsafe { libc::madvise(self.ptr() as *mut libc::c_void, self.len, libc::MADV_FREE) == 0 }
        }
        #[cfg(not(target_os = "linux"))]
        {
            false
        }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: the mapping we created, unmapped once; nothing refers to
        // it after its owner is gone.
        unsafe { libc::munmap(self.ptr() as *mut libc::c_void, self.len) };
    }
}

/// A cached buffer, and whether its pages were handed back (MADV_FREE).
struct Entry {
    pages: Pages,
    released: bool,
}

static POOL: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// FLATSHARD_HOST_CACHE_BYTES, read and validated by `config` when a
/// communicator is created.
fn limit() -> usize {
    crate::config::host_cache_limit()
}

/// The newest cached bytes, up to a quarter of the limit, stay resident.
fn warm_limit(lim: usize) -> usize {
    lim / 4
}

/// Drop the oldest entries until the pool holds at most `lim` bytes, and
/// release (MADV_FREE) those beyond the newest `warm_limit(lim)` bytes.
fn trim(p: &mut Vec<Entry>, lim: usize) {
    let mut total: usize = p.iter().map(|e| e.pages.len).sum();
    while total > lim && !p.is_empty() {
        let old = p.remove(0);
        total -= old.pages.len;
    }
    let mut warm = 0;
    let mut i = p.len();
    while i > 0 {
        i -= 1;
        warm += p[i].pages.len;
        if warm > warm_limit(lim) && !p[i].released {
            if p[i].pages.lazy_free() {
                p[i].released = true;
            } else {
                p.remove(i);
            }
        }
    }
}

fn pool() -> std::sync::MutexGuard<'static, Vec<Entry>> {
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A cached buffer of `bytes` bytes (rounded up to a page), if there is one
/// (the newest first: it is the likeliest to be resident and in cache).
/// Its contents are arbitrary.
pub fn take(bytes: usize) -> Option<Pages> {
    if bytes < LARGE {
        return None;
    }
    let len = bytes.checked_next_multiple_of(PAGE)?;
    let mut p = pool();
    trim(&mut p, limit());
    p.iter().rposition(|e| e.pages.len == len).map(|i| p.remove(i).pages)
}

/// Keep `v` for reuse (oldest entries leave first), or unmap it.
pub fn give(v: Pages) {
    let lim = limit();
    if v.len < LARGE || v.len > lim {
        return;
    }
    let mut p = pool();
    p.push(Entry { pages: v, released: false });
    trim(&mut p, lim);
}
