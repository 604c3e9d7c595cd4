//! Model averaging for local SGD. See SPEC.md §1.
//!
//! - [`average`]: `average_parameters`, in place through a bounded bucket.
//! - [`schedule`]: PyTorch's periodic and hierarchical schedules and checks (pure).
//! - [`averager`]: the averagers (step counter + schedule + communicators).

pub mod average;
pub mod averager;
pub mod device;
pub mod schedule;

pub use average::{average_parameters, average_parameters_with, AvgOptions, AVG_ONLY_WITH_GRAD, BUCKET_ENV, DEFAULT_BUCKET_BYTES};
pub use averager::Averager;

/// Average flat-parameter shards in place over `replicate` (the ranks that
/// hold the same shard under HYBRID_SHARD) without unsharding: local SGD on a
/// sharded model. Padding elements are 0 on every replica and stay 0.
pub fn average_flat_params(replicate: &crate::comm::Comm, fps: &mut [&mut crate::flat_param::FlatParam]) -> crate::error::Result<()> {
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
