//! Bulk copies for the host transports.
//!
//! glibc's `memcpy` switches to `rep movsb` for large copies; on the AMD
//! machines we measure on (Zen 3/4 EPYC under KVM) that was the single hottest
//! instruction of a shared-memory all_reduce, and a plain unrolled vector loop
//! made a 16 MiB all_reduce on 2 ranks 20–30% faster (A/B in the same minutes;
//! no difference at 256 MiB). `copy` is that loop; `copy_stream` is the same with non-temporal
//! stores, for destinations that are not read again soon (results larger than
//! the last-level cache).
//!
//! Both use the widest vectors `reduce::kernel_name` allows (AVX-512, AVX2),
//! and fall back to `ptr::copy_nonoverlapping` elsewhere.

use crate::reduce;

/// Copies shorter than this go straight to `copy_nonoverlapping`.
const VEC_MIN: usize = 4096;

/// Copy `len` bytes between non-overlapping regions.
///
/// # Safety
/// `src` valid for reads and `dst` for writes of `len` bytes; no overlap.
#[inline]
pub unsafe fn copy(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: copy_impl's contract is ours, which our caller upholds.
    unsafe { copy_impl(src, dst, len, false) }
}

/// As `copy`, with non-temporal stores (followed by a store fence).
///
/// # Safety
/// As `copy`.
#[inline]
pub unsafe fn copy_stream(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: copy_impl's contract is ours, which our caller upholds.
    unsafe { copy_impl(src, dst, len, true) }
}

/// Copy `len` bytes from `src` to both `dst` (regular stores: it is read again
/// soon, e.g. a shared-memory slot) and `out` (streaming stores if
/// `stream_out`), reading `src` once.
///
/// # Safety
/// `src` valid for reads, `dst` and `out` for writes of `len` bytes; no two overlap.
pub unsafe fn copy2(src: *const u8, dst: *mut u8, out: *mut u8, len: usize, stream_out: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if len >= VEC_MIN && reduce::flavour() == 2 {
            // SAFETY: our contract is copy2_avx512's; flavour 2 means avx512f was
            // detected on this CPU.
            return unsafe { x86::copy2_avx512(src, dst, out, len, stream_out) };
        }
    }
    // SAFETY: src readable, dst and out writable for len bytes, no two overlap (contract).
    unsafe {
        copy(src, dst, len);
        copy_impl(src, out, len, stream_out);
    }
}

/// # Safety
/// As `copy`.
#[inline]
unsafe fn copy_impl(src: *const u8, dst: *mut u8, len: usize, stream: bool) {
    if len == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if len >= VEC_MIN {
            match reduce::flavour() {
                // SAFETY: our contract; flavour 2 means avx512f was detected on this CPU.
                2 => return unsafe { x86::copy_avx512(src, dst, len, stream) },
                // SAFETY: our contract; flavour 1 means avx2 was detected on this CPU.
                1 => return unsafe { x86::copy_avx2(src, dst, len, stream) },
                _ => {}
            }
        }
    }
    let _ = stream;
    // SAFETY: src readable and dst writable for len bytes, no overlap (contract).
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Copy up to the next `align`-byte boundary of dst; returns the bytes done
    /// (at most `len`). If `align_offset` cannot say (it may return
    /// `usize::MAX`), that is all `len` bytes, so the callers store no vector.
    ///
    /// # Safety
    /// `src` readable and `dst` writable for `len` bytes; no overlap.
    #[inline(always)]
    unsafe fn head(src: *const u8, dst: *mut u8, len: usize, align: usize) -> usize {
        let h = dst.align_offset(align).min(len);
        // SAFETY: h <= len bytes of ranges valid for len (contract).
        unsafe { std::ptr::copy_nonoverlapping(src, dst, h) };
        h
    }

    /// One copy loop per vector width: `$v` vectors of `$w` bytes, four per
    /// step, then single vectors, then the tail; streaming or regular stores.
    /// The stores (regular and streaming) are the aligned forms.
    macro_rules! copy_loop {
        ($name:ident, $feature:literal, $v:ty, $w:literal, $load:ident, $store:ident, $stream:ident) => {
            /// # Safety
            /// As `copy` (`src` readable, `dst` writable for `len` bytes, no
            /// overlap), and the CPU has the target feature.
            #[target_feature(enable = $feature)]
            pub unsafe fn $name(src: *const u8, dst: *mut u8, len: usize, stream: bool) {
                // SAFETY: bounds: every vector access covers bytes [i, i + w) (or the
                // four vectors [i, i + 4w)) with the loop condition ensuring the end
                // <= len, and the tail copies the last len - i bytes, i <= len; the
                // ranges are valid and disjoint for len bytes (contract). Alignment:
                // `head` leaves dst + i on a w-byte boundary (or i = len, so no vector
                // runs) and i then grows by multiples of w, as the aligned and
                // streaming stores require; the loads are unaligned. Features: ours,
                // present per our contract (the dispatcher checked them).
                unsafe {
                    let put = |d: *mut $v, x: $v| if stream { $stream(d, x) } else { $store(d, x) };
                    let mut i = head(src, dst, len, $w);
                    while i + 4 * $w <= len {
                        let s = src.add(i) as *const $v;
                        let d = dst.add(i) as *mut $v;
                        let (a, b, c, e) = ($load(s), $load(s.add(1)), $load(s.add(2)), $load(s.add(3)));
                        put(d, a);
                        put(d.add(1), b);
                        put(d.add(2), c);
                        put(d.add(3), e);
                        i += 4 * $w;
                    }
                    while i + $w <= len {
                        put(dst.add(i) as *mut $v, $load(src.add(i) as *const $v));
                        i += $w;
                    }
                    std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
                }
                if stream {
                    _mm_sfence();
                }
            }
        };
    }

    copy_loop!(copy_avx512, "avx512f", __m512i, 64, _mm512_loadu_si512, _mm512_store_si512, _mm512_stream_si512);
    copy_loop!(copy_avx2, "avx2", __m256i, 32, _mm256_loadu_si256, _mm256_store_si256, _mm256_stream_si256);

    /// # Safety
    /// As `copy2` (`src` readable, `dst` and `out` writable for `len` bytes,
    /// no two overlap), and the CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn copy2_avx512(src: *const u8, dst: *mut u8, out: *mut u8, len: usize, stream: bool) {
        // SAFETY: bounds: the head copies i <= len bytes, each loop step touches
        // bytes [i, i + 128) with i + 128 <= len, and the tails the last len - i
        // bytes; all three ranges are valid and disjoint for len bytes (contract).
        // Alignment: out + i is 64-byte aligned after the head (or i = len, and no
        // vector runs; align_offset may return usize::MAX) and i grows by 128, as
        // the aligned and streaming stores to `out` require; the loads and the
        // stores to `dst` are unaligned. AVX-512 F: ours, present per our contract.
        unsafe {
            // align the streamed destination (streaming stores need 64 bytes)
            let mut i = out.align_offset(64).min(len);
            std::ptr::copy_nonoverlapping(src, dst, i);
            std::ptr::copy_nonoverlapping(src, out, i);
            while i + 128 <= len {
                let s = src.add(i) as *const __m512i;
                let (a, b) = (_mm512_loadu_si512(s), _mm512_loadu_si512(s.add(1)));
                let d = dst.add(i) as *mut __m512i;
                _mm512_storeu_si512(d, a);
                _mm512_storeu_si512(d.add(1), b);
                let o = out.add(i) as *mut __m512i;
                if stream {
                    _mm512_stream_si512(o, a);
                    _mm512_stream_si512(o.add(1), b);
                } else {
                    _mm512_store_si512(o, a);
                    _mm512_store_si512(o.add(1), b);
                }
                i += 128;
            }
            std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
            std::ptr::copy_nonoverlapping(src.add(i), out.add(i), len - i);
        }
        if stream {
            _mm_sfence();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type CopyFns = Vec<(&'static str, unsafe fn(*const u8, *mut u8, usize, bool))>;
    type Copy2Fns = Vec<(&'static str, unsafe fn(*const u8, *mut u8, *mut u8, usize, bool))>;

    /// Every implementation this CPU can run, called directly (the dispatch
    /// picks only one of them per process).
    fn impls() -> (CopyFns, Copy2Fns) {
        let mut one: CopyFns = vec![("dispatch", copy_impl)];
        let mut two: Copy2Fns = vec![("dispatch", copy2)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                one.push(("avx2", x86::copy_avx2));
            }
            if std::is_x86_feature_detected!("avx512f") {
                one.push(("avx512", x86::copy_avx512));
                two.push(("avx512", x86::copy2_avx512));
            }
        }
        (one, two)
    }

    #[test]
    fn copies_every_length_and_alignment() {
        let src: Vec<u8> = (0..20000u32).map(|i| (i * 7 + 3) as u8).collect();
        let (one, two) = impls();
        for &len in &[0usize, 1, 63, 4095, 4096, 4097, 5000, 8191, 12345] {
            for so in 0..3 {
                for d_off in [0usize, 1, 31, 33, 63] {
                    for stream in [false, true] {
                        for (name, f) in &one {
                            let mut dst = vec![0xAAu8; len + 128];
                            // SAFETY: both ranges inside their vectors.
                            unsafe { f(src.as_ptr().add(so), dst.as_mut_ptr().add(d_off), len, stream) };
                            let at = format!("{name}: len {len} src+{so} dst+{d_off} stream {stream}");
                            assert_eq!(&dst[d_off..d_off + len], &src[so..so + len], "{at}");
                            assert!(dst[..d_off].iter().chain(&dst[d_off + len..]).all(|b| *b == 0xAA), "wrote outside dst: {at}");
                        }
                        for (name, f) in &two {
                            let (mut d1, mut d2) = (vec![0x55u8; len + 128], vec![0x66u8; len + 128]);
                            let o = 63 - d_off;
                            // SAFETY: as above.
                            unsafe { f(src.as_ptr().add(so), d1.as_mut_ptr().add(d_off), d2.as_mut_ptr().add(o), len, stream) };
                            let at = format!("copy2 {name}: len {len} src+{so} dst+{d_off} out+{o} stream {stream}");
                            assert_eq!(&d1[d_off..d_off + len], &src[so..so + len], "dst: {at}");
                            assert_eq!(&d2[o..o + len], &src[so..so + len], "out: {at}");
                            assert!(d1[..d_off].iter().chain(&d1[d_off + len..]).all(|b| *b == 0x55), "wrote outside dst: {at}");
                            assert!(d2[..o].iter().chain(&d2[o + len..]).all(|b| *b == 0x66), "wrote outside out: {at}");
                        }
                    }
                }
            }
        }
    }
}
