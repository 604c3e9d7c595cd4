//! `average_parameters` on CUDA tensors. On an NCCL communicator each tensor
//! is averaged on the device (ncclAvg, stream-ordered like every NCCL
//! collective); on a host communicator each tensor is staged through host
//! memory (extra memory: the largest tensor), so several ranks sharing one GPU,
//! or a CPU-only job with GPU parameters, still work.
//! Not verified on a GPU yet (no GPU in this project's CI).

use super::average::AVG_ONLY_WITH_GRAD;
use crate::comm::Comm;
use crate::dtype::ReduceOp;
use crate::error::{try_zeroed, Error, Result};
use crate::tensor::{Device, TensorRef};

/// # Safety
/// Every tensor's `data` must be device memory valid for `numel` elements.
pub unsafe fn average_device(comm: &Comm, params: &[TensorRef], flags: u32) -> Result<()> {
    let rank = comm.rank();
    crate::cuda::driver().map_err(|e| e.context(format!("rank {rank}: params hold CUDA tensors")))?;
    if let Some(i) = params.iter().position(|t| t.device == Device::Cpu) {
        return Err(Error::unsupported(format!(
            "rank {rank}: params[{i}] is a host tensor among CUDA tensors; average host and device tensors in separate calls"
        )));
    }
    if flags & !AVG_ONLY_WITH_GRAD != 0 {
        return Err(Error::invalid_arg(format!("rank {rank}: flags: 0x{flags:x} has unknown bits")));
    }
    let mut chosen = Vec::new();
    for (i, t) in params.iter().enumerate() {
        if !t.dtype.is_float() {
            return Err(Error::invalid_arg(format!("rank {rank}: params[{i}].dtype: {} cannot be averaged", t.dtype.name())));
        }
        t.bytes().map_err(|e| e.context(format!("rank {rank}: params[{i}]")))?;
        if flags & AVG_ONLY_WITH_GRAD == 0 || !t.grad.is_null() {
            chosen.push(*t);
        }
    }
    if chosen.is_empty() {
        return Err(Error::invalid_arg(format!("rank {rank}: no parameter has a gradient (FLATSHARD_AVG_ONLY_WITH_GRAD skipped all {})", params.len())));
    }
    for t in chosen {
        let n = t.numel as usize;
        if comm.is_device() {
            comm.run(|b| {
                let d = b.device().ok_or_else(|| Error::internal("device backend vanished"))?;
                d.all_reduce(t.data, t.data, n, t.dtype, ReduceOp::Avg)
            })?;
        } else {
            let bytes = t.bytes()?;
            let mut host = try_zeroed(bytes, "staging a CUDA tensor for averaging")?;
            crate::cuda::copy_to_host(host.as_mut_ptr(), t.data, bytes)?;
            let h = TensorRef { data: host.as_mut_ptr(), grad: std::ptr::null_mut(), numel: t.numel, dtype: t.dtype, device: Device::Cpu };
            super::average_parameters(comm, &[h], 0)?;
            crate::cuda::copy_to_device(t.data, host.as_ptr(), bytes)?;
        }
    }
    Ok(())
}
