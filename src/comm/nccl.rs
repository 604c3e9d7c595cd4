//! The NCCL communicator: collectives on device pointers, stream-ordered on
//! the communicator's stream. `synchronize` waits with the deadline, polls
//! ncclCommGetAsyncError and aborts the NCCL communicator on timeout, so a
//! dead peer is an error, not a hang.

use super::{Backend, DeviceCollectives};
use crate::cuda;
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use cudarc::driver::sys as cu;
use cudarc::nccl::sys as nc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct NcclBackend {
    comm: nc::ncclComm_t,
    stream: *mut std::ffi::c_void,
    device: i32,
    rank: usize,
    size: usize,
    owned: bool,
    timeout: Duration,
    abort: Arc<AtomicBool>,
    destroyed: AtomicBool,
    scratch: std::sync::OnceLock<u64>,
}

// The NCCL handle is used by one thread at a time (Comm's contract), except
// ncclCommAbort, which NCCL allows from any thread.
unsafe impl Send for NcclBackend {}
unsafe impl Sync for NcclBackend {}

fn nccl_check(r: nc::ncclResult_t, what: &str) -> Result<()> {
    if r == nc::ncclResult_t::ncclSuccess {
        return Ok(());
    }
    // SAFETY: returns a static string.
    let s = unsafe { std::ffi::CStr::from_ptr(nc::ncclGetErrorString(r)).to_string_lossy().into_owned() };
    Err(Error::new(crate::error::ErrorKind::Nccl, format!("{what}: {s} ({r:?})")))
}

fn nccl_dtype(dt: DType) -> Result<nc::ncclDataType_t> {
    use nc::ncclDataType_t::*;
    Ok(match dt {
        DType::F32 => ncclFloat32,
        DType::F64 => ncclFloat64,
        DType::F16 => ncclFloat16,
        DType::BF16 => ncclBfloat16,
        DType::I32 => ncclInt32,
        DType::I64 => ncclInt64,
        DType::U8 => ncclUint8,
    })
}

fn nccl_op(op: ReduceOp) -> nc::ncclRedOp_t {
    match op {
        ReduceOp::Sum => nc::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => nc::ncclRedOp_t::ncclAvg,
        ReduceOp::Min => nc::ncclRedOp_t::ncclMin,
        ReduceOp::Max => nc::ncclRedOp_t::ncclMax,
    }
}

impl NcclBackend {
    /// Create a communicator from a unique id every rank received.
    pub fn init(id: &[u8; 128], rank: usize, size: usize, device: i32, stream: *mut std::ffi::c_void, timeout: Duration) -> Result<Self> {
        cuda::nccl()?;
        cuda::set_device(device)?;
        let mut uid = nc::ncclUniqueId { internal: [0; 128] };
        for (d, s) in uid.internal.iter_mut().zip(id.iter()) {
            *d = *s as std::ffi::c_char;
        }
        let mut comm = std::ptr::null_mut();
        // SAFETY: valid out-pointer and id.
        nccl_check(unsafe { nc::ncclCommInitRank(&mut comm, size as i32, uid, rank as i32) }, "ncclCommInitRank")?;
        Ok(NcclBackend { comm, stream, device, rank, size, owned: true, timeout, abort: Arc::new(AtomicBool::new(false)), destroyed: AtomicBool::new(false), scratch: std::sync::OnceLock::new() })
    }

    /// Adopt an existing ncclComm_t (not destroyed on drop).
    pub fn wrap(comm: *mut std::ffi::c_void, device: i32, stream: *mut std::ffi::c_void, timeout: Duration) -> Result<Self> {
        cuda::nccl()?;
        let comm = comm as nc::ncclComm_t;
        let (mut n, mut r) = (0, 0);
        // SAFETY: the caller passed a live ncclComm_t.
        unsafe {
            nccl_check(nc::ncclCommCount(comm, &mut n), "ncclCommCount")?;
            nccl_check(nc::ncclCommUserRank(comm, &mut r), "ncclCommUserRank")?;
        }
        Ok(NcclBackend { comm, stream, device, rank: r as usize, size: n as usize, owned: false, timeout, abort: Arc::new(AtomicBool::new(false)), destroyed: AtomicBool::new(false), scratch: std::sync::OnceLock::new() })
    }

    /// A fresh 128-byte ncclUniqueId (rank 0 creates it, the others receive it).
    pub fn unique_id() -> Result<[u8; 128]> {
        cuda::nccl()?;
        let mut uid = nc::ncclUniqueId { internal: [0; 128] };
        // SAFETY: valid out-pointer.
        nccl_check(unsafe { nc::ncclGetUniqueId(&mut uid) }, "ncclGetUniqueId")?;
        let mut out = [0u8; 128];
        for (d, s) in out.iter_mut().zip(uid.internal.iter()) {
            *d = *s as u8;
        }
        Ok(out)
    }

    fn stream(&self) -> nc::cudaStream_t {
        self.stream as nc::cudaStream_t
    }

    fn enter(&self) -> Result<()> {
        if self.destroyed.load(Ordering::SeqCst) {
            return Err(Error::aborted("the NCCL communicator was aborted"));
        }
        cuda::set_device(self.device)
    }

    /// 4 bytes of device memory for barriers, allocated on first use.
    fn scratch_word(&self) -> Result<u64> {
        if let Some(p) = self.scratch.get() {
            return Ok(*p);
        }
        self.enter()?;
        let mut p: cu::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; freed in Drop.
        cuda::check(unsafe { cu::cuMemAlloc_v2(&mut p, 4) }, "cuMemAlloc (barrier word)")?;
        // SAFETY: fresh allocation of 4 bytes.
        cuda::check(unsafe { cu::cuMemsetD32_v2(p, 0, 1) }, "cuMemsetD32")?;
        Ok(*self.scratch.get_or_init(|| p))
    }

    fn kill(&self) {
        if !self.destroyed.swap(true, Ordering::SeqCst) {
            // SAFETY: aborting is allowed from any thread; the handle is not used again.
            unsafe {
                nc::ncclCommAbort(self.comm);
            }
        }
    }
}

impl DeviceCollectives for NcclBackend {
    unsafe fn all_reduce(&self, send: *const u8, recv: *mut u8, count: usize, dt: DType, op: ReduceOp) -> Result<()> {
        self.enter()?;
        nccl_check(nc::ncclAllReduce(send as _, recv as _, count, nccl_dtype(dt)?, nccl_op(op), self.comm, self.stream()), "ncclAllReduce")
    }
    unsafe fn all_gather(&self, send: *const u8, recv: *mut u8, count: usize, dt: DType) -> Result<()> {
        self.enter()?;
        nccl_check(nc::ncclAllGather(send as _, recv as _, count, nccl_dtype(dt)?, self.comm, self.stream()), "ncclAllGather")
    }
    unsafe fn reduce_scatter(&self, send: *const u8, recv: *mut u8, count: usize, dt: DType, op: ReduceOp) -> Result<()> {
        self.enter()?;
        nccl_check(nc::ncclReduceScatter(send as _, recv as _, count, nccl_dtype(dt)?, nccl_op(op), self.comm, self.stream()), "ncclReduceScatter")
    }
    unsafe fn broadcast(&self, buf: *mut u8, count: usize, dt: DType, root: usize) -> Result<()> {
        self.enter()?;
        nccl_check(nc::ncclBroadcast(buf as _, buf as _, count, nccl_dtype(dt)?, root as i32, self.comm, self.stream()), "ncclBroadcast")
    }
    fn device_index(&self) -> i32 {
        self.device
    }
    fn stream(&self) -> crate::cuda::Stream {
        self.stream
    }
    fn split(&self, color: i32, key: i32) -> Result<Option<Box<dyn Backend>>> {
        self.enter()?;
        let mut child: nc::ncclComm_t = std::ptr::null_mut();
        // NCCL_SPLIT_NOCOLOR (-1): take part in the split without joining a group.
        let c = if color < 0 { -1 } else { color };
        // SAFETY: live communicator, valid out-pointer; a NULL config inherits
        // the parent's.
        nccl_check(unsafe { nc::ncclCommSplit(self.comm, c, key, &mut child, std::ptr::null_mut()) }, &format!("rank {}: ncclCommSplit", self.rank))?;
        if color < 0 || child.is_null() {
            return Ok(None);
        }
        let (mut n, mut r) = (0, 0);
        // SAFETY: the fresh child communicator.
        unsafe {
            nccl_check(nc::ncclCommCount(child, &mut n), "ncclCommCount")?;
            nccl_check(nc::ncclCommUserRank(child, &mut r), "ncclCommUserRank")?;
        }
        Ok(Some(Box::new(NcclBackend {
            comm: child,
            stream: self.stream,
            device: self.device,
            rank: r as usize,
            size: n as usize,
            owned: true,
            timeout: self.timeout,
            abort: Arc::new(AtomicBool::new(false)),
            destroyed: AtomicBool::new(false),
            scratch: std::sync::OnceLock::new(),
        })))
    }
    fn group(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        self.enter()?;
        // SAFETY: group calls bracket the collectives issued by f.
        nccl_check(unsafe { nc::ncclGroupStart() }, "ncclGroupStart")?;
        let r = f();
        // Always close the group, also when f failed part-way.
        let end = nccl_check(unsafe { nc::ncclGroupEnd() }, "ncclGroupEnd");
        r.and(end)
    }
    fn synchronize(&self) -> Result<()> {
        self.enter()?;
        let deadline = Instant::now() + self.timeout;
        loop {
            // SAFETY: the stream belongs to this communicator's device.
            let q = unsafe { cu::cuStreamQuery(self.stream as cu::CUstream) };
            let mut async_err = nc::ncclResult_t::ncclSuccess;
            // SAFETY: live comm (not destroyed: checked in enter and below).
            unsafe { nc::ncclCommGetAsyncError(self.comm, &mut async_err) };
            if async_err != nc::ncclResult_t::ncclSuccess && async_err != nc::ncclResult_t::ncclInProgress {
                self.kill();
                return nccl_check(async_err, &format!("rank {}: asynchronous NCCL error", self.rank));
            }
            if q == cu::CUresult::CUDA_SUCCESS {
                return Ok(());
            }
            if q != cu::CUresult::CUDA_ERROR_NOT_READY {
                return cuda::check(q, "cuStreamQuery");
            }
            if self.abort.load(Ordering::SeqCst) {
                self.kill();
                return Err(Error::aborted("the communicator was aborted"));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(Error::timeout(format!(
                    "rank {}: NCCL work did not finish within {} ms; the NCCL communicator was aborted",
                    self.rank,
                    self.timeout.as_millis()
                )));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

fn host_refused() -> Error {
    Error::unsupported("an NCCL communicator takes device pointers; for host memory use a host communicator (flatshard_comm_init)")
}

impl Backend for NcclBackend {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn transport_name(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce(&self, _: &mut [u8], _: DType, _: ReduceOp) -> Result<()> {
        Err(host_refused())
    }
    fn all_gather(&self, _: &[u8], _: &mut [u8], _: DType) -> Result<()> {
        Err(host_refused())
    }
    fn reduce_scatter(&self, _: &[u8], _: &mut [u8], _: DType, _: ReduceOp) -> Result<()> {
        Err(host_refused())
    }
    fn broadcast(&self, _: &mut [u8], _: DType, _: usize) -> Result<()> {
        Err(host_refused())
    }
    fn barrier(&self) -> Result<()> {
        // A one-word all-reduce on a scratch device word, then wait for it:
        // returns once every rank has reached the barrier.
        let word = self.scratch_word()?;
        // SAFETY: `word` is 4 bytes of device memory owned by this backend.
        unsafe { DeviceCollectives::all_reduce(self, word as *const u8, word as *mut u8, 1, DType::F32, ReduceOp::Sum)? };
        self.synchronize()
    }
    fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
        self.kill();
    }
    fn device(&self) -> Option<&dyn DeviceCollectives> {
        Some(self)
    }
}

impl Drop for NcclBackend {
    fn drop(&mut self) {
        if let Some(p) = self.scratch.get() {
            // SAFETY: allocated by scratch_word, not used after this.
            unsafe {
                cu::cuMemFree_v2(*p);
            }
        }
        if self.owned && !self.destroyed.swap(true, Ordering::SeqCst) {
            // SAFETY: owned, live, not used again.
            unsafe {
                nc::ncclCommDestroy(self.comm);
            }
        }
    }
}
