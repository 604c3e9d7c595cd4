//! The transport traits: `Backend` (host memory, every transport) and
//! `DeviceCollectives` (device pointers, NCCL), and `SelfBackend`, the group
//! of one.

use crate::dtype::{DType, ReduceOp};
use crate::error::Result;

/// A transport. Buffers are already validated (lengths agree with the count);
/// `op` is never AVG (Comm divides). Implementations check that all ranks
/// agree on the call (`OpDesc`) before moving data.
pub trait Backend: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    fn transport_name(&self) -> &'static str;
    fn all_reduce(&self, buf: &mut [u8], dt: DType, op: ReduceOp) -> Result<()>;
    /// `recv.len() == size * send.len()`, rank-major.
    fn all_gather(&self, send: &[u8], recv: &mut [u8], dt: DType) -> Result<()>;
    /// `send.len() == size * recv.len()`.
    fn reduce_scatter(&self, send: &[u8], recv: &mut [u8], dt: DType, op: ReduceOp) -> Result<()>;
    fn broadcast(&self, buf: &mut [u8], dt: DType, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Unblock any waiter (from any thread) and make later calls fail.
    fn abort(&self);
    /// Transports that take device pointers (NCCL) expose them here.
    fn device(&self) -> Option<&dyn DeviceCollectives> {
        None
    }
}

/// Collectives on raw device pointers, stream-ordered (NCCL). Pointers are
/// never dereferenced on the host.
pub trait DeviceCollectives {
    /// # Safety
    /// Device pointers valid for `count` elements.
    unsafe fn all_reduce(&self, send: *const u8, recv: *mut u8, count: usize, dt: DType, op: ReduceOp) -> Result<()>;
    /// # Safety
    /// As `all_reduce`; recv holds size × count.
    unsafe fn all_gather(&self, send: *const u8, recv: *mut u8, count: usize, dt: DType) -> Result<()>;
    /// # Safety
    /// As `all_reduce`; send holds size × count.
    unsafe fn reduce_scatter(&self, send: *const u8, recv: *mut u8, count: usize, dt: DType, op: ReduceOp) -> Result<()>;
    /// # Safety
    /// As `all_reduce`.
    unsafe fn broadcast(&self, buf: *mut u8, count: usize, dt: DType, root: usize) -> Result<()>;
    /// Wait for the queued work with the deadline; report asynchronous errors.
    fn synchronize(&self) -> Result<()>;
    /// As `synchronize`, for the work before `ev` only (async work, API §7).
    fn wait_event(&self, ev: &crate::cuda::event::Event) -> Result<()>;
    /// The CUDA device ordinal the communicator runs on.
    fn device_index(&self) -> i32;
    /// The stream its collectives are ordered on (null = legacy default).
    fn stream(&self) -> crate::cuda::Stream;
    /// MPI-style split (ncclCommSplit): None for color < 0. Collective.
    fn split(&self, color: i32, key: i32) -> Result<Option<Box<dyn Backend>>>;
    /// Fuse the collectives issued inside `f` into one launch (ncclGroupStart/End).
    fn group(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<()>;
}

/// A group of one: every collective is a copy or nothing.
pub struct SelfBackend;

impl Backend for SelfBackend {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn transport_name(&self) -> &'static str {
        "self"
    }
    fn all_reduce(&self, _: &mut [u8], _: DType, _: ReduceOp) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, send: &[u8], recv: &mut [u8], _: DType) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn reduce_scatter(&self, send: &[u8], recv: &mut [u8], _: DType, _: ReduceOp) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn broadcast(&self, _: &mut [u8], _: DType, _: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self) {}
}

/// Byte range (start, length) of part `c` when `n` elements of `es` bytes
/// are split into `w` parts: the first `n % w` parts get one element more.
/// How every transport cuts a buffer among ranks (ring chunks, shared-memory
/// slices, hierarchical slices).
pub fn chunk_range(n: usize, w: usize, c: usize, es: usize) -> (usize, usize) {
    let (base, rem) = (n / w, n % w);
    (es * (c * base + c.min(rem)), es * (base + usize::from(c < rem)))
}
