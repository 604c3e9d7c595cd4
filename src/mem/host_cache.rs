//! A small per-process cache of large freed host buffers, so that the next
//! unshard of the same size reuses one instead of mapping fresh memory:
//! the kernel zeroes every freshly mapped page, and for a gathered full
//! parameter that zeroing took longer than the all_gather itself (profile of
//! a 2-rank 256 MiB unshard + reshard: 59% of the time in `clear_page`).
//!
//! A cached buffer is returned to the kernel with `MADV_FREE`: it stays
//! mapped, but the kernel may reclaim its pages at any time without I/O (they
//! then read as zeros), so resharding still gives the memory up under memory
//! pressure; until then it counts in the RSS. At most
//! `FLATSHARD_HOST_CACHE_BYTES` (default 512 MiB, 0 = off) are kept; only
//! buffers of at least 4 MiB are cached, and only `Buf::for_overwrite` reuses
//! them (never a buffer whose zeros are relied on).

use std::sync::Mutex;

const MIN_BYTES: usize = 4 << 20;
static POOL: Mutex<Vec<Vec<u64>>> = Mutex::new(Vec::new());

/// FLATSHARD_HOST_CACHE_BYTES, read and validated by `config` when a
/// communicator is created.
fn limit() -> usize {
    crate::config::host_cache_limit()
}

/// Drop the oldest entries until the pool holds at most `lim` bytes.
fn trim(p: &mut Vec<Vec<u64>>, lim: usize) {
    let mut total: usize = p.iter().map(|b| b.len() * 8).sum();
    while total > lim && !p.is_empty() {
        let old = p.remove(0);
        total -= old.len() * 8;
    }
}

fn pool() -> std::sync::MutexGuard<'static, Vec<Vec<u64>>> {
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A cached buffer of exactly `n` words, if there is one.
pub fn take(n: usize) -> Option<Vec<u64>> {
    if n * 8 < MIN_BYTES {
        return None;
    }
    let mut p = pool();
    trim(&mut p, limit());
    p.iter().position(|v| v.len() == n).map(|i| p.swap_remove(i))
}

/// Keep `v` for reuse (oldest entries leave first), or free it.
pub fn give(v: Vec<u64>) {
    let bytes = v.len() * 8;
    let lim = limit();
    if bytes < MIN_BYTES || bytes > lim || !lazy_free(&v) {
        return;
    }
    let mut p = pool();
    p.push(v);
    trim(&mut p, lim);
}

/// MADV_FREE the whole pages of `v`; false where that is not supported.
fn lazy_free(v: &[u64]) -> bool {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let addr = v.as_ptr() as usize;
        let start = addr.next_multiple_of(PAGE);
        let end = (addr + v.len() * 8) / PAGE * PAGE;
        if end <= start {
            return false;
        }
        // SAFETY: [start, end) lies inside the live allocation of v; after
        // MADV_FREE its pages read either as before or as zeros, both
        // valid u64 values, and the buffer is only handed out to callers
        // that overwrite it.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_FREE) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = v;
        false
    }
}
