//! C API §4: flat parameters (FSDP-style sharding). Converts pointers and
//! options, then calls `crate::flat_param::FlatParam`.
//!
//! Lifetime rule: a flat param holds its own references to the `comm` (and
//! `replicate_comm`) it was built with, so the caller may free those handles
//! first; the communicators close when the flat param is freed.

use super::comm::{comm_arc, comm_ref, dtype, flatshard_comm};
use super::handle::{self, Kind};
use super::{boundary, boundary_value, check_struct_size, need, types::*};
use crate::comm::Comm;
use crate::error::{Error, Result};
use crate::flat_param::shared::SharedFlatParam;
use crate::flat_param::{FlatParam, FlatParamOptions, ParamInput, Sharding, UnshardOptions};
use std::sync::{Arc, MutexGuard};

/// Opaque flat parameter handle.
pub struct flatshard_flat_param {
    _private: [u8; 0],
}

/// Options for flatshard_flat_param_new. NULL or zero-filled = defaults
/// (FULL_SHARD, no alignment, no sync, no mixed precision).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct flatshard_flat_param_options {
    /// sizeof(flatshard_flat_param_options), set by flatshard_flat_param_options_init(); 0 = first layout.
    pub struct_size: u32,
    /// Default FLATSHARD_FULL_SHARD.
    pub sharding: ShardingArg,
    /// 1 = 16-byte per-param alignment + world-size padding inside the flat
    /// param (torch use_orig_params=True).
    pub align_params: i32,
    /// 1 = rank 0's initial values win (torch sync_module_states).
    pub sync_from_rank0: i32,
    /// Mixed precision: 1 = param_dtype is the dtype of the training unshard.
    pub has_param_dtype: i32,
    pub param_dtype: DtypeArg,
    /// Mixed precision: 1 = reduce_dtype is the dtype of gradient reduction
    /// (default: param_dtype if set, else the params' dtype).
    pub has_reduce_dtype: i32,
    pub reduce_dtype: DtypeArg,
    /// HYBRID_SHARD: the ranks holding the same shard. The flat param keeps
    /// its own reference (the handle may be freed first). Ignored for the
    /// other strategies.
    pub replicate_comm: *mut flatshard_comm,
}

/// Options for flatshard_flat_param_unshard; every flag defaults to 0 (off).
/// PyTorch's summon_full_params default is writeback = 1.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct flatshard_unshard_options {
    /// sizeof(flatshard_unshard_options), set by flatshard_unshard_options_init(); 0 = first layout.
    pub struct_size: u32,
    /// Copy edits back into the shards at reshard.
    pub writeback: i32,
    /// Only rank 0 materialises the full parameters.
    pub rank0_only: i32,
    /// Full parameters live in (pinned) host memory; for host params they
    /// always do, so this changes nothing there.
    pub offload_to_cpu: i32,
    /// Also gather the sharded gradients (NULL grad views if no rank has one).
    pub with_grads: i32,
}

/// The C handle: a flat param with its communicators and in-flight work
/// (`crate::flat_param::shared`); calls that need the flat param go through
/// `settled()`, which waits for that work first (API §7).
pub(crate) struct Handle {
    pub(crate) fp: SharedFlatParam,
}

impl Kind for Handle {
    const TAG: u64 = 0x464c_5348_464c_4154; // "FLSHFLAT"
    const NAME: &'static str = "flatshard_flat_param";
}

/// # Safety
/// Pointer arguments are NULL or valid as the calling export's C contract says
/// (handles from this library, structs and strings readable).
pub(crate) unsafe fn fp_mut<'a>(fp: *mut flatshard_flat_param) -> Result<&'a mut Handle> {
    // SAFETY: this function's contract (# Safety above) is what the unsafe
    // operations below need; pointers are NULL-checked before they are read.
    unsafe { handle::get_mut::<Handle, _>(fp, "fp") }
}

/// For the other C modules (checkpoints): the flat param behind a handle,
/// with its communicators and in-flight work (`settled()` waits for it).
pub(crate) unsafe fn shared_flat_param<'a>(fp: *mut flatshard_flat_param, arg: &str) -> Result<&'a mut SharedFlatParam> {
    // SAFETY: the caller passes a pointer from the C caller; `handle::get_mut`
    // checks NULL and the tag before reading the object behind it.
    let h = unsafe { handle::get_mut::<Handle, _>(fp, arg) }?;
    Ok(&mut h.fp)
}

fn flag(v: i32, name: &str) -> Result<bool> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(Error::invalid_arg(format!("{name}: {v} is not a flag (0 or 1)"))),
    }
}

/// Zero-fill `*o` and set `o->struct_size` (defaults: FULL_SHARD, every flag
/// off, no mixed precision, no replicate_comm).
///
/// Ownership: `*o` is the caller's; it is written during the call only.
///
/// Threads: any thread (the struct is the caller's).
///
/// Returns: nothing. NULL `o` is ignored.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_options_init(o: *mut flatshard_flat_param_options) {
    // SAFETY: `o` is NULL (ignored) or points to a writable options struct
    // (this function's C contract); write() does not read the old contents.
    unsafe {
        if !o.is_null() {
            o.write(flatshard_flat_param_options {
                struct_size: std::mem::size_of::<flatshard_flat_param_options>() as u32,
                sharding: ShardingArg(0),
                align_params: 0,
                sync_from_rank0: 0,
                has_param_dtype: 0,
                param_dtype: DtypeArg(0),
                has_reduce_dtype: 0,
                reduce_dtype: DtypeArg(0),
                replicate_comm: std::ptr::null_mut(),
            });
        }
    }
}

/// Zero-fill `*o` and set `o->struct_size` (every flag off: a training
/// unshard).
///
/// Ownership: `*o` is the caller's; it is written during the call only.
///
/// Threads: any thread (the struct is the caller's).
///
/// Returns: nothing. NULL `o` is ignored.
#[no_mangle]
pub unsafe extern "C" fn flatshard_unshard_options_init(o: *mut flatshard_unshard_options) {
    // SAFETY: `o` is NULL (ignored) or points to a writable options struct
    // (this function's C contract); write() does not read the old contents.
    unsafe {
        if !o.is_null() {
            o.write(flatshard_unshard_options {
                struct_size: std::mem::size_of::<flatshard_unshard_options>() as u32,
                writeback: 0,
                rank0_only: 0,
                offload_to_cpu: 0,
                with_grads: 0,
            });
        }
    }
}

/// Build a flat parameter: flatten `params[0..n_params)` (one float dtype, all
/// in host memory or all on one CUDA device) in order, shard them over `comm`
/// (SPEC §2) and copy this rank's shard out of the caller's tensors. Before any
/// data moves the ranks compare layouts and options, so one rank's bad
/// arguments fail every rank at once.
///
/// Ownership: `params`, the memory of each `params[i].data` and `*opts` are
/// read during the call only and not referenced afterwards (`grad` pointers are
/// ignored). The flat param holds its own references to `comm` and
/// `opts->replicate_comm`: their handles may be freed before it. On success
/// `*out` owns the flat param: free it with flatshard_flat_param_free.
///
/// Threads: collective over `comm` (and `opts->replicate_comm` for
/// HYBRID_SHARD): every rank calls with the same layout and options, and every
/// rank creates its flat params on a communicator in the same order. Not
/// concurrently with other calls on those communicators.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL out; NULL or freed comm; NULL params
/// with n_params > 0; n_params 0; a bad dtype or device enum; mixed dtypes or
/// devices; an integer dtype; NULL data with numel > 0; data not on the CUDA
/// device it names, or not on an NCCL communicator's device; bad options:
/// struct_size, sharding, a flag not 0/1, a non-float param_dtype or
/// reduce_dtype, HYBRID_SHARD without a replicate_comm or with replicate_comm
/// == comm, a freed replicate_comm; the message names the first offending index
/// or field); UNSUPPORTED (CUDA tensors without a CUDA driver); MISMATCH (every
/// other rank: the ranks passed different layouts or options, or a rank refused
/// its arguments, named in the message); TIMEOUT, PEER_LOST, ABORTED, IO (from
/// comm or replicate_comm); OUT_OF_MEMORY (the shard); CUDA, NCCL (device
/// tensors). A NULL out or a bad argument is refused through the comparison,
/// so the other ranks fail at once with MISMATCH naming this rank; a NULL or
/// freed comm has no communicator to tell them through: they wait until their
/// timeout.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_new(
    comm: *mut flatshard_comm,
    params: *const flatshard_tensor,
    n_params: u64,
    opts: *const flatshard_flat_param_options,
    out: *mut *mut flatshard_flat_param,
) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_flat_param_new", || unsafe {
        let comm = comm_arc(comm, "comm")?;
        // Refused after the comm is known, so the other ranks hear of it.
        if let Err(e) = need(out, "out") {
            return Err(FlatParam::fail_new(&comm, e));
        }
        let (inputs, o, replicate) = match parse_new_args(params, n_params, opts) {
            Ok(v) => v,
            Err(e) => return Err(FlatParam::fail_new(&comm, e)),
        };
        let fp = FlatParam::new(&comm, replicate.as_deref(), &inputs, &o)?;
        *out = handle::into_raw::<Handle, flatshard_flat_param>(Handle { fp: SharedFlatParam::new(fp, comm, replicate) });
        Ok(())
    })
}

type NewArgs<'a> = (Vec<ParamInput<'a>>, FlatParamOptions, Option<Arc<Comm>>);

/// # Safety
/// Pointer arguments are NULL or valid as the calling export's C contract says
/// (handles from this library, structs and strings readable).
unsafe fn parse_new_args<'a>(params: *const flatshard_tensor, n_params: u64, opts: *const flatshard_flat_param_options) -> Result<NewArgs<'a>> {
    // SAFETY: this function's contract (# Safety above) is what the unsafe
    // operations below need; pointers are NULL-checked before they are read.
    unsafe {
        let mut o = FlatParamOptions::default();
        let mut replicate: *const flatshard_comm = std::ptr::null();
        if !opts.is_null() {
            let r = &*opts;
            check_struct_size("flatshard_flat_param_options", r.struct_size, std::mem::size_of::<flatshard_flat_param_options>())?;
            o.sharding = Sharding::from_raw(r.sharding.0 as i64, "options.sharding")?;
            o.align_params = flag(r.align_params, "options.align_params")?;
            o.sync_from_rank0 = flag(r.sync_from_rank0, "options.sync_from_rank0")?;
            if flag(r.has_param_dtype, "options.has_param_dtype")? {
                o.param_dtype = Some(dtype(r.param_dtype, "options.param_dtype")?);
            }
            if flag(r.has_reduce_dtype, "options.has_reduce_dtype")? {
                o.reduce_dtype = Some(dtype(r.reduce_dtype, "options.reduce_dtype")?);
            }
            if o.sharding == Sharding::HybridShard {
                replicate = r.replicate_comm;
            }
        }
        let rep = if replicate.is_null() { None } else { Some(comm_arc(replicate, "options.replicate_comm")?) };
        if n_params > 0 {
            need(params, "params")?;
        }
        let n = usize::try_from(n_params).map_err(|_| Error::invalid_arg(format!("n_params: {n_params} is too large")))?;
        let ts = if n == 0 { &[][..] } else { std::slice::from_raw_parts(params, n) };
        let mut inputs = Vec::with_capacity(n);
        for (i, t) in ts.iter().enumerate() {
            let t = tensor_from_c(t, &format!("params[{i}]"))?;
            // The tensor's memory is the caller's; FlatParam::new checks it
            // (NULL, host vs device) before reading it.
            inputs.push(ParamInput::raw(t.data, t.numel, t.dtype, t.device));
        }
        Ok((inputs, o, rep))
    }
}

/// Σ param numels, without padding. Does not wait for in-flight work.
///
/// Ownership: `fp` is read during the call only.
///
/// Threads: `fp` is const: any number of threads may call this at once.
///
/// Returns: the number of elements; 0 for NULL or a freed handle.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_numel(fp: *const flatshard_flat_param) -> u64 {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary_value(0, || unsafe { handle::get::<Handle, _>(fp, "fp").map(|h| h.fp.numel()).unwrap_or(0) })
}

/// c·W: elements of the unsharded buffer, padding included. Does not wait for
/// in-flight work.
///
/// Ownership: `fp` is read during the call only.
///
/// Threads: `fp` is const: any number of threads may call this at once.
///
/// Returns: the number of elements; 0 for NULL or a freed handle.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_padded_numel(fp: *const flatshard_flat_param) -> u64 {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary_value(0, || unsafe { handle::get::<Handle, _>(fp, "fp").map(|h| h.fp.padded_numel()).unwrap_or(0) })
}

/// c: elements of this rank's shard (SPEC §2). Does not wait for in-flight
/// work.
///
/// Ownership: `fp` is read during the call only.
///
/// Threads: `fp` is const: any number of threads may call this at once.
///
/// Returns: the number of elements; 0 for NULL or a freed handle.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_shard_numel(fp: *const flatshard_flat_param) -> u64 {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary_value(0, || unsafe { handle::get::<Handle, _>(fp, "fp").map(|h| h.fp.shard_numel()).unwrap_or(0) })
}

/// This rank's shard, what an optimizer steps on: `out->data` (shard_numel
/// elements) and `out->grad` (NULL until a gradient exists). Waits for the flat
/// param's in-flight asynchronous work first. Local.
///
/// Ownership: both pointers are library-owned and stay valid until
/// flatshard_flat_param_free (grad from when it exists); the caller may read
/// and write the elements between flat-param calls. `*out` is the caller's,
/// written on success.
///
/// Threads: not concurrently with other calls on `fp`. Not collective; works on
/// a poisoned communicator.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed fp; NULL out); the error of
/// the flat param's failed asynchronous work, from the first call that waits
/// for it (see flatshard_flat_param_unshard_async).
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_shard(fp: *mut flatshard_flat_param, out: *mut flatshard_tensor) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_flat_param_shard", || unsafe {
        let h = fp_mut(fp)?;
        need(out, "out")?;
        *out = tensor_to_c(&h.fp.settled()?.shard());
        Ok(())
    })
}

/// Param i's slice inside this rank's shard (`out->numel` 0 and NULL pointers
/// if the param does not reach this shard) and, in `*offset_in_param`, where
/// the slice starts inside param i (torch use_orig_params sharded views). Waits
/// for the flat param's in-flight asynchronous work first. Local.
///
/// Ownership: the pointers are library-owned and stay valid until
/// flatshard_flat_param_free (grad: NULL until a gradient exists). `*out` and
/// `*offset_in_param` are the caller's, written on success.
///
/// Threads: not concurrently with other calls on `fp`. Not collective; works on
/// a poisoned communicator.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed fp; NULL out or
/// offset_in_param; i >= the number of params); the error of the flat param's
/// failed asynchronous work, from the first call that waits for it.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_shard_view(
    fp: *mut flatshard_flat_param,
    i: u64,
    out: *mut flatshard_tensor,
    offset_in_param: *mut u64,
) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_flat_param_shard_view", || unsafe {
        let h = fp_mut(fp)?;
        need(out, "out")?;
        need(offset_in_param, "offset_in_param")?;
        let (t, off) = h.fp.settled()?.shard_view(i)?;
        *out = tensor_to_c(&t);
        *offset_in_param = off;
        Ok(())
    })
}

/// # Safety
/// Pointer arguments are NULL or valid as the calling export's C contract says
/// (handles from this library, structs and strings readable).
unsafe fn unshard_opts(o: *const flatshard_unshard_options) -> Result<UnshardOptions> {
    // SAFETY: this function's contract (# Safety above) is what the unsafe
    // operations below need; pointers are NULL-checked before they are read.
    unsafe {
        if o.is_null() {
            return Ok(UnshardOptions::default());
        }
        let o = &*o;
        check_struct_size("flatshard_unshard_options", o.struct_size, std::mem::size_of::<flatshard_unshard_options>())?;
        Ok(UnshardOptions {
            writeback: flag(o.writeback, "options.writeback")?,
            rank0_only: flag(o.rank0_only, "options.rank0_only")?,
            offload_to_cpu: flag(o.offload_to_cpu, "options.offload_to_cpu")?,
            with_grads: flag(o.with_grads, "options.with_grads")?,
            forward_only: false,
        })
    }
}

/// Materialise the full parameters (PyTorch summon_full_params / the training
/// all-gather). Training (writeback = 0 and rank0_only = 0) gathers in
/// param_dtype; otherwise in the params' own dtype. With rank0_only only rank 0
/// of comm allocates the full buffer (under HYBRID_SHARD: rank 0 of each shard
/// group); the other ranks hold one shard-sized scratch buffer while the chunks
/// are broadcast. CUDA flat params gather into device memory, or with
/// offload_to_cpu into pinned host memory (views then have device CPU; with
/// rank0_only device memory stays at one shard-sized chunk); offload_to_cpu
/// changes nothing for host params. A CUDA flat param on an NCCL comm runs on
/// the comm's stream, on a host comm through pinned staging; either way the
/// call returns when the data is in place. Waits for in-flight asynchronous
/// work first.
///
/// Ownership: `*opts` is read during the call only. The full buffer is
/// library-owned and lives until flatshard_flat_param_reshard (or _free).
///
/// Threads: collective over the flat param's comm: every rank calls with the
/// same options. Not concurrently with other calls on `fp` or its comm.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed fp; bad options: struct_size,
/// a flag not 0/1); INVALID_STATE (already unsharded: call
/// flatshard_flat_param_reshard first); MISMATCH (the ranks' collectives
/// differ, e.g. different options; fp stays sharded); TIMEOUT, PEER_LOST,
/// ABORTED, IO (the comm is poisoned; fp stays sharded); OUT_OF_MEMORY (the
/// full buffer); CUDA, NCCL (device flat params); the error of the flat param's
/// failed asynchronous work, from the first call that waits for it.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_unshard(fp: *mut flatshard_flat_param, opts: *const flatshard_unshard_options) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_flat_param_unshard", || unsafe {
        let h = fp_mut(fp)?;
        let o = unshard_opts(opts)?;
        h.fp.with_settled(|fp, comm| fp.unshard(comm, o))
    })
}

/// A training unshard for a forward pass only: flatshard_flat_param_unshard
/// with default options (gathered in param_dtype), but no full gradient
/// buffer is ever made: views have grad NULL, and
/// flatshard_flat_param_reduce_grads returns INVALID_STATE until the flat
/// param is resharded and unsharded for training (PyTorch FSDP's forward
/// allocates no gradients either). Saves the gradient buffer's memory and
/// its zero-filling, which competes with the prefetched gathers. A flat param
/// whose backward follows at once (the last layer) is better unsharded for
/// training and kept. Waits for in-flight asynchronous work first.
///
/// Ownership: the full buffer is library-owned and lives until
/// flatshard_flat_param_reshard (or _free).
///
/// Threads: collective over the flat param's comm, like
/// flatshard_flat_param_unshard: every rank calls it (ranks that mix it with
/// flatshard_flat_param_unshard gather the same data). Not concurrently with
/// other calls on `fp` or its comm.
///
/// Statuses: as flatshard_flat_param_unshard with default options.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_unshard_forward(fp: *mut flatshard_flat_param) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time.
    boundary("flatshard_flat_param_unshard_forward", || unsafe {
        let h = fp_mut(fp)?;
        h.fp.with_settled(|fp, comm| fp.unshard(comm, UnshardOptions { forward_only: true, ..Default::default() }))
    })
}

/// flatshard_flat_param_unshard_forward, queued (API §7), as
/// flatshard_flat_param_unshard_async with default options but without the
/// full gradient buffer. Ranks that issue it where others issue
/// flatshard_flat_param_unshard_async get MISMATCH on the work (the options
/// are compared).
///
/// Ownership: on success `*out` owns a work handle: free it with
/// flatshard_work_free; it stays valid after the flat param or its
/// communicator is freed. The full buffer is library-owned.
///
/// Threads: collective over the flat param's comm: every rank issues the same
/// sequence of operations. Not concurrently with other calls on `fp`; the work
/// runs on the communicator's progress thread.
///
/// Statuses: as flatshard_flat_param_unshard_async with default options.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_unshard_forward_async(
    fp: *mut flatshard_flat_param,
    out: *mut *mut super::work::flatshard_work,
) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // `out` is NULL-checked before use.
    boundary("flatshard_flat_param_unshard_forward_async", || unsafe {
        need(out, "out")?;
        let h = fp_mut(fp)?;
        super::work::publish_work(h.fp.unshard_async(UnshardOptions { forward_only: true, ..Default::default() })?, out);
        Ok(())
    })
}

/// Param i inside the unsharded buffer: data (and grad) pointers, zero-copy, in
/// the unshard dtype (param_dtype for a training unshard). Training (with_grads
/// = 0): the first view after an unshard creates a zero-filled full gradient
/// buffer (flatshard_flat_param_unshard_async creates it beforehand); after
/// flatshard_flat_param_unshard_forward, grad is NULL. with_grads = 1: grad is NULL if no rank had a gradient. Waits for
/// in-flight asynchronous work first. Local.
///
/// Ownership: the pointers are library-owned and valid until
/// flatshard_flat_param_reshard (or _free); the caller reads and writes them in
/// between (backward writes the gradients there). `*out` is the caller's,
/// written on success.
///
/// Threads: not concurrently with other calls on `fp`. Not collective; works on
/// a poisoned communicator once the unshard completed.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed fp; NULL out; i >= the number
/// of params); INVALID_STATE (sharded: call flatshard_flat_param_unshard first;
/// a rank ≠ 0 under rank0_only: use flatshard_flat_param_shard_view there);
/// OUT_OF_MEMORY, CUDA (the full gradient buffer); the error of the flat
/// param's failed asynchronous work (e.g. its unshard_async), from the first
/// call that waits for it.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_view(fp: *mut flatshard_flat_param, i: u64, out: *mut flatshard_tensor) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_flat_param_view", || unsafe {
        let h = fp_mut(fp)?;
        need(out, "out")?;
        *out = tensor_to_c(&h.fp.settled()?.view(i)?);
        Ok(())
    })
}

/// Free the full parameters; pointers from flatshard_flat_param_view become
/// invalid. With writeback, each rank first copies its own unpadded range of
/// the full buffer (and of the gradients with with_grads) into its shard; under
/// rank0_only + writeback rank 0 scatters the ranges back instead. Host
/// buffers of 1 MiB or more (full parameters and gradients) go to a small
/// per-process cache (at most FLATSHARD_HOST_CACHE_BYTES, default 512 MiB; 0 =
/// off) for the next buffer of the same size: the newest quarter stays
/// resident, older ones are released with MADV_FREE, so the kernel may reclaim
/// them at any time, but until then they count in the RSS. Waits for in-flight
/// asynchronous work first.
///
/// Ownership: the full buffers go back to the library (or its cache); the shard
/// stays library-owned until flatshard_flat_param_free.
///
/// Threads: not concurrently with other calls on `fp`. Local, except under
/// rank0_only + writeback, where every rank of the comm must call it
/// (collective). Without writeback it works on a poisoned communicator.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed fp); INVALID_STATE (already
/// sharded: call flatshard_flat_param_unshard first); MISMATCH, TIMEOUT,
/// PEER_LOST, ABORTED, IO (rank0_only + writeback: the scatter from rank 0);
/// OUT_OF_MEMORY (writeback: the shard gradient, scratch); CUDA, NCCL (device
/// flat params); the error of the flat param's failed asynchronous work, from
/// the first call that waits for it.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_reshard(fp: *mut flatshard_flat_param) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_flat_param_reshard", || unsafe { fp_mut(fp)?.fp.reshard() })
}

/// Training: after backward wrote full gradients into the views' grad pointers,
/// average them over the sharding ranks (reduce-scatter; all-reduce for
/// NO_SHARD; then all-reduce over replicate_comm for HYBRID_SHARD), in
/// reduce_dtype, and ADD this rank's range into the shard gradient (created
/// zero-filled). The full gradient is zeroed afterwards. A rank that took no
/// view contributes zeros. Waits for in-flight asynchronous work first.
///
/// Ownership: the gradients are library-owned buffers (the views' grad pointers
/// and the shard's grad); nothing else is passed.
///
/// Threads: collective over the flat param's comm (and replicate_comm for
/// HYBRID_SHARD). Not concurrently with other calls on `fp` or those
/// communicators.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed fp); INVALID_STATE (sharded:
/// unshard and write gradients first; or unsharded with with_grads /
/// rank0_only, a summon rather than training; or by
/// flatshard_flat_param_unshard_forward, which has no gradients); MISMATCH (the ranks called
/// differently); TIMEOUT, PEER_LOST, ABORTED, IO (the communicator is
/// poisoned); OUT_OF_MEMORY (reduction buffers); CUDA, NCCL (device flat
/// params); the error of the flat param's failed asynchronous work, from the
/// first call that waits for it. On any error the shard gradient and the full
/// gradient are as they were before the call.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_reduce_grads(fp: *mut flatshard_flat_param) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_flat_param_reduce_grads", || unsafe {
        let h = fp_mut(fp)?;
        let (comm, rep) = (h.fp.comm().clone(), h.fp.replicate().cloned());
        let mut fp = h.fp.settled()?;
        fp.reduce_grads(&comm, rep.as_deref())
    })
}

/// Zero this rank's shard gradient (PyTorch zero_grad) after the optimizer
/// step; no-op if there is none yet. Waits for in-flight asynchronous work
/// first. Local: a CUDA flat param's memset is ordered on the comm's stream and
/// complete on return.
///
/// Ownership: the shard gradient stays library-owned (its pointer does not
/// change).
///
/// Threads: not concurrently with other calls on `fp`. Not collective.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed fp); CUDA (device flat params;
/// on an NCCL communicator also its wait's TIMEOUT, NCCL or ABORTED); the error
/// of the flat param's failed asynchronous work, from the first call that waits
/// for it.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_zero_grad(fp: *mut flatshard_flat_param) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_flat_param_zero_grad", || unsafe {
        let h = fp_mut(fp)?;
        h.fp.with_settled(|fp, comm| fp.zero_grad(comm))
    })
}

/// Drop this rank's shard gradient (PyTorch `zero_grad(set_to_none=True)`,
/// its default) after the optimizer step: flatshard_flat_param_shard and
/// _shard_view then give grad NULL, and the next reduce_grads makes the
/// averaged gradient the shard gradient instead of adding it to zeros (no
/// memset here, no add there). No-op if there is none. Waits for in-flight
/// asynchronous work first. Local.
///
/// Ownership: grad pointers from flatshard_flat_param_shard and _shard_view
/// are invalid afterwards; after the next reduction the shard gradient may
/// live at a different address (take it from _shard again).
///
/// Threads: not concurrently with other calls on `fp`. Not collective.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed fp); the error of the flat
/// param's failed asynchronous work, from the first call that waits for it.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_drop_grad(fp: *mut flatshard_flat_param) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_flat_param_drop_grad", || unsafe {
        let h = fp_mut(fp)?;
        h.fp.with_settled(|fp, comm| fp.drop_grad(comm))
    })
}

/// Free a flat parameter and every buffer it owns (also while unsharded). Waits
/// for in-flight asynchronous work first (its status stays with its work
/// handle).
///
/// Ownership: `fp` and every pointer from flatshard_flat_param_shard,
/// _shard_view and _view are invalid afterwards. The flat param's references to
/// comm and replicate_comm are released: a communicator whose handle was
/// already freed closes here. Work handles of the flat param stay valid.
///
/// Threads: not concurrently with any other call on `fp`. Local, not
/// collective.
///
/// Returns: nothing. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_free(fp: *mut flatshard_flat_param) {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary_value((), || unsafe {
        // In-flight work first (API §7); its status stays with its work handle.
        if let Ok(h) = fp_mut(fp) {
            h.fp.wait_quiet();
        }
        handle::free::<Handle, _>(fp)
    });
}

/// Average the shards of `fps[0..n]` in place over `replicate_comm` (the ranks
/// holding the same shard, e.g. HYBRID_SHARD's replicate group) without
/// unsharding: local SGD on a sharded model (PyTorch has no equivalent).
/// Padding stays 0. Waits for each flat param's in-flight asynchronous work
/// first; complete on return (also on an NCCL communicator).
///
/// Ownership: the `fps` array is read during the call only; the shards are
/// library-owned and averaged in place (their pointers do not change).
///
/// Threads: collective over `replicate_comm`: every rank of it passes flat
/// params of the same layouts in the same order. Not concurrently with other
/// calls on `replicate_comm` or on any fps[i].
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed replicate_comm; NULL fps with
/// n > 0; n 0; a NULL, freed or repeated fps[i]; fps[i] built with another
/// replicate_comm); INVALID_STATE (an unsharded flat param); MISMATCH (another
/// rank passed different layouts, or refused its arguments); TIMEOUT,
/// PEER_LOST, ABORTED, IO (replicate_comm is poisoned); OUT_OF_MEMORY (the
/// bucket); UNSUPPORTED, CUDA, NCCL (device flat params); the error of a flat
/// param's failed asynchronous work. INVALID_ARGUMENT and INVALID_STATE are
/// found before the ranks compare: the other ranks then wait until their
/// timeout.
#[no_mangle]
pub unsafe extern "C" fn flatshard_average_flat_params(replicate_comm: *mut flatshard_comm, fps: *const *mut flatshard_flat_param, n: u64) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_average_flat_params", || unsafe {
        let rc = comm_ref(replicate_comm, "replicate_comm")?;
        if n > 0 {
            need(fps, "fps")?;
        }
        let n = usize::try_from(n).map_err(|_| Error::invalid_arg(format!("n: {n} is too large")))?;
        let ptrs: &[*mut flatshard_flat_param] = if n == 0 { &[] } else { std::slice::from_raw_parts(fps, n) };
        let mut guards: Vec<MutexGuard<'_, FlatParam>> = Vec::with_capacity(n);
        for (i, p) in ptrs.iter().enumerate() {
            if ptrs[..i].contains(p) {
                return Err(Error::invalid_arg(format!("fps[{i}] repeats an earlier entry")));
            }
            let h = handle::get_mut::<Handle, _>(*p, &format!("fps[{i}]"))?;
            if h.fp.replicate().is_some_and(|r| !std::ptr::eq(&**r, rc)) {
                return Err(Error::invalid_arg(format!("fps[{i}] was built with a different replicate_comm than the one passed here")));
            }
            guards.push(h.fp.settled()?);
        }
        let mut handles: Vec<&mut FlatParam> = guards.iter_mut().map(|g| &mut **g).collect();
        crate::averaging::average_flat_params(rc, &mut handles)
    })
}

/// flatshard_flat_param_unshard, queued (API §7); returns once the operation is
/// queued. From then on the flat param counts as unsharded, and
/// flatshard_flat_param_view, _reshard, _reduce_grads, _shard, _shard_view,
/// _zero_grad and _free first wait for the work (the first of them returns its
/// error if it failed; the flat param is then sharded, its shard intact).
/// Before data moves the ranks compare (flat param, operation, options). A
/// training unshard (every flag 0) also creates the zero-filled full gradient
/// on the progress thread, so the first view costs nothing
/// (flatshard_flat_param_unshard_forward_async makes none). On an NCCL communicator the unshard runs during the call
/// (stream-ordered, complete on return).
///
/// Ownership: `*opts` is read during the call only. On success `*out` owns a
/// work handle: free it with flatshard_work_free; it stays valid after the flat
/// param or its communicator is freed. The full buffer is library-owned, as
/// after flatshard_flat_param_unshard.
///
/// Threads: collective over the flat param's comm: every rank issues the same
/// sequence of operations. Not concurrently with other calls on `fp`; the work
/// runs on the communicator's progress thread.
///
/// Statuses: from the call: OK; INVALID_ARGUMENT (NULL or freed fp; NULL out;
/// bad options); INVALID_STATE (already unsharded, or unshard/reduce_grads work
/// in flight); ABORTED (the communicator is poisoned); IO (the progress thread
/// could not start); the error of the flat param's earlier failed asynchronous
/// work. From flatshard_work_wait: MISMATCH (the ranks issued different
/// operations, flat params or options), TIMEOUT, PEER_LOST, ABORTED, IO,
/// OUT_OF_MEMORY, CUDA, NCCL.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_unshard_async(
    fp: *mut flatshard_flat_param,
    opts: *const flatshard_unshard_options,
    out: *mut *mut super::work::flatshard_work,
) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_flat_param_unshard_async", || unsafe {
        need(out, "out")?;
        let h = fp_mut(fp)?;
        let o = unshard_opts(opts)?;
        super::work::publish_work(h.fp.unshard_async(o)?, out);
        Ok(())
    })
}

/// flatshard_flat_param_reduce_grads, queued (API §7): first waits for the flat
/// param's earlier in-flight work (returning its error), then queues the
/// reduction. Until the work finished the full gradients belong to the library;
/// flatshard_flat_param_reshard, _shard, _view and _free wait for it. A failed
/// reduction leaves the shard gradient (and the full gradient) as they were.
/// HYBRID_SHARD queues the reduce-scatter on comm and the all-reduce on
/// replicate_comm, each in that communicator's order; a failure in one shard
/// group fails the replicate peers with MISMATCH. A reshard issued while the
/// work runs frees the full gradient without zeroing it. On an NCCL
/// communicator the reduction runs during the call (complete on return).
///
/// Ownership: on success `*out` owns a work handle: free it with
/// flatshard_work_free; it stays valid after the flat param or its communicator
/// is freed.
///
/// Threads: collective over the flat param's comm (and replicate_comm for
/// HYBRID_SHARD): every rank issues the same sequence of operations. Not
/// concurrently with other calls on `fp`; the work runs on the communicators'
/// progress threads.
///
/// Statuses: from the call: OK; INVALID_ARGUMENT (NULL or freed fp; NULL out);
/// INVALID_STATE (sharded, or unsharded as a summon); ABORTED (the communicator
/// is poisoned); IO (the progress thread could not start); the error of the
/// flat param's earlier failed asynchronous work. From flatshard_work_wait:
/// MISMATCH, TIMEOUT, PEER_LOST, ABORTED, IO, OUT_OF_MEMORY, CUDA, NCCL (for
/// NCCL: the errors of the reduction that ran during the call).
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_reduce_grads_async(
    fp: *mut flatshard_flat_param,
    out: *mut *mut super::work::flatshard_work,
) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_flat_param_reduce_grads_async", || unsafe {
        need(out, "out")?;
        let h = fp_mut(fp)?;
        super::work::publish_work(h.fp.reduce_grads_async()?, out);
        Ok(())
    })
}
