//! "Bring your own collectives": a backend that calls the caller's functions
//! (LibTorch c10d, MPI, UCC...). Before each collective the ranks all-gather a
//! small descriptor through the same callbacks, so disagreement is MISMATCH
//! on every rank, as with the built-in transports.

use super::{Backend, OpDesc, OpKind};
use crate::dtype::{DType, ReduceOp};
use crate::dtype::{DtypeArg, ReduceOpArg};
use crate::error::{Error, Result};
use std::ffi::c_void;

/// Bring your own collectives (LibTorch c10d, MPI, UCC...). Callbacks return 0
/// on success; any other value fails the call with FLATSHARD_ERR_PEER_LOST and
/// poisons the communicator.
#[repr(C)]
#[derive(Clone, Copy)]
#[allow(non_camel_case_types)] // the C name
pub struct flatshard_collectives {
    pub struct_size: u32,
    pub ctx: *mut c_void,
    pub all_reduce: Option<unsafe extern "C" fn(ctx: *mut c_void, buf: *mut c_void, count: u64, dt: DtypeArg, op: ReduceOpArg) -> i32>,
    pub all_gather: Option<unsafe extern "C" fn(ctx: *mut c_void, send: *const c_void, recv: *mut c_void, count_per_rank: u64, dt: DtypeArg) -> i32>,
    pub reduce_scatter:
        Option<unsafe extern "C" fn(ctx: *mut c_void, send: *const c_void, recv: *mut c_void, count_per_rank: u64, dt: DtypeArg, op: ReduceOpArg) -> i32>,
    pub broadcast: Option<unsafe extern "C" fn(ctx: *mut c_void, buf: *mut c_void, count: u64, dt: DtypeArg, root: i32) -> i32>,
    pub barrier: Option<unsafe extern "C" fn(ctx: *mut c_void) -> i32>,
    /// May be NULL.
    pub destroy: Option<unsafe extern "C" fn(ctx: *mut c_void)>,
}

pub struct CallbackBackend {
    rank: usize,
    size: usize,
    ops: flatshard_collectives,
    /// Calls made on this communicator: travels in the agreement header.
    seq: std::sync::atomic::AtomicU32,
}

// SAFETY: the caller promises its callbacks (and ctx) may be used from the
// thread that uses the communicator, whichever it is (API.md: the caller's
// thread or the progress thread).
unsafe impl Send for CallbackBackend {}
// SAFETY: flatshard never calls the callbacks concurrently on one comm (one
// thread uses a communicator at a time; `abort` calls none); `seq` is atomic.
unsafe impl Sync for CallbackBackend {}

impl CallbackBackend {
    pub fn new(rank: usize, size: usize, ops: flatshard_collectives) -> Result<Self> {
        let missing: Vec<&str> = [
            ("all_reduce", ops.all_reduce.is_none()),
            ("all_gather", ops.all_gather.is_none()),
            ("reduce_scatter", ops.reduce_scatter.is_none()),
            ("broadcast", ops.broadcast.is_none()),
            ("barrier", ops.barrier.is_none()),
        ]
        .iter()
        .filter(|(_, m)| *m)
        .map(|(n, _)| *n)
        .collect();
        if !missing.is_empty() {
            return Err(Error::invalid_arg(format!("ops: callbacks {missing:?} are NULL (only destroy may be NULL)")));
        }
        Ok(CallbackBackend { rank, size, ops, seq: std::sync::atomic::AtomicU32::new(0) })
    }

    fn check(&self, name: &str, rc: i32) -> Result<()> {
        if rc != 0 {
            return Err(Error::peer_lost(format!("{name}: the user's collective callback returned {rc}")));
        }
        Ok(())
    }

    /// All-gather the descriptors through the user's all_gather and compare.
    fn agree(&self, desc: OpDesc) -> Result<()> {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mine = desc.encode(seq, 0);
        let mut all = vec![0u8; 32 * self.size];
        let f = self.ops.all_gather.ok_or_else(|| Error::internal("all_gather callback missing"))?;
        // SAFETY: the caller's callback with its own ctx (valid until destroy, per
        // flatshard_comm_from_collectives); send holds 32 u8, recv 32 × size.
        let rc = unsafe { f(self.ops.ctx, mine.as_ptr() as *const c_void, all.as_mut_ptr() as *mut c_void, 32, DtypeArg(DType::U8 as i32)) };
        self.check("agreement all_gather", rc)?;
        let mut bad = Vec::new();
        for r in 0..self.size {
            let h: [u8; 32] = all[32 * r..32 * r + 32].try_into().expect("32");
            match OpDesc::decode_in_step(&h, seq) {
                Ok((d, _)) if d == desc => {}
                Ok((d, _)) => bad.push(format!("rank {r} called {}", d.describe())),
                Err(e) => return Err(e.context(format!("rank {r}"))),
            }
        }
        if !bad.is_empty() {
            return Err(Error::mismatch(format!("ranks disagree: this rank called {}; {}", desc.describe(), bad.join("; "))));
        }
        Ok(())
    }
}

impl Backend for CallbackBackend {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn transport_name(&self) -> &'static str {
        "callbacks"
    }
    fn all_reduce(&self, buf: &mut [u8], dt: DType, op: ReduceOp) -> Result<()> {
        let n = (buf.len() / dt.size()) as u64;
        self.agree(OpDesc::new(OpKind::AllReduce, n, dt, op, -1))?;
        let f = self.ops.all_reduce.ok_or_else(|| Error::internal("callback missing"))?;
        // SAFETY: (here and in the collectives below) the caller's callback with its
        // own ctx (valid until destroy, per flatshard_comm_from_collectives); the
        // buffers are live slices borrowed for the call, holding the counts passed
        // (`n` elements; for all_gather recv and reduce_scatter send, size × n, which
        // Comm checked before calling the backend).
        self.check("all_reduce", unsafe { f(self.ops.ctx, buf.as_mut_ptr() as *mut c_void, n, DtypeArg(dt as i32), ReduceOpArg(op as i32)) })
    }
    fn all_gather(&self, send: &[u8], recv: &mut [u8], dt: DType) -> Result<()> {
        let n = (send.len() / dt.size()) as u64;
        self.agree(OpDesc::new(OpKind::AllGather, n, dt, ReduceOp::Sum, -1))?;
        let f = self.ops.all_gather.ok_or_else(|| Error::internal("callback missing"))?;
        // SAFETY: see all_reduce.
        self.check("all_gather", unsafe { f(self.ops.ctx, send.as_ptr() as *const c_void, recv.as_mut_ptr() as *mut c_void, n, DtypeArg(dt as i32)) })
    }
    fn reduce_scatter(&self, send: &[u8], recv: &mut [u8], dt: DType, op: ReduceOp) -> Result<()> {
        let n = (recv.len() / dt.size()) as u64;
        self.agree(OpDesc::new(OpKind::ReduceScatter, n, dt, op, -1))?;
        let f = self.ops.reduce_scatter.ok_or_else(|| Error::internal("callback missing"))?;
        // SAFETY: see all_reduce.
        self.check("reduce_scatter", unsafe {
            f(self.ops.ctx, send.as_ptr() as *const c_void, recv.as_mut_ptr() as *mut c_void, n, DtypeArg(dt as i32), ReduceOpArg(op as i32))
        })
    }
    fn broadcast(&self, buf: &mut [u8], dt: DType, root: usize) -> Result<()> {
        let n = (buf.len() / dt.size()) as u64;
        self.agree(OpDesc::new(OpKind::Broadcast, n, dt, ReduceOp::Sum, root as i32))?;
        let f = self.ops.broadcast.ok_or_else(|| Error::internal("callback missing"))?;
        // SAFETY: see all_reduce.
        self.check("broadcast", unsafe { f(self.ops.ctx, buf.as_mut_ptr() as *mut c_void, n, DtypeArg(dt as i32), root as i32) })
    }
    fn barrier(&self) -> Result<()> {
        let f = self.ops.barrier.ok_or_else(|| Error::internal("callback missing"))?;
        // SAFETY: the caller's callback with its own ctx (see all_reduce).
        self.check("barrier", unsafe { f(self.ops.ctx) })
    }
    fn abort(&self) {}
}

impl Drop for CallbackBackend {
    fn drop(&mut self) {
        if let Some(d) = self.ops.destroy {
            // SAFETY: the caller's destroy with its own ctx, called once (drop), after
            // the last use of the callbacks.
            unsafe { d(self.ops.ctx) };
        }
    }
}
