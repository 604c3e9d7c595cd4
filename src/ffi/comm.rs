//! C API §3: communicators and collectives.

use super::handle::{self, Kind};
use super::{boundary, boundary_value, check_struct_size, need, opt_str, types::*};
use crate::comm::{callbacks::CallbackBackend, Comm, CommOptions, Transport};
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use crate::mem::{self, Region};
use std::ffi::{c_char, c_void};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// Opaque communicator handle.
pub struct flatshard_comm {
    _private: [u8; 0],
}

/// A communicator handle holds one reference to a shared `Comm`; flat params
/// and averagers built on it hold their own, so freeing the handle first is
/// safe: the communicator closes when its last user is freed.
impl Kind for Arc<Comm> {
    const TAG: u64 = 0x464c_5348_434f_4d4d; // "FLSHCOMM"
    const NAME: &'static str = "flatshard_comm";
}

pub(crate) unsafe fn comm_ref<'a>(c: *const flatshard_comm, arg: &str) -> Result<&'a Comm> {
    // SAFETY: the caller passes a pointer from the C caller; `handle::get`
    // checks NULL and the tag before reading the object behind it.
    unsafe { handle::get::<Arc<Comm>, _>(c, arg) }.map(|a| &**a)
}

/// A new reference to the communicator behind a handle, for objects that keep
/// using it (flat params, averagers).
pub(crate) unsafe fn comm_arc(c: *const flatshard_comm, arg: &str) -> Result<Arc<Comm>> {
    // SAFETY: as in `comm_ref`.
    unsafe { handle::get::<Arc<Comm>, _>(c, arg) }.cloned()
}

pub(crate) fn dtype(d: DtypeArg, arg: &str) -> Result<DType> {
    DType::from_raw(d.0 as i64, arg)
}

fn reduce_op(o: ReduceOpArg) -> Result<ReduceOp> {
    ReduceOp::from_raw(o.0 as i64, "op")
}

/// # Safety
/// Pointer arguments are NULL or valid as the calling export's C contract says
/// (handles from this library, structs and strings readable).
pub(crate) unsafe fn parse_options(o: *const flatshard_comm_options) -> Result<CommOptions> {
    // SAFETY: this function's contract (# Safety above) is what the unsafe
    // operations below need; pointers are NULL-checked before they are read.
    unsafe {
        let mut opts = CommOptions::default();
        if o.is_null() {
            return Ok(opts);
        }
        let o = &*o;
        check_struct_size("flatshard_comm_options", o.struct_size, std::mem::size_of::<flatshard_comm_options>())?;
        if o.timeout_ms != 0 {
            opts.timeout = Duration::from_millis(o.timeout_ms as u64);
        }
        opts.token = opt_str(o.token, "options.token")?.map(String::into_bytes);
        opts.bind_addr = opt_str(o.bind_addr, "options.bind_addr")?;
        opts.transport = match o.transport.0 {
            0 => Transport::Auto,
            1 => Transport::Tcp,
            2 => Transport::Shm,
            v => return Err(Error::invalid_arg(format!("options.transport: {v} is not a flatshard_transport (0..=2)"))),
        };
        Ok(opts)
    }
}

/// Zero-fill `*o` and set `o->struct_size`. NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn flatshard_comm_options_init(o: *mut flatshard_comm_options) {
    // SAFETY: `o` is NULL (ignored) or points to a writable options struct
    // (this function's C contract); write() does not read the old contents.
    unsafe {
        if !o.is_null() {
            o.write(flatshard_comm_options {
                struct_size: std::mem::size_of::<flatshard_comm_options>() as u32,
                timeout_ms: 0,
                token: std::ptr::null(),
                bind_addr: std::ptr::null(),
                transport: TransportArg(0),
            });
        }
    }
}

/// `master_addr` as given; a job of one rank may pass NULL (nothing to reach).
/// # Safety
/// Pointer arguments are NULL or valid as the calling export's C contract says
/// (handles from this library, structs and strings readable).
pub(crate) unsafe fn master_addr_arg(master_addr: *const c_char, world_size: i32) -> Result<String> {
    // SAFETY: this function's contract (# Safety above) is what the unsafe
    // operations below need; pointers are NULL-checked before they are read.
    unsafe {
        if world_size == 1 && master_addr.is_null() {
            return Ok("127.0.0.1".to_string());
        }
        need(master_addr, "master_addr")?;
        Ok(opt_str(master_addr, "master_addr")?.unwrap_or_default())
    }
}

pub(crate) fn publish(c: Comm, out: *mut *mut flatshard_comm) {
    // SAFETY: every caller checked `out` for NULL first (`need(out, ...)`).
    unsafe { *out = handle::into_raw::<Arc<Comm>, flatshard_comm>(Arc::new(c)) };
}

/// Join a job of `world_size` ranks. Rank 0 serves the rendezvous store on
/// `master_addr:master_port`; the others connect (retrying until the timeout,
/// so start order does not matter). Collective over all ranks.
/// On success `*out` owns a communicator; free it with flatshard_comm_free.
/// INVALID_ARGUMENT (bad rank/size/port/options), TIMEOUT, AUTH, IO.
#[no_mangle]
pub unsafe extern "C" fn flatshard_comm_init(
    master_addr: *const c_char,
    master_port: u16,
    rank: i32,
    world_size: i32,
    opts: *const flatshard_comm_options,
    out: *mut *mut flatshard_comm,
) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_comm_init", || unsafe {
        need(out, "out")?;
        let addr = master_addr_arg(master_addr, world_size)?;
        let opts = parse_options(opts)?;
        publish(Comm::init(&addr, master_port, rank, world_size, opts)?, out);
        Ok(())
    })
}

/// Join using the launcher's environment: MASTER_ADDR, MASTER_PORT and RANK,
/// WORLD_SIZE (torchrun, flatshard-run; LOCAL_RANK when present) or, without
/// RANK/WORLD_SIZE, Slurm's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, Open
/// MPI's OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK or PMI_RANK/PMI_SIZE (MASTER_ADDR
/// and MASTER_PORT still required; not for a world of one). Under torchrun
/// (TORCHELASTIC_USE_AGENT_STORE=True) MASTER_ADDR:MASTER_PORT is the agent's
/// PyTorch TCPStore: flatshard joins it as a client and publishes its
/// rendezvous there under keys scoped by TORCHELASTIC_RUN_ID and
/// TORCHELASTIC_RESTART_COUNT (every rdzv backend, --standalone, multi-node);
/// the ranks then prove the job token (FLATSHARD_TOKEN / options.token) to
/// each other through it. Collective over all ranks.
/// On success `*out` owns a communicator; free it with flatshard_comm_free.
/// Thread-safety: as flatshard_comm_init.
/// INVALID_ARGUMENT (a missing, partial or malformed variable, naming it and
/// its limit; bad options), TIMEOUT (a rank or the agent's store did not
/// answer in time), AUTH (a rank holds another job token), PEER_LOST (the
/// agent's store sent a malformed or oversized reply), IO.
#[no_mangle]
pub unsafe extern "C" fn flatshard_comm_init_from_env(opts: *const flatshard_comm_options, out: *mut *mut flatshard_comm) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_comm_init_from_env", || unsafe {
        need(out, "out")?;
        let opts = parse_options(opts)?;
        publish(Comm::init_from_env(opts)?, out);
        Ok(())
    })
}

/// Build a communicator on the caller's own collectives. `ops` is copied;
/// `ops->ctx` must stay valid until flatshard_comm_free, which calls
/// `ops->destroy(ctx)` if set. Every callback except destroy is required.
#[no_mangle]
pub unsafe extern "C" fn flatshard_comm_from_collectives(
    rank: i32,
    size: i32,
    ops: *const flatshard_collectives,
    out: *mut *mut flatshard_comm,
) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_comm_from_collectives", || unsafe {
        need(out, "out")?;
        need(ops, "ops")?;
        let ops = &*ops;
        check_struct_size("flatshard_collectives", ops.struct_size, std::mem::size_of::<flatshard_collectives>())?;
        if size < 1 || rank < 0 || rank >= size {
            return Err(Error::invalid_arg(format!("rank {rank} / size {size}: need 0 <= rank < size")));
        }
        let b = CallbackBackend::new(rank as usize, size as usize, *ops)?;
        publish(Comm::from_backend(Box::new(b), Arc::new(AtomicBool::new(false)))?, out);
        Ok(())
    })
}

/// This rank's index in the communicator; -1 for NULL.
#[no_mangle]
pub unsafe extern "C" fn flatshard_comm_rank(c: *const flatshard_comm) -> i32 {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary_value(-1, || unsafe { comm_ref(c, "c").map(|c| c.rank() as i32).unwrap_or(-1) })
}

/// Number of ranks; -1 for NULL.
#[no_mangle]
pub unsafe extern "C" fn flatshard_comm_size(c: *const flatshard_comm) -> i32 {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary_value(-1, || unsafe { comm_ref(c, "c").map(|c| c.size() as i32).unwrap_or(-1) })
}

/// Contiguous blocks of `group_size` ranks, like torch.distributed.new_subgroups.
/// Collective over `parent`. `*out` is owned by the caller (flatshard_comm_free).
#[no_mangle]
pub unsafe extern "C" fn flatshard_comm_new_subgroups(parent: *mut flatshard_comm, group_size: i32, out: *mut *mut flatshard_comm) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_comm_new_subgroups", || unsafe {
        need(out, "out")?;
        let p = comm_ref(parent, "parent")?;
        publish(p.new_subgroups(group_size)?, out);
        Ok(())
    })
}

/// MPI_Comm_split: ranks with the same `color` form a communicator ordered by
/// (key, parent rank). color < 0 → `*out = NULL`. Collective over `parent`.
/// On an NCCL communicator this is ncclCommSplit (same stream and device).
#[no_mangle]
pub unsafe extern "C" fn flatshard_comm_split(parent: *mut flatshard_comm, color: i32, key: i32, out: *mut *mut flatshard_comm) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_comm_split", || unsafe {
        need(out, "out")?;
        let p = comm_ref(parent, "parent")?;
        match p.split(color, key)? {
            Some(c) => publish(c, out),
            None => *out = std::ptr::null_mut(),
        }
        Ok(())
    })
}

/// A caller's buffer of `count` elements: NULL is refused unless it is empty.
/// Only its address is kept; no Rust reference is made over caller memory
/// here (the memory layer makes slices after its overlap checks).
pub(crate) fn region(p: *const c_void, count: u64, dt: DType, arg: &str) -> Result<Region> {
    let bytes = dt.bytes(count, arg)?;
    if bytes > 0 {
        need(p, arg)?;
    }
    Ok(super::types::region_at(p, bytes))
}

pub(crate) fn times_size(c: &Comm, count_per_rank: u64) -> Result<u64> {
    count_per_rank.checked_mul(c.size() as u64).ok_or_else(|| Error::invalid_arg(format!("count_per_rank {count_per_rank} x {} ranks overflows", c.size())))
}

/// In-place all-reduce of `count` elements of `buf` (host memory, or device
/// memory: see API §6). AVG = SUM / size (floating dtypes only).
/// Collective: every rank calls with the same count, dtype and op.
/// Ownership: `buf` stays the caller's; it is read and written during the
/// call only. Thread-safety: not with other calls on `c` (except
/// flatshard_comm_abort).
/// Statuses: OK; INVALID_ARGUMENT (NULL c, NULL buf with count > 0, bad dtype
/// or op, AVG on an integer dtype, count × itemsize overflows); MISMATCH (the
/// ranks called differently: nothing moved, c stays usable); TIMEOUT,
/// PEER_LOST, ABORTED (c is poisoned); UNSUPPORTED / CUDA / NCCL for device
/// memory without a usable driver; OUT_OF_MEMORY (staging).
#[no_mangle]
pub unsafe extern "C" fn flatshard_all_reduce(c: *mut flatshard_comm, buf: *mut c_void, count: u64, dt: DtypeArg, op: ReduceOpArg) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_all_reduce", || unsafe {
        let c = comm_ref(c, "c")?;
        let (dt, op) = (dtype(dt, "dt")?, reduce_op(op)?);
        op.check(dt)?;
        let b = region(buf, count, dt, "buf")?;
        mem::collective(c, |ops| ops.all_reduce(c, b, dt, op))
    })
}

/// Gather `count_per_rank` elements from every rank into `recv` (size ×
/// count_per_rank, rank-major). `send` may lie inside `recv` (in place).
/// Collective, ownership and thread-safety as flatshard_all_reduce.
/// Statuses: as flatshard_all_reduce (INVALID_ARGUMENT also for
/// count_per_rank × size overflowing).
#[no_mangle]
pub unsafe extern "C" fn flatshard_all_gather(
    c: *mut flatshard_comm,
    send: *const c_void,
    recv: *mut c_void,
    count_per_rank: u64,
    dt: DtypeArg,
) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_all_gather", || unsafe {
        let c = comm_ref(c, "c")?;
        let dt = dtype(dt, "dt")?;
        let total = times_size(c, count_per_rank)?;
        let (s, r) = (region(send, count_per_rank, dt, "send")?, region(recv, total, dt, "recv")?);
        mem::collective(c, |ops| ops.all_gather(c, s, r, dt))
    })
}

/// Reduce `size × count_per_rank` elements of `send` across ranks and leave
/// block `rank` of the result in `recv` (`recv` may overlap `send`).
/// Collective, ownership and thread-safety as flatshard_all_reduce.
/// Statuses: as flatshard_all_gather.
#[no_mangle]
pub unsafe extern "C" fn flatshard_reduce_scatter(
    c: *mut flatshard_comm,
    send: *const c_void,
    recv: *mut c_void,
    count_per_rank: u64,
    dt: DtypeArg,
    op: ReduceOpArg,
) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_reduce_scatter", || unsafe {
        let c = comm_ref(c, "c")?;
        let (dt, op) = (dtype(dt, "dt")?, reduce_op(op)?);
        op.check(dt)?;
        let total = times_size(c, count_per_rank)?;
        let (s, r) = (region(send, total, dt, "send")?, region(recv, count_per_rank, dt, "recv")?);
        mem::collective(c, |ops| ops.reduce_scatter(c, s, r, dt, op))
    })
}

/// Copy `count` elements of `buf` from `root` to every rank.
/// Collective, ownership and thread-safety as flatshard_all_reduce.
/// Statuses: as flatshard_all_reduce; INVALID_ARGUMENT for root outside
/// [0, size).
#[no_mangle]
pub unsafe extern "C" fn flatshard_broadcast(c: *mut flatshard_comm, buf: *mut c_void, count: u64, dt: DtypeArg, root: i32) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_broadcast", || unsafe {
        let c = comm_ref(c, "c")?;
        let dt = dtype(dt, "dt")?;
        if root < 0 || root as usize >= c.size() {
            return Err(Error::invalid_arg(format!("root: must be in [0, {}), got {root}", c.size())));
        }
        let b = region(buf, count, dt, "buf")?;
        mem::collective(c, |ops| ops.broadcast(c, b, dt, root))
    })
}

/// Return once every rank has called it. Collective.
/// Statuses: OK; INVALID_ARGUMENT (NULL c); TIMEOUT, PEER_LOST, ABORTED.
#[no_mangle]
pub unsafe extern "C" fn flatshard_barrier(c: *mut flatshard_comm) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_barrier", || unsafe { comm_ref(c, "c")?.barrier() })
}

/// Unblock any collective in progress (from any thread) and poison the
/// communicator: later calls return FLATSHARD_ERR_ABORTED; peers get errors.
/// The handle must still be freed with flatshard_comm_free.
#[no_mangle]
pub unsafe extern "C" fn flatshard_comm_abort(c: *mut flatshard_comm) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_comm_abort", || unsafe {
        comm_ref(c, "c")?.abort();
        Ok(())
    })
}

/// Release the caller's reference to a communicator (NULL is a no-op). The
/// handle is invalid afterwards. Flat params and averagers built on it hold
/// their own references and keep working; the communicator closes when the
/// last of them is freed (then peers blocked on this rank get PEER_LOST).
/// Rank 0's store lives until its last communicator is closed. Queued
/// asynchronous work (API §7) gets at most the communicator's timeout to
/// finish, then is aborted (its work handles report ABORTED). Not
/// thread-safe with other calls on the same handle.
#[no_mangle]
pub unsafe extern "C" fn flatshard_comm_free(c: *mut flatshard_comm) {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary_value((), || unsafe {
        // API §7: queued work gets the timeout to finish, then is aborted.
        if let Ok(comm) = comm_ref(c, "c") {
            comm.drain_or_abort();
        }
        handle::free::<Arc<Comm>, _>(c)
    });
}
