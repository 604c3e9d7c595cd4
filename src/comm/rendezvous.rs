//! Rendezvous: joining a job (the store on rank 0, the job id, the checked
//! settings), and building one group's transport (shared memory when every
//! member is on this host, TCP otherwise).

use super::backend::{Backend, SelfBackend};
use super::{launch, net, shm, store, tcp, torchstore, Comm, CommOptions, Transport};
use crate::config::{self, Config};
use crate::dtype::DType;
use crate::error::{Error, Result};
use net::Wait;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

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
    /// Every FLATSHARD_* setting, read once at init; the job-wide ones were
    /// compared across ranks there.
    pub config: Arc<Config>,
}

fn host_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    format!("{}:{}", host.trim(), boot.trim())
}

impl Comm {
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
        // Settings are read before any rank touches the network. A rank that
        // refuses its own still joins the store and publishes why, so the
        // others fail at once instead of waiting for it.
        let local = Config::from_env().map_err(|e| e.context(format!("rank {rank}")));
        if world == 1 {
            let config = Arc::new(local?);
            config.apply_process_wide();
            let bind_ip = IpAddr::from([127, 0, 0, 1]);
            let ctx = JobCtx { opts, key, store: None, server: None, job_id: "solo".into(), host_id: host_id(), bind_ip, config: config.clone() };
            return Ok(Comm::assemble(Box::new(SelfBackend), Arc::new(AtomicBool::new(false)), Some(Arc::new(ctx)), config, "w"));
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
            torchstore::check_members(&|k, v| store.set(k, v, &w), &|k| store.get(k, &w), &key, &job_id, rank, world)?;
        }
        let config = Arc::new(agree_on_settings(&store, rank, world, local, &w)?);
        config.apply_process_wide();
        let ctx = Arc::new(JobCtx { opts, key, store: Some(store), server, job_id, host_id: host_id(), bind_ip, config: config.clone() });
        let backend = create_group(&ctx, "w", rank, world, &abort)?;
        crate::log::info(rank, &format!("joined job {} ({} ranks, {} transport)", ctx.job_id, world, backend.transport_name()));
        Ok(Comm::assemble(backend, abort, Some(ctx), config, "w"))
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
            if let Ok(id) = super::nccl::NcclBackend::unique_id() {
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
        let b = super::nccl::NcclBackend::init(&id, rank as usize, world as usize, device, stream, timeout)?;
        host.barrier()?;
        Comm::from_backend(Box::new(b), Arc::new(AtomicBool::new(false)))
    }

    /// The launcher's environment (launch.rs): torchrun (through its agent's
    /// store when it hosts one), flatshard-run, Slurm, Open MPI or PMI.
    pub fn init_from_env(opts: CommOptions) -> Result<Comm> {
        let env = launch::from_process_env()?;
        let (addr, port) = env.master.clone().unwrap_or_else(|| ("127.0.0.1".to_string(), 0));
        crate::log::info(env.rank as usize, &format!("{} launch: rank {} of {}, local rank {:?}", env.source, env.rank, env.world, env.local_rank));
        Comm::init_via(&addr, port, env.rank, env.world, opts, env.agent_store.as_ref().map(|a| a.prefix.as_str()))
    }
}

/// Exchange the job-wide settings through the store: every rank publishes
/// its own (or why it refused them) and compares everyone's, so a difference
/// or a malformed value fails creation on every rank with the same message,
/// naming the variable and each rank's value. Rank 0 serves the store, so on
/// failure it waits (within the deadline) until every rank has read.
fn agree_on_settings(store: &store::StoreClient, rank: usize, world: usize, local: Result<Config>, w: &Wait) -> Result<Config> {
    let line = match &local {
        Ok(c) => c.encode_job_wide(),
        Err(e) => format!("error: {}", e.msg),
    };
    store.set(&format!("config/{rank}"), line.as_bytes(), w)?;
    let verdict = match local {
        Err(e) => Err(e),
        Ok(c) => {
            let mut lines = Vec::with_capacity(world);
            for r in 0..world {
                lines.push(if r == rank { line.clone() } else { String::from_utf8_lossy(&store.get(&format!("config/{r}"), w)?).into_owned() });
            }
            config::compare_job_wide(rank, &lines).map(|()| c)
        }
    };
    // Rank 0 may close the store as soon as this lands: after a failure the
    // verdict is what counts, not whether the store acknowledged.
    let read = store.set(&format!("config_read/{rank}"), b"1", w);
    if verdict.is_ok() {
        read?;
    }
    if verdict.is_err() && rank == 0 {
        for r in 1..world {
            let _ = store.get(&format!("config_read/{r}"), w);
        }
    }
    verdict
}

/// Rendezvous for one group and pick its transport.
pub(super) fn create_group(ctx: &Arc<JobCtx>, gid: &str, rank: usize, size: usize, abort: &Arc<AtomicBool>) -> Result<Box<dyn Backend>> {
    create_group_as(ctx, gid, rank, size, abort, ctx.opts.transport)
}

/// `create_group` with the transport given (the hierarchical backend builds
/// its intra- and cross-host sub-groups with it).
fn create_group_as(ctx: &Arc<JobCtx>, gid: &str, rank: usize, size: usize, abort: &Arc<AtomicBool>, transport: Transport) -> Result<Box<dyn Backend>> {
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
    if transport == Transport::Auto && !one_host && super::hier::worthwhile(&hosts) {
        drop(listener);
        // the sub-groups' own flag: the backend may stop them itself
        // without marking the communicator aborted (HierBackend::abort)
        let sub_abort = Arc::new(AtomicBool::new(false));
        let make = |g: &str, r: usize, n: usize, t: Transport| create_group_as(ctx, g, r, n, &sub_abort, t);
        return super::hier::connect(gid, rank, &hosts, &make);
    }
    let use_shm = match transport {
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
        return shm::connect(&ctx.job_id, gid, rank, size, store, ctx.opts.timeout, &ctx.config, abort.clone());
    }
    let peers: Vec<tcp::Peer> =
        (0..size).map(|r| tcp::Peer { addr: addrs[r], sockbuf: tcp::peer_sockbuf(ctx.config.tcp_sockbuf, hosts[r] == hosts[rank]) }).collect();
    let b = tcp::TcpBackend::connect(rank, size, listener, &peers, &ctx.key, &ident, ctx.opts.timeout, abort.clone())?;
    Ok(Box::new(b))
}
