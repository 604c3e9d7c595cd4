//! C API §5: model averaging. (`flatshard_average_flat_params`, for
//! HYBRID_SHARD replicas, is in `ffi/flat_param.rs`.)

use super::comm::{comm_arc, comm_ref, flatshard_comm};
use super::handle::{self, Kind};
use super::{boundary, boundary_value, need, types::*};
use crate::averaging::{self, Averager};
use crate::error::Result;
use crate::tensor::TensorRef;

/// Flag for `flatshard_average_parameters` / `flatshard_averager_step`: skip
/// tensors whose `grad` is NULL (PyTorch's `get_params_to_average` filter).
pub const FLATSHARD_AVG_ONLY_WITH_GRAD: u32 = 1;
const _: () = assert!(FLATSHARD_AVG_ONLY_WITH_GRAD == averaging::AVG_ONLY_WITH_GRAD);

/// Opaque model averager (periodic or hierarchical).
pub struct flatshard_averager {
    _private: [u8; 0],
}

impl Kind for Averager {
    const TAG: u64 = 0x464c_5348_4156_4752; // "FLSHAVGR"
    const NAME: &'static str = "flatshard_averager";
}

/// Convert and check the caller's tensor array (descriptions only; memory is
/// not touched here).
///
/// # Safety
/// `params` is NULL or points to `n` readable `flatshard_tensor`s.
unsafe fn tensors(params: *const flatshard_tensor, n: u64) -> Result<Vec<TensorRef>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    need(params, "params")?;
    let n = usize::try_from(n).map_err(|_| crate::error::Error::invalid_arg(format!("n: {n} tensors do not fit in memory")))?;
    // SAFETY: our contract: n readable tensors (non-NULL checked above).
    let cs = unsafe { std::slice::from_raw_parts(params, n) };
    cs.iter().enumerate().map(|(i, t)| tensor_from_c(t, &format!("params[{i}]"))).collect()
}

/// Average `n` tensors in place over `comm`: every element becomes the mean
/// over the ranks (PyTorch's `x / size` then SUM all-reduce); each tensor keeps
/// its address and dtype. Mixed f32/f64/f16/bf16 in one call; f16/bf16 are
/// divided in their own dtype and summed in f32. `flags`: 0 or
/// FLATSHARD_AVG_ONLY_WITH_GRAD (skip tensors whose grad is NULL). Extra memory
/// ≤ 2 × bucket (FLATSHARD_BUCKET_BYTES, default 16 MiB), whatever the model
/// size.
///
/// Before moving data the ranks compare what they are about to average (one
/// small all-gather), so a rank with different tensors, or one that refused its
/// arguments, makes every rank return at once and nothing is averaged.
///
/// CUDA tensors (all of the call's tensors on the device): on an NCCL
/// communicator each is averaged in place on the device (ncclAvg, in fused NCCL
/// groups, ordered on the communicator's stream: flatshard_comm_synchronize
/// waits); on a host communicator they are staged through one pinned host
/// bucket of at most FLATSHARD_BUCKET_BYTES. (Not yet verified on a GPU.)
///
/// Ownership: the caller owns `params` and every tensor's memory; the library
/// reads and writes `data` during the call only (from this thread and one
/// helper thread; on an NCCL communicator until the stream has run the work)
/// and keeps no pointer. Tensors must not overlap.
///
/// Threads: collective: every rank of `comm` passes the same tensors (count,
/// numel, dtype) in the same order. Not concurrently with other calls on `comm`
/// (flatshard_comm_abort excepted); nothing else may touch the tensors' memory
/// during the call.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed comm; NULL params with n > 0;
/// a bad dtype or device enum; an integer dtype; NULL data with numel > 0;
/// unknown flag bits; n == 0; nothing left after the grad filter: "no parameter
/// has a gradient"; a CUDA tensor on another device than an NCCL
/// communicator's); UNSUPPORTED (CUDA tensors without a CUDA driver, or host
/// and CUDA tensors mixed in one call); MISMATCH (another rank passed different
/// tensors or refused its arguments: the message names the ranks);
/// OUT_OF_MEMORY (the bucket); TIMEOUT, PEER_LOST, ABORTED, IO from the
/// communicator (the tensors' contents are then unspecified: partly averaged);
/// CUDA, NCCL (CUDA tensors). A NULL pointer, freed comm or bad enum is refused
/// before the comparison: the peers then wait until their timeout.
#[no_mangle]
pub unsafe extern "C" fn flatshard_average_parameters(comm: *mut flatshard_comm, params: *mut flatshard_tensor, n: u64, flags: u32) -> flatshard_status {
    boundary("flatshard_average_parameters", || {
        // SAFETY: the C contract of this function (doc above): a handle from this library.
        let c = unsafe { comm_ref(comm, "comm")? };
        // SAFETY: the C contract: `params` holds n tensors.
        let ts = unsafe { tensors(params, n) }.map_err(|e| averaging::refuse(c, e.context(format!("rank {}", c.rank()))))?;
        // CUDA tensors take the device path inside.
        // SAFETY: the caller's tensors are valid for numel elements during the
        // call and do not overlap (documented above).
        unsafe { averaging::average_parameters(c, &ts, flags) }
    })
}

fn publish(a: Averager, out: *mut *mut flatshard_averager) {
    // SAFETY: every caller checked `out` for NULL first (`need(out, ...)`).
    unsafe { *out = handle::into_raw::<Averager, flatshard_averager>(a) };
}

/// A periodic averager (PyTorch `PeriodicModelAverager`):
/// flatshard_averager_step averages over all of `comm` iff `step >=
/// warmup_steps && (step - warmup_steps) % period == 0`. Period 1 is legal but
/// logs a warning (FLATSHARD_DEBUG=WARN): an all-reduce of the gradients is
/// cheaper.
///
/// Ownership: on success `*out` owns a new averager; free it with
/// flatshard_averager_free. The averager holds its own reference to `comm`:
/// `comm` may be freed before the averager, which keeps working (the
/// communicator closes when its last user is freed).
///
/// Threads: not collective (no communication). Any thread; it only takes a
/// reference to `comm`.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed comm; NULL out; period 0:
/// "period must be a positive value").
#[no_mangle]
pub unsafe extern "C" fn flatshard_periodic_averager_new(
    comm: *mut flatshard_comm,
    period: u64,
    warmup_steps: u64,
    out: *mut *mut flatshard_averager,
) -> flatshard_status {
    boundary("flatshard_periodic_averager_new", || {
        need(out, "out")?;
        // SAFETY: `comm` is NULL or a handle from this library (C contract).
        let c = unsafe { comm_arc(comm, "comm")? };
        publish(Averager::periodic(c, period, warmup_steps)?, out);
        Ok(())
    })
}

/// A hierarchical averager (PyTorch `HierarchicalModelAverager`): `periods[i]`
/// → `group_sizes[i]`, in the order given (PyTorch's dict order). At each step
/// with `step >= warmup_steps`, the first period from the *last* given to the
/// first that divides the absolute step picks the group size; ranks average
/// within contiguous blocks `[g*k, g*k+g)` of that size. At most one level per
/// step. Checks, in this order: n ≥ 1; every period > 0; every group size > 0;
/// the last group size equals the size of comm; every group size divides it; no
/// period twice. A largest period of 1 logs a warning.
///
/// Ownership: `periods` and `group_sizes` (n entries each) are copied. On
/// success `*out` owns a new averager (flatshard_averager_free), which owns its
/// subgroups and holds its own reference to `comm`, so `comm` may be freed
/// first (the communicator closes when its last user is freed).
///
/// Threads: collective over `comm`: it creates the subgroups now (once per
/// distinct group size; the size of comm reuses `comm`), so every rank calls
/// with the same arguments. Not concurrently with other calls on `comm`.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed comm; NULL out; NULL arrays
/// with n > 0; a failed check above, the message naming the numbers);
/// UNSUPPORTED (comm built from user callbacks cannot create subgroups; NCCL
/// older than 2.18); MISMATCH, TIMEOUT, PEER_LOST, ABORTED, IO, AUTH, NCCL
/// (while creating the subgroups, as flatshard_comm_new_subgroups).
#[no_mangle]
pub unsafe extern "C" fn flatshard_hierarchical_averager_new(
    comm: *mut flatshard_comm,
    periods: *const u64,
    group_sizes: *const i32,
    n: u64,
    warmup_steps: u64,
    out: *mut *mut flatshard_averager,
) -> flatshard_status {
    boundary("flatshard_hierarchical_averager_new", || {
        need(out, "out")?;
        // SAFETY: `comm` is NULL or a handle from this library (C contract).
        let c = unsafe { comm_arc(comm, "comm")? };
        let (p, g): (&[u64], &[i32]) = if n == 0 {
            (&[], &[])
        } else {
            need(periods, "periods")?;
            need(group_sizes, "group_sizes")?;
            let n = usize::try_from(n).map_err(|_| crate::error::Error::invalid_arg(format!("n: {n} levels do not fit in memory")))?;
            // SAFETY: the C contract: periods and group_sizes hold n entries each (non-NULL checked).
            unsafe { (std::slice::from_raw_parts(periods, n), std::slice::from_raw_parts(group_sizes, n)) }
        };
        publish(Averager::hierarchical(c, p, g, warmup_steps)?, out);
        Ok(())
    })
}

/// One optimizer step: average `params` in place if the schedule says so (as
/// flatshard_average_parameters, over the group the schedule picks), then `step
/// += 1`. `*averaged_group_size` (may be NULL) receives the size of the group
/// that averaged, 0 if none. Arguments (pointers, dtypes, devices, flags) are
/// checked on every step; "nothing to average" (n == 0, or no tensor with a
/// grad under FLATSHARD_AVG_ONLY_WITH_GRAD) only on steps that average, as in
/// PyTorch. On any error the step counter does not advance and
/// `*averaged_group_size` is not written.
///
/// Ownership: as flatshard_average_parameters; `*averaged_group_size` is the
/// caller's, written on success.
///
/// Threads: collective over the group that averages on this step: every rank
/// steps in lockstep with the same tensors. Not concurrently with other calls
/// on `a` or on its communicator.
///
/// Statuses: as flatshard_average_parameters (on a step that does not average:
/// only its argument checks, INVALID_ARGUMENT and UNSUPPORTED);
/// INVALID_ARGUMENT also for a NULL or freed `a`; INVALID_STATE when the step
/// counter is at UINT64_MAX.
#[no_mangle]
pub unsafe extern "C" fn flatshard_averager_step(
    a: *mut flatshard_averager,
    params: *mut flatshard_tensor,
    n: u64,
    flags: u32,
    averaged_group_size: *mut i32,
) -> flatshard_status {
    boundary("flatshard_averager_step", || {
        // SAFETY: the C contract: `a` is a handle from this library used by one thread.
        let avg = unsafe { handle::get_mut::<Averager, _>(a, "a")? };
        // SAFETY: the C contract: `params` holds n tensors.
        let ts = unsafe { tensors(params, n) }.map_err(|e| e.context(format!("rank {}", avg.rank())))?;
        // SAFETY: the C contract: the tensors' memory is valid and unaliased for the call.
        let size = unsafe { avg.step(&ts, flags)? };
        if !averaged_group_size.is_null() {
            // SAFETY: the C contract: NULL or writable.
            unsafe { *averaged_group_size = size as i32 };
        }
        Ok(())
    })
}

/// The step the next flatshard_averager_step will run (0 for a new averager);
/// save it with a checkpoint.
///
/// Ownership: `a` is read during the call only.
///
/// Threads: `a` is const: any number of threads may call this at once.
///
/// Returns: the step; 0 for NULL or a freed handle.
#[no_mangle]
pub unsafe extern "C" fn flatshard_averager_get_step(a: *const flatshard_averager) -> u64 {
    // SAFETY: `a` is NULL or a handle from this library (C contract).
    boundary_value(0, || unsafe { handle::get::<Averager, _>(a, "a") }.map(|a| a.current_step()).unwrap_or(0))
}

/// Resume a schedule: the next flatshard_averager_step runs step `step`
/// (PyTorch's PostLocalSGDOptimizer keeps `step` in its state dict).
///
/// Ownership: `a` stays the caller's; nothing else is passed.
///
/// Threads: not concurrently with other calls on `a`. Not collective, but every
/// rank must set the same step.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed `a`).
#[no_mangle]
pub unsafe extern "C" fn flatshard_averager_set_step(a: *mut flatshard_averager, step: u64) -> flatshard_status {
    boundary("flatshard_averager_set_step", || {
        // SAFETY: `a` is NULL or a handle from this library, used by one thread.
        unsafe { handle::get_mut::<Averager, _>(a, "a")? }.set_step(step);
        Ok(())
    })
}

/// Free an averager and the subgroups it created. The communicator it was built
/// on closes here if the caller already freed it (the averager held the last
/// reference).
///
/// Ownership: `a` is invalid afterwards.
///
/// Threads: not concurrently with any other call on `a`. Local: freeing
/// subgroups is not collective, but peers still using theirs get PEER_LOST, so
/// free averagers on every rank together.
///
/// Returns: nothing. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn flatshard_averager_free(a: *mut flatshard_averager) {
    // SAFETY: `a` is NULL or a handle from this library, freed once (C contract).
    boundary_value((), || unsafe { handle::free::<Averager, _>(a) });
}
