//! A flat param with asynchronous operations (API §7): `unshard_async` and
//! `reduce_grads_async` hand the flat param to the communicator's progress
//! thread, and every other call first waits for that work (`settled`).
//!
//! The flat param lives behind an `Arc<Mutex<_>>`: the queued job holds one
//! reference and the lock while it runs, the caller's calls take the lock
//! only after the in-flight work finished, so the two never touch it at the
//! same time (the lock is then uncontended). The job's reference is dropped
//! before the work's status is published, so after `settled` the caller is
//! the only owner again.
//!
//! Before an asynchronous operation moves data the ranks agree on (flat
//! param, operation, options) through `crate::agree`: ranks that issued
//! different sequences (e.g. unshard of two flat params of the same shape)
//! get MISMATCH on the work instead of exchanging the wrong buffers.

use super::{FlatParam, Reduced, UnshardOptions};
use crate::comm::progress::{is_call_error, Work};
use crate::comm::Comm;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A flat param, the communicators it was built on, and its in-flight work.
pub struct SharedFlatParam {
    fp: Arc<Mutex<FlatParam>>,
    comm: Arc<Comm>,
    replicate: Option<Arc<Comm>>,
    /// The last asynchronous operation issued on it, until a call waits for it.
    inflight: Option<Work>,
    /// Same on every rank that built its flat params in the same order.
    id: u64,
    /// numel, padded numel, shard numel (read without waiting).
    sizes: [u64; 3],
    /// Set by a reshard that waits for an in-flight reduce_grads_async: the
    /// full gradient is freed right after it, so the reduction need not zero
    /// it (API §7: the full gradients belong to the library until the work
    /// finishes, so nobody can see them in between).
    resharding: Arc<AtomicBool>,
}

const UNSHARD: u64 = 1;
const REDUCE_GRADS: u64 = 2;

fn option_bits(o: &UnshardOptions) -> u64 {
    o.writeback as u64 | (o.rank0_only as u64) << 1 | (o.offload_to_cpu as u64) << 2 | (o.with_grads as u64) << 3 | (o.forward_only as u64) << 4
}

/// Compare (flat param, operation, options) across the ranks of `comm`.
fn agree_op(comm: &Comm, id: u64, op: u64, options: u64) -> Result<()> {
    agree_or_refuse(comm, "asynchronous flat-param operation", id, op, options, true)
}

/// `agree_op`, or (`ok` false) take part as a rank that refuses: its peers
/// then get MISMATCH naming it.
fn agree_or_refuse(comm: &Comm, what: &str, id: u64, op: u64, options: u64, ok: bool) -> Result<()> {
    let fields = [("flat param (creation order)", id), ("operation (1 unshard_async, 2 reduce_grads_async)", op), ("unshard options", options)];
    crate::agree::agree(comm, what, fields.len(), if ok { Ok(&fields) } else { Err(()) })
}

/// Work that ran during the call (NCCL): argument and state
/// errors are the call's, the others the work's.
fn ran_now(r: Result<()>) -> Result<Work> {
    match r {
        Err(e) if is_call_error(&e) => Err(e),
        r => Ok(Work::finished(r)),
    }
}

impl SharedFlatParam {
    pub fn new(fp: FlatParam, comm: Arc<Comm>, replicate: Option<Arc<Comm>>) -> SharedFlatParam {
        let sizes = [fp.numel(), fp.padded_numel(), fp.shard_numel()];
        let id = comm.next_object_id();
        SharedFlatParam { fp: Arc::new(Mutex::new(fp)), comm, replicate, inflight: None, id, sizes, resharding: Arc::new(AtomicBool::new(false)) }
    }

    pub fn comm(&self) -> &Arc<Comm> {
        &self.comm
    }
    pub fn replicate(&self) -> Option<&Arc<Comm>> {
        self.replicate.as_ref()
    }
    pub fn numel(&self) -> u64 {
        self.sizes[0]
    }
    pub fn padded_numel(&self) -> u64 {
        self.sizes[1]
    }
    pub fn shard_numel(&self) -> u64 {
        self.sizes[2]
    }

    /// The flat param, after its in-flight work (if any) finished. Returns
    /// that work's error if it failed and nobody was told yet (API §7); the
    /// flat param then is as the failure left it (sharded after a failed
    /// unshard, gradients unchanged after a failed reduction).
    pub fn settled(&mut self) -> Result<MutexGuard<'_, FlatParam>> {
        if let Some(w) = self.inflight.take() {
            w.settle()?;
        }
        Ok(self.fp.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// `f` on the flat param and its communicator, after the in-flight work
    /// (whose error it returns instead, as [`Self::settled`]).
    pub fn with_settled<R>(&mut self, f: impl FnOnce(&mut FlatParam, &Comm) -> Result<R>) -> Result<R> {
        let comm = self.comm.clone();
        let mut fp = self.settled()?;
        f(&mut fp, &comm)
    }

    /// Reshard, after the in-flight work. A reduce_grads_async still in
    /// flight is told that its full gradient will be freed unseen.
    pub fn reshard(&mut self) -> Result<()> {
        if self.inflight.as_ref().is_some_and(|w| !w.is_finished()) {
            self.resharding.store(true, Ordering::SeqCst);
        }
        let comm = self.comm.clone();
        let r = self.settled().and_then(|mut fp| fp.reshard(&comm));
        self.resharding.store(false, Ordering::SeqCst);
        r
    }

    /// HYBRID_SHARD on host communicators: the reduce-scatter over the shard
    /// group is queued on its communicator, the all-reduce over the
    /// replicate group on that one's, each behind what was issued on it
    /// before (so both keep the order of the calls); the second waits for
    /// the first and alone changes the gradients. Its work is the
    /// operation's: a failed first part fails it, on the replicate peers too
    /// (they get MISMATCH naming this rank instead of waiting for it).
    fn hybrid_reduce_async(&mut self, comm: Arc<Comm>, rep: Arc<Comm>) -> Result<Work> {
        let slot: Arc<Mutex<Option<Reduced>>> = Arc::new(Mutex::new(None));
        let (fp, c, r, id, out) = (self.fp.clone(), comm.clone(), rep.clone(), self.id, slot.clone());
        let first = comm.submit(Box::new(move || {
            agree_op(&c, id, REDUCE_GRADS, 0)?;
            let red = fp.lock().unwrap_or_else(|p| p.into_inner()).reduce_grads_local(&c, Some(&r))?;
            *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(red);
            Ok(())
        }))?;
        let (fp, c, r, resharding) = (self.fp.clone(), comm, rep.clone(), self.resharding.clone());
        resharding.store(false, Ordering::SeqCst);
        rep.submit(Box::new(move || {
            let done = first.wait_quiet();
            agree_or_refuse(&r, "asynchronous flat-param operation (replicate group)", id, REDUCE_GRADS, 0, done.is_ok())?;
            done?;
            let red = slot
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .ok_or_else(|| Error::internal("hybrid reduce_grads_async: the shard group's result is missing"))?;
            red.all_reduce(&r)?;
            fp.lock().unwrap_or_else(|p| p.into_inner()).apply_reduced(&c, red, &|| resharding.load(Ordering::SeqCst))
        }))
    }

    /// Wait for in-flight work without reporting its status (free).
    pub fn wait_quiet(&mut self) {
        if let Some(w) = self.inflight.take() {
            let _ = w.wait_quiet();
        }
    }

    /// Queue an unshard. From now on the flat param counts as unsharded:
    /// INVALID_STATE if it is, or if an unshard or reduction is in flight.
    pub fn unshard_async(&mut self, o: UnshardOptions) -> Result<Work> {
        match &self.inflight {
            Some(w) if !w.is_finished() => {
                return Err(Error::invalid_state(format!(
                    "unshard_async: rank {}: the flat param counts as unsharded (an unshard_async or reduce_grads_async is in flight); reshard it first",
                    self.comm.rank()
                )))
            }
            _ => {}
        }
        let comm = self.comm.clone();
        let mut g = self.settled()?;
        g.check_unshard(&comm)?;
        o.validate(comm.rank())?;
        comm.check_usable()?;
        let w = if comm.is_device() {
            // Stream-ordered already: run now, complete on return.
            let r = g.unshard(&comm, o);
            drop(g);
            ran_now(r)?
        } else {
            drop(g);
            let (fp, c, id) = (self.fp.clone(), comm.clone(), self.id);
            comm.submit(Box::new(move || {
                agree_op(&c, id, UNSHARD, option_bits(&o))?;
                let mut fp = fp.lock().unwrap_or_else(|p| p.into_inner());
                fp.unshard(&c, o)?;
                // A training unshard's zero-filled full gradient is made here,
                // on the progress thread, not by the caller's first view
                // (where its memset also slowed the gathers running meanwhile).
                // A failure to allocate it is left to that view, which
                // retries and reports it: the unshard itself succeeded.
                let _ = fp.prepare_grad();
                Ok(())
            }))?
        };
        self.inflight = Some(w.clone());
        Ok(w)
    }

    /// Queue a gradient reduction (after waiting for earlier in-flight work,
    /// whose error it returns); HYBRID_SHARD in two parts, one per
    /// communicator (`hybrid_reduce_async`). NCCL runs it during the call,
    /// in its stream's order.
    pub fn reduce_grads_async(&mut self) -> Result<Work> {
        let (comm, rep) = (self.comm.clone(), self.replicate.clone());
        let mut g = self.settled()?;
        g.check_reduce_grads(&comm, rep.as_deref())?;
        comm.check_usable()?;
        let w = if comm.is_device() || rep.as_ref().is_some_and(|r| r.is_device()) {
            let r = g.reduce_grads(&comm, rep.as_deref());
            drop(g);
            ran_now(r)?
        } else if let Some(rep) = rep {
            drop(g);
            rep.check_usable()?;
            self.hybrid_reduce_async(comm, rep)?
        } else {
            drop(g);
            let (fp, c, id, resharding) = (self.fp.clone(), comm.clone(), self.id, self.resharding.clone());
            resharding.store(false, Ordering::SeqCst);
            comm.submit(Box::new(move || {
                agree_op(&c, id, REDUCE_GRADS, 0)?;
                fp.lock().unwrap_or_else(|p| p.into_inner()).reduce_grads_then(&c, None, &|| resharding.load(Ordering::SeqCst))
            }))?
        };
        self.inflight = Some(w.clone());
        Ok(w)
    }
}
