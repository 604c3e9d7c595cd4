//! The NCCL communicator: collectives on device pointers, stream-ordered on
//! the communicator's stream. `synchronize` waits with the deadline, polls
//! ncclCommGetAsyncError and aborts the NCCL communicator on timeout, so a
//! dead peer is an error, not a hang.

use super::{Backend, DeviceCollectives};
use crate::cuda;
use crate::cuda::nccl_sys::{self as nc, ncclComm_t, Nccl};
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use cudarc::driver::sys as cu;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct NcclBackend {
    lib: &'static Nccl,
    comm: ncclComm_t,
    stream: *mut std::ffi::c_void,
    device: i32,
    rank: usize,
    size: usize,
    owned: bool,
    timeout: Duration,
    abort: Arc<AtomicBool>,
    destroyed: AtomicBool,
    scratch: std::sync::OnceLock<cuda::DevMem>,
}

// SAFETY: the NCCL handle and stream are plain handles that NCCL and the CUDA
// driver let any thread use; nothing here is tied to the creating thread.
unsafe impl Send for NcclBackend {}
// SAFETY: the NCCL handle is used by one thread at a time (Comm's contract),
// except through `abort`, which only sets an atomic flag; the other shared
// state is atomics and a OnceLock.
unsafe impl Sync for NcclBackend {}

fn nccl_check(lib: &Nccl, r: nc::ncclResult_t, what: &str) -> Result<()> {
    if r == nc::NCCL_SUCCESS {
        return Ok(());
    }
    // SAFETY: returns a static string.
    let s = unsafe {
        let p = (lib.get_error_string)(r);
        if p.is_null() {
            format!("error {r}")
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    Err(Error::new(crate::error::ErrorKind::Nccl, format!("{what}: {s} (ncclResult_t {r})")))
}

fn nccl_dtype(dt: DType) -> nc::ncclDataType_t {
    match dt {
        DType::F32 => nc::NCCL_FLOAT32,
        DType::F64 => nc::NCCL_FLOAT64,
        DType::F16 => nc::NCCL_FLOAT16,
        DType::BF16 => nc::NCCL_BFLOAT16,
        DType::I32 => nc::NCCL_INT32,
        DType::I64 => nc::NCCL_INT64,
        DType::U8 => nc::NCCL_UINT8,
    }
}

fn nccl_op(op: ReduceOp) -> nc::ncclRedOp_t {
    match op {
        ReduceOp::Sum => nc::NCCL_SUM,
        ReduceOp::Avg => nc::NCCL_AVG,
        ReduceOp::Min => nc::NCCL_MIN,
        ReduceOp::Max => nc::NCCL_MAX,
    }
}

impl NcclBackend {
    fn new(lib: &'static Nccl, comm: ncclComm_t, device: i32, stream: *mut std::ffi::c_void, owned: bool, timeout: Duration) -> Result<Self> {
        let (mut n, mut r, mut d) = (0, 0, 0);
        // SAFETY: a live communicator.
        unsafe {
            nccl_check(lib, (lib.comm_count)(comm, &mut n), "ncclCommCount")?;
            nccl_check(lib, (lib.comm_user_rank)(comm, &mut r), "ncclCommUserRank")?;
            nccl_check(lib, (lib.comm_cu_device)(comm, &mut d), "ncclCommCuDevice")?;
        }
        if d != device {
            return Err(Error::invalid_arg(format!("cuda_device: {device}, but the NCCL communicator runs on device {d}")));
        }
        Ok(NcclBackend {
            lib,
            comm,
            stream,
            device,
            rank: r as usize,
            size: n as usize,
            owned,
            timeout,
            abort: Arc::new(AtomicBool::new(false)),
            destroyed: AtomicBool::new(false),
            scratch: std::sync::OnceLock::new(),
        })
    }

    /// Create a communicator from a unique id every rank received.
    pub fn init(id: &[u8; 128], rank: usize, size: usize, device: i32, stream: *mut std::ffi::c_void, timeout: Duration) -> Result<Self> {
        let lib = nc::nccl()?;
        cuda::set_device(device)?;
        let mut uid = nc::ncclUniqueId { internal: [0; 128] };
        for (d, s) in uid.internal.iter_mut().zip(id.iter()) {
            *d = *s as std::ffi::c_char;
        }
        let mut comm = std::ptr::null_mut();
        // SAFETY: valid out-pointer and id.
        nccl_check(lib, unsafe { (lib.comm_init_rank)(&mut comm, size as i32, uid, rank as i32) }, "ncclCommInitRank")?;
        let b = Self::new(lib, comm, device, stream, true, timeout);
        if b.is_err() {
            // SAFETY: our fresh communicator, not used again.
            unsafe { (lib.comm_destroy)(comm) };
        }
        b
    }

    /// Adopt an existing ncclComm_t (never aborted or destroyed by flatshard).
    pub fn wrap(comm: *mut std::ffi::c_void, device: i32, stream: *mut std::ffi::c_void, timeout: Duration) -> Result<Self> {
        let lib = nc::nccl()?;
        cuda::set_device(device)?;
        Self::new(lib, comm, device, stream, false, timeout)
    }

    /// A fresh 128-byte ncclUniqueId (rank 0 creates it, the others receive it).
    pub fn unique_id() -> Result<[u8; 128]> {
        let lib = nc::nccl()?;
        let mut uid = nc::ncclUniqueId { internal: [0; 128] };
        // SAFETY: valid out-pointer.
        nccl_check(lib, unsafe { (lib.get_unique_id)(&mut uid) }, "ncclGetUniqueId")?;
        let mut out = [0u8; 128];
        for (d, s) in out.iter_mut().zip(uid.internal.iter()) {
            *d = *s as u8;
        }
        Ok(out)
    }

    fn stream(&self) -> nc::cudaStream_t {
        self.stream
    }

    fn enter(&self) -> Result<()> {
        if self.destroyed.load(Ordering::SeqCst) {
            return Err(Error::aborted("the NCCL communicator was aborted"));
        }
        cuda::set_device(self.device)
    }

    /// 4 bytes of device memory for barriers, allocated on first use.
    fn scratch_word(&self) -> Result<u64> {
        if let Some(m) = self.scratch.get() {
            return Ok(m.ptr() as u64);
        }
        self.enter()?;
        let m = cuda::DevMem::zeroed(self.device, 4, "the NCCL barrier word")?;
        Ok(self.scratch.get_or_init(|| m).ptr() as u64)
    }

    /// Abort the NCCL communicator (owned ones only: a wrapped one belongs
    /// to the engine, which must abort or destroy it itself).
    fn kill(&self) {
        if self.owned && !self.destroyed.swap(true, Ordering::SeqCst) {
            // SAFETY: aborting is allowed from any thread; the handle is not used again.
            unsafe {
                (self.lib.comm_abort)(self.comm);
            }
        }
    }
}

impl DeviceCollectives for NcclBackend {
    // In the four collectives below, the communicator is live (enter refuses a
    // destroyed one) and its device current (enter); NCCL only enqueues work on
    // our stream and never touches the pointers on the host.
    unsafe fn all_reduce(&self, send: *const u8, recv: *mut u8, count: usize, dt: DType, op: ReduceOp) -> Result<()> {
        self.enter()?;
        // SAFETY: device buffers valid for count elements (the trait's contract).
        let r = unsafe { (self.lib.all_reduce)(send as _, recv as _, count, nccl_dtype(dt), nccl_op(op), self.comm, self.stream()) };
        nccl_check(self.lib, r, "ncclAllReduce")
    }
    unsafe fn all_gather(&self, send: *const u8, recv: *mut u8, count: usize, dt: DType) -> Result<()> {
        self.enter()?;
        // SAFETY: send valid for count elements, recv for size × count (the trait's contract).
        let r = unsafe { (self.lib.all_gather)(send as _, recv as _, count, nccl_dtype(dt), self.comm, self.stream()) };
        nccl_check(self.lib, r, "ncclAllGather")
    }
    unsafe fn reduce_scatter(&self, send: *const u8, recv: *mut u8, count: usize, dt: DType, op: ReduceOp) -> Result<()> {
        self.enter()?;
        // SAFETY: send valid for size × count elements, recv for count (the trait's contract).
        let r = unsafe { (self.lib.reduce_scatter)(send as _, recv as _, count, nccl_dtype(dt), nccl_op(op), self.comm, self.stream()) };
        nccl_check(self.lib, r, "ncclReduceScatter")
    }
    unsafe fn broadcast(&self, buf: *mut u8, count: usize, dt: DType, root: usize) -> Result<()> {
        self.enter()?;
        // SAFETY: buf valid for count elements (the trait's contract); in place.
        let r = unsafe { (self.lib.broadcast)(buf as _, buf as _, count, nccl_dtype(dt), root as i32, self.comm, self.stream()) };
        nccl_check(self.lib, r, "ncclBroadcast")
    }
    fn device_index(&self) -> i32 {
        self.device
    }
    fn stream(&self) -> crate::cuda::Stream {
        self.stream
    }
    fn split(&self, color: i32, key: i32) -> Result<Option<Box<dyn Backend>>> {
        self.enter()?;
        let split = self.lib.comm_split.ok_or_else(|| {
            Error::unsupported(format!("split: {} is NCCL {}, ncclCommSplit needs NCCL >= 2.18", self.lib.path, nc::version_string(self.lib.version)))
        })?;
        // Every rank must reach ncclCommSplit, which has no timeout: meet in a
        // barrier first (a one-word all-reduce waited for with the deadline).
        Backend::barrier(self)?;
        let mut child: ncclComm_t = std::ptr::null_mut();
        let c = if color < 0 { nc::NCCL_SPLIT_NOCOLOR } else { color };
        // SAFETY: live communicator, valid out-pointer; a NULL config inherits
        // the parent's.
        nccl_check(self.lib, unsafe { split(self.comm, c, key, &mut child, std::ptr::null_mut()) }, &format!("rank {}: ncclCommSplit", self.rank))?;
        if color < 0 || child.is_null() {
            return Ok(None);
        }
        match NcclBackend::new(self.lib, child, self.device, self.stream, true, self.timeout) {
            Ok(b) => Ok(Some(Box::new(b))),
            Err(e) => {
                // SAFETY: the fresh child, not used again.
                unsafe { (self.lib.comm_destroy)(child) };
                Err(e)
            }
        }
    }
    fn group(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        self.enter()?;
        // SAFETY: group calls bracket the collectives issued by f.
        nccl_check(self.lib, unsafe { (self.lib.group_start)() }, "ncclGroupStart")?;
        let r = f();
        // Always close the group, also when f failed part-way.
        // SAFETY: closes the group opened above.
        let end = nccl_check(self.lib, unsafe { (self.lib.group_end)() }, "ncclGroupEnd");
        r.and(end)
    }
    fn synchronize(&self) -> Result<()> {
        // SAFETY: the stream belongs to this communicator's device.
        self.wait_until(&|| match unsafe { cu::cuStreamQuery(self.stream as cu::CUstream) } {
            cu::CUresult::CUDA_SUCCESS => Ok(true),
            cu::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            q => cuda::check(q, "cuStreamQuery").map(|_| false),
        })
    }
    fn wait_event(&self, ev: &crate::cuda::event::Event) -> Result<()> {
        self.wait_until(&|| ev.query())
    }
}

impl NcclBackend {
    /// Poll `done` until true, with the deadline, NCCL's asynchronous errors
    /// and the abort flag (the NCCL communicator is aborted on timeout).
    fn wait_until(&self, done: &dyn Fn() -> Result<bool>) -> Result<()> {
        self.enter()?;
        let deadline = Instant::now() + self.timeout;
        let what = if self.owned { "the NCCL communicator was aborted" } else { "the wrapped NCCL communicator is left to its owner (ncclCommAbort it)" };
        loop {
            let q = done();
            let mut async_err = nc::NCCL_SUCCESS;
            // SAFETY: live comm (not destroyed: checked in enter and below).
            unsafe { (self.lib.comm_get_async_error)(self.comm, &mut async_err) };
            if async_err != nc::NCCL_SUCCESS && async_err != nc::NCCL_IN_PROGRESS {
                cuda::mark_failed();
                self.kill();
                return nccl_check(self.lib, async_err, &format!("rank {}: asynchronous NCCL error; {what}", self.rank));
            }
            match q {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    cuda::mark_failed();
                    return Err(e);
                }
            }
            if self.abort.load(Ordering::SeqCst) {
                cuda::mark_failed();
                self.kill();
                return Err(Error::aborted(format!("the communicator was aborted; {what}")));
            }
            if Instant::now() >= deadline {
                cuda::mark_failed();
                self.kill();
                return Err(Error::timeout(format!("rank {}: NCCL work did not finish within {} ms; {what}", self.rank, self.timeout.as_millis())));
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
        // Flag only: another thread may be inside an NCCL call on this comm,
        // and ncclCommAbort frees it. The owning thread aborts it when it sees
        // the flag (synchronize polls it every 50 µs) or at drop.
        self.abort.store(true, Ordering::SeqCst);
    }
    fn device(&self) -> Option<&dyn DeviceCollectives> {
        Some(self)
    }
}

impl Drop for NcclBackend {
    fn drop(&mut self) {
        // The barrier word (a DevMem) frees itself in its own context.
        if !self.owned || self.destroyed.load(Ordering::SeqCst) {
            return;
        }
        if self.abort.load(Ordering::SeqCst) || cuda::failed() {
            self.kill();
            return;
        }
        // Wait (with the deadline) for this rank's queued work, so that
        // ncclCommDestroy, which waits for it too, cannot hang on a dead peer;
        // synchronize aborts the comm if the wait fails.
        if self.synchronize().is_ok() && !self.destroyed.swap(true, Ordering::SeqCst) {
            let _ = cuda::set_device(self.device);
            // SAFETY: owned, live, idle, not used again.
            unsafe {
                (self.lib.comm_destroy)(self.comm);
            }
        }
    }
}
