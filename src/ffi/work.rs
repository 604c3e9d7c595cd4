//! C API §7: asynchronous collectives and work handles.
//!
//! An `_async` call checks its arguments and the communicator's state on the
//! caller's thread (those errors come back from the call, `*out` untouched),
//! then queues the operation: on a host communicator as a job for its
//! progress thread, on an NCCL communicator by enqueueing it on the
//! communicator's stream and recording an event. Errors that involve peers
//! come back from `flatshard_work_wait` / `_test`.

use super::comm::{comm_arc, dtype, flatshard_comm, region, times_size};
use super::handle::{self, Kind};
use super::{boundary, boundary_value, need, types::*};
use crate::comm::progress::Work;
use crate::dtype::{DtypeArg, ReduceOp, ReduceOpArg};
use crate::error::{Error, Result};
use crate::mem::{self, Region};
use std::ffi::c_void;

/// Opaque work handle: one queued operation.
pub struct flatshard_work {
    _private: [u8; 0],
}

impl Kind for Work {
    const TAG: u64 = 0x464c_5348_574f_524b; // "FLSHWORK"
    const NAME: &'static str = "flatshard_work";
}

pub(crate) fn publish_work(w: Work, out: *mut *mut flatshard_work) {
    // SAFETY: every caller checked `out` for NULL first (`need(out, ...)`).
    unsafe { *out = handle::into_raw::<Work, flatshard_work>(w) };
}

/// A caller buffer that travels to the progress thread. The C contract
/// (API §7 "Buffers") hands the memory to the library until the work ends.
#[derive(Clone, Copy)]
pub(crate) struct SendRegion(Region);
// SAFETY: only an address and a length; the caller guarantees the memory
// stays valid and untouched until the work finishes (API §7), so using it
// on the progress thread is sound.
unsafe impl Send for SendRegion {}

impl SendRegion {
    /// The region (a method, so closures capture the whole `SendRegion`).
    pub(crate) fn get(self) -> Region {
        self.0
    }
}

fn reduce_op(o: ReduceOpArg) -> Result<ReduceOp> {
    ReduceOp::from_raw(o.0 as i64, "op")
}

/// `flatshard_all_reduce`, queued. `*out` (written only on success) owns a
/// work handle: free it with flatshard_work_free. `buf` belongs to the
/// library until the work finished. Returns at once: INVALID_ARGUMENT (NULL
/// c/out/buf, bad dtype/op/count), ABORTED (communicator aborted or
/// poisoned). Peer errors (MISMATCH, TIMEOUT, PEER_LOST, ABORTED) come from
/// flatshard_work_wait. Same thread-safety as the blocking call.
#[no_mangle]
pub unsafe extern "C" fn flatshard_all_reduce_async(
    c: *mut flatshard_comm,
    buf: *mut c_void,
    count: u64,
    dt: DtypeArg,
    op: ReduceOpArg,
    out: *mut *mut flatshard_work,
) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_all_reduce_async", || unsafe {
        need(out, "out")?;
        let c = comm_arc(c, "c")?;
        let (dt, op) = (dtype(dt, "dt")?, reduce_op(op)?);
        op.check(dt)?;
        let b = SendRegion(region(buf, count, dt, "buf")?);
        let w = c.issue(move |c| mem::collective(c, |ops| ops.all_reduce(c, b.get(), dt, op)))?;
        publish_work(w, out);
        Ok(())
    })
}

/// `flatshard_all_gather`, queued; as flatshard_all_reduce_async for
/// ownership, buffers and statuses.
#[no_mangle]
pub unsafe extern "C" fn flatshard_all_gather_async(
    c: *mut flatshard_comm,
    send: *const c_void,
    recv: *mut c_void,
    count_per_rank: u64,
    dt: DtypeArg,
    out: *mut *mut flatshard_work,
) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_all_gather_async", || unsafe {
        need(out, "out")?;
        let c = comm_arc(c, "c")?;
        let dt = dtype(dt, "dt")?;
        let total = times_size(&c, count_per_rank)?;
        let (s, r) = (SendRegion(region(send, count_per_rank, dt, "send")?), SendRegion(region(recv, total, dt, "recv")?));
        let w = c.issue(move |c| mem::collective(c, |ops| ops.all_gather(c, s.get(), r.get(), dt)))?;
        publish_work(w, out);
        Ok(())
    })
}

/// `flatshard_reduce_scatter`, queued; as flatshard_all_reduce_async for
/// ownership, buffers and statuses.
#[no_mangle]
pub unsafe extern "C" fn flatshard_reduce_scatter_async(
    c: *mut flatshard_comm,
    send: *const c_void,
    recv: *mut c_void,
    count_per_rank: u64,
    dt: DtypeArg,
    op: ReduceOpArg,
    out: *mut *mut flatshard_work,
) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_reduce_scatter_async", || unsafe {
        need(out, "out")?;
        let c = comm_arc(c, "c")?;
        let (dt, op) = (dtype(dt, "dt")?, reduce_op(op)?);
        op.check(dt)?;
        let total = times_size(&c, count_per_rank)?;
        let (s, r) = (SendRegion(region(send, total, dt, "send")?), SendRegion(region(recv, count_per_rank, dt, "recv")?));
        let w = c.issue(move |c| mem::collective(c, |ops| ops.reduce_scatter(c, s.get(), r.get(), dt, op)))?;
        publish_work(w, out);
        Ok(())
    })
}

/// `flatshard_broadcast`, queued; as flatshard_all_reduce_async for
/// ownership, buffers and statuses (a root outside [0, size) is
/// INVALID_ARGUMENT from the call).
#[no_mangle]
pub unsafe extern "C" fn flatshard_broadcast_async(
    c: *mut flatshard_comm,
    buf: *mut c_void,
    count: u64,
    dt: DtypeArg,
    root: i32,
    out: *mut *mut flatshard_work,
) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_broadcast_async", || unsafe {
        need(out, "out")?;
        let c = comm_arc(c, "c")?;
        let dt = dtype(dt, "dt")?;
        if root < 0 || root as usize >= c.size() {
            return Err(Error::invalid_arg(format!("root: must be in [0, {}), got {root}", c.size())));
        }
        let b = SendRegion(region(buf, count, dt, "buf")?);
        let w = c.issue(move |c| mem::collective(c, |ops| ops.broadcast(c, b.get(), dt, root)))?;
        publish_work(w, out);
        Ok(())
    })
}

unsafe fn work_ref<'a>(w: *const flatshard_work) -> Result<&'a Work> {
    // SAFETY: `handle::get` checks NULL and the tag before reading.
    unsafe { handle::get::<Work, _>(w, "w") }
}

/// Block until the work finished; returns its status (the same on every
/// call), with flatshard_last_error() set on this thread if it failed:
/// MISMATCH (ranks issued different operations; the communicator stays
/// usable), TIMEOUT / PEER_LOST / ABORTED (the communicator is poisoned),
/// NCCL / CUDA (device work), or the error of a flat-param operation.
/// INVALID_ARGUMENT: NULL or freed handle. A work handle may be used from one
/// thread at a time; it stays valid after its communicator or flat param was
/// freed.
#[no_mangle]
pub unsafe extern "C" fn flatshard_work_wait(w: *mut flatshard_work) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_work_wait", || unsafe { work_ref(w)?.wait() })
}

/// Never blocks: OK with `*done = 0` while the work is in flight; once it
/// finished, `*done = 1` and the work's status (as flatshard_work_wait).
/// INVALID_ARGUMENT: NULL `w` or `done` (then `*done` is not written).
#[no_mangle]
pub unsafe extern "C" fn flatshard_work_test(w: *mut flatshard_work, done: *mut i32) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_work_test", || unsafe {
        let w = work_ref(w)?;
        need(done, "done")?;
        match w.test()? {
            None => {
                *done = 0;
                Ok(())
            }
            Some(r) => {
                *done = 1;
                r
            }
        }
    })
}

/// CUDA: make `cuda_stream` (a CUstream of the communicator's device; NULL =
/// the legacy default stream) wait for the work; the host does not wait.
/// For host work (and work that already failed) this is flatshard_work_wait.
/// Statuses as flatshard_work_wait, plus CUDA if the driver refuses.
#[no_mangle]
pub unsafe extern "C" fn flatshard_work_wait_stream(w: *mut flatshard_work, cuda_stream: *mut c_void) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_work_wait_stream", || unsafe { work_ref(w)?.wait_stream(cuda_stream) })
}

/// Free a work handle (NULL is a no-op), waiting first if it is still in
/// flight (its status is then dropped). Must be called exactly once per
/// handle, from the thread using it.
#[no_mangle]
pub unsafe extern "C" fn flatshard_work_free(w: *mut flatshard_work) {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary_value((), || unsafe {
        if let Ok(work) = work_ref(w) {
            let _ = work.wait_quiet();
        }
        handle::free::<Work, _>(w)
    });
}
