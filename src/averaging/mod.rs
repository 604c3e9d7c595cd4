//! Model averaging for local SGD. See SPEC.md §1.
//!
//! - [`average`]: `average_parameters`, in place through a bounded bucket.
//! - [`schedule`]: PyTorch's periodic and hierarchical schedules and checks (pure).
//! - [`averager`]: the averagers (step counter + schedule + communicators).

pub mod average;
pub mod averager;
pub mod device;
pub mod schedule;

pub use average::{AvgOptions, AVG_ONLY_WITH_GRAD, BUCKET_ENV, DEFAULT_BUCKET_BYTES};
pub use averager::Averager;

use crate::comm::Comm;
use crate::error::{Error, Result};
use crate::tensor::{Device, TensorRef};

/// Argument checks that do not depend on whether this step averages: flags,
/// then the host or the device path's checks (memory, dtype, pointers).
/// `rank` names this rank in messages.
pub fn validate(rank: usize, params: &[TensorRef], flags: u32) -> Result<()> {
    let unknown = flags & !AVG_ONLY_WITH_GRAD;
    if unknown != 0 {
        return Err(Error::invalid_arg(format!(
            "rank {rank}: flags: 0x{flags:x} has unknown bits 0x{unknown:x}; the only flag is FLATSHARD_AVG_ONLY_WITH_GRAD (0x1)"
        )));
    }
    if params.iter().any(|t| t.device != Device::Cpu) {
        // CUDA tensors: the device path's checks (driver, one kind of memory).
        return device::validate(rank, params);
    }
    average::validate_host(rank, params)
}

/// Average `params` in place over `comm` (bucket size from the environment).
///
/// Before any data moves, the ranks exchange a fingerprint of what they are
/// about to average (dtype and numel of every tensor left after the grad
/// filter, and the bucket size), so a rank whose tensors differ, or that failed
/// its own argument checks, makes every rank return at once — MISMATCH on the
/// others — instead of leaving them waiting until the timeout.
///
/// # Safety
/// Each tensor's `data` must be valid for reads and writes of `numel` elements
/// of its dtype for the whole call, and no two tensors may overlap. Nothing else
/// may access that memory during the call (a helper thread reads and writes it).
pub unsafe fn average_parameters(comm: &Comm, params: &[TensorRef], flags: u32) -> Result<()> {
    // SAFETY: average_checked's contract is ours, which our caller upholds.
    unsafe { average_checked(comm, params, flags, Ok(AvgOptions::for_comm(comm))) }
}

/// `average_parameters` with explicit options.
///
/// # Safety
/// As for [`average_parameters`].
pub unsafe fn average_parameters_with(comm: &Comm, params: &[TensorRef], flags: u32, opts: &AvgOptions) -> Result<()> {
    // SAFETY: average_checked's contract is ours, which our caller upholds.
    unsafe { average_checked(comm, params, flags, Ok(opts.clone())) }
}

/// This rank refuses its arguments (`e`, e.g. an unreadable tensor array):
/// tell the other ranks through the agreement they are waiting in, so they
/// fail at once with MISMATCH naming this rank instead of timing out.
pub fn refuse(comm: &Comm, e: Error) -> Error {
    if comm.size() > 1 {
        if let Err(told) = crate::agree::agree(comm, "average_parameters", 2, Err(())) {
            return e.context(format!("(while telling the other ranks: {})", told.msg));
        }
    }
    e
}

/// # Safety
/// As for [`average_parameters`].
unsafe fn average_checked(comm: &Comm, params: &[TensorRef], flags: u32, opts: Result<AvgOptions>) -> Result<()> {
    let rank = comm.rank();
    let cuda = params.iter().any(|t| t.device != Device::Cpu);
    let local = opts.and_then(|o| {
        validate(rank, params, flags)?;
        if cuda {
            device::check_memory(comm, params)?;
        }
        if o.bucket_bytes == 0 {
            return Err(Error::invalid_arg(format!("rank {rank}: bucket_bytes: must be positive, got 0")));
        }
        let chosen = average::select(rank, params, flags)?;
        Ok((o, chosen))
    });
    let world = comm.size();
    if world == 1 {
        // x / 1 summed over one rank is x: nothing to do.
        return local.map(|_| ());
    }
    let fields = local.as_ref().map(|(o, chosen)| {
        let tensors =
            crate::agree::fingerprint(std::iter::once(chosen.len() as u64).chain(chosen.iter().flat_map(|&i| [params[i].dtype as u64, params[i].numel])));
        [("tensors (count, numel and dtype after the grad filter; fingerprint)", tensors), (crate::config::BUCKET_BYTES, o.bucket_bytes as u64)]
    });
    let agreed = crate::agree::agree(comm, "average_parameters", 2, fields.as_ref().map(|f| &f[..]).map_err(|_| ()));
    let (opts, chosen) = local?;
    agreed?;
    if cuda {
        // SAFETY: our contract (the tensors' memory is valid and ours for the call);
        // validate and check_memory established that it is device memory of the
        // devices the tensors name, and the communicator's device for NCCL.
        return unsafe { device::average_device(comm, params, &chosen, &opts) };
    }
    // SAFETY: our contract is stream's; validate checked the tensors are host memory
    // with non-null data and `chosen` holds indices into params (select).
    unsafe { average::stream(comm, params, &chosen, &opts, world) }
}

/// Average flat-parameter shards in place over `replicate` (the ranks that
/// hold the same shard under HYBRID_SHARD) without unsharding: local SGD on a
/// sharded model. Padding elements are 0 on every replica and stay 0.
pub fn average_flat_params(replicate: &Comm, fps: &mut [&mut crate::flat_param::FlatParam]) -> crate::error::Result<()> {
    let rank = replicate.rank();
    let mut shards = Vec::with_capacity(fps.len());
    for (i, fp) in fps.iter_mut().enumerate() {
        if fp.is_unsharded() {
            return Err(crate::error::Error::invalid_state(format!(
                "rank {rank}: fps[{i}] is unsharded; call flatshard_flat_param_reshard before averaging its shard"
            )));
        }
        let mut t = fp.shard();
        t.grad = std::ptr::null_mut();
        shards.push(t);
    }
    if shards.is_empty() {
        return Err(crate::error::Error::invalid_arg(format!("rank {rank}: n is 0: no flat parameter to average")));
    }
    // SAFETY: each shard is library-owned memory of `numel` elements, alive
    // while `fps` is borrowed mutably.
    unsafe { average_parameters(replicate, &shards, 0)? };
    // Flat-param calls complete before returning, also on an NCCL comm
    // (whose averaging is otherwise only stream-ordered).
    replicate.synchronize()
}
