//! f16 / bf16 <-> f32 / f64 conversions, the one place for them: the
//! reduction kernels (`reduce`), dtype conversion of buffers (`mem`, mixed
//! precision, checkpoints) and averaging all use these. Halves round to
//! nearest-even; NaNs stay quiet NaNs. (A leaf module: the kernels below it
//! and the memory layer above it both use it without a cycle.)

use crate::dtype::DType;

/// f32 -> bf16 bits, round to nearest-even; NaN stays a quiet NaN.
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    let rounding = 0x7FFF + ((b >> 16) & 1);
    (b.wrapping_add(rounding) >> 16) as u16
}

#[inline(always)]
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

// f16 <-> f32 in straight-line integer/float code (selects, no branches or
// calls), so the block loops vectorise in every flavour. Bit-identical to the
// `half` crate (and to F16C): NaNs are quieted and keep their top payload bits;
// f32 -> f16 rounds to nearest-even, overflows to infinity, and produces
// subnormals exactly. The tests below check every f16 and a sweep of f32s.

/// f16 bits -> f32, exact.
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let shifted_exp: u32 = 0x7c00 << 13;
    let mut o = (h & 0x7fff) << 13;
    let exp = shifted_exp & o;
    o = o.wrapping_add((127 - 15) << 23);
    let infnan = exp == shifted_exp;
    let small = exp == 0;
    // Inf/NaN: exponent all ones; NaN also gets the quiet bit.
    let nan_quiet = if infnan && (h & 0x3ff) != 0 { 0x0040_0000 } else { 0 };
    let o_inf = o.wrapping_add((128 - 16) << 23) | nan_quiet;
    // zero/subnormal: renormalise through a float subtraction
    let o_small = (f32::from_bits(o.wrapping_add(1 << 23)) - f32::from_bits(113 << 23)).to_bits();
    let o = if infnan {
        o_inf
    } else if small {
        o_small
    } else {
        o
    };
    f32::from_bits(o | ((h & 0x8000) << 16))
}

/// f32 -> f16 bits, round to nearest-even.
#[inline(always)]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    let sign = (u >> 16) & 0x8000;
    let a = u & 0x7fff_ffff;
    let f16max: u32 = (127 + 16) << 23;
    // NaN: quiet, top payload bits kept; Inf or overflow: infinity.
    let special = if a > 0x7f80_0000 { 0x7e00 | ((a & 0x007f_ffff) >> 13) } else { 0x7c00 };
    // subnormal or zero: let a float add do the rounding
    let denorm_magic: u32 = ((127 - 15) + (23 - 10) + 1) << 23;
    let sub = (f32::from_bits(a) + f32::from_bits(denorm_magic)).to_bits().wrapping_sub(denorm_magic);
    // normal: rebias and round to nearest-even by hand
    let mant_odd = (a >> 13) & 1;
    let norm = a.wrapping_add(((15u32.wrapping_sub(127)) << 23).wrapping_add(0xfff)).wrapping_add(mant_odd) >> 13;
    let o = if a >= f16max {
        special
    } else if a < (113 << 23) {
        sub
    } else {
        norm
    };
    (o | sign) as u16
}

/// Convert `src` (elements of `from`) into `dst` (elements of `to`); float dtypes.
pub fn convert_host(src: &[u8], from: DType, dst: &mut [u8], to: DType) {
    if from == to {
        dst.copy_from_slice(src);
        return;
    }
    let n = src.len() / from.size();
    debug_assert_eq!(dst.len(), n * to.size());
    match (from, to) {
        (DType::F32, DType::BF16) => {
            for (s, d) in src.chunks_exact(4).zip(dst.chunks_exact_mut(2)) {
                let x = f32::from_ne_bytes(s.try_into().expect("4"));
                d.copy_from_slice(&f32_to_bf16_bits(x).to_ne_bytes());
            }
        }
        (DType::BF16, DType::F32) => {
            for (s, d) in src.chunks_exact(2).zip(dst.chunks_exact_mut(4)) {
                let x = bf16_bits_to_f32(u16::from_ne_bytes(s.try_into().expect("2")));
                d.copy_from_slice(&x.to_ne_bytes());
            }
        }
        _ => {
            for i in 0..n {
                let x = read_f64(&src[i * from.size()..], from);
                write_f64(&mut dst[i * to.size()..], to, x);
            }
        }
    }
}

fn read_f64(b: &[u8], dt: DType) -> f64 {
    match dt {
        DType::F32 => f32::from_ne_bytes(b[..4].try_into().expect("4")) as f64,
        DType::F64 => f64::from_ne_bytes(b[..8].try_into().expect("8")),
        DType::F16 => half::f16::from_bits(u16::from_ne_bytes(b[..2].try_into().expect("2"))).to_f64(),
        DType::BF16 => half::bf16::from_bits(u16::from_ne_bytes(b[..2].try_into().expect("2"))).to_f64(),
        _ => unreachable!("flat params hold floating dtypes only"),
    }
}

/// f64 -> f32 rounding to odd: exact, or the neighbour toward zero with its
/// last bit set. Rounding that to nearest-even in a format with at least two
/// fewer significand bits (f16: 11, bf16: 8, against 24) equals one correct
/// rounding of the f64; `half`'s f64 conversions round twice (through f32).
fn f64_to_f32_odd(v: f64) -> f32 {
    if v.is_nan() {
        return v as f32;
    }
    let t = v as f32;
    if t as f64 == v {
        return t;
    }
    let mut bits = t.to_bits();
    if (t as f64).abs() > v.abs() {
        bits -= 1; // the neighbour toward zero (also turns ±inf into ±MAX)
    }
    f32::from_bits(bits | 1)
}

fn write_f64(b: &mut [u8], dt: DType, x: f64) {
    match dt {
        DType::F32 => b[..4].copy_from_slice(&(x as f32).to_ne_bytes()),
        DType::F64 => b[..8].copy_from_slice(&x.to_ne_bytes()),
        DType::F16 => b[..2].copy_from_slice(&f32_to_f16_bits(f64_to_f32_odd(x)).to_ne_bytes()),
        DType::BF16 => b[..2].copy_from_slice(&f32_to_bf16_bits(f64_to_f32_odd(x)).to_ne_bytes()),
        _ => unreachable!("flat params hold floating dtypes only"),
    }
}
