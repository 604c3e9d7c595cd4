//! Communicators: the `Backend` trait and its transports (tcp, shm, user
//! callbacks), the rendezvous that builds groups, and `Comm`, the handle the
//! rest of the library uses (argument checks, AVG, poisoning, splitting).

pub mod auth;
pub mod callbacks;
pub mod launch;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod net;
pub mod shm;
pub mod store;
pub mod tcp;
pub mod torchstore;

use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use net::Wait;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Which host transport a group uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Shared memory when every member is on this host, TCP otherwise.
    Auto,
    Tcp,
    Shm,
}

#[derive(Debug, Clone)]
pub struct CommOptions {
    /// Per collective and per rendezvous.
    pub timeout: Duration,
    /// Job secret; `None` = env `FLATSHARD_TOKEN`; unset = no secret.
    pub token: Option<Vec<u8>>,
    /// Local address to listen on; `None` = the interface that reaches the master.
    pub bind_addr: Option<String>,
    pub transport: Transport,
}

impl Default for CommOptions {
    fn default() -> Self {
        CommOptions { timeout: Duration::from_millis(600_000), token: None, bind_addr: None, transport: Transport::Auto }
    }
}

/// The kinds of collective, as they travel in headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    AllReduce = 1,
    AllGather = 2,
    ReduceScatter = 3,
    Broadcast = 4,
    Barrier = 5,
}

/// What one collective call is. Every rank must call with the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpDesc {
    pub kind: OpKind,
    pub count: u64,
    pub dt: DType,
    pub op: ReduceOp,
    pub root: i32,
}

impl OpDesc {
    pub fn new(kind: OpKind, count: u64, dt: DType, op: ReduceOp, root: i32) -> Self {
        OpDesc { kind, count, dt, op, root }
    }
    pub fn describe(&self) -> String {
        let mut s = format!("{:?}(count {}, {}", self.kind, self.count, self.dt.name());
        if matches!(self.kind, OpKind::AllReduce | OpKind::ReduceScatter) {
            s += &format!(", {}", self.op.name());
        }
        if self.kind == OpKind::Broadcast {
            s += &format!(", root {}", self.root);
        }
        s + ")"
    }
    /// 32-byte wire header: magic, seq, kind, dtype, op, 0, root, count, payload length.
    pub fn encode(&self, seq: u32, payload: u64) -> [u8; 32] {
        let mut h = [0u8; 32];
        h[0..4].copy_from_slice(b"FSOP");
        h[4..8].copy_from_slice(&seq.to_le_bytes());
        h[8] = self.kind as u8;
        h[9] = self.dt as u8;
        h[10] = self.op as u8;
        h[12..16].copy_from_slice(&self.root.to_le_bytes());
        h[16..24].copy_from_slice(&self.count.to_le_bytes());
        h[24..32].copy_from_slice(&payload.to_le_bytes());
        h
    }
    pub fn decode(h: &[u8; 32]) -> Result<(OpDesc, u64)> {
        if &h[0..4] != b"FSOP" {
            return Err(Error::peer_lost("sent a frame that is not a flatshard header (stream out of step)"));
        }
        let kind = match h[8] {
            1 => OpKind::AllReduce,
            2 => OpKind::AllGather,
            3 => OpKind::ReduceScatter,
            4 => OpKind::Broadcast,
            5 => OpKind::Barrier,
            k => return Err(Error::peer_lost(format!("sent unknown collective kind {k}"))),
        };
        let dt = DType::from_raw(h[9] as i64, "header dtype").map_err(|e| Error::peer_lost(e.msg))?;
        let op = ReduceOp::from_raw(h[10] as i64, "header op").map_err(|e| Error::peer_lost(e.msg))?;
        let root = i32::from_le_bytes(h[12..16].try_into().expect("4"));
        let count = u64::from_le_bytes(h[16..24].try_into().expect("8"));
        let payload = u64::from_le_bytes(h[24..32].try_into().expect("8"));
        Ok((OpDesc { kind, count, dt, op, root }, payload))
    }
}

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

/// What every group of one job on this process shares: options, the store
/// connection, and (on rank 0) the store itself.
pub struct JobCtx {
    pub opts: CommOptions,
    pub key: Vec<u8>,
    pub store: Option<store::StoreClient>,
    pub server: Option<store::StoreServer>,
    pub job_id: String,
    pub host_id: String,
    pub bind_ip: IpAddr,
    /// FLATSHARD_TCP_SOCKBUF, read once at init.
    pub tcp_sockbuf: Option<usize>,
}

/// A communicator: a group of ranks and the transport that joins them.
pub struct Comm {
    backend: Box<dyn Backend>,
    abort: Arc<AtomicBool>,
    poisoned: Mutex<Option<String>>,
    ctx: Option<Arc<JobCtx>>,
    gid: String,
    splits: AtomicU64,
}

fn host_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    format!("{}:{}", host.trim(), boot.trim())
}

impl Comm {
    /// Wrap a backend that needs no rendezvous (user callbacks, NCCL wrap).
    pub fn from_backend(backend: Box<dyn Backend>, abort: Arc<AtomicBool>) -> Comm {
        Comm { backend, abort, poisoned: Mutex::new(None), ctx: None, gid: "ext".into(), splits: AtomicU64::new(0) }
    }

    /// Join a job: rank 0 serves the rendezvous store on `master_addr:port`.
    pub fn init(master_addr: &str, port: u16, rank: i32, world: i32, opts: CommOptions) -> Result<Comm> {
        Comm::init_via(master_addr, port, rank, world, opts, None)
    }

    /// `init`, or with `agent_store` = Some(key scope): meet in the PyTorch
    /// TCPStore that torchrun's agent serves on `master_addr:port`.
    fn init_via(master_addr: &str, port: u16, rank: i32, world: i32, mut opts: CommOptions, agent_store: Option<&str>) -> Result<Comm> {
        if world < 1 {
            return Err(Error::invalid_arg(format!("world_size: must be >= 1, got {world}")));
        }
        if rank < 0 || rank >= world {
            return Err(Error::invalid_arg(format!("rank: must be in [0, {world}), got {rank}")));
        }
        let (rank, world) = (rank as usize, world as usize);
        if opts.token.is_none() {
            opts.token = std::env::var("FLATSHARD_TOKEN").ok().filter(|t| !t.is_empty()).map(String::into_bytes);
        }
        let key = opts.token.clone().unwrap_or_default();
        // Settings are checked before any rank touches the network, so a bad
        // one fails every rank at once instead of leaving peers waiting.
        let tcp_sockbuf = tcp_sockbuf_setting(rank)?;
        if world == 1 {
            let ctx =
                JobCtx { opts, key, store: None, server: None, job_id: "solo".into(), host_id: host_id(), bind_ip: IpAddr::from([127, 0, 0, 1]), tcp_sockbuf };
            let abort = Arc::new(AtomicBool::new(false));
            return Ok(Comm {
                backend: Box::new(SelfBackend),
                abort,
                poisoned: Mutex::new(None),
                ctx: Some(Arc::new(ctx)),
                gid: "w".into(),
                splits: AtomicU64::new(0),
            });
        }
        if port == 0 {
            return Err(Error::invalid_arg(format!("master_port: 0 is not a port the other {} ranks can reach", world - 1)));
        }
        let master = net::resolve(master_addr, port)?;
        let bind_ip = match &opts.bind_addr {
            Some(a) => a.parse::<IpAddr>().map_err(|e| Error::invalid_arg(format!("bind_addr: '{a}' is not an IP address: {e}")))?,
            None => net::local_addr_towards(master)?,
        };
        let abort = Arc::new(AtomicBool::new(false));
        let what = format!("rank {rank}: rendezvous at {master}");
        let w = Wait::new(opts.timeout, &abort, &what);
        let (server, store) = match agent_store {
            Some(scope) => (None, store::StoreClient::torch(torchstore::TorchStore::connect(master_addr, port, scope, &w)?)),
            None => {
                let server = if rank == 0 {
                    let l = net::listen(master).map_err(|e| e.context("rank 0 serves the rendezvous store on master_addr:master_port"))?;
                    Some(store::StoreServer::start(l, key.clone())?)
                } else {
                    None
                };
                (server, store::StoreClient::connect(master, &key, rank, &w)?)
            }
        };
        let job_id = if rank == 0 {
            let mut b = [0u8; 6];
            net::random_bytes(&mut b)?;
            let id: String = b.iter().map(|x| format!("{x:02x}")).collect();
            store.set("job_id", id.as_bytes(), &w)?;
            id
        } else {
            String::from_utf8_lossy(&store.get("job_id", &w)?).into_owned()
        };
        if agent_store.is_some() {
            torchstore::check_members(&store, &key, &job_id, rank, world, &w)?;
        }
        let ctx = Arc::new(JobCtx { opts, key, store: Some(store), server, job_id, host_id: host_id(), bind_ip, tcp_sockbuf });
        let backend = create_group(&ctx, "w", rank, world, &abort)?;
        crate::log::info(rank, &format!("joined job {} ({} ranks, {} transport)", ctx.job_id, world, backend.transport_name()));
        Ok(Comm { backend, abort, poisoned: Mutex::new(None), ctx: Some(ctx), gid: "w".into(), splits: AtomicU64::new(0) })
    }

    /// NCCL communicator: the ncclUniqueId travels from rank 0 through the
    /// same authenticated TCP rendezvous as a host communicator.
    #[cfg(feature = "cuda")]
    pub fn init_nccl(master_addr: &str, port: u16, rank: i32, world: i32, device: i32, stream: *mut std::ffi::c_void, opts: CommOptions) -> Result<Comm> {
        crate::cuda::nccl()?;
        let timeout = opts.timeout;
        let host = Comm::init(master_addr, port, rank, world, CommOptions { transport: Transport::Tcp, ..opts })?;
        let mut msg = [0u8; 129];
        if rank == 0 {
            if let Ok(id) = nccl::NcclBackend::unique_id() {
                msg[0] = 1;
                msg[1..].copy_from_slice(&id);
            }
        }
        host.broadcast(&mut msg, DType::U8, 0)?;
        if msg[0] != 1 {
            return Err(Error::unsupported("rank 0 could not create an ncclUniqueId (is NCCL loadable there?)"));
        }
        let id: [u8; 128] = msg[1..].try_into().map_err(|_| Error::internal("id length"))?;
        // ncclCommInitRank has no timeout: make sure every rank can use its
        // device before any of them enters it.
        let mine = crate::cuda::set_device(device);
        let mut flags = vec![0u8; host.size()];
        host.all_gather(&[mine.is_err() as u8], &mut flags, DType::U8)?;
        if let Err(e) = mine {
            return Err(e.context(format!("rank {rank}: cuda_device {device}")));
        }
        if let Some(bad) = flags.iter().position(|f| *f != 0) {
            return Err(Error::mismatch(format!("rank {rank}: rank {bad} cannot use its CUDA device (see its error); no NCCL communicator was created")));
        }
        let b = nccl::NcclBackend::init(&id, rank as usize, world as usize, device, stream, timeout)?;
        host.barrier()?;
        Ok(Comm::from_backend(Box::new(b), Arc::new(AtomicBool::new(false))))
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
        self.run(|b| Self::dev(b)?.all_reduce(send, recv, count, dt, op))
    }

    /// # Safety
    /// As `dev_all_reduce`; `recv` holds size × count elements.
    pub unsafe fn dev_all_gather(&self, send: *const u8, recv: *mut u8, count: usize, dt: DType) -> Result<()> {
        self.run(|b| Self::dev(b)?.all_gather(send, recv, count, dt))
    }

    /// # Safety
    /// As `dev_all_reduce`; `send` holds size × count elements.
    pub unsafe fn dev_reduce_scatter(&self, send: *const u8, recv: *mut u8, count: usize, dt: DType, op: ReduceOp) -> Result<()> {
        op.check(dt)?;
        self.run(|b| Self::dev(b)?.reduce_scatter(send, recv, count, dt, op))
    }

    /// # Safety
    /// As `dev_all_reduce`.
    pub unsafe fn dev_broadcast(&self, buf: *mut u8, count: usize, dt: DType, root: i32) -> Result<()> {
        if root < 0 || root as usize >= self.size() {
            return Err(Error::invalid_arg(format!("root: must be in [0, {}), got {root}", self.size())));
        }
        self.run(|b| Self::dev(b)?.broadcast(buf, count, dt, root as usize))
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

    /// The launcher's environment (launch.rs): torchrun (through its agent's
    /// store when it hosts one), flatshard-run, Slurm, Open MPI or PMI.
    pub fn init_from_env(opts: CommOptions) -> Result<Comm> {
        let env = launch::from_process_env()?;
        let (addr, port) = env.master.clone().unwrap_or_else(|| ("127.0.0.1".to_string(), 0));
        crate::log::info(env.rank as usize, &format!("{} launch: rank {} of {}, local rank {:?}", env.source, env.rank, env.world, env.local_rank));
        Comm::init_via(&addr, port, env.rank, env.world, opts, env.agent_store.as_ref().map(|a| a.prefix.as_str()))
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
            return Ok(b.map(|b| Comm::from_backend(b, Arc::new(AtomicBool::new(false)))));
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
        Ok(Some(Comm { backend, abort, poisoned: Mutex::new(None), ctx: Some(ctx), gid, splits: AtomicU64::new(0) }))
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

/// FLATSHARD_TCP_SOCKBUF: socket buffer bytes for every TCP peer (0 = kernel
/// autotuning); None when unset (then peers on this host get
/// tcp::LOCAL_SOCKBUF and others autotuning).
fn tcp_sockbuf_setting(rank: usize) -> Result<Option<usize>> {
    const VAR: &str = "FLATSHARD_TCP_SOCKBUF";
    let Some(b) = env_bytes_opt(VAR).map_err(|e| e.context(format!("rank {rank}")))? else {
        return Ok(None);
    };
    if b != 0 && !(tcp::MIN_SOCKBUF..=tcp::MAX_SOCKBUF).contains(&b) {
        return Err(Error::invalid_arg(format!(
            "rank {rank}: environment: {VAR}={b} is outside [{}, {}] bytes (or 0 for kernel autotuning)",
            tcp::MIN_SOCKBUF,
            tcp::MAX_SOCKBUF
        )));
    }
    Ok(Some(b))
}

/// A byte count from the environment; None when unset or empty,
/// INVALID_ARGUMENT naming the variable when malformed.
fn env_bytes_opt(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            v.trim().parse::<usize>().map(Some).map_err(|_| Error::invalid_arg(format!("environment: {name}='{v}' is not a byte count")))
        }
        _ => Ok(None),
    }
}

/// `env_bytes_opt`, with `default` when unset or empty.
pub(crate) fn env_bytes(name: &str, default: usize) -> Result<usize> {
    Ok(env_bytes_opt(name)?.unwrap_or(default))
}

/// Rendezvous for one group and pick its transport.
fn create_group(ctx: &Arc<JobCtx>, gid: &str, rank: usize, size: usize, abort: &Arc<AtomicBool>) -> Result<Box<dyn Backend>> {
    if size == 1 {
        return Ok(Box::new(SelfBackend));
    }
    let store = ctx.store.as_ref().ok_or_else(|| Error::internal("group of several ranks without a store"))?;
    let what = format!("rank {rank}: rendezvous of group {gid}");
    let w = Wait::new(ctx.opts.timeout, abort, &what);
    let listener = net::listen(SocketAddr::new(ctx.bind_ip, 0))?;
    let addr = listener.local_addr().map_err(|e| Error::io(format!("data listener: {e}")))?;
    let info = format!("{}|{}", ctx.host_id, addr);
    store.set(&format!("{gid}/info/{rank}"), info.as_bytes(), &w)?;
    let mut hosts = Vec::with_capacity(size);
    let mut addrs = Vec::with_capacity(size);
    for r in 0..size {
        let v = if r == rank { info.clone() } else { String::from_utf8_lossy(&store.get(&format!("{gid}/info/{r}"), &w)?).into_owned() };
        let parts: Vec<&str> = v.rsplitn(2, '|').collect();
        if parts.len() != 2 {
            return Err(Error::peer_lost(format!("{what}: rank {r} published a malformed address '{v}'")));
        }
        addrs.push(parts[0].parse::<SocketAddr>().map_err(|_| Error::peer_lost(format!("{what}: rank {r} published a bad address '{}'", parts[0])))?);
        hosts.push(parts[1].to_string());
    }
    let one_host = hosts.iter().all(|h| *h == hosts[0]);
    let use_shm = match ctx.opts.transport {
        Transport::Tcp => false,
        Transport::Auto => one_host && shm::available(),
        Transport::Shm => {
            if !one_host {
                let others: Vec<usize> = (0..size).filter(|r| hosts[*r] != hosts[rank]).collect();
                return Err(Error::invalid_arg(format!(
                    "transport: FLATSHARD_TRANSPORT_SHM needs every rank on one host; ranks {others:?} of group {gid} are elsewhere"
                )));
            }
            true
        }
    };
    let ident = format!("{}/{}", ctx.job_id, gid);
    if use_shm {
        drop(listener);
        return shm::connect(&ctx.job_id, gid, rank, size, store, ctx.opts.timeout, abort.clone());
    }
    let peers: Vec<tcp::Peer> = (0..size).map(|r| tcp::Peer { addr: addrs[r], sockbuf: tcp::peer_sockbuf(ctx.tcp_sockbuf, hosts[r] == hosts[rank]) }).collect();
    let b = tcp::TcpBackend::connect(rank, size, listener, &peers, &ctx.key, &ident, ctx.opts.timeout, abort.clone())?;
    Ok(Box::new(b))
}
