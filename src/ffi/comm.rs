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

/// Zero-fill `*o` and set `o->struct_size` (every option at its default).
///
/// Ownership: `*o` is the caller's; it is written during the call only.
///
/// Threads: any thread (the struct is the caller's).
///
/// Returns: nothing. NULL `o` is ignored.
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
/// so start order does not matter). Every FLATSHARD_* setting is read and
/// checked before any traffic, and the job-wide ones are compared across ranks.
/// A job of one rank opens no socket (`master_addr` may then be NULL).
///
/// Ownership: `master_addr` and `*opts` (and its strings) are read during the
/// call only. On success `*out` owns a communicator: free it with
/// flatshard_comm_free.
///
/// Threads: collective: every rank of the job calls it once, with its own rank.
/// Any thread.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL out; NULL master_addr or master_port 0
/// with world_size > 1; rank or world_size out of range; an address that does
/// not resolve; bad options: struct_size, transport, bind_addr, a string that
/// is not UTF-8; a malformed FLATSHARD_* setting on any rank, naming that rank;
/// FLATSHARD_TRANSPORT_SHM with ranks on several hosts; FLATSHARD_SHM_CHUNK too
/// small for world_size); MISMATCH (job-wide settings differ between ranks: the
/// message names the variable and each rank's value; a peer speaks another
/// protocol version); TIMEOUT (not every rank joined within timeout_ms); AUTH
/// (a peer failed the job-token handshake); PEER_LOST (a peer closed or sent
/// garbage during the rendezvous); IO (rank 0 cannot listen on
/// master_addr:master_port, e.g. the port is taken; a socket or shared-memory
/// call failed).
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
/// RANK/WORLD_SIZE, Slurm's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, Open MPI's
/// OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK or PMI_RANK/PMI_SIZE (MASTER_ADDR and
/// MASTER_PORT still required; not for a world of one). Under torchrun
/// (TORCHELASTIC_USE_AGENT_STORE=True) MASTER_ADDR:MASTER_PORT is the agent's
/// PyTorch TCPStore: flatshard joins it as a client and publishes its
/// rendezvous there under keys scoped by TORCHELASTIC_RUN_ID and
/// TORCHELASTIC_RESTART_COUNT (every rdzv backend, --standalone, multi-node);
/// the ranks then prove the job token (FLATSHARD_TOKEN / options.token) to each
/// other through it. Otherwise as flatshard_comm_init.
///
/// Ownership: `*opts` is read during the call only. On success `*out` owns a
/// communicator: free it with flatshard_comm_free.
///
/// Threads: collective: every rank of the job calls it once. Any thread.
///
/// Statuses: as flatshard_comm_init; also INVALID_ARGUMENT (a missing, partial
/// or malformed variable, naming it and its limit), TIMEOUT (a rank or the
/// agent's store did not answer in time), AUTH (a rank holds another job
/// token), PEER_LOST (the agent's store sent a malformed or oversized reply).
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

/// Build a communicator on the caller's own collectives (LibTorch c10d, MPI,
/// UCC...). Before each collective the ranks all-gather a small descriptor
/// through `ops->all_gather`, so calls that differ are MISMATCH as on the
/// built-in transports. A callback that returns non-zero fails the call with
/// PEER_LOST and poisons the communicator; flatshard_comm_abort cannot
/// interrupt a running callback.
///
/// Ownership: `*ops` is copied. `ops->ctx` stays the caller's and must remain
/// valid until the communicator closes (when flatshard_comm_free and the frees
/// of every flat param and averager built on it have all happened); closing
/// calls `ops->destroy(ctx)` if set. Buffers given to a callback are valid
/// during that callback only. On success `*out` owns the communicator: free it
/// with flatshard_comm_free.
///
/// Threads: not collective (no communication). Any thread. The callbacks run on
/// the thread that makes a call on the communicator, or on its progress thread
/// for asynchronous work, never two at once (MPI_THREAD_SERIALIZED is enough).
///
/// Statuses: OK; INVALID_ARGUMENT (NULL ops or out; unknown ops->struct_size; a
/// NULL callback other than destroy; not 0 <= rank < size; a malformed
/// FLATSHARD_* setting). On any error `ops->destroy` is not called: `ctx`
/// stays the caller's to release.
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
        // Settings first: a refused setting must not build (and drop, which
        // calls ops->destroy) the backend; the caller still owns ctx then.
        let config = crate::config::Config::from_env().map_err(|e| e.context(format!("rank {rank}")))?;
        let b = CallbackBackend::new(rank as usize, size as usize, *ops)?;
        publish(Comm::with_settings(config, Box::new(b), Arc::new(AtomicBool::new(false))), out);
        Ok(())
    })
}

/// This rank's index in the communicator.
///
/// Ownership: `c` is read during the call only.
///
/// Threads: `c` is const: any number of threads may call this at once.
///
/// Returns: the rank, 0 <= rank < size; -1 for NULL or a freed handle.
#[no_mangle]
pub unsafe extern "C" fn flatshard_comm_rank(c: *const flatshard_comm) -> i32 {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary_value(-1, || unsafe { comm_ref(c, "c").map(|c| c.rank() as i32).unwrap_or(-1) })
}

/// Number of ranks in the communicator.
///
/// Ownership: `c` is read during the call only.
///
/// Threads: `c` is const: any number of threads may call this at once.
///
/// Returns: the size, >= 1; -1 for NULL or a freed handle.
#[no_mangle]
pub unsafe extern "C" fn flatshard_comm_size(c: *const flatshard_comm) -> i32 {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary_value(-1, || unsafe { comm_ref(c, "c").map(|c| c.size() as i32).unwrap_or(-1) })
}

/// Split `parent` into contiguous blocks of `group_size` ranks, like
/// torch.distributed.new_subgroups: rank r joins block r / group_size, in
/// parent's rank order. Each block meets afresh (shared memory within a host,
/// TCP across hosts); on an NCCL communicator this is ncclCommSplit.
///
/// Ownership: on success `*out` owns the new communicator
/// (flatshard_comm_free). It does not need the `parent` handle: either may be
/// freed first.
///
/// Threads: collective over `parent`: every rank of it calls with the same
/// group_size. Not concurrently with other calls on `parent`
/// (flatshard_comm_abort excepted).
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed parent; NULL out; group_size
/// not positive or not dividing parent's size; FLATSHARD_TRANSPORT_SHM for a
/// block that spans hosts); UNSUPPORTED (parent built from user callbacks; NCCL
/// older than 2.18); MISMATCH (ranks of parent made different calls); TIMEOUT,
/// PEER_LOST, ABORTED (parent is or becomes poisoned), AUTH, IO (while the new
/// group meets); NCCL (ncclCommSplit failed).
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
/// (key, parent rank). Each group meets afresh (shared memory within a host,
/// TCP across hosts); on an NCCL communicator this is ncclCommSplit (same
/// stream and device).
///
/// Ownership: on success `*out` owns the new communicator
/// (flatshard_comm_free), or is NULL for color < 0. It does not need the
/// `parent` handle: either may be freed first.
///
/// Threads: collective over `parent`: every rank of it calls (color < 0
/// included). Not concurrently with other calls on `parent`
/// (flatshard_comm_abort excepted).
///
/// Statuses: OK (also for color < 0); INVALID_ARGUMENT (NULL or freed parent;
/// NULL out; FLATSHARD_TRANSPORT_SHM for a group that spans hosts); UNSUPPORTED
/// (parent built from user callbacks; NCCL older than 2.18); MISMATCH (ranks of
/// parent made different calls); TIMEOUT, PEER_LOST, ABORTED (parent is or
/// becomes poisoned), AUTH, IO (while the new group meets); NCCL (ncclCommSplit
/// failed).
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

/// In-place all-reduce of `count` elements of `buf`, in host or device memory
/// (API §6). AVG = SUM / size, floating dtypes only; f16/bf16 accumulate in
/// f32. count 0 is legal (buf may then be NULL) and still synchronises. On a
/// host communicator the result is in place when the call returns; on an NCCL
/// one the call is ordered on the communicator's stream
/// (flatshard_comm_synchronize waits), and memory NCCL cannot read directly is
/// staged.
///
/// Ownership: `buf` (count elements) stays the caller's; it is read and written
/// during the call only (on an NCCL communicator: until the stream has run the
/// operation).
///
/// Threads: collective: every rank of `c` calls with the same count, dtype and
/// op. Not concurrently with other calls on `c` (flatshard_comm_abort
/// excepted).
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed c; NULL buf with count > 0;
/// bad dtype or op; AVG on an integer dtype; count × itemsize overflows; memory
/// of another GPU than an NCCL communicator's); MISMATCH (host and callback
/// communicators: the ranks called differently; nothing moved, c stays usable);
/// TIMEOUT, PEER_LOST, ABORTED, IO (c is poisoned: later calls return ABORTED
/// at once); OUT_OF_MEMORY (staging); UNSUPPORTED, CUDA, NCCL (device memory or
/// an NCCL communicator: no usable driver, or the driver or NCCL failed).
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

/// Gather `count_per_rank` elements of `send` from every rank into `recv` (size
/// × count_per_rank elements, rank-major). `send` may lie inside `recv` (in
/// place). Memory, completion and count 0 as flatshard_all_reduce.
///
/// Ownership: `send` (count_per_rank elements) is read and `recv` (size ×
/// count_per_rank) written during the call only; both stay the caller's.
///
/// Threads: collective: every rank of `c` calls with the same count_per_rank
/// and dtype. Not concurrently with other calls on `c` (flatshard_comm_abort
/// excepted).
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed c; NULL send or recv with
/// count_per_rank > 0; bad dtype; count_per_rank × size × itemsize overflows;
/// memory of another GPU than an NCCL communicator's); MISMATCH (host and
/// callback communicators: the ranks called differently; nothing moved, c stays
/// usable); TIMEOUT, PEER_LOST, ABORTED, IO (c is poisoned); OUT_OF_MEMORY
/// (staging); UNSUPPORTED, CUDA, NCCL (device memory or an NCCL communicator).
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
/// block `rank` of the result (count_per_rank elements) in `recv`, which may
/// overlap `send`. AVG = SUM / size, floating dtypes only. Memory, completion
/// and count 0 as flatshard_all_reduce.
///
/// Ownership: `send` (size × count_per_rank elements) is read and `recv`
/// (count_per_rank) written during the call only; both stay the caller's.
///
/// Threads: collective: every rank of `c` calls with the same count_per_rank,
/// dtype and op. Not concurrently with other calls on `c` (flatshard_comm_abort
/// excepted).
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed c; NULL send or recv with
/// count_per_rank > 0; bad dtype or op; AVG on an integer dtype; count_per_rank
/// × size × itemsize overflows; memory of another GPU than an NCCL
/// communicator's); MISMATCH (host and callback communicators: the ranks called
/// differently; nothing moved, c stays usable); TIMEOUT, PEER_LOST, ABORTED, IO
/// (c is poisoned); OUT_OF_MEMORY (staging); UNSUPPORTED, CUDA, NCCL (device
/// memory or an NCCL communicator).
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

/// Copy `count` elements of `buf` from rank `root` to every rank. Memory,
/// completion and count 0 as flatshard_all_reduce.
///
/// Ownership: `buf` (count elements) stays the caller's; it is read (on root)
/// or written (elsewhere) during the call only.
///
/// Threads: collective: every rank of `c` calls with the same count, dtype and
/// root. Not concurrently with other calls on `c` (flatshard_comm_abort
/// excepted).
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed c; NULL buf with count > 0;
/// bad dtype; root outside [0, size); count × itemsize overflows; memory of
/// another GPU than an NCCL communicator's); MISMATCH (host and callback
/// communicators: the ranks called differently; nothing moved, c stays usable);
/// TIMEOUT, PEER_LOST, ABORTED, IO (c is poisoned); OUT_OF_MEMORY (staging);
/// UNSUPPORTED, CUDA, NCCL (device memory or an NCCL communicator).
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

/// Return once every rank of `c` has called it.
///
/// Ownership: `c` stays the caller's; nothing else is passed.
///
/// Threads: collective: every rank of `c` calls it. Not concurrently with other
/// calls on `c` (flatshard_comm_abort excepted).
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed c); MISMATCH (host and
/// callback communicators: another rank made a different call; c stays usable);
/// TIMEOUT, PEER_LOST, ABORTED, IO (c is poisoned); NCCL (NCCL communicator).
#[no_mangle]
pub unsafe extern "C" fn flatshard_barrier(c: *mut flatshard_comm) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_barrier", || unsafe { comm_ref(c, "c")?.barrier() })
}

/// Unblock any call in progress on `c` and poison it: later calls return
/// ABORTED, queued asynchronous work fails with ABORTED within 1 s, and peers
/// blocked on this rank get errors. A user callback already running is not
/// interrupted. On an NCCL communicator this only flags it: the thread using it
/// aborts it (in flatshard_comm_synchronize, or at free); a wrapped NCCL
/// communicator itself is never aborted.
///
/// Ownership: `c` stays valid: free it with flatshard_comm_free as usual.
///
/// Threads: any thread, any time, also while another thread is inside a call on
/// `c` (the one exception to API §1), but not concurrently with
/// flatshard_comm_free of the same handle. Not collective.
///
/// Statuses: OK (also when already aborted or poisoned); INVALID_ARGUMENT (NULL
/// or freed c).
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

/// Release the caller's reference to a communicator. Flat params and averagers
/// built on it hold their own references and keep working; the communicator
/// closes when the last of them is freed (then peers blocked on this rank get
/// PEER_LOST). Rank 0's store lives until its last communicator is closed.
/// Queued asynchronous work (API §7) gets at most the communicator's timeout to
/// finish, then is aborted (its work handles report ABORTED); work handles stay
/// valid.
///
/// Ownership: `c` is invalid afterwards; pointers the library handed out for it
/// are not affected (flat params, averagers, work handles keep their own).
///
/// Threads: not concurrently with any other call on `c`, flatshard_comm_abort
/// included. Not collective.
///
/// Returns: nothing. NULL is a no-op.
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
