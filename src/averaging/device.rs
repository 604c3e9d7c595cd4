//! `average_parameters` on CUDA tensors.
//!
//! - NCCL communicator: every tensor is averaged in place on the device
//!   (ncclAvg), issued in fused NCCL groups (no extra device memory, one
//!   launch per group); stream-ordered on the communicator's stream like every
//!   NCCL collective (flatshard_comm_synchronize waits).
//! - Host communicator: the tensors are staged through one pinned host bucket
//!   of at most FLATSHARD_BUCKET_BYTES (tensors packed, large ones split), so
//!   several ranks sharing one GPU, or a CPU-only job with GPU parameters,
//!   still work with bounded extra memory. Completes before returning.
//!
//! As on the host, the ranks agree on what they average before any data
//! moves: a rank with bad arguments makes every rank return (MISMATCH on the
//! others) instead of leaving them waiting.

use super::average::AvgOptions;
use crate::comm::Comm;
use crate::dtype::ReduceOp;
use crate::error::{Error, Result};
use crate::mem::{Buf, Ops, Place, Region};
use crate::tensor::{Device, TensorRef};

/// NCCL ops per fused group.
const GROUP: usize = 256;

/// The checks that do not depend on the communicator (also on the averagers'
/// steps that do not average).
pub fn validate(rank: usize, params: &[TensorRef]) -> Result<()> {
    if let Some((i, t)) = params.iter().enumerate().find(|(_, t)| t.device != Device::Cpu) {
        crate::cuda::driver().map_err(|e| e.context(format!("rank {rank}: params[{i}] is a {} tensor", t.device.describe())))?;
    }
    for (i, t) in params.iter().enumerate() {
        if t.device == Device::Cpu {
            return Err(Error::unsupported(format!(
                "rank {rank}: params[{i}] is a host tensor among CUDA tensors; average host and device tensors in separate calls"
            )));
        }
        if !t.dtype.is_float() {
            return Err(Error::invalid_arg(format!("rank {rank}: params[{i}].dtype: {} cannot be averaged; pass f32, f64, f16 or bf16", t.dtype.name())));
        }
    }
    Ok(())
}

/// The checks that need the memory itself and the communicator: every
/// tensor's memory is on the GPU its device names, and that GPU is the NCCL
/// communicator's (if it is one). After `validate`.
pub fn check_memory(comm: &Comm, params: &[TensorRef]) -> Result<()> {
    let rank = comm.rank();
    for (i, t) in params.iter().enumerate() {
        let Device::Cuda(d) = t.device else { continue };
        let what = format!("rank {rank}: params[{i}]");
        t.bytes().map_err(|e| e.context(&what))?;
        if t.numel > 0 {
            crate::cuda::check_on_device(t.data, d, &format!("{what}.data"))?;
        }
        if let Some(cd) = comm.device_index().filter(|cd| *cd != d) {
            return Err(Error::invalid_arg(format!("{what}.device: cuda:{d}, but the NCCL communicator runs on cuda:{cd}")));
        }
    }
    Ok(())
}

/// Average the `chosen` CUDA tensors (arguments checked and agreed by
/// `average_parameters`).
///
/// # Safety
/// Every tensor's `data` must be device memory of the device the tensor names
/// (and, for an NCCL communicator, of the communicator's device: `check_memory`),
/// valid for `numel` elements, not accessed by anything else during the call
/// (nor, for an NCCL communicator, before the work queued on its stream is done).
pub(crate) unsafe fn average_device(comm: &Comm, params: &[TensorRef], chosen: &[usize], opts: &AvgOptions) -> Result<()> {
    if comm.is_device() {
        for batch in chosen.chunks(GROUP) {
            comm.dev_group(|| {
                for &i in batch {
                    let t = &params[i];
                    // SAFETY: t.data is device memory of the communicator's device valid
                    // for numel elements of t.dtype and ours meanwhile (contract); send ==
                    // recv is NCCL's in-place form.
                    unsafe { comm.dev_all_reduce(t.data, t.data, t.numel as usize, t.dtype, ReduceOp::Avg)? };
                }
                Ok(())
            })?;
        }
        return Ok(());
    }
    // SAFETY: our contract is staged's.
    unsafe { staged(comm, params, chosen, opts.bucket_bytes) }
}

/// Host communicator: pack the chosen tensors (pieces of them) into one
/// pinned bucket, average it with the host path, copy back; repeat.
///
/// # Safety
/// As for `average_device`.
unsafe fn staged(comm: &Comm, params: &[TensorRef], chosen: &[usize], bucket_bytes: usize) -> Result<()> {
    let total: usize = chosen.iter().map(|&i| params[i].numel as usize * params[i].dtype.size()).sum();
    let bucket = Buf::zeroed_on(Place::Pinned, bucket_bytes.min(total.max(1)).max(8), "the averaging staging bucket")?;
    let mut ops = Ops::new(comm);
    // (tensor, first element, elements) pieces in the current bucket fill.
    let mut pieces: Vec<(usize, usize, usize)> = Vec::new();
    let mut used = 0usize;
    let flush = |ops: &mut Ops, pieces: &mut Vec<(usize, usize, usize)>| -> Result<()> {
        if pieces.is_empty() {
            return Ok(());
        }
        let mut host = Vec::with_capacity(pieces.len());
        let mut off = 0;
        for &(i, first, n) in pieces.iter() {
            let t = &params[i];
            let es = t.dtype.size();
            // A device address, never dereferenced here: wrapping_add, not add.
            let dev = Region::new(t.data.wrapping_add(first * es), n * es, Region::place_of(t.device));
            let staged = bucket.at(off, n * es);
            ops.copy(staged, dev)?;
            host.push(TensorRef { data: staged.ptr, grad: std::ptr::null_mut(), numel: n as u64, dtype: t.dtype, device: Device::Cpu });
            off += (n * es).next_multiple_of(8);
        }
        // The host path averages the pinned bucket (the ranks agreed on the
        // whole call already and fill their buckets alike; its bucket size is
        // at least ours, so one pass).
        let all: Vec<usize> = (0..host.len()).collect();
        // SAFETY: the host tensors are disjoint ranges of the pinned bucket (at
        // 8-byte steps, each inside it: `at` checks), which this function owns and
        // nothing else uses meanwhile; the device-to-host copies into it are complete
        // (Ops::copy waits for a DtoH copy before returning).
        unsafe { super::average::stream(comm, &host, &all, &AvgOptions { bucket_bytes: bucket.len().max(1), overlap: false }, comm.size())? };
        let mut off = 0;
        for &(i, first, n) in pieces.iter() {
            let t = &params[i];
            let es = t.dtype.size();
            let dev = Region::new(t.data.wrapping_add(first * es), n * es, Region::place_of(t.device));
            ops.copy(dev, bucket.at(off, n * es))?;
            off += (n * es).next_multiple_of(8);
        }
        // The bucket is refilled next: wait for the copies out of it.
        ops.finish_step()?;
        pieces.clear();
        Ok(())
    };
    for &i in chosen {
        let t = &params[i];
        let es = t.dtype.size();
        let mut first = 0usize;
        let numel = t.numel as usize;
        while first < numel {
            let room = (bucket.len().saturating_sub(used)) / es;
            if room == 0 {
                flush(&mut ops, &mut pieces)?;
                used = 0;
                continue;
            }
            let n = room.min(numel - first);
            pieces.push((i, first, n));
            used += (n * es).next_multiple_of(8);
            first += n;
        }
    }
    flush(&mut ops, &mut pieces)?;
    ops.finish()
}
