//! Launching the element-wise kernels of kernels.cu (committed as PTX, JIT
//! compiled by the driver once per device on first use).

use super::{check, set_device, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::driver::sys as cu;
use std::sync::Mutex;

static PTX: &str = concat!(include_str!("kernels.ptx"), "\0");

/// Loaded modules by device ordinal (the primary context of each device).
static MODULES: Mutex<Vec<(i32, usize)>> = Mutex::new(Vec::new());

fn module(device: i32) -> Result<cu::CUmodule> {
    let mut m = MODULES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, h)) = m.iter().find(|(d, _)| *d == device) {
        return Ok(*h as cu::CUmodule);
    }
    set_device(device)?;
    let mut h: cu::CUmodule = std::ptr::null_mut();
    // SAFETY: valid out-pointer and a NUL-terminated PTX image; the device's
    // context is current (set_device). The module lives for the process (the
    // primary context is retained and never destroyed by flatshard).
    let r = unsafe { cu::cuModuleLoadData(&mut h, PTX.as_ptr() as *const std::ffi::c_void) };
    check(r, "cuModuleLoadData (flatshard kernels, PTX ISA 8.1: needs a CUDA 12.1+ driver)")?;
    m.push((device, h as usize));
    Ok(h)
}

fn function(device: i32, name: &str) -> Result<cu::CUfunction> {
    let m = module(device)?;
    let cname = std::ffi::CString::new(name).map_err(|_| Error::internal("kernel name"))?;
    let mut f: cu::CUfunction = std::ptr::null_mut();
    // SAFETY: valid module and NUL-terminated name.
    check(unsafe { cu::cuModuleGetFunction(&mut f, m, cname.as_ptr()) }, &format!("cuModuleGetFunction {name}"))?;
    Ok(f)
}

/// Launch kernel `name(a, b, n)` (every kernel takes two pointers and a u64
/// count, in that order) with a grid-stride loop over `n` elements.
///
/// # Safety
/// `a` and `b` are device memory of `device` valid for `n` elements of the
/// kernel's dtypes, in the roles the kernel gives them (read, or read and
/// written), and stay so until the stream has passed the kernel.
unsafe fn launch(device: i32, name: &str, a: *mut u8, b: *mut u8, n: usize, stream: Stream) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    set_device(device)?;
    let f = function(device, name)?;
    let (mut a, mut b, mut n64) = (a as u64, b as u64, n as u64);
    let mut args: [*mut std::ffi::c_void; 3] =
        [&mut a as *mut u64 as *mut std::ffi::c_void, &mut b as *mut u64 as *mut std::ffi::c_void, &mut n64 as *mut u64 as *mut std::ffi::c_void];
    const THREADS: usize = 256;
    let blocks = n.div_ceil(THREADS).min(65_535) as u32;
    // SAFETY: `args` points at three live u64 locals matching the kernel's three
    // .u64 parameters (the driver copies them at launch); the pointers they carry
    // are valid for n elements (contract) and the kernel's grid-stride loop stays
    // below n; device's context is current (set_device).
    let r = unsafe { cu::cuLaunchKernel(f, blocks, 1, 1, THREADS as u32, 1, 1, 0, stream as cu::CUstream, args.as_mut_ptr(), std::ptr::null_mut()) };
    check(r, &format!("cuLaunchKernel {name}"))
}

fn short(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "",
    }
}

/// Is there a device kernel for this conversion? (f64 → f16/bf16 would round
/// twice through f32, so those run on the host.)
fn has_convert(from: DType, to: DType) -> bool {
    let double_rounding = from == DType::F64 && matches!(to, DType::F16 | DType::BF16);
    from != to && !short(from).is_empty() && !short(to).is_empty() && !double_rounding
}

/// `dst[i] = (to) src[i]` for `n` elements on the device, in order on
/// `stream`. Ok(false): no kernel for this pair (f64 → f16/bf16 would round
/// twice through f32), the caller converts on the host.
///
/// # Safety
/// Device pointers valid for `n` elements of their dtypes.
pub unsafe fn launch_convert(src: *const u8, from: DType, dst: *mut u8, to: DType, n: usize, device: i32, stream: Stream) -> Result<bool> {
    if !has_convert(from, to) {
        return Ok(false);
    }
    // SAFETY: fs_convert_* read n elements at src and write n at dst, which are
    // valid for that (contract); src is only read, so the cast to *mut is harmless.
    unsafe { launch(device, &format!("fs_convert_{}_{}", short(from), short(to)), src as *mut u8, dst, n, stream)? };
    Ok(true)
}

/// `dst[i] += src[i]` (f16/bf16 in f32, rounded to nearest-even).
///
/// # Safety
/// Device pointers valid for `n` elements of `dt`.
pub unsafe fn launch_add(dst: *mut u8, src: *const u8, dt: DType, n: usize, device: i32, stream: Stream) -> Result<()> {
    if short(dt).is_empty() {
        return Err(Error::invalid_arg(format!("{}: flat-param gradients are floating point", dt.name())));
    }
    // SAFETY: fs_add_* read and write n elements at dst and read n at src, which
    // are valid for that (contract); src is only read.
    unsafe { launch(device, &format!("fs_add_{}", short(dt)), dst, src as *mut u8, n, stream) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed PTX was generated from the current kernels.cu
    /// (scripts/gen-ptx.sh records its sha256).
    #[test]
    fn committed_ptx_is_generated_from_kernels_cu() {
        use sha2::Digest;
        let src = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/src/cuda/kernels.cu")).unwrap();
        let hex: String = sha2::Sha256::digest(&src).iter().map(|b| format!("{b:02x}")).collect();
        assert!(PTX.contains(&format!("// kernels.cu sha256: {hex}")), "src/cuda/kernels.ptx is stale: run scripts/gen-ptx.sh");
        // PTX ISA 8.1 = CUDA 12.1 drivers and newer; a newer ISA would not load there.
        assert!(PTX.contains("\n.version 8.1\n") && PTX.contains("\n.target sm_70\n"), "PTX ISA/target changed: update the driver note in module()");
    }

    /// Every kernel the launchers can ask for exists in the PTX.
    #[test]
    fn every_launchable_kernel_is_in_the_ptx() {
        let floats = [DType::F32, DType::F64, DType::F16, DType::BF16];
        let mut n = 0;
        for from in floats {
            assert!(PTX.contains(&format!(".entry fs_add_{}(", short(from))), "fs_add_{}", short(from));
            for to in floats {
                let launched = has_convert(from, to);
                let name = format!(".entry fs_convert_{}_{}(", short(from), short(to));
                assert_eq!(PTX.contains(&name), launched, "{name}");
                n += launched as usize;
            }
        }
        assert_eq!(n, 10);
    }
}
