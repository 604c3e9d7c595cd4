//! CUDA driver and NCCL, loaded at run time through cudarc (dlopen). Nothing
//! here needs a CUDA toolkit to build; without a driver every entry point
//! reports UNSUPPORTED with what is missing.

#[cfg(feature = "cuda")]
use crate::error::ErrorKind;
use crate::error::{Error, Result};
use std::sync::OnceLock;

#[cfg(feature = "cuda")]
use cudarc::driver::sys as cu;

/// Is a usable CUDA driver present (libcuda loads, cuInit succeeds, ≥ 1 device)?
pub fn driver() -> Result<()> {
    static STATE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATE.get_or_init(probe_driver).clone().map_err(Error::unsupported)
}

#[cfg(feature = "cuda")]
fn probe_driver() -> std::result::Result<(), String> {
    // SAFETY: plain driver calls with valid out-pointers.
    unsafe {
        if !cu::is_culib_present() {
            return Err("no CUDA driver: libcuda.so could not be loaded (install the NVIDIA driver, or use CPU tensors)".into());
        }
        let r = cu::cuInit(0);
        if r != cu::CUresult::CUDA_SUCCESS {
            return Err(format!("CUDA driver present but cuInit failed: {r:?}"));
        }
        let mut n = 0;
        let r = cu::cuDeviceGetCount(&mut n);
        if r != cu::CUresult::CUDA_SUCCESS || n == 0 {
            return Err(format!("CUDA driver present but no GPU is visible ({r:?}, {n} devices)"));
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn probe_driver() -> std::result::Result<(), String> {
    Err("this flatshard was built without the `cuda` feature".into())
}

/// Is NCCL loadable?
pub fn nccl() -> Result<()> {
    driver()?;
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only tries to dlopen the library.
        if unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Ok(());
        }
        Err(Error::unsupported("no NCCL: libnccl.so could not be loaded (install NCCL, e.g. the nvidia-nccl wheel, and put it on LD_LIBRARY_PATH)"))
    }
    #[cfg(not(feature = "cuda"))]
    Err(Error::unsupported("this flatshard was built without the `cuda` feature"))
}

#[cfg(feature = "cuda")]
pub(crate) fn check(r: cu::CUresult, what: &str) -> Result<()> {
    if r == cu::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut s: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a static string pointer.
    let name = unsafe {
        cu::cuGetErrorString(r, &mut s);
        if s.is_null() { format!("{r:?}") } else { std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned() }
    };
    let kind = if r == cu::CUresult::CUDA_ERROR_OUT_OF_MEMORY { ErrorKind::OutOfMemory } else { ErrorKind::Cuda };
    Err(Error::new(kind, format!("{what}: {name}")))
}

/// Make `device`'s primary context current on this thread.
#[cfg(feature = "cuda")]
pub(crate) fn set_device(device: i32) -> Result<()> {
    driver()?;
    // SAFETY: valid out-pointers; the primary context stays retained for the process.
    unsafe {
        let mut dev = 0;
        check(cu::cuDeviceGet(&mut dev, device), &format!("cuda_device {device}"))?;
        let mut ctx = std::ptr::null_mut();
        check(cu::cuDevicePrimaryCtxRetain(&mut ctx, dev), "cuDevicePrimaryCtxRetain")?;
        check(cu::cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    }
}

/// True if `p` is device memory (false without a driver or for host memory).
pub fn is_device_ptr(p: *const u8) -> bool {
    #[cfg(feature = "cuda")]
    {
        if p.is_null() || driver().is_err() {
            return false;
        }
        let mut ty: u32 = 0;
        // SAFETY: the attribute query only inspects the address.
        let r = unsafe {
            cu::cuPointerGetAttribute(
                &mut ty as *mut u32 as *mut std::ffi::c_void,
                cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                p as cu::CUdeviceptr,
            )
        };
        r == cu::CUresult::CUDA_SUCCESS && ty == cu::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = p;
        false
    }
}

/// Copy device → host (synchronous).
///
/// # Safety
/// `dst` valid for `len` host bytes, `src` for `len` device bytes.
pub unsafe fn copy_to_host(dst: *mut u8, src: *const u8, len: usize) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        check(cu::cuMemcpyDtoH_v2(dst as *mut std::ffi::c_void, src as cu::CUdeviceptr, len), "cuMemcpyDtoH")
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (dst, src, len);
        driver()
    }
}

/// Copy host → device (synchronous).
///
/// # Safety
/// `dst` valid for `len` device bytes, `src` for `len` host bytes.
pub unsafe fn copy_to_device(dst: *mut u8, src: *const u8, len: usize) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        check(cu::cuMemcpyHtoD_v2(dst as cu::CUdeviceptr, src as *const std::ffi::c_void, len), "cuMemcpyHtoD")
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (dst, src, len);
        driver()
    }
}
