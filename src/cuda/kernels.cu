// Element-wise kernels for flat parameters on CUDA devices: dtype conversion
// (mixed precision) and gradient accumulation. Compiled to PTX by
// scripts/gen-ptx.sh (NVRTC, compute_70) and committed as kernels.ptx, which
// the driver JIT-compiles at run time: no CUDA toolkit at build time.
//
// Every kernel gives the same bits as the host path (src/reduce.rs,
// src/flat_param/mod.rs `convert`): f16/bf16 are widened to f32 exactly and
// rounded to nearest-even; conversions that would round twice on the device
// (f64 -> f16/bf16) are not here and run on the host instead.
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float x) {
    u32 b = __float_as_uint(x);
    if (x != x) return (u16)((b >> 16) | 0x0040u);
    u32 rounding = 0x7FFFu + ((b >> 16) & 1u);
    return (u16)((b + rounding) >> 16);
}
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

#define GRID_STRIDE(n) for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)blockDim.x * gridDim.x)

#define CONVERT(name, S, D, expr) \
    extern "C" __global__ void name(const S *src, D *dst, u64 n) { GRID_STRIDE(n) { S x = src[i]; dst[i] = (expr); } }

CONVERT(fs_convert_f32_bf16, float, u16, f32_to_bf16(x))
CONVERT(fs_convert_bf16_f32, u16, float, bf16_to_f32(x))
CONVERT(fs_convert_f32_f16, float, u16, f32_to_f16(x))
CONVERT(fs_convert_f16_f32, u16, float, f16_to_f32(x))
CONVERT(fs_convert_f32_f64, float, double, (double)x)
CONVERT(fs_convert_f64_f32, double, float, (float)x)
CONVERT(fs_convert_f16_bf16, u16, u16, f32_to_bf16(f16_to_f32(x)))
CONVERT(fs_convert_bf16_f16, u16, u16, f32_to_f16(bf16_to_f32(x)))
CONVERT(fs_convert_f16_f64, u16, double, (double)f16_to_f32(x))
CONVERT(fs_convert_bf16_f64, u16, double, (double)bf16_to_f32(x))

// dst[i] += src[i]
#define ADD(name, T, expr) \
    extern "C" __global__ void name(T *dst, const T *src, u64 n) { GRID_STRIDE(n) { T a = dst[i]; T b = src[i]; dst[i] = (expr); } }

ADD(fs_add_f32, float, a + b)
ADD(fs_add_f64, double, a + b)
ADD(fs_add_f16, u16, f32_to_f16(f16_to_f32(a) + f16_to_f32(b)))
ADD(fs_add_bf16, u16, f32_to_bf16(bf16_to_f32(a) + bf16_to_f32(b)))
