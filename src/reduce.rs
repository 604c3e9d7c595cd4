//! Reduction kernels shared by every host transport.
//!
//! One fused n-way pass: `dst = src[0] op src[1] op ... op src[n-1]`, element by
//! element, reading each input once. Work is done in blocks of `BLOCK` elements
//! held in an f32/f64/i64 accumulator on the stack, so the inner loops are
//! straight-line and the compiler vectorises them. f16/bf16 are widened to f32,
//! accumulated across all inputs and rounded to nearest-even once per call.
//! The same generic body is compiled twice: portable, and with AVX2+FMA+F16C
//! enabled, picked at run time.
//!
//! Inputs are combined in the order given, so every rank that reduces the same
//! inputs in the same order gets bit-identical results.

pub use crate::convert::{bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits};
use crate::dtype::{DType, ReduceOp};

const BLOCK: usize = 512;

/// Element types as the kernels see them: load widened, store narrowed.
trait Elem: Copy {
    type Acc: Copy + Default;
    /// Element `i` of the array at `p`, widened.
    ///
    /// # Safety
    /// The `size_of::<Self>()` bytes of element `i` (from `p + i * size`) are
    /// readable. No alignment is needed.
    unsafe fn load(p: *const u8, i: usize) -> Self::Acc;
    /// Write `v`, narrowed, as element `i` of the array at `p`.
    ///
    /// # Safety
    /// The bytes of element `i` are writable. No alignment is needed.
    unsafe fn store(p: *mut u8, i: usize, v: Self::Acc);
    fn sum(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    fn min(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    fn max(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    fn div(a: Self::Acc, n: f64) -> Self::Acc;
}

macro_rules! plain_elem {
    ($t:ty, $acc:ty, $sum:expr, $div:expr) => {
        impl Elem for $t {
            type Acc = $acc;
            #[inline(always)]
            unsafe fn load(p: *const u8, i: usize) -> $acc {
                // SAFETY: element i is readable (`load`'s contract), so the offset stays
                // inside the caller's array; read_unaligned needs no alignment.
                unsafe { (p as *const $t).add(i).read_unaligned() as $acc }
            }
            #[inline(always)]
            unsafe fn store(p: *mut u8, i: usize, v: $acc) {
                // SAFETY: element i is writable (`store`'s contract); write_unaligned
                // needs no alignment.
                unsafe { (p as *mut $t).add(i).write_unaligned(v as $t) }
            }
            #[inline(always)]
            fn sum(a: $acc, b: $acc) -> $acc {
                $sum(a, b)
            }
            #[inline(always)]
            fn min(a: $acc, b: $acc) -> $acc {
                if b < a {
                    b
                } else {
                    a
                }
            }
            #[inline(always)]
            fn max(a: $acc, b: $acc) -> $acc {
                if b > a {
                    b
                } else {
                    a
                }
            }
            #[inline(always)]
            fn div(a: $acc, n: f64) -> $acc {
                $div(a, n)
            }
        }
    };
}

plain_elem!(f32, f32, |a: f32, b: f32| a + b, |a: f32, n: f64| a / n as f32);
plain_elem!(f64, f64, |a: f64, b: f64| a + b, |a: f64, n: f64| a / n);
plain_elem!(i32, i32, |a: i32, b: i32| a.wrapping_add(b), |a: i32, n: f64| (a as f64 / n) as i32);
plain_elem!(i64, i64, |a: i64, b: i64| a.wrapping_add(b), |a: i64, n: f64| (a as f64 / n) as i64);
plain_elem!(u8, u8, |a: u8, b: u8| a.wrapping_add(b), |a: u8, n: f64| (a as f64 / n) as u8);

#[derive(Clone, Copy)]
struct Bf16;
#[derive(Clone, Copy)]
struct F16;

macro_rules! f32_ops {
    () => {
        #[inline(always)]
        fn sum(a: f32, b: f32) -> f32 {
            a + b
        }
        #[inline(always)]
        fn min(a: f32, b: f32) -> f32 {
            if b < a {
                b
            } else {
                a
            }
        }
        #[inline(always)]
        fn max(a: f32, b: f32) -> f32 {
            if b > a {
                b
            } else {
                a
            }
        }
        #[inline(always)]
        fn div(a: f32, n: f64) -> f32 {
            a / n as f32
        }
    };
}

impl Elem for Bf16 {
    type Acc = f32;
    #[inline(always)]
    unsafe fn load(p: *const u8, i: usize) -> f32 {
        // SAFETY: the 2 bytes of element i are readable (`load`'s contract); unaligned read.
        bf16_bits_to_f32(unsafe { (p as *const u16).add(i).read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store(p: *mut u8, i: usize, v: f32) {
        // SAFETY: the 2 bytes of element i are writable (`store`'s contract); unaligned write.
        unsafe { (p as *mut u16).add(i).write_unaligned(f32_to_bf16_bits(v)) }
    }
    f32_ops!();
}

impl Elem for F16 {
    type Acc = f32;
    #[inline(always)]
    unsafe fn load(p: *const u8, i: usize) -> f32 {
        // SAFETY: the 2 bytes of element i are readable (`load`'s contract); unaligned read.
        f16_bits_to_f32(unsafe { (p as *const u16).add(i).read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store(p: *mut u8, i: usize, v: f32) {
        // SAFETY: the 2 bytes of element i are writable (`store`'s contract); unaligned write.
        unsafe { (p as *mut u16).add(i).write_unaligned(f32_to_f16_bits(v)) }
    }
    f32_ops!();
}

/// The generic fused body. `scale_by`: divide the result by this (AVG), or 0 = no.
/// The operator is matched once here so each loop gets a statically known,
/// inlined combine function (a function pointer would cost a call per element).
///
/// # Safety
/// The kernel contract (as `reduce_n_raw`, for element type `E`): `dst` is
/// writable and every pointer in `srcs` readable for `n` elements of `E`, and
/// `dst` either equals a source or overlaps none.
#[inline(always)]
unsafe fn reduce_body<E: Elem>(dst: *mut u8, srcs: &[*const u8], n: usize, op: ReduceOp, scale_by: f64) {
    // SAFETY: reduce_loop has this function's contract, which our caller upholds.
    unsafe {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => reduce_loop::<E, _>(dst, srcs, n, scale_by, E::sum),
            ReduceOp::Min => reduce_loop::<E, _>(dst, srcs, n, scale_by, E::min),
            ReduceOp::Max => reduce_loop::<E, _>(dst, srcs, n, scale_by, E::max),
        }
    }
}

/// # Safety
/// The kernel contract (see `reduce_body`).
#[inline(always)]
unsafe fn reduce_loop<E: Elem, F: Fn(E::Acc, E::Acc) -> E::Acc>(dst: *mut u8, srcs: &[*const u8], n: usize, scale_by: f64, f: F) {
    // Two instantiations, so the scale test is not a per-element branch
    // (which kept the loops from being vectorised).
    if scale_by != 0.0 {
        // SAFETY: reduce_passes has this function's contract, which our caller upholds.
        unsafe { reduce_passes::<E, F, _>(dst, srcs, n, f, |a| E::div(a, scale_by)) }
    } else {
        // SAFETY: as above.
        unsafe { reduce_passes::<E, F, _>(dst, srcs, n, f, |a| a) }
    }
}

/// `dst[j] = val(j)` for j in 0..n, computed in groups of `G` into a local
/// array before they are stored. Written as one loop, a `dst` that equals a
/// source makes the compiler's overlap test before the vector loop fail, so
/// in-place passes ran scalar. (Only for the one-source and in-place cases:
/// for separate buffers the plain loop measured faster.)
///
/// `val` is called with `j < n` only (callers rely on this: their closures
/// read the sources at `j`).
///
/// # Safety
/// `dst` is writable for `n` elements of `E`.
#[inline(always)]
unsafe fn store_grouped<E: Elem>(dst: *mut u8, n: usize, val: impl Fn(usize) -> E::Acc) {
    const G: usize = 16;
    let mut j = 0;
    while j + G <= n {
        let mut t = [E::Acc::default(); G];
        for (l, v) in t.iter_mut().enumerate() {
            *v = val(j + l);
        }
        for (l, v) in t.iter().enumerate() {
            // SAFETY: j + l < j + G <= n, and dst is writable for n elements (contract).
            unsafe { E::store(dst, j + l, *v) };
        }
        j += G;
    }
    for j in j..n {
        // SAFETY: j < n, and dst is writable for n elements (contract).
        unsafe { E::store(dst, j, val(j)) };
    }
}

/// Sources are combined left to right (as before: results are unchanged).
/// Blocks of `BLOCK` elements: the first pass combines the first two sources,
/// middle passes fold one source each into `acc`, and the last pass combines
/// the last source and stores, so every pass does arithmetic (a pass that only
/// loads or only stores is turned into a `memcpy` call by the compiler, which
/// was most of the time of a 2-source reduction) and 2 sources are one pass.
/// The block loops index `acc` and the sources by the same `j` on purpose:
/// that is the form the compiler vectorises (checked in the disassembly).
///
/// # Safety
/// The kernel contract (see `reduce_body`).
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn reduce_passes<E: Elem, F: Fn(E::Acc, E::Acc) -> E::Acc, G: Fn(E::Acc) -> E::Acc>(dst: *mut u8, srcs: &[*const u8], n: usize, f: F, fin: G) {
    let k = srcs.len();
    if k == 1 {
        let s0 = srcs[0];
        // SAFETY: dst is writable and s0 readable for n elements (contract), and
        // store_grouped calls the closure with j < n only.
        unsafe { store_grouped::<E>(dst, n, |j| fin(E::load(s0, j))) };
        return;
    }
    let (s0, s1, last) = (srcs[0], srcs[1], srcs[k - 1]);
    if k == 2 {
        if std::ptr::eq(dst, s0) || std::ptr::eq(dst, s1) {
            // in place (the TCP ring's reduce): see store_grouped
            // SAFETY: as for k == 1, with both sources readable for n elements.
            unsafe { store_grouped::<E>(dst, n, |j| fin(f(E::load(s0, j), E::load(s1, j)))) };
        } else {
            for j in 0..n {
                // SAFETY: j < n; dst writable, s0 and s1 readable for n elements (contract).
                unsafe { E::store(dst, j, fin(f(E::load(s0, j), E::load(s1, j)))) };
            }
        }
        return;
    }
    let mut acc = [E::Acc::default(); BLOCK];
    let mut start = 0;
    while start < n {
        let len = BLOCK.min(n - start);
        // SAFETY: in all three loops every index is start + j with
        // j < len <= n - start, i.e. < n; dst is writable and every source
        // readable for n elements (contract). A source equal to dst is read at
        // each index before the last loop writes that index.
        unsafe {
            for j in 0..len {
                acc[j] = f(E::load(s0, start + j), E::load(s1, start + j));
            }
            for s in &srcs[2..k - 1] {
                let s = *s;
                for j in 0..len {
                    acc[j] = f(acc[j], E::load(s, start + j));
                }
            }
            for j in 0..len {
                E::store(dst, start + j, fin(f(acc[j], E::load(last, start + j))));
            }
        }
        start += len;
    }
}

/// # Safety
/// The kernel contract for `dt` (see `reduce_n_raw`).
#[inline(always)]
unsafe fn dispatch_body(dst: *mut u8, srcs: &[*const u8], n: usize, dt: DType, op: ReduceOp, scale_by: f64) {
    // SAFETY: each arm's element type is the one `dt` names, so our caller's
    // contract for `dt` is reduce_body's contract for that type.
    unsafe {
        match dt {
            DType::F32 => reduce_body::<f32>(dst, srcs, n, op, scale_by),
            DType::F64 => reduce_body::<f64>(dst, srcs, n, op, scale_by),
            DType::F16 => reduce_body::<F16>(dst, srcs, n, op, scale_by),
            DType::BF16 => reduce_body::<Bf16>(dst, srcs, n, op, scale_by),
            DType::I32 => reduce_body::<i32>(dst, srcs, n, op, scale_by),
            DType::I64 => reduce_body::<i64>(dst, srcs, n, op, scale_by),
            DType::U8 => reduce_body::<u8>(dst, srcs, n, op, scale_by),
        }
    }
}

/// # Safety
/// The kernel contract for `dt` (see `reduce_n_raw`), and the CPU has AVX2,
/// FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dispatch_avx2(dst: *mut u8, srcs: &[*const u8], n: usize, dt: DType, op: ReduceOp, scale_by: f64) {
    if dt == DType::F16 {
        // SAFETY: our contract, and the features reduce_f16_f16c needs are ours.
        return unsafe { reduce_f16_f16c(dst, srcs, n, op, scale_by) };
    }
    // SAFETY: our contract is dispatch_body's.
    unsafe { dispatch_body(dst, srcs, n, dt, op, scale_by) }
}

/// f16 with the F16C conversion instructions, 8 lanes at a time (4x the
/// bit-twiddling conversion). Same operations in the same order as the
/// generic body: `min_ps(new, acc)` is `if new < acc { new } else { acc }`.
///
/// # Safety
/// The kernel contract for f16 (see `reduce_n_raw`), and the CPU has AVX2,
/// FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn reduce_f16_f16c(dst: *mut u8, srcs: &[*const u8], n: usize, op: ReduceOp, scale_by: f64) {
    use std::arch::x86_64::*;
    let div = _mm256_set1_ps(scale_by as f32);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, so the 8 f16 (16 bytes) from element i lie inside
        // dst and every source, which are valid for n f16 (contract); loadu and
        // storeu need no alignment. A source equal to dst is read before the
        // store. AVX2/F16C: enabled on this function, present per our contract.
        unsafe {
            let load = |p: *const u8| _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i) as *const __m128i));
            let mut acc = load(srcs[0]);
            for s in &srcs[1..] {
                let v = load(*s);
                acc = match op {
                    ReduceOp::Sum | ReduceOp::Avg => _mm256_add_ps(acc, v),
                    ReduceOp::Min => _mm256_min_ps(v, acc),
                    ReduceOp::Max => _mm256_max_ps(v, acc),
                };
            }
            if scale_by != 0.0 {
                acc = _mm256_div_ps(acc, div);
            }
            _mm_storeu_si128(dst.add(2 * i) as *mut __m128i, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(acc));
        }
        i += 8;
    }
    if i < n {
        // SAFETY: i < n, so element i of each array is in bounds and the arrays
        // from there are valid for the n - i elements passed on (reduce_body's
        // contract, from ours).
        unsafe {
            let rest: Vec<*const u8> = srcs.iter().map(|s| s.add(2 * i)).collect();
            reduce_body::<F16>(dst.add(2 * i), &rest, n - i, op, scale_by);
        }
    }
}

/// AVX-512 (F/BW/VL) build of the same body: twice the lanes per
/// instruction. Identical results: the same operations in the same order,
/// element by element (Rust never contracts a*b+c into an FMA by itself).
///
/// # Safety
/// The kernel contract for `dt` (see `reduce_n_raw`), and the CPU has
/// AVX-512 F/BW/VL, AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn dispatch_avx512(dst: *mut u8, srcs: &[*const u8], n: usize, dt: DType, op: ReduceOp, scale_by: f64) {
    if dt == DType::F16 {
        // SAFETY: our contract; reduce_f16_f16c needs a subset of our features.
        return unsafe { reduce_f16_f16c(dst, srcs, n, op, scale_by) };
    }
    // SAFETY: our contract is dispatch_body's.
    unsafe { dispatch_body(dst, srcs, n, dt, op, scale_by) }
}

/// # Safety
/// The kernel contract for `dt` (see `reduce_n_raw`).
unsafe fn dispatch_portable(dst: *mut u8, srcs: &[*const u8], n: usize, dt: DType, op: ReduceOp, scale_by: f64) {
    // SAFETY: our contract is dispatch_body's.
    unsafe { dispatch_body(dst, srcs, n, dt, op, scale_by) }
}

/// Which kernel flavour this CPU runs ("avx512", "avx2" or "portable").
/// FLATSHARD_KERNEL=avx2|portable caps it (for comparisons).
pub fn kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        let cap = std::env::var("FLATSHARD_KERNEL").unwrap_or_default();
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c");
        if avx2
            && cap != "avx2"
            && cap != "portable"
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
        {
            return "avx512";
        }
        if cap == "portable" {
            return "portable";
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c") {
            return "avx2";
        }
    }
    "portable"
}

/// 0 portable, 1 avx2, 2 avx512 (decided once).
pub(crate) fn flavour() -> u8 {
    use std::sync::OnceLock;
    static K: OnceLock<u8> = OnceLock::new();
    *K.get_or_init(|| match kernel_name() {
        "avx512" => 2,
        "avx2" => 1,
        _ => 0,
    })
}

/// Raw fused reduction. `dst` may equal one of `srcs` (each block is read
/// completely before it is written), but must not partially overlap any.
///
/// # Safety
/// Every pointer must be valid for `n` elements of `dt` (`dst` for writes,
/// the sources for reads; no alignment needed), `dst` must equal or not
/// overlap each source, and no other thread may write any of them during the
/// call. (The "kernel contract" the functions above refer to.)
pub unsafe fn reduce_n_raw(dst: *mut u8, srcs: &[*const u8], n: usize, dt: DType, op: ReduceOp, scale_by: f64) {
    if n == 0 || srcs.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        match flavour() {
            // SAFETY: our contract; flavour 2 means kernel_name detected avx512f/bw/vl,
            // avx2, fma and f16c on this CPU (exactly dispatch_avx512's features).
            2 => return unsafe { dispatch_avx512(dst, srcs, n, dt, op, scale_by) },
            // SAFETY: our contract; flavour 1 means avx2, fma and f16c were detected.
            1 => return unsafe { dispatch_avx2(dst, srcs, n, dt, op, scale_by) },
            _ => {}
        }
    }
    // SAFETY: our contract is dispatch_portable's.
    unsafe { dispatch_portable(dst, srcs, n, dt, op, scale_by) }
}

/// `dst = srcs[0] op ... op srcs[k-1]` (AVG is a SUM here; use `scale` after).
/// Panics if a length differs (a bug in the caller, not caller input).
pub fn reduce_n(dst: &mut [u8], srcs: &[&[u8]], dt: DType, op: ReduceOp) {
    let n = dst.len() / dt.size();
    assert!(srcs.iter().all(|s| s.len() >= n * dt.size()), "reduce_n: short input");
    let ptrs: Vec<*const u8> = srcs.iter().map(|s| s.as_ptr()).collect();
    // SAFETY: dst holds n elements and every source at least n (asserted); the
    // borrow checker keeps the &mut dst apart from the & sources, and they stay
    // borrowed for the call.
    unsafe { reduce_n_raw(dst.as_mut_ptr(), &ptrs, n, dt, op, 0.0) }
}

/// `dst = dst op src`.
pub fn reduce_into(dst: &mut [u8], src: &[u8], dt: DType, op: ReduceOp) {
    let n = dst.len() / dt.size();
    assert!(src.len() >= n * dt.size(), "reduce_into: short input");
    let d = dst.as_mut_ptr();
    // SAFETY: dst holds n elements and src at least n (asserted); the first
    // source is dst itself (allowed) and src, a shared borrow, cannot overlap it.
    unsafe { reduce_n_raw(d, &[d as *const u8, src.as_ptr()], n, dt, op, 0.0) }
}

/// `buf[i] = buf[i] / divisor` (AVG = SUM / size). f16/bf16 divide in f32.
pub fn scale(buf: &mut [u8], dt: DType, divisor: f64) {
    let n = buf.len() / dt.size();
    let d = buf.as_mut_ptr();
    // SAFETY: buf holds n elements; the one source is the destination itself (allowed).
    unsafe { reduce_n_raw(d, &[d as *const u8], n, dt, ReduceOp::Sum, divisor) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_ne_bytes()).collect()
    }
    fn to_f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4).map(|c| f32::from_ne_bytes(c.try_into().unwrap())).collect()
    }

    #[test]
    fn sum_min_max_f32_across_blocks() {
        let n = BLOCK * 2 + 7;
        let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..n).map(|i| (n - i) as f32 * 0.5).collect();
        for op in [ReduceOp::Sum, ReduceOp::Min, ReduceOp::Max] {
            let mut d = f32s(&a);
            reduce_into(&mut d, &f32s(&b), DType::F32, op);
            let got = to_f32s(&d);
            for i in 0..n {
                let want = match op {
                    ReduceOp::Sum => a[i] + b[i],
                    ReduceOp::Min => a[i].min(b[i]),
                    _ => a[i].max(b[i]),
                };
                assert_eq!(got[i], want, "op {op:?} at {i}");
            }
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1.0 + 2^-8 is exactly between two bf16 values (1.0 and 1.0078125): ties to even -> 1.0
        assert_eq!(f32_to_bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        // 1.0078125 + 2^-8 ties between 1.0078125 (odd mantissa) and 1.015625 -> 1.015625
        assert_eq!(f32_to_bf16_bits(1.0078125 + 1.0 / 256.0), 0x3F82);
        assert!(bf16_bits_to_f32(f32_to_bf16_bits(f32::NAN)).is_nan());
    }

    #[test]
    fn f16_accumulates_in_f32() {
        // 2048 + 1 + 1 in f16 pairwise would stay 2048 (spacing 2); in f32 it is 2050.
        let h = |x: f32| half::f16::from_f32(x).to_bits().to_ne_bytes();
        let a = h(2048.0);
        let b = h(1.0);
        let mut d = [0u8; 2];
        reduce_n(&mut d, &[&a, &b, &b], DType::F16, ReduceOp::Sum);
        assert_eq!(half::f16::from_bits(u16::from_ne_bytes(d)).to_f32(), 2050.0);
    }

    #[test]
    fn integers_and_scale() {
        let a: Vec<u8> = [5i64, -3].iter().flat_map(|x| x.to_ne_bytes()).collect();
        let b: Vec<u8> = [7i64, 10].iter().flat_map(|x| x.to_ne_bytes()).collect();
        let mut d = a.clone();
        reduce_into(&mut d, &b, DType::I64, ReduceOp::Max);
        let got: Vec<i64> = d.chunks_exact(8).map(|c| i64::from_ne_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, vec![7, 10]);
        let mut f = f32s(&[3.0, 9.0]);
        scale(&mut f, DType::F32, 3.0);
        assert_eq!(to_f32s(&f), vec![1.0, 3.0]);
    }

    #[test]
    fn every_flavour_gives_identical_bits() {
        // pseudo-random bit patterns (NaNs included) in every dtype, 3 inputs
        let n = BLOCK * 3 + 5;
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rnd = |len: usize| -> Vec<u8> {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect()
        };
        // NaN payloads may differ (IEEE leaves which NaN an op returns open,
        // and LLVM may commute an add); any other bit difference is a bug.
        let same = |dt: DType, a: &[u8], b: &[u8]| -> bool {
            let es = dt.size();
            a.chunks_exact(es).zip(b.chunks_exact(es)).all(|(x, y)| {
                let nan = |v: &[u8]| match dt {
                    DType::F32 => f32::from_ne_bytes(v.try_into().unwrap()).is_nan(),
                    DType::F64 => f64::from_ne_bytes(v.try_into().unwrap()).is_nan(),
                    DType::F16 => f16_bits_to_f32(u16::from_ne_bytes(v.try_into().unwrap())).is_nan(),
                    DType::BF16 => bf16_bits_to_f32(u16::from_ne_bytes(v.try_into().unwrap())).is_nan(),
                    _ => false,
                };
                x == y || (nan(x) && nan(y))
            })
        };
        for dt in [DType::F32, DType::F64, DType::F16, DType::BF16, DType::I32, DType::I64, DType::U8] {
            let ins: Vec<Vec<u8>> = (0..3).map(|_| rnd(n * dt.size())).collect();
            let ptrs: Vec<*const u8> = ins.iter().map(|v| v.as_ptr()).collect();
            for op in [ReduceOp::Sum, ReduceOp::Min, ReduceOp::Max] {
                let mut want = vec![0u8; n * dt.size()];
                // SAFETY: want and every input hold n elements of dt; separate vectors.
                unsafe { dispatch_portable(want.as_mut_ptr(), &ptrs, n, dt, op, 0.0) };
                let mut got = vec![0u8; n * dt.size()];
                // SAFETY: as above.
                unsafe { reduce_n_raw(got.as_mut_ptr(), &ptrs, n, dt, op, 0.0) };
                assert!(same(dt, &got, &want), "{} {op:?}: {} kernel differs from portable", dt.name(), kernel_name());
                #[cfg(target_arch = "x86_64")]
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c") {
                    // SAFETY: as above, and the features were detected just now.
                    unsafe { dispatch_avx2(got.as_mut_ptr(), &ptrs, n, dt, op, 0.0) };
                    assert!(same(dt, &got, &want), "{} {op:?}: avx2 kernel differs from portable", dt.name());
                }
            }
        }
    }

    #[test]
    fn f16_conversions_match_half_bit_for_bit() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32().to_bits();
            assert_eq!(f16_bits_to_f32(h).to_bits(), want, "f16 {h:#06x}");
        }
        // every f32 exponent, mantissas around the f16 rounding points, NaNs, both signs
        let check = |u: u32| {
            let x = f32::from_bits(u);
            assert_eq!(f32_to_f16_bits(x), half::f16::from_f32(x).to_bits(), "f32 {u:#010x} ({x:e})");
        };
        for e in 0..=255u32 {
            for m in [0u32, 1, 0xfff, 0x1000, 0x1001, 0x1fff, 0x2000, 0x3000, 0x7fffff, 0x400000, 0x401000, 0x7fe000, 0x7ff000, 0x7fefff] {
                for s in [0u32, 1] {
                    check((s << 31) | (e << 23) | m);
                }
            }
        }
        let mut x: u32 = 12345;
        for _ in 0..2_000_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            check(x);
        }
    }
}
