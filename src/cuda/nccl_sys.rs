//! NCCL, loaded at run time by flatshard itself (dlopen + dlsym).
//!
//! Why not cudarc's NCCL module: its loader looks for `libnccl.so` (and
//! `.so.1`, `.so.12`, ...), but NCCL's real file is `libnccl.so.2` — the only
//! file of the `nvidia-nccl-cu12` wheel and of distro runtime packages — and
//! it panics on a missing symbol. Here:
//!
//! 1. `FLATSHARD_NCCL_LIBRARY` (a path), if set;
//! 2. the `libnccl.so.2` already loaded in this process (e.g. by PyTorch), so
//!    a wrapped `ncclComm_t` is used with the library that created it;
//! 3. `libnccl.so.2`, then `libnccl.so`, through the normal search path.
//!
//! Symbols of newer NCCLs (`ncclCommSplit` 2.18, `ncclCommFinalize` 2.14) are
//! optional and reported as UNSUPPORTED when missing; NCCL < 2.10 (no
//! `ncclAvg`) is refused with a message naming the version found.

#![allow(non_camel_case_types)]

use crate::error::{Error, Result};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

pub(crate) type ncclComm_t = *mut c_void;
pub(crate) type ncclResult_t = c_int;
pub(crate) type ncclDataType_t = c_int;
pub(crate) type ncclRedOp_t = c_int;
pub(crate) type cudaStream_t = *mut c_void;

pub(crate) const NCCL_SUCCESS: ncclResult_t = 0;
pub(crate) const NCCL_IN_PROGRESS: ncclResult_t = 7;
/// ncclCommSplit color of a rank that joins no group.
pub(crate) const NCCL_SPLIT_NOCOLOR: c_int = -1;

// ncclDataType_t
pub(crate) const NCCL_UINT8: ncclDataType_t = 1;
pub(crate) const NCCL_INT32: ncclDataType_t = 2;
pub(crate) const NCCL_INT64: ncclDataType_t = 4;
pub(crate) const NCCL_FLOAT16: ncclDataType_t = 6;
pub(crate) const NCCL_FLOAT32: ncclDataType_t = 7;
pub(crate) const NCCL_FLOAT64: ncclDataType_t = 8;
pub(crate) const NCCL_BFLOAT16: ncclDataType_t = 9;

// ncclRedOp_t
pub(crate) const NCCL_SUM: ncclRedOp_t = 0;
pub(crate) const NCCL_MAX: ncclRedOp_t = 2;
pub(crate) const NCCL_MIN: ncclRedOp_t = 3;
pub(crate) const NCCL_AVG: ncclRedOp_t = 4;

/// NCCL_UNIQUE_ID_BYTES = 128; passed by value to ncclCommInitRank.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct ncclUniqueId {
    pub(crate) internal: [c_char; 128],
}

type R = ncclResult_t;

/// The NCCL entry points flatshard uses.
pub(crate) struct Nccl {
    pub version: i32,
    pub path: String,
    pub get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> R,
    pub comm_init_rank: unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> R,
    pub comm_destroy: unsafe extern "C" fn(ncclComm_t) -> R,
    pub comm_abort: unsafe extern "C" fn(ncclComm_t) -> R,
    pub comm_get_async_error: unsafe extern "C" fn(ncclComm_t, *mut R) -> R,
    pub comm_count: unsafe extern "C" fn(ncclComm_t, *mut c_int) -> R,
    pub comm_cu_device: unsafe extern "C" fn(ncclComm_t, *mut c_int) -> R,
    pub comm_user_rank: unsafe extern "C" fn(ncclComm_t, *mut c_int) -> R,
    pub get_error_string: unsafe extern "C" fn(R) -> *const c_char,
    pub all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t) -> R,
    pub broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, c_int, ncclComm_t, cudaStream_t) -> R,
    pub reduce_scatter: unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t) -> R,
    pub all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclComm_t, cudaStream_t) -> R,
    pub group_start: unsafe extern "C" fn() -> R,
    pub group_end: unsafe extern "C" fn() -> R,
    /// NCCL ≥ 2.18.
    pub comm_split: Option<unsafe extern "C" fn(ncclComm_t, c_int, c_int, *mut ncclComm_t, *mut c_void) -> R>,
}

// SAFETY: plain function pointers into a library that is never unloaded.
unsafe impl Send for Nccl {}
// SAFETY: as for Send; the struct is never mutated after loading, and which
// NCCL calls may run concurrently is the callers' concern, not this table's.
unsafe impl Sync for Nccl {}

fn dl_error() -> String {
    // SAFETY: dlerror returns a thread-local message or NULL.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: NUL-terminated per dlerror's contract.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn open(name: &str, flags: c_int) -> std::result::Result<*mut c_void, String> {
    let c = CString::new(name).map_err(|_| format!("'{name}' contains a NUL byte"))?;
    // SAFETY: valid C string; the handle is never closed.
    let h = unsafe { libc::dlopen(c.as_ptr(), flags) };
    if h.is_null() {
        Err(format!("{name}: {}", dl_error()))
    } else {
        Ok(h)
    }
}

fn sym(h: *mut c_void, name: &str) -> Option<*mut c_void> {
    let c = CString::new(name).ok()?;
    // SAFETY: a live handle and a valid C string.
    let p = unsafe { libc::dlsym(h, c.as_ptr()) };
    (!p.is_null()).then_some(p)
}

fn load() -> std::result::Result<Nccl, String> {
    let mut tried = Vec::new();
    let mut handle = None;
    if let Ok(p) = std::env::var("FLATSHARD_NCCL_LIBRARY") {
        match open(&p, libc::RTLD_NOW | libc::RTLD_LOCAL) {
            Ok(h) => handle = Some((h, p)),
            Err(e) => return Err(format!("FLATSHARD_NCCL_LIBRARY: {e}")),
        }
    }
    if handle.is_none() {
        for (name, flags) in [
            ("libnccl.so.2", libc::RTLD_NOW | libc::RTLD_NOLOAD),
            ("libnccl.so.2", libc::RTLD_NOW | libc::RTLD_LOCAL),
            ("libnccl.so", libc::RTLD_NOW | libc::RTLD_LOCAL),
        ] {
            match open(name, flags) {
                Ok(h) => {
                    handle = Some((h, name.to_string()));
                    break;
                }
                Err(e) if flags & libc::RTLD_NOLOAD == 0 => tried.push(e),
                Err(_) => {}
            }
        }
    }
    let Some((h, path)) = handle else {
        return Err(format!(
            "no NCCL: {} (install NCCL, e.g. `pip install nvidia-nccl-cu12` and put its lib/ on LD_LIBRARY_PATH, or set FLATSHARD_NCCL_LIBRARY)",
            tried.join("; ")
        ));
    };
    /// A symbol address as the function pointer type of the field it fills.
    ///
    /// # Safety
    /// `F` is the symbol's C signature (true in every NCCL 2.x that exports it).
    unsafe fn cast<F: Copy>(p: *mut c_void) -> F {
        assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
        // SAFETY: F is pointer-sized (asserted) and, per the contract, a function
        // pointer type matching the symbol, so p's bits are a valid F.
        unsafe { std::mem::transmute_copy(&p) }
    }
    macro_rules! req {
        ($name:literal) => {{
            let p = sym(h, $name).ok_or_else(|| format!("{path} has no symbol {}", $name))?;
            // SAFETY: see `cast`.
            unsafe { cast(p) }
        }};
    }
    macro_rules! opt {
        ($name:literal) => {{
            // SAFETY: see `cast`.
            sym(h, $name).map(|p| unsafe { cast(p) })
        }};
    }
    let get_version: unsafe extern "C" fn(*mut c_int) -> R = req!("ncclGetVersion");
    let mut v: c_int = 0;
    // SAFETY: valid out-pointer.
    unsafe { get_version(&mut v) };
    // NCCL >= 2.9 encodes major*10000 + minor*100 + patch (older: major*1000 + minor*100 + patch).
    if v < 21000 {
        return Err(format!("{path} is NCCL version code {v}; flatshard needs NCCL >= 2.10 (ncclAvg)"));
    }
    Ok(Nccl {
        version: v,
        path: path.clone(),
        get_unique_id: req!("ncclGetUniqueId"),
        comm_init_rank: req!("ncclCommInitRank"),
        comm_destroy: req!("ncclCommDestroy"),
        comm_abort: req!("ncclCommAbort"),
        comm_get_async_error: req!("ncclCommGetAsyncError"),
        comm_count: req!("ncclCommCount"),
        comm_cu_device: req!("ncclCommCuDevice"),
        comm_user_rank: req!("ncclCommUserRank"),
        get_error_string: req!("ncclGetErrorString"),
        all_reduce: req!("ncclAllReduce"),
        broadcast: req!("ncclBroadcast"),
        reduce_scatter: req!("ncclReduceScatter"),
        all_gather: req!("ncclAllGather"),
        group_start: req!("ncclGroupStart"),
        group_end: req!("ncclGroupEnd"),
        comm_split: opt!("ncclCommSplit"),
    })
}

/// The loaded NCCL (loaded once per process), or UNSUPPORTED saying why not.
pub(crate) fn nccl() -> Result<&'static Nccl> {
    static LIB: OnceLock<std::result::Result<Nccl, String>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().map_err(|e| Error::unsupported(e.clone()))
}

/// "major.minor.patch" of a version code.
pub(crate) fn version_string(v: i32) -> String {
    format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loader's refusals name what they tried (run in one test: it sets
    /// the environment).
    #[test]
    fn loader_reports_what_it_tried() {
        std::env::set_var("FLATSHARD_NCCL_LIBRARY", "/nonexistent/libnccl.so.2");
        let e = load().err().expect("no such file");
        assert!(e.contains("FLATSHARD_NCCL_LIBRARY") && e.contains("/nonexistent/libnccl.so.2"), "{e}");
        // a real library that is not NCCL
        std::env::set_var("FLATSHARD_NCCL_LIBRARY", "libm.so.6");
        let e = load().err().expect("libm is not NCCL");
        assert!(e.contains("libm.so.6 has no symbol ncclGetVersion"), "{e}");
        std::env::remove_var("FLATSHARD_NCCL_LIBRARY");
        match load() {
            Ok(n) => eprintln!("NCCL {} found at {}", version_string(n.version), n.path),
            Err(e) => assert!(e.contains("libnccl.so.2") && e.contains("FLATSHARD_NCCL_LIBRARY"), "{e}"),
        }
        assert_eq!(version_string(22703), "2.27.3");
    }
}
