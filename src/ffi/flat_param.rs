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
/// off). NULL is ignored.
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

/// Zero-fill `*o` and set `o->struct_size` (every flag off). NULL is ignored.
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

/// Build a flat parameter. Collective over `comm` (and `opts->replicate_comm`
/// for HYBRID_SHARD). Flattens `params[0..n_params)` (same float dtype, all in
/// host memory or all on one CUDA device) in order, shards them and copies this rank's shard out of the
/// caller's tensors; afterwards the caller's buffers are not referenced (their
/// `grad` pointers are ignored). The flat param holds its own references to
/// `comm` and `replicate_comm`: their handles may be freed before it. On success `*out` owns the flat param; free it
/// with flatshard_flat_param_free.
/// INVALID_ARGUMENT: NULL pointer, empty list, mixed dtypes/devices, integer
/// dtype, bad options (message names the first offending index / field);
/// UNSUPPORTED: CUDA tensors without a CUDA driver;
/// MISMATCH (every rank): ranks passed different layouts or options, or
/// another rank's arguments were invalid; TIMEOUT / PEER_LOST from the comm.
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
        need(out, "out")?;
        let comm = comm_arc(comm, "comm")?;
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

/// Σ param numels, no padding; 0 for NULL.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_numel(fp: *const flatshard_flat_param) -> u64 {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary_value(0, || unsafe { handle::get::<Handle, _>(fp, "fp").map(|h| h.fp.numel()).unwrap_or(0) })
}

/// c·W: elements of the unsharded buffer (with padding); 0 for NULL.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_padded_numel(fp: *const flatshard_flat_param) -> u64 {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary_value(0, || unsafe { handle::get::<Handle, _>(fp, "fp").map(|h| h.fp.padded_numel()).unwrap_or(0) })
}

/// c: elements of this rank's shard (SPEC §2); 0 for NULL.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_shard_numel(fp: *const flatshard_flat_param) -> u64 {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary_value(0, || unsafe { handle::get::<Handle, _>(fp, "fp").map(|h| h.fp.shard_numel()).unwrap_or(0) })
}

/// This rank's shard: `out->data` (c elements, library-owned, valid until
/// flatshard_flat_param_free) and `out->grad` (NULL until a gradient exists;
/// valid until free). What an optimizer steps on. INVALID_ARGUMENT for NULL.
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
/// the slice starts inside param i (torch use_orig_params sharded views).
/// Pointers are library-owned, valid until free (grad: until free, NULL until
/// a gradient exists). INVALID_ARGUMENT: NULL, i >= n_params.
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
        })
    }
}

/// Materialise the full parameters (PyTorch summon_full_params / the training
/// all-gather). Collective over the flat param's comm (every rank must call it
/// with the same options). Training (writeback = 0 and rank0_only = 0) gathers
/// in param_dtype; otherwise in the params' own dtype. With rank0_only only
/// rank 0 of comm allocates the full buffer (under HYBRID_SHARD: rank 0 of
/// each shard group); the other ranks hold one shard-sized scratch buffer
/// while the chunks are broadcast. CUDA flat params gather into device memory,
/// or with offload_to_cpu into pinned host memory (views then have device
/// CPU; with rank0_only device memory stays at one shard-sized chunk);
/// offload_to_cpu changes nothing for host params. The full buffer is
/// library-owned and lives until flatshard_flat_param_reshard. A CUDA flat
/// param on an NCCL comm runs on the comm's stream, on a host comm through
/// pinned staging; either way the call returns when the data is in place.
/// INVALID_STATE: already unsharded (call flatshard_flat_param_reshard first);
/// INVALID_ARGUMENT: NULL fp, bad options; TIMEOUT / PEER_LOST from the comm.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_unshard(fp: *mut flatshard_flat_param, opts: *const flatshard_unshard_options) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_flat_param_unshard", || unsafe {
        let h = fp_mut(fp)?;
        let o = unshard_opts(opts)?;
        let comm = h.fp.comm().clone();
        let mut fp = h.fp.settled()?;
        fp.unshard(&comm, o)
    })
}

/// Param i inside the unsharded buffer: data (and grad) pointers, zero-copy,
/// in the unshard dtype (param_dtype for a training unshard). Library-owned,
/// valid until flatshard_flat_param_reshard. Training (with_grads = 0): the
/// first view after an unshard creates a zero-filled full gradient buffer.
/// with_grads = 1: grad is NULL if no rank had a gradient.
/// INVALID_STATE: sharded (call flatshard_flat_param_unshard first), or a rank
/// ≠ 0 under rank0_only (use flatshard_flat_param_shard_view there);
/// INVALID_ARGUMENT: NULL, i >= n_params.
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
/// the full buffer (and of the gradients with with_grads) into its shard;
/// under rank0_only + writeback rank 0 scatters the ranges back, so this is
/// then collective. Host full buffers of 4 MiB or more that every rank
/// gathered go to a small per-process cache (at most
/// FLATSHARD_HOST_CACHE_BYTES, default 512 MiB; 0 = off) for the next unshard
/// of the same size: released with MADV_FREE, so the kernel may reclaim them
/// at any time, but until then they count in the RSS. INVALID_STATE: already
/// sharded (call flatshard_flat_param_unshard first); INVALID_ARGUMENT: NULL.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_reshard(fp: *mut flatshard_flat_param) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_flat_param_reshard", || unsafe {
        let h = fp_mut(fp)?;
        let comm = h.fp.comm().clone();
        let mut fp = h.fp.settled()?;
        fp.reshard(&comm)
    })
}

/// Training: after backward wrote full gradients into the views' grad
/// pointers, average them over the sharding ranks (reduce-scatter; all-reduce
/// for NO_SHARD; then all-reduce over replicate_comm for HYBRID_SHARD), in
/// reduce_dtype, and ADD this rank's range into the shard gradient (created
/// zero-filled). The full gradient is zeroed afterwards. Collective. A rank
/// that took no view contributes zeros.
/// INVALID_STATE: sharded (unshard and write gradients first), or unsharded
/// with with_grads / rank0_only (a summon, not training); INVALID_ARGUMENT: NULL.
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
/// step; no-op if there is none yet. Local. INVALID_ARGUMENT: NULL.
#[no_mangle]
pub unsafe extern "C" fn flatshard_flat_param_zero_grad(fp: *mut flatshard_flat_param) -> flatshard_status {
    // SAFETY: this export's C contract (its doc comment, API §1): handles are NULL or
    // live ones from this library, a non-const one used by one thread at a time;
    // other pointers are NULL or valid as documented, and are NULL-checked before use.
    boundary("flatshard_flat_param_zero_grad", || unsafe {
        let h = fp_mut(fp)?;
        let comm = h.fp.comm().clone();
        let mut fp = h.fp.settled()?;
        fp.zero_grad(&comm)
    })
}

/// Free a flat parameter and every buffer it owns (also while unsharded:
/// view pointers become invalid). Local, not collective. NULL is a no-op.
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

/// Average the shards of `fps[0..n]` in place over `replicate_comm` (the
/// ranks holding the same shard, e.g. HYBRID_SHARD's replicate group) without
/// unsharding: local SGD on a sharded model (PyTorch has no equivalent).
/// Collective over `replicate_comm`; every flat param must be sharded (else
/// INVALID_STATE) and, if it was built with a replicate_comm, built with this
/// one (else INVALID_ARGUMENT). Ranks must pass the same layouts (MISMATCH).
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

/// `flatshard_flat_param_unshard`, queued (API §7). Returns once the
/// operation is queued; from then on the flat param counts as unsharded and
/// flatshard_flat_param_view, _reshard, _reduce_grads, _shard, _zero_grad
/// and _free first wait for the work (and the first of them returns its
/// error if it failed; the flat param is then sharded, its shard intact).
/// The ranks compare (flat param, operation, options) before data moves:
/// different sequences are MISMATCH on the work. `*out` (written only on
/// success) owns a work handle (flatshard_work_free); it stays valid after
/// the flat param is freed. Returns at once: INVALID_ARGUMENT (NULL, bad
/// options), INVALID_STATE (already unsharded, or unshard/reduce_grads work
/// in flight), ABORTED (communicator poisoned). Peer errors come from
/// flatshard_work_wait. On an NCCL communicator the unshard runs during the
/// call (stream-ordered, complete on return). Not thread-safe on one fp.
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

/// `flatshard_flat_param_reduce_grads`, queued (API §7): first waits for
/// the flat param's earlier in-flight work (returning its error), then
/// queues the reduction. Until the work finished the full gradients belong
/// to the library; flatshard_flat_param_reshard, _shard, _view and _free
/// wait for it. A failed reduction leaves the shard gradient (and the full
/// gradient) as they were. `*out` as in flatshard_flat_param_unshard_async.
/// Returns at once: INVALID_ARGUMENT (NULL), INVALID_STATE (sharded, or
/// unsharded as a summon), ABORTED (communicator poisoned); peer errors come
/// from flatshard_work_wait. On an NCCL communicator, and for HYBRID_SHARD,
/// the reduction runs during the call (complete on return). Not thread-safe
/// on one fp.
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
