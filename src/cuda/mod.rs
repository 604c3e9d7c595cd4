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

/// How many CUDA devices are visible (UNSUPPORTED without a driver).
pub fn device_count() -> Result<i32> {
    driver()?;
    #[cfg(feature = "cuda")]
    {
        let mut n = 0;
        // SAFETY: valid out-pointer.
        check(unsafe { cu::cuDeviceGetCount(&mut n) }, "cuDeviceGetCount")?;
        Ok(n)
    }
    #[cfg(not(feature = "cuda"))]
    Ok(0)
}

/// Is NCCL loadable (see `nccl_sys` for where it is looked for)?
pub fn nccl() -> Result<()> {
    driver()?;
    #[cfg(feature = "cuda")]
    {
        nccl_sys::nccl().map(|_| ())
    }
    #[cfg(not(feature = "cuda"))]
    Err(Error::unsupported("this flatshard was built without the `cuda` feature"))
}

#[cfg(feature = "cuda")]
pub(crate) mod nccl_sys;

pub mod event;

#[cfg(feature = "cuda")]
pub(crate) fn check(r: cu::CUresult, what: &str) -> Result<()> {
    if r == cu::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut s: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a static string pointer.
    let name = unsafe {
        cu::cuGetErrorString(r, &mut s);
        if s.is_null() {
            format!("{r:?}")
        } else {
            std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned()
        }
    };
    let kind = if r == cu::CUresult::CUDA_ERROR_OUT_OF_MEMORY { ErrorKind::OutOfMemory } else { ErrorKind::Cuda };
    Err(Error::new(kind, format!("{what}: {name}")))
}

/// `device`'s primary context (retained once per process and device).
#[cfg(feature = "cuda")]
fn primary_ctx(device: i32) -> Result<cu::CUcontext> {
    use std::sync::Mutex;
    static CTXS: Mutex<Vec<(i32, usize)>> = Mutex::new(Vec::new());
    driver()?;
    let mut t = CTXS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, c)) = t.iter().find(|(d, _)| *d == device) {
        return Ok(*c as cu::CUcontext);
    }
    // SAFETY: valid out-pointers; the primary context stays retained for the process.
    let ctx = unsafe {
        let mut dev = 0;
        check(cu::cuDeviceGet(&mut dev, device), &format!("cuda_device {device}"))?;
        let mut ctx = std::ptr::null_mut();
        check(cu::cuDevicePrimaryCtxRetain(&mut ctx, dev), "cuDevicePrimaryCtxRetain")?;
        ctx
    };
    t.push((device, ctx as usize));
    Ok(ctx)
}

#[cfg(feature = "cuda")]
thread_local! {
    /// The context this thread had before flatshard first switched it during
    /// the current C call; restored when the call returns (`restore_caller_ctx`).
    static CALLER_CTX: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

#[cfg(feature = "cuda")]
fn make_current(ctx: cu::CUcontext) -> Result<()> {
    let mut cur: cu::CUcontext = std::ptr::null_mut();
    // SAFETY: valid out-pointer; ctx is a retained primary context.
    unsafe {
        if cu::cuCtxGetCurrent(&mut cur) == cu::CUresult::CUDA_SUCCESS && cur == ctx {
            return Ok(());
        }
        CALLER_CTX.with(|c| {
            if c.get().is_none() {
                c.set(Some(cur as usize));
            }
        });
        check(cu::cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    }
}

/// Make `device`'s primary context current on this thread (a no-op when it
/// is already). The caller's context comes back when the C call returns.
#[cfg(feature = "cuda")]
pub(crate) fn set_device(device: i32) -> Result<()> {
    make_current(primary_ctx(device)?)
}

/// Make sure some context is current (calls such as cuPointerGetAttribute,
/// cuMemHostAlloc or cuStreamSynchronize(NULL) need one): the caller's if it
/// has one, else device 0's primary context.
#[cfg(feature = "cuda")]
pub(crate) fn ensure_ctx() -> Result<()> {
    driver()?;
    let mut cur: cu::CUcontext = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    if unsafe { cu::cuCtxGetCurrent(&mut cur) } == cu::CUresult::CUDA_SUCCESS && !cur.is_null() {
        return Ok(());
    }
    set_device(0)
}

/// Give the calling thread back the CUDA context it had before this C call
/// (called by the C boundary on the way out; nothing to do unless flatshard
/// switched contexts during the call).
pub fn restore_caller_ctx() {
    #[cfg(feature = "cuda")]
    if let Some(prev) = CALLER_CTX.with(|c| c.take()) {
        // SAFETY: the context this thread had at the start of the call.
        unsafe {
            cu::cuCtxSetCurrent(prev as cu::CUcontext);
        }
    }
}

/// Make the context of the device that owns `p` current (if `p` is device memory).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn enter_ptr(p: *const u8) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(d) = device_of(p) {
        return set_device(d);
    }
    let _ = p;
    Ok(())
}

/// Make a context current for a pointer query without creating one: the
/// caller's if it has one, else the first device's primary context that is
/// already active (memory from a primary context can only exist then).
/// False if there is no context at all (then no device memory exists).
#[cfg(feature = "cuda")]
fn ctx_for_query() -> bool {
    if driver().is_err() {
        return false;
    }
    let mut cur: cu::CUcontext = std::ptr::null_mut();
    // SAFETY: valid out-pointers.
    unsafe {
        if cu::cuCtxGetCurrent(&mut cur) == cu::CUresult::CUDA_SUCCESS && !cur.is_null() {
            return true;
        }
        let mut n = 0;
        if cu::cuDeviceGetCount(&mut n) != cu::CUresult::CUDA_SUCCESS {
            return false;
        }
        for d in 0..n {
            let (mut dev, mut flags, mut active) = (0, 0u32, 0i32);
            if cu::cuDeviceGet(&mut dev, d) == cu::CUresult::CUDA_SUCCESS
                && cu::cuDevicePrimaryCtxGetState(dev, &mut flags, &mut active) == cu::CUresult::CUDA_SUCCESS
                && active != 0
            {
                return set_device(d).is_ok();
            }
        }
    }
    false
}

/// True if `p` is device memory (false without a driver or for host memory).
/// Never creates a CUDA context (a CPU-only job on a GPU machine stays off the GPU).
pub fn is_device_ptr(p: *const u8) -> bool {
    #[cfg(feature = "cuda")]
    {
        if p.is_null() || !ctx_for_query() {
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

/// INVALID_ARGUMENT unless `p` is memory of CUDA device `d`; `what` names it.
pub fn check_on_device(p: *const u8, d: i32, what: &str) -> Result<()> {
    match device_of(p) {
        Some(x) if x == d => Ok(()),
        Some(x) => Err(Error::invalid_arg(format!("{what}: memory of cuda:{x}, but device says cuda:{d}"))),
        None => Err(Error::invalid_arg(format!("{what}: not CUDA device memory, but device says cuda:{d}"))),
    }
}

/// Copy device → host (synchronous).
///
/// # Safety
/// `dst` valid for `len` host bytes, `src` for `len` device bytes.
pub unsafe fn copy_to_host(dst: *mut u8, src: *const u8, len: usize) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        enter_ptr(src)?;
        // SAFETY: dst is host memory and src device memory valid for len bytes
        // (contract); src's device context is current (enter_ptr).
        check(unsafe { cu::cuMemcpyDtoH_v2(dst as *mut std::ffi::c_void, src as cu::CUdeviceptr, len) }, "cuMemcpyDtoH")
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
        enter_ptr(dst)?;
        // SAFETY: dst is device memory and src host memory valid for len bytes
        // (contract); dst's device context is current (enter_ptr).
        check(unsafe { cu::cuMemcpyHtoD_v2(dst as cu::CUdeviceptr, src as *const std::ffi::c_void, len) }, "cuMemcpyHtoD")
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (dst, src, len);
        driver()
    }
}

/// A CUstream (cudaStream_t); null = the legacy default stream.
pub type Stream = *mut std::ffi::c_void;

/// The ordinal of the device that owns `p`, if `p` is device memory.
pub fn device_of(p: *const u8) -> Option<i32> {
    if !is_device_ptr(p) {
        return None;
    }
    #[cfg(feature = "cuda")]
    {
        let mut ord: i32 = -1;
        // SAFETY: the attribute query only inspects the address.
        let r = unsafe {
            cu::cuPointerGetAttribute(
                &mut ord as *mut i32 as *mut std::ffi::c_void,
                cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                p as cu::CUdeviceptr,
            )
        };
        (r == cu::CUresult::CUDA_SUCCESS).then_some(ord)
    }
    #[cfg(not(feature = "cuda"))]
    None
}

static DEVICE_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Record that waiting for device work failed (timeout, abort, NCCL error):
/// kernels may still be running on flatshard's buffers, and cuMemFree /
/// cuMemFreeHost would wait for them — possibly forever. From now on this
/// process leaks its device and pinned buffers instead of freeing them.
pub fn mark_failed() {
    DEVICE_FAILED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Did waiting for device work fail in this process (see `mark_failed`)?
pub fn failed() -> bool {
    DEVICE_FAILED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Device memory owned by flatshard (cuMemAlloc / cuMemFree).
pub struct DevMem {
    ptr: u64,
    len: usize,
    device: i32,
}

impl DevMem {
    /// `len` bytes on `device`, zero-filled before this returns (on a private
    /// non-blocking stream, so it never waits for the engine's or NCCL's work).
    pub fn zeroed(device: i32, len: usize, what: &str) -> Result<DevMem> {
        #[cfg(feature = "cuda")]
        {
            set_device(device)?;
            let mut p: cu::CUdeviceptr = 0;
            if len > 0 {
                // SAFETY: valid out-pointer; freed in Drop.
                check(unsafe { cu::cuMemAlloc_v2(&mut p, len) }, &format!("cuMemAlloc of {len} bytes for {what} on cuda:{device}"))?;
            }
            let m = DevMem { ptr: p, len, device };
            account(len as isize);
            if len > 0 {
                let s = private_stream(device)?;
                // SAFETY: fresh allocation of len bytes; s is our own stream.
                unsafe {
                    check(cu::cuMemsetD8Async(p, 0, len, s), "cuMemsetD8Async")?;
                    check(cu::cuStreamSynchronize(s), "cuStreamSynchronize (zeroing)")?;
                }
            }
            Ok(m)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (device, len, what);
            driver().map(|_| unreachable!())
        }
    }
    pub fn ptr(&self) -> *mut u8 {
        self.ptr as *mut u8
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn device(&self) -> i32 {
        self.device
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        #[cfg(feature = "cuda")]
        if self.ptr != 0 && !failed() {
            // cuMemFree waits for work still using the allocation.
            // SAFETY: allocated by cuMemAlloc in `zeroed`, not used after this.
            unsafe {
                let _ = set_device(self.device);
                cu::cuMemFree_v2(self.ptr);
            }
            account(-(self.len as isize));
        }
    }
}

/// flatshard's own non-blocking stream on `device` (created once).
#[cfg(feature = "cuda")]
fn private_stream(device: i32) -> Result<cu::CUstream> {
    use std::sync::Mutex;
    static STREAMS: Mutex<Vec<(i32, usize)>> = Mutex::new(Vec::new());
    let mut t = STREAMS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, s)) = t.iter().find(|(d, _)| *d == device) {
        return Ok(*s as cu::CUstream);
    }
    set_device(device)?;
    let mut s: cu::CUstream = std::ptr::null_mut();
    // SAFETY: valid out-pointer; the stream lives for the process.
    check(unsafe { cu::cuStreamCreate(&mut s, cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) }, "cuStreamCreate")?;
    t.push((device, s as usize));
    Ok(s)
}

static DEV_BYTES: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);
static DEV_PEAK: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn account(delta: isize) {
    use std::sync::atomic::Ordering::SeqCst;
    let now = DEV_BYTES.fetch_add(delta, SeqCst) + delta;
    DEV_PEAK.fetch_max(now, SeqCst);
}

/// Device memory flatshard holds now and at most since the last
/// `reset_device_peak`, in bytes (this process, all devices).
pub fn device_bytes() -> (usize, usize) {
    use std::sync::atomic::Ordering::SeqCst;
    (DEV_BYTES.load(SeqCst).max(0) as usize, DEV_PEAK.load(SeqCst).max(0) as usize)
}

/// Restart the peak of `device_bytes` at the current value.
pub fn reset_device_peak() {
    use std::sync::atomic::Ordering::SeqCst;
    DEV_PEAK.store(DEV_BYTES.load(SeqCst), SeqCst);
}

/// Page-locked host memory (cuMemHostAlloc, portable): the staging and
/// offload buffers, so device copies are true DMA and can be asynchronous.
pub struct PinnedMem {
    ptr: *mut u8,
    len: usize,
}

impl PinnedMem {
    pub fn zeroed(len: usize, what: &str) -> Result<PinnedMem> {
        #[cfg(feature = "cuda")]
        {
            ensure_ctx()?;
            let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
            if len > 0 {
                // SAFETY: valid out-pointer; freed in Drop.
                check(unsafe { cu::cuMemHostAlloc(&mut p, len, cu::CU_MEMHOSTALLOC_PORTABLE) }, &format!("cuMemHostAlloc of {len} bytes for {what}"))?;
                // SAFETY: fresh host allocation of len bytes.
                unsafe { std::ptr::write_bytes(p as *mut u8, 0, len) };
            }
            Ok(PinnedMem { ptr: p as *mut u8, len })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (len, what);
            driver().map(|_| unreachable!())
        }
    }
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PinnedMem {
    fn drop(&mut self) {
        #[cfg(feature = "cuda")]
        if !self.ptr.is_null() && !failed() {
            // SAFETY: allocated by cuMemHostAlloc, not used after this.
            unsafe {
                let _ = ensure_ctx();
                cu::cuMemFreeHost(self.ptr as *mut std::ffi::c_void);
            }
        }
    }
}

// SAFETY: plain memory owned by one value.
unsafe impl Send for PinnedMem {}

/// Where a copy goes from and to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dir {
    HtoD,
    DtoH,
    DtoD,
}

/// Asynchronous copy on `stream`.
///
/// # Safety
/// `dst`/`src` valid for `len` bytes on the sides `dir` says; a host side
/// must stay alive until the stream has passed the copy.
pub unsafe fn copy_async(dst: *mut u8, src: *const u8, len: usize, dir: Dir, stream: Stream) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    {
        let s = stream as cu::CUstream;
        enter_ptr(if dir == Dir::DtoH { src } else { dst })?;
        // SAFETY: each side is memory of the kind `dir` names, valid for len bytes,
        // and a host side outlives the copy (contract); the device side's context
        // is current (enter_ptr).
        unsafe {
            match dir {
                Dir::HtoD => check(cu::cuMemcpyHtoDAsync_v2(dst as cu::CUdeviceptr, src as *const std::ffi::c_void, len, s), "cuMemcpyHtoDAsync"),
                Dir::DtoH => check(cu::cuMemcpyDtoHAsync_v2(dst as *mut std::ffi::c_void, src as cu::CUdeviceptr, len, s), "cuMemcpyDtoHAsync"),
                Dir::DtoD => check(cu::cuMemcpyDtoDAsync_v2(dst as cu::CUdeviceptr, src as cu::CUdeviceptr, len, s), "cuMemcpyDtoDAsync"),
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (dst, src, dir, stream);
        driver()
    }
}

/// Zero `len` device bytes in order on `stream`.
///
/// # Safety
/// `dst` is device memory valid for `len` bytes.
pub unsafe fn memset0_async(dst: *mut u8, len: usize, stream: Stream) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    {
        enter_ptr(dst)?;
        // SAFETY: dst is device memory valid for len bytes (contract), its context current.
        check(unsafe { cu::cuMemsetD8Async(dst as cu::CUdeviceptr, 0, len, stream as cu::CUstream) }, "cuMemsetD8Async")
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (dst, stream);
        driver()
    }
}

/// Wait for everything queued on `stream` of `device` (local work only:
/// copies and kernels; NCCL work is waited for through the communicator,
/// with its deadline).
pub fn stream_sync(device: i32, stream: Stream) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        set_device(device)?;
        // SAFETY: a stream handle of that device (or the default stream).
        let r = check(unsafe { cu::cuStreamSynchronize(stream as cu::CUstream) }, "cuStreamSynchronize");
        if r.is_err() {
            mark_failed();
        }
        r
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, stream);
        driver()
    }
}

#[cfg(feature = "cuda")]
mod kernels;
#[cfg(feature = "cuda")]
pub use kernels::{launch_add, launch_convert};

/// Without the `cuda` feature there are no kernels; callers never get here
/// because no device buffer can exist.
///
/// # Safety
/// As the `cuda` build's (device pointers valid for `n` elements); this one
/// touches nothing.
#[cfg(not(feature = "cuda"))]
pub unsafe fn launch_convert(_: *const u8, _: crate::dtype::DType, _: *mut u8, _: crate::dtype::DType, _: usize, _: i32, _: Stream) -> Result<bool> {
    driver().map(|_| false)
}
/// Without the `cuda` feature: UNSUPPORTED.
///
/// # Safety
/// As the `cuda` build's (device pointers valid for `n` elements); this one
/// touches nothing.
#[cfg(not(feature = "cuda"))]
pub unsafe fn launch_add(_: *mut u8, _: *const u8, _: crate::dtype::DType, _: usize, _: i32, _: Stream) -> Result<()> {
    driver()
}
