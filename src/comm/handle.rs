//! `Comm`, the handle the rest of the library uses: argument checks, AVG,
//! the poison rules of API §3, splitting into subgroups, and the routing of
//! device pointers.

use super::backend::{Backend, DeviceCollectives};
use super::rendezvous::{create_group, JobCtx};
use crate::config::Config;
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A communicator: a group of ranks and the transport that joins them.
pub struct Comm {
    backend: Box<dyn Backend>,
    abort: Arc<AtomicBool>,
    poisoned: Mutex<Option<String>>,
    ctx: Option<Arc<JobCtx>>,
    config: Arc<Config>,
    gid: String,
    splits: AtomicU64,
    /// One order for every operation, and the progress thread (API §7).
    pub(super) progress: super::progress::Engine,
}

impl Comm {
    /// The one constructor: a transport and what it belongs to.
    pub(super) fn assemble(backend: Box<dyn Backend>, abort: Arc<AtomicBool>, ctx: Option<Arc<JobCtx>>, config: Arc<Config>, gid: &str) -> Comm {
        let progress = super::progress::Engine::new(backend.rank());
        Comm { backend, abort, poisoned: Mutex::new(None), ctx, config, gid: gid.into(), splits: AtomicU64::new(0), progress }
    }

    /// Wrap a backend that needs no rendezvous (user callbacks, NCCL wrap).
    /// Its settings are this process's own: nothing to compare them with.
    pub fn from_backend(backend: Box<dyn Backend>, abort: Arc<AtomicBool>) -> Result<Comm> {
        let config = Config::from_env().map_err(|e| e.context(format!("rank {}", backend.rank())))?;
        Ok(Comm::with_settings(config, backend, abort))
    }

    /// `from_backend` with settings read beforehand (`Config::from_env`), for
    /// backends that must not be built, and dropped, when the settings are
    /// refused (a callback backend's drop calls the caller's destroy).
    pub fn with_settings(config: Config, backend: Box<dyn Backend>, abort: Arc<AtomicBool>) -> Comm {
        config.apply_process_wide();
        Comm::assemble(backend, abort, None, Arc::new(config), "ext")
    }

    /// Every FLATSHARD_* setting of this communicator (read when it was
    /// created; the job-wide ones agree on every rank).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Does this communicator take device pointers (NCCL)?
    pub fn is_device(&self) -> bool {
        self.backend.device().is_some()
    }

    /// The CUDA device of a device communicator (NCCL), None for host ones.
    pub fn device_index(&self) -> Option<i32> {
        self.backend.device().map(|d| d.device_index())
    }

    /// The stream device work is ordered on: the NCCL communicator's stream,
    /// or the legacy default stream (null) for host communicators.
    pub fn stream(&self) -> crate::cuda::Stream {
        self.backend.device().map_or(std::ptr::null_mut(), |d| d.stream())
    }

    fn dev(b: &dyn Backend) -> Result<&dyn DeviceCollectives> {
        b.device().ok_or_else(|| Error::unsupported("device collectives need an NCCL communicator (flatshard_comm_init_nccl / _wrap_nccl)"))
    }

    /// All-reduce of device memory, stream-ordered. `send == recv` is in place.
    ///
    /// # Safety
    /// Device pointers on this communicator's device, valid for `count` elements.
    pub unsafe fn dev_all_reduce(&self, send: *const u8, recv: *mut u8, count: usize, dt: DType, op: ReduceOp) -> Result<()> {
        op.check(dt)?;
        // SAFETY: our caller's contract (device pointers of this comm's device, valid
        // for the counts) is the device collective's.
        self.run(|b| unsafe { Self::dev(b)?.all_reduce(send, recv, count, dt, op) })
    }

    /// # Safety
    /// As `dev_all_reduce`; `recv` holds size × count elements.
    pub unsafe fn dev_all_gather(&self, send: *const u8, recv: *mut u8, count: usize, dt: DType) -> Result<()> {
        // SAFETY: our caller's contract (device pointers of this comm's device, valid
        // for the counts) is the device collective's.
        self.run(|b| unsafe { Self::dev(b)?.all_gather(send, recv, count, dt) })
    }

    /// # Safety
    /// As `dev_all_reduce`; `send` holds size × count elements.
    pub unsafe fn dev_reduce_scatter(&self, send: *const u8, recv: *mut u8, count: usize, dt: DType, op: ReduceOp) -> Result<()> {
        op.check(dt)?;
        // SAFETY: our caller's contract (device pointers of this comm's device, valid
        // for the counts) is the device collective's.
        self.run(|b| unsafe { Self::dev(b)?.reduce_scatter(send, recv, count, dt, op) })
    }

    /// # Safety
    /// As `dev_all_reduce`.
    pub unsafe fn dev_broadcast(&self, buf: *mut u8, count: usize, dt: DType, root: i32) -> Result<()> {
        if root < 0 || root as usize >= self.size() {
            return Err(Error::invalid_arg(format!("root: must be in [0, {}), got {root}", self.size())));
        }
        // SAFETY: our caller's contract (device pointers of this comm's device, valid
        // for the counts) is the device collective's.
        self.run(|b| unsafe { Self::dev(b)?.broadcast(buf, count, dt, root as usize) })
    }

    /// Issue the device collectives of `f` as one fused NCCL group.
    pub fn dev_group(&self, mut f: impl FnMut() -> Result<()>) -> Result<()> {
        match self.backend.device() {
            Some(d) => d.group(&mut f),
            None => f(),
        }
    }

    /// Wait for the device work queued on the communicator's stream, with the
    /// deadline (NCCL); OK at once for host communicators.
    pub fn synchronize(&self) -> Result<()> {
        if !self.is_device() {
            return Ok(());
        }
        self.run(|b| Self::dev(b)?.synchronize())
    }

    pub fn rank(&self) -> usize {
        self.backend.rank()
    }

    pub fn size(&self) -> usize {
        self.backend.size()
    }

    pub fn transport_name(&self) -> &'static str {
        self.backend.transport_name()
    }

    /// The job this communicator belongs to (job id, options); None for
    /// communicators built on callbacks or NCCL.
    pub fn job_ctx(&self) -> Option<&Arc<JobCtx>> {
        self.ctx.as_ref()
    }

    pub fn abort_flag(&self) -> &Arc<AtomicBool> {
        &self.abort
    }

    /// Run one collective with the poison rules of API.md §3.
    pub(crate) fn run<T>(&self, f: impl FnOnce(&dyn Backend) -> Result<T>) -> Result<T> {
        // Behind the operations issued before this one (API §7 order).
        let _turn = self.progress.turn();
        if let Some(why) = self.poisoned.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Err(Error::aborted(format!("rank {}: communicator unusable after an earlier failure ({why})", self.rank())));
        }
        if self.abort.load(Ordering::SeqCst) {
            return Err(Error::aborted(format!("rank {}: communicator was aborted", self.rank())));
        }
        let mut r = f(self.backend.as_ref());
        if r.is_err() && self.abort.load(Ordering::SeqCst) {
            // abort() shut the sockets down; report the cause, not the symptom.
            r = Err(Error::aborted("the communicator was aborted (flatshard_comm_abort) during the call"));
        }
        if let Err(e) = &r {
            if e.poisons() {
                *self.poisoned.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.msg.clone());
                // Close our side so peers stuck on us learn promptly.
                self.backend.abort();
            }
        }
        r.map_err(|e| if e.msg.starts_with("rank ") { e } else { e.context(format!("rank {}", self.rank())) })
    }

    fn check_len(&self, what: &str, len: usize, count: u64, dt: DType) -> Result<()> {
        let want = dt.bytes(count, what)?;
        if len != want {
            return Err(Error::internal(format!("{what}: buffer of {len} bytes for {count} x {}", dt.name())));
        }
        Ok(())
    }

    pub fn all_reduce(&self, buf: &mut [u8], dt: DType, op: ReduceOp) -> Result<()> {
        op.check(dt)?;
        let n = self.size();
        let base = if op == ReduceOp::Avg { ReduceOp::Sum } else { op };
        self.run(|b| b.all_reduce(buf, dt, base))?;
        if op == ReduceOp::Avg && n > 1 {
            crate::reduce::scale(buf, dt, n as f64);
        }
        Ok(())
    }

    pub fn all_gather(&self, send: &[u8], recv: &mut [u8], dt: DType) -> Result<()> {
        self.check_len("all_gather recv", recv.len(), (send.len() / dt.size() * self.size()) as u64, dt)?;
        self.run(|b| b.all_gather(send, recv, dt))
    }

    pub fn reduce_scatter(&self, send: &[u8], recv: &mut [u8], dt: DType, op: ReduceOp) -> Result<()> {
        op.check(dt)?;
        self.check_len("reduce_scatter send", send.len(), (recv.len() / dt.size() * self.size()) as u64, dt)?;
        let base = if op == ReduceOp::Avg { ReduceOp::Sum } else { op };
        self.run(|b| b.reduce_scatter(send, recv, dt, base))?;
        if op == ReduceOp::Avg && self.size() > 1 {
            crate::reduce::scale(recv, dt, self.size() as f64);
        }
        Ok(())
    }

    pub fn broadcast(&self, buf: &mut [u8], dt: DType, root: i32) -> Result<()> {
        if root < 0 || root as usize >= self.size() {
            return Err(Error::invalid_arg(format!("root: must be in [0, {}), got {root}", self.size())));
        }
        self.run(|b| b.broadcast(buf, dt, root as usize))
    }

    pub fn barrier(&self) -> Result<()> {
        self.run(|b| b.barrier())
    }

    /// Unblock every waiter and poison the communicator; callable from any thread.
    pub fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
        self.backend.abort();
    }

    pub fn is_poisoned(&self) -> bool {
        self.abort.load(Ordering::SeqCst) || self.poisoned.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// MPI_Comm_split: ranks with the same `color` form a group ordered by
    /// (key, rank); color < 0 joins none (returns None). Collective.
    pub fn split(&self, color: i32, key: i32) -> Result<Option<Comm>> {
        if self.is_device() {
            let b = self.run(|b| Self::dev(b)?.split(color, key))?;
            return Ok(b.map(|b| Comm::assemble(b, Arc::new(AtomicBool::new(false)), None, self.config.clone(), "ext")));
        }
        let ctx = self
            .ctx
            .clone()
            .ok_or_else(|| Error::unsupported("split: this communicator was built from user callbacks; create subgroups with your own library"))?;
        let n = self.size();
        let mut mine = [0u8; 8];
        mine[..4].copy_from_slice(&color.to_le_bytes());
        mine[4..].copy_from_slice(&key.to_le_bytes());
        let mut all = vec![0u8; 8 * n];
        self.all_gather(&mine, &mut all, DType::U8)?;
        let seq = self.splits.fetch_add(1, Ordering::SeqCst);
        if color < 0 {
            return Ok(None);
        }
        let mut members: Vec<(i32, usize)> = (0..n)
            .filter_map(|r| {
                let c = i32::from_le_bytes(all[8 * r..8 * r + 4].try_into().expect("4"));
                let k = i32::from_le_bytes(all[8 * r + 4..8 * r + 8].try_into().expect("4"));
                (c == color).then_some((k, r))
            })
            .collect();
        members.sort();
        let new_rank = members.iter().position(|m| m.1 == self.rank()).ok_or_else(|| Error::internal("split: own rank missing"))?;
        let gid = format!("{}.{}c{}", self.gid, seq, color);
        let abort = Arc::new(AtomicBool::new(false));
        let backend = create_group(&ctx, &gid, new_rank, members.len(), &abort)?;
        Ok(Some(Comm::assemble(backend, abort, Some(ctx), self.config.clone(), &gid)))
    }

    /// torch.distributed.new_subgroups: contiguous blocks of `group_size`.
    pub fn new_subgroups(&self, group_size: i32) -> Result<Comm> {
        let n = self.size() as i32;
        if group_size <= 0 || group_size > n || n % group_size != 0 {
            return Err(Error::invalid_arg(format!("group_size: must be positive and divide the communicator size {n}, got {group_size}")));
        }
        let r = self.rank() as i32;
        self.split(r / group_size, r)?.ok_or_else(|| Error::internal("new_subgroups: no group"))
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        // Peers blocked on us get PEER_LOST when the sockets close. An NCCL
        // communicator is not aborted: its backend destroys it (owned; NCCL
        // finishes this rank's queued work first) or leaves it (wrapped).
        if !self.is_device() {
            self.backend.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{on_threads, tcp_comms};
    use super::*;
    use crate::error::ErrorKind;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_ne_bytes()).collect()
    }

    /// AVG is SUM divided by the size; a mismatch leaves the communicator
    /// usable; the call after it runs normally.
    #[test]
    fn avg_and_mismatch_keep_the_comm_usable() {
        let out = on_threads(tcp_comms(3, "unit/avg"), |r, c: Comm| {
            let mut b = f32s(&[r as f32, 1.0]);
            c.all_reduce(&mut b, DType::F32, ReduceOp::Avg).unwrap();
            assert_eq!(b, f32s(&[1.0, 1.0]));
            // rank 1 calls a different op: MISMATCH everywhere, nothing moved
            let op = if r == 1 { ReduceOp::Max } else { ReduceOp::Sum };
            let mut b = f32s(&[r as f32]);
            let e = c.all_reduce(&mut b, DType::F32, op).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Mismatch, "rank {r}: {e}");
            assert_eq!(b, f32s(&[r as f32]));
            assert!(!c.is_poisoned());
            c.barrier().unwrap();
            let e = c.all_reduce(&mut b, DType::I32, ReduceOp::Avg).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument);
            c.barrier().unwrap();
            r
        });
        assert_eq!(out, vec![0, 1, 2]);
    }

    /// A peer that leaves poisons the communicator: PEER_LOST once, then
    /// ABORTED at once for every later call; abort() poisons too.
    #[test]
    fn peer_lost_poisons_and_abort_poisons() {
        let mut comms = tcp_comms(2, "unit/poison");
        let gone = comms.pop().unwrap();
        drop(gone);
        let c = comms.pop().unwrap();
        let mut b = vec![0u8; 64];
        let e = c.all_reduce(&mut b, DType::F32, ReduceOp::Sum).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PeerLost, "{e}");
        assert!(c.is_poisoned());
        let t = std::time::Instant::now();
        let e = c.barrier().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Aborted, "{e}");
        assert!(e.msg.contains("unusable after an earlier failure"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_millis(100));

        let c = tcp_comms(2, "unit/abort").pop().unwrap();
        c.abort();
        assert_eq!(c.barrier().unwrap_err().kind, ErrorKind::Aborted);
    }

    /// abort() from another thread unblocks a collective that waits for a
    /// peer that never calls.
    #[test]
    fn abort_from_another_thread_unblocks() {
        let mut comms = tcp_comms(2, "unit/abort-thread");
        let _silent = comms.pop().unwrap();
        let c = Arc::new(comms.pop().unwrap());
        let c2 = c.clone();
        let h = std::thread::spawn(move || c2.barrier());
        std::thread::sleep(std::time::Duration::from_millis(100));
        let t = std::time::Instant::now();
        c.abort();
        let e = h.join().unwrap().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Aborted, "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }

    /// The cross-rank agreement step names the field and the ranks that
    /// differ, and lets a refusing rank report its own error.
    #[test]
    fn agreement_names_fields_and_refusals() {
        let out = on_threads(tcp_comms(3, "unit/agree"), |r, c: Comm| {
            let same = [("a", 1u64), ("b", 2)];
            crate::agree::agree(&c, "unit", 2, Ok(&same)).unwrap();
            let diff = [("a", 1u64), ("b", if r == 2 { 9 } else { 2 })];
            let e = crate::agree::agree(&c, "unit", 2, Ok(&diff)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Mismatch);
            assert!(e.msg.contains("b (rank 0: 2, rank 2: 9)") && !e.msg.contains("a (rank"), "{}", e.msg);
            let mine = if r == 1 { Err(()) } else { Ok(&same[..]) };
            let res = crate::agree::agree(&c, "unit", 2, mine);
            if r == 1 {
                assert!(res.is_ok(), "the refusing rank reports its own error");
            } else {
                let e = res.unwrap_err();
                assert!(e.kind == ErrorKind::Mismatch && e.msg.contains("rank 1 refused its arguments"), "{}", e.msg);
            }
            c.barrier().is_ok()
        });
        assert!(out.iter().all(|ok| *ok));
    }
}
