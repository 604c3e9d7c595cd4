//! The C ABI. This layer only converts pointers, checks arguments, catches
//! panics and maps errors; the logic lives in the safe modules.
//!
//! Every export runs its body through [`boundary`], which turns a Rust error
//! into a `flatshard_status` plus the thread's `flatshard_last_error()` text,
//! and a panic into `FLATSHARD_ERR_INTERNAL`.

#![allow(non_camel_case_types)]
// The C contract of every export (pointers, lifetimes) is in its doc comment
// and in API.md; a Rust `# Safety` section per extern fn would repeat it.
#![allow(clippy::missing_safety_doc)]

pub mod averaging;
pub mod checkpoint;
pub mod comm;
pub mod cuda;
pub mod flat_param;
pub mod handle;
pub mod types;
pub mod work;

use crate::error::{Error, ErrorKind, Result};
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
pub use types::*;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = c);
}

pub(crate) fn status_of(kind: ErrorKind) -> flatshard_status {
    use flatshard_status::*;
    match kind {
        ErrorKind::InvalidArgument => FLATSHARD_ERR_INVALID_ARGUMENT,
        ErrorKind::InvalidState => FLATSHARD_ERR_INVALID_STATE,
        ErrorKind::Unsupported => FLATSHARD_ERR_UNSUPPORTED,
        ErrorKind::Mismatch => FLATSHARD_ERR_MISMATCH,
        ErrorKind::Timeout => FLATSHARD_ERR_TIMEOUT,
        ErrorKind::PeerLost => FLATSHARD_ERR_PEER_LOST,
        ErrorKind::Auth => FLATSHARD_ERR_AUTH,
        ErrorKind::Aborted => FLATSHARD_ERR_ABORTED,
        ErrorKind::OutOfMemory => FLATSHARD_ERR_OUT_OF_MEMORY,
        ErrorKind::Io => FLATSHARD_ERR_IO,
        ErrorKind::Cuda => FLATSHARD_ERR_CUDA,
        ErrorKind::Nccl => FLATSHARD_ERR_NCCL,
        ErrorKind::Internal => FLATSHARD_ERR_INTERNAL,
    }
}

/// Run an export's body: errors become a status and the thread's last error;
/// a panic becomes FLATSHARD_ERR_INTERNAL and never unwinds into C.
pub(crate) fn boundary(func: &str, f: impl FnOnce() -> Result<()>) -> flatshard_status {
    let r = catch_unwind(AssertUnwindSafe(f));
    // The caller's CUDA context, if flatshard switched it during the call.
    crate::cuda::restore_caller_ctx();
    match r {
        Ok(Ok(())) => flatshard_status::FLATSHARD_OK,
        Ok(Err(e)) => {
            set_last_error(&format!("{func}: {}", e.msg));
            crate::log::trace(usize::MAX, &format!("{func} failed: {}", e.msg));
            status_of(e.kind)
        }
        Err(p) => {
            let what =
                p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("{func}: internal error (a bug in flatshard, please report): {what}"));
            flatshard_status::FLATSHARD_ERR_INTERNAL
        }
    }
}

/// Like `boundary` for functions that return a value instead of a status.
pub(crate) fn boundary_value<T>(default: T, f: impl FnOnce() -> T) -> T {
    let r = catch_unwind(AssertUnwindSafe(f)).unwrap_or(default);
    crate::cuda::restore_caller_ctx();
    r
}

/// A required pointer argument: NULL → INVALID_ARGUMENT naming it.
pub(crate) fn need<T>(p: *const T, name: &str) -> Result<()> {
    if p.is_null() {
        return Err(Error::invalid_arg(format!("{name} is NULL")));
    }
    Ok(())
}

/// An optional C string argument.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
pub(crate) unsafe fn opt_str(p: *const c_char, name: &str) -> Result<Option<String>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the C caller passes a NUL-terminated string (each export's
    // documented contract); NULL was handled above.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map(|s| Some(s.to_string())).map_err(|_| Error::invalid_arg(format!("{name} is not valid UTF-8")))
}

/// Check an options struct's `struct_size`: 0 or a size this library knows.
pub(crate) fn check_struct_size(name: &str, got: u32, known: usize) -> Result<()> {
    if got != 0 && got as usize != known {
        return Err(Error::invalid_arg(format!("{name}.struct_size is {got}; this library knows {known} (or 0): call {name}_init() before setting fields")));
    }
    Ok(())
}

/// Name of a status ("FLATSHARD_OK", "FLATSHARD_ERR_TIMEOUT", ...).
///
/// Ownership: a static string owned by the library, valid for the life of the
/// process; do not free it.
///
/// Threads: any thread, any time.
///
/// Returns: the status's name; "FLATSHARD_UNKNOWN_STATUS" for a value that is
/// not a flatshard_status. Never NULL.
#[no_mangle]
pub extern "C" fn flatshard_status_name(status: StatusArg) -> *const c_char {
    // The enum's own names (Debug), NUL-terminated once per status.
    static NAMES: std::sync::OnceLock<Vec<CString>> = std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| flatshard_status::ALL.iter().map(|s| CString::new(format!("{s:?}")).unwrap_or_default()).collect());
    match flatshard_status::from_raw(status.0) {
        Some(s) => names[s as usize].as_ptr(),
        None => c"FLATSHARD_UNKNOWN_STATUS".as_ptr(),
    }
}

/// The message of the last failed flatshard call on this thread (what, which
/// rank, which argument, which limit).
///
/// Ownership: owned by the library (one per thread); valid until the next
/// flatshard call on the same thread; do not free it. Copy it to keep it.
///
/// Threads: any thread; each thread sees its own calls' messages (for
/// asynchronous work: the thread that called flatshard_work_wait / _test).
///
/// Returns: the message; "" if no flatshard call on this thread has failed
/// yet. Never NULL.
#[no_mangle]
pub extern "C" fn flatshard_last_error() -> *const c_char {
    boundary_value(c"".as_ptr(), || LAST_ERROR.with(|l| l.borrow().as_ptr()))
}

/// The library's run-time version (compare with FLATSHARD_VERSION_* of the
/// header the program was compiled with).
///
/// Ownership: a static string owned by the library, valid for the life of the
/// process; do not free it.
///
/// Threads: any thread, any time.
///
/// Returns: "MAJOR.MINOR.PATCH", never NULL.
#[no_mangle]
pub extern "C" fn flatshard_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}
