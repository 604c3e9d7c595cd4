//! C API §8: sharded checkpoints. Converts pointers and infos, then calls
//! `crate::checkpoint::Checkpoint`.
//!
//! Ownership: a checkpoint keeps its own reference to the comm it was begun
//! on (as flat params do), so the comm handle may be freed before it.

#![deny(unsafe_op_in_unsafe_fn)]

use super::comm::{comm_arc, comm_ref, flatshard_comm};
use super::flat_param::{flatshard_flat_param, shared_flat_param};
use super::handle::{self, Kind};
use super::{boundary, need, types::*};
use crate::checkpoint::{self, Checkpoint, ParamInfo, ShardData, ShardDest};
use crate::comm::Comm;
use crate::error::{Error, Result};
use std::ffi::{c_char, c_void, CStr};
use std::sync::Arc;

/// Opaque checkpoint handle: one save or one load.
pub struct flatshard_checkpoint {
    _private: [u8; 0],
}

/// A tensor's name and shape in a checkpoint.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct flatshard_param_info {
    /// Unique, e.g. "layers.0.attn.weight" (UTF-8, no '/' or '\\', no
    /// control characters, at most 4096 bytes with the prefix).
    pub name: *const c_char,
    /// 0..8.
    pub ndim: u32,
    /// ndim entries; their product is the param's numel (NULL allowed when ndim is 0).
    pub shape: *const u64,
}

struct Handle {
    ck: Checkpoint,
    comm: Arc<Comm>,
}

impl Kind for Handle {
    const TAG: u64 = 0x464c_5348_434b_5054; // "FLSHCKPT"
    const NAME: &'static str = "flatshard_checkpoint";
}

unsafe fn ck_parts<'a>(ck: *mut flatshard_checkpoint) -> Result<(&'a mut Checkpoint, &'a Comm)> {
    // SAFETY: `ck` comes from the C caller; `handle::get_mut` checks NULL and
    // the tag before touching the object.
    let h = unsafe { handle::get_mut::<Handle, _>(ck, "ck") }?;
    Ok((&mut h.ck, &*h.comm))
}

unsafe fn c_str(p: *const c_char, what: &str) -> Result<String> {
    need(p, what)?;
    // SAFETY: non-NULL, and the C contract: a NUL-terminated string.
    unsafe { CStr::from_ptr(p) }.to_str().map(str::to_string).map_err(|_| Error::invalid_arg(format!("{what} is not valid UTF-8")))
}

unsafe fn info_from_c(i: &flatshard_param_info, what: &str) -> Result<ParamInfo> {
    // SAFETY: the name pointer is the C caller's (c_str checks NULL).
    let name = unsafe { c_str(i.name, &format!("{what}.name")) }?;
    if i.ndim as usize > checkpoint::safetensors::MAX_NDIM {
        return Err(Error::invalid_arg(format!("{what} ({name}): ndim {} is over the limit of 8", i.ndim)));
    }
    if i.ndim > 0 {
        need(i.shape, &format!("{what}.shape"))?;
    }
    // SAFETY: the C contract: shape holds ndim entries (checked non-NULL).
    let shape = if i.ndim == 0 { vec![] } else { unsafe { std::slice::from_raw_parts(i.shape, i.ndim as usize) }.to_vec() };
    Ok(ParamInfo { name, shape })
}

unsafe fn infos_from_c(infos: *const flatshard_param_info, n: u64) -> Result<Vec<ParamInfo>> {
    if n > 0 {
        need(infos, "infos")?;
    }
    let n = usize::try_from(n).map_err(|_| Error::invalid_arg(format!("n: {n} is too large")))?;
    // SAFETY: the C contract: infos holds n entries (checked non-NULL).
    let s = if n == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(infos, n) } };
    // SAFETY: each entry's pointers are the C caller's, checked inside.
    s.iter().enumerate().map(|(i, x)| unsafe { info_from_c(x, &format!("infos[{i}]")) }).collect()
}

/// Hand a new checkpoint to C.
fn publish(ck: Checkpoint, comm: Arc<Comm>, out: *mut *mut flatshard_checkpoint) {
    // SAFETY: `out` was checked non-NULL by the caller before any work.
    unsafe { *out = handle::into_raw::<Handle, flatshard_checkpoint>(Handle { ck, comm }) };
}

/// Begin a save into `dir` (a directory path; its parent must exist). Rank 0
/// removes temporary directories left by earlier saves to `dir` and creates
/// this save's temporary sibling (".<name>.flatshard-tmp-<id>"). Every rank
/// then makes the same save calls in the same order, then
/// flatshard_checkpoint_commit.
///
/// Ownership: `dir` is read during the call only. The checkpoint keeps its own
/// reference to `comm` (whose handle may be freed first). On success `*out`
/// owns the checkpoint: free it with flatshard_checkpoint_free, which discards
/// the save unless it was committed.
///
/// Threads: collective over `comm`: every rank calls it with the same dir. Not
/// concurrently with other calls on `comm`. A checkpoint is used from one
/// thread at a time.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL out; NULL or freed comm; NULL dir, not
/// UTF-8, empty or without a final component); MISMATCH (ranks passed different
/// dirs, or another rank's dir was invalid); IO (the parent directory is
/// missing or the temporary directory cannot be created: on every rank);
/// TIMEOUT, PEER_LOST, ABORTED (from comm).
#[no_mangle]
pub unsafe extern "C" fn flatshard_checkpoint_save_begin(
    comm: *mut flatshard_comm,
    dir: *const c_char,
    out: *mut *mut flatshard_checkpoint,
) -> flatshard_status {
    boundary("flatshard_checkpoint_save_begin", || {
        need(out, "out")?;
        // SAFETY: `comm` and `dir` come from the C caller; both helpers check NULL
        // (and the handle tag) before reading.
        let (c, dir) = unsafe { (comm_arc(comm, "comm")?, c_str(dir, "dir")) };
        let ck = Checkpoint::save_begin_arg(&c, dir)?;
        publish(ck, c, out);
        Ok(())
    })
}

/// Save the flat param's shard: one tensor per param, named `prefix` +
/// `infos[i].name` (prefix may be NULL) with shape `infos[i].shape`. With
/// `shard_data` NULL the shard's parameters are saved; otherwise `shard_data`
/// is a host buffer of flatshard_flat_param_shard_numel(fp) elements of the
/// flat param's dtype laid out like the shard (an optimizer moment, the shard
/// gradient). Each rank writes only its own shard, as N-d boxes, straight from
/// memory (under HYBRID_SHARD only the replicate group's rank 0 writes;
/// NO_SHARD: rank 0 of the fp's comm). Waits for the flat param's in-flight
/// asynchronous work first.
///
/// Ownership: `infos` (n entries, with their names and shapes), `prefix` and
/// `shard_data` are read during the call only; `fp` stays the caller's.
///
/// Threads: collective over the checkpoint's comm: every rank makes the same
/// call. Not concurrently with other calls on `ck`, `fp` or the comm.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed ck or fp; NULL infos with n >
/// 0; n differs from the fp's param count; a shape whose product differs from
/// the param's numel; ndim > 8; a bad or duplicate name); INVALID_STATE (fp is
/// unsharded; the checkpoint is a load, was committed, or an earlier call on it
/// failed); UNSUPPORTED (a CUDA flat param); MISMATCH (another rank's arguments
/// differ or were invalid); IO (a file could not be written; the other ranks
/// learn at commit); TIMEOUT, PEER_LOST, ABORTED (from the comm); the error of
/// the flat param's failed asynchronous work. After any error the checkpoint
/// accepts only flatshard_checkpoint_free.
#[no_mangle]
pub unsafe extern "C" fn flatshard_checkpoint_save_flat_param(
    ck: *mut flatshard_checkpoint,
    fp: *mut flatshard_flat_param,
    infos: *const flatshard_param_info,
    n: u64,
    prefix: *const c_char,
    shard_data: *const c_void,
) -> flatshard_status {
    boundary("flatshard_checkpoint_save_flat_param", || {
        // SAFETY: `ck` comes from the C caller; ck_parts checks NULL and the tag.
        let (ck, comm) = unsafe { ck_parts(ck) }?;
        // SAFETY: every pointer comes from the C caller; the helpers check NULL
        // (and the flat param's tag) before reading, and read only what the C
        // contract says is there (n infos, NUL-terminated strings).
        let args = (|| unsafe {
            let fp = shared_flat_param(fp, "fp")?;
            let infos = infos_from_c(infos, n)?;
            let prefix = if prefix.is_null() { None } else { Some(c_str(prefix, "prefix")?) };
            Ok((fp, infos, prefix))
        })();
        let (shared, infos, prefix) = match args {
            Ok(a) => a,
            Err(e) => return ck.reject(comm, checkpoint::CallKind::SaveFlatParam, e),
        };
        let rep = shared.replicate().cloned();
        // Waits for the flat param's in-flight asynchronous work (API §7).
        let fp = match shared.settled() {
            Ok(g) => g,
            Err(e) => return ck.reject(comm, checkpoint::CallKind::SaveFlatParam, e),
        };
        let bytes = fp.shard_numel() as usize * fp.dtype().size();
        let data = if shard_data.is_null() {
            ShardData::Params
        } else {
            // SAFETY: the C contract: a non-NULL shard_data holds shard_numel
            // elements of the flat param's dtype, readable during the call.
            ShardData::Buffer(unsafe { std::slice::from_raw_parts(shard_data as *const u8, bytes) })
        };
        ck.save_flat_param(comm, &fp, rep.as_deref(), &infos, prefix.as_deref(), data)
    })
}

/// Save a tensor every rank holds identically (step counters, replicated
/// params): written whole, once, by rank 0 of the checkpoint's comm. Any dtype;
/// `t` must be in host memory.
///
/// Ownership: `info` (with its name and shape) and `t` (and its memory) are
/// read during the call only.
///
/// Threads: collective over the checkpoint's comm: every rank makes the same
/// call. Not concurrently with other calls on `ck` or the comm.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed ck; NULL info or t; shape
/// product ≠ t->numel; ndim > 8; a bad or duplicate name; a bad dtype or device
/// enum); UNSUPPORTED (a CUDA tensor); INVALID_STATE, MISMATCH, IO, TIMEOUT,
/// PEER_LOST, ABORTED as for flatshard_checkpoint_save_flat_param.
#[no_mangle]
pub unsafe extern "C" fn flatshard_checkpoint_save_tensor(
    ck: *mut flatshard_checkpoint,
    info: *const flatshard_param_info,
    t: *const flatshard_tensor,
) -> flatshard_status {
    boundary("flatshard_checkpoint_save_tensor", || {
        // SAFETY: `ck` comes from the C caller; ck_parts checks NULL and the tag.
        let (ck, comm) = unsafe { ck_parts(ck) }?;
        let args = (|| {
            need(info, "info")?;
            need(t, "t")?;
            // SAFETY: checked non-NULL; the C contract: a valid struct whose
            // pointers info_from_c checks before use.
            let i = unsafe { info_from_c(&*info, "info") }?;
            // SAFETY: checked non-NULL; the C contract: a valid tensor struct
            // (tensor_from_c validates its enums and pointers).
            let t = unsafe { &*t };
            let tr = tensor_from_c(t, "t")?;
            tr.check_host("t")?;
            Ok((i, tr))
        })();
        let (i, tr) = match args {
            Ok(a) => a,
            Err(e) => return ck.reject(comm, checkpoint::CallKind::SaveTensor, e),
        };
        let len = tr.bytes()?;
        // SAFETY: tensor_from_c checked data non-NULL for numel > 0 and the
        // byte count; the caller's tensor is host memory (check_host).
        let data = if len == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(tr.data as *const u8, len) } };
        ck.save_tensor(comm, &i, data, tr.dtype)
    })
}

/// Make the save durable and visible: every rank fsyncs its files; the ranks
/// check that they made the same calls and that every element was written
/// exactly once; then rank 0 writes flatshard_checkpoint.json, fsyncs the
/// directory and swaps it into place (renameat2 RENAME_EXCHANGE, or rename when
/// `dir` is new) and removes the previous checkpoint. At every instant `dir` is
/// one complete checkpoint.
///
/// Ownership: the checkpoint stays the caller's: free it afterwards.
///
/// Threads: collective over the checkpoint's comm. Not concurrently with other
/// calls on `ck` or the comm.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed ck); INVALID_STATE (not a
/// save, already committed, or an earlier call failed; the call still tells the
/// other ranks, which get MISMATCH); MISMATCH (ranks made different calls, or a
/// shard was saved by no rank or by two); IO (fsync or rename failed: on every
/// rank); TIMEOUT, PEER_LOST, ABORTED (from the comm).
#[no_mangle]
pub unsafe extern "C" fn flatshard_checkpoint_commit(ck: *mut flatshard_checkpoint) -> flatshard_status {
    boundary("flatshard_checkpoint_commit", || {
        // SAFETY: `ck` comes from the C caller; ck_parts checks NULL and the tag.
        let (ck, comm) = unsafe { ck_parts(ck) }?;
        ck.commit(comm)
    })
}

/// Begin a load of the checkpoint in `dir` (written by flatshard at any world
/// size, or by PyTorch's HuggingFaceStorageWriter, or consolidated): every rank
/// reads and checks every `*.safetensors` header in `dir` (not the data).
///
/// Ownership: `dir` is read during the call only. The checkpoint keeps its own
/// reference to `comm` (whose handle may be freed first). On success `*out`
/// owns the checkpoint: free it with flatshard_checkpoint_free.
///
/// Threads: collective over `comm`: every rank calls it with the same dir. Not
/// concurrently with other calls on `comm`. A checkpoint is used from one
/// thread at a time.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL out; NULL or freed comm; NULL dir; no
/// `*.safetensors` in dir; a truncated or malformed file, the message naming
/// the file and the field: header length, dtype, shape, data_offsets,
/// DCP_SHARDING_INFO, name; boxes that miss or repeat elements); IO (dir or a
/// file cannot be read); OUT_OF_MEMORY (a header); MISMATCH (ranks passed
/// different dirs, or another rank failed); TIMEOUT, PEER_LOST, ABORTED (from
/// comm).
#[no_mangle]
pub unsafe extern "C" fn flatshard_checkpoint_load_begin(
    comm: *mut flatshard_comm,
    dir: *const c_char,
    out: *mut *mut flatshard_checkpoint,
) -> flatshard_status {
    boundary("flatshard_checkpoint_load_begin", || {
        need(out, "out")?;
        // SAFETY: as in flatshard_checkpoint_save_begin.
        let (c, dir) = unsafe { (comm_arc(comm, "comm")?, c_str(dir, "dir")) };
        let ck = Checkpoint::load_begin_arg(&c, dir)?;
        publish(ck, c, out);
        Ok(())
    })
}

/// Load the flat param's shard (shard_data NULL) or a shard-shaped host buffer
/// of shard_numel elements (`shard_data`) from the checkpoint, at any world
/// size, sharding, align_params or floating dtype (converted, rounding to
/// nearest-even): each rank reads only the byte ranges its shard needs. Padding
/// is left as it was. Waits for the flat param's in-flight asynchronous work
/// first.
///
/// Ownership: `infos`, `prefix` are read and `shard_data` is written during the
/// call only; all stay the caller's. `fp`'s shard is written in place (its
/// pointer does not change).
///
/// Threads: collective over the checkpoint's comm: every rank makes the same
/// call. Not concurrently with other calls on `ck`, `fp` or the comm.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed ck or fp; bad infos; a name
/// not in the checkpoint; a different shape; an integer/floating dtype change;
/// missing boxes); INVALID_STATE (fp is unsharded; the checkpoint is a save, or
/// an earlier call failed); UNSUPPORTED (a CUDA flat param); IO (a read
/// failed); MISMATCH (another rank's arguments differ or its read failed);
/// TIMEOUT, PEER_LOST, ABORTED (from the comm); the error of the flat param's
/// failed asynchronous work. After any error the checkpoint accepts only
/// flatshard_checkpoint_free.
#[no_mangle]
pub unsafe extern "C" fn flatshard_checkpoint_load_flat_param(
    ck: *mut flatshard_checkpoint,
    fp: *mut flatshard_flat_param,
    infos: *const flatshard_param_info,
    n: u64,
    prefix: *const c_char,
    shard_data: *mut c_void,
) -> flatshard_status {
    boundary("flatshard_checkpoint_load_flat_param", || {
        // SAFETY: `ck` comes from the C caller; ck_parts checks NULL and the tag.
        let (ck, comm) = unsafe { ck_parts(ck) }?;
        // SAFETY: as in flatshard_checkpoint_save_flat_param.
        let args = (|| unsafe {
            let fp = shared_flat_param(fp, "fp")?;
            let infos = infos_from_c(infos, n)?;
            let prefix = if prefix.is_null() { None } else { Some(c_str(prefix, "prefix")?) };
            Ok((fp, infos, prefix))
        })();
        let (shared, infos, prefix) = match args {
            Ok(a) => a,
            Err(e) => return ck.reject(comm, checkpoint::CallKind::LoadFlatParam, e),
        };
        // Waits for the flat param's in-flight asynchronous work (API §7).
        let mut fp = match shared.settled() {
            Ok(g) => g,
            Err(e) => return ck.reject(comm, checkpoint::CallKind::LoadFlatParam, e),
        };
        let bytes = fp.shard_numel() as usize * fp.dtype().size();
        let dest = if shard_data.is_null() {
            ShardDest::Params
        } else {
            // SAFETY: the C contract: a non-NULL shard_data holds shard_numel
            // elements of the flat param's dtype, writable during the call.
            ShardDest::Buffer(unsafe { std::slice::from_raw_parts_mut(shard_data as *mut u8, bytes) })
        };
        ck.load_flat_param(comm, &mut fp, &infos, prefix.as_deref(), dest)
    })
}

/// Load a whole tensor into `t` (host memory, t->numel = the shape's product);
/// every rank reads it. Floating dtypes convert; integer dtypes must match.
///
/// Ownership: `info` is read and `t`'s memory written during the call only;
/// both stay the caller's.
///
/// Threads: collective over the checkpoint's comm: every rank makes the same
/// call. Not concurrently with other calls on `ck` or the comm.
///
/// Statuses: as flatshard_checkpoint_load_flat_param (INVALID_ARGUMENT also for
/// NULL info or t, or an integer dtype that differs from the saved one;
/// UNSUPPORTED for a CUDA tensor).
#[no_mangle]
pub unsafe extern "C" fn flatshard_checkpoint_load_tensor(
    ck: *mut flatshard_checkpoint,
    info: *const flatshard_param_info,
    t: *mut flatshard_tensor,
) -> flatshard_status {
    boundary("flatshard_checkpoint_load_tensor", || {
        // SAFETY: `ck` comes from the C caller; ck_parts checks NULL and the tag.
        let (ck, comm) = unsafe { ck_parts(ck) }?;
        let args = (|| {
            need(info, "info")?;
            need(t, "t")?;
            // SAFETY: checked non-NULL; the C contract: a valid struct whose
            // pointers info_from_c checks before use.
            let i = unsafe { info_from_c(&*info, "info") }?;
            // SAFETY: checked non-NULL; the C contract: a valid tensor struct
            // (tensor_from_c validates its enums and pointers).
            let t = unsafe { &*t };
            let tr = tensor_from_c(t, "t")?;
            tr.check_host("t")?;
            Ok((i, tr))
        })();
        let (i, tr) = match args {
            Ok(a) => a,
            Err(e) => return ck.reject(comm, checkpoint::CallKind::LoadTensor, e),
        };
        let len = tr.bytes()?;
        // SAFETY: as for save_tensor; the caller's buffer is writable.
        let data = if len == 0 { &mut [][..] } else { unsafe { std::slice::from_raw_parts_mut(tr.data, len) } };
        ck.load_tensor(comm, &i, data, tr.dtype)
    })
}

/// Free a checkpoint. A save that was not committed is discarded: this rank's
/// files are removed, then the temporary directory if it is empty (so the last
/// rank to free removes it; leftovers of a rank that died are removed by the
/// next save), and `dir` keeps the previous checkpoint.
///
/// Ownership: `ck` is invalid afterwards; its reference to the comm is released
/// (a comm whose handle was already freed closes here).
///
/// Threads: not concurrently with any other call on `ck`. Local, not
/// collective.
///
/// Returns: nothing. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn flatshard_checkpoint_free(ck: *mut flatshard_checkpoint) {
    // SAFETY: `ck` comes from the C caller; `handle::free` ignores NULL and
    // handles whose tag is gone.
    super::boundary_value((), || unsafe { handle::free::<Handle, _>(ck) });
}

/// Write the Hugging Face form of the checkpoint in `src_dir` into `dst_dir`
/// (created if missing): model-0000k-of-0000N.safetensors, each holding at most
/// `max_file_bytes` of tensor data (0 = 5 GiB; a larger tensor gets a file of
/// its own), tensors whole in save order, and model.safetensors.index.json.
/// Earlier model-*-of-*.safetensors files in dst_dir are replaced. Rank 0
/// creates the files; every rank copies its share of the saved boxes into place
/// (no gather); rank 0 writes the index last.
///
/// Ownership: `src_dir` and `dst_dir` are read during the call only; nothing is
/// retained.
///
/// Threads: collective over `comm`: every rank calls it with the same
/// arguments. Not concurrently with other calls on `comm`.
///
/// Statuses: OK; INVALID_ARGUMENT (NULL or freed comm; NULL src_dir or dst_dir;
/// src_dir = dst_dir; a malformed or incomplete checkpoint); IO (a file could
/// not be read, created or written); MISMATCH (ranks passed different
/// arguments, or another rank failed); TIMEOUT, PEER_LOST, ABORTED (from comm).
#[no_mangle]
pub unsafe extern "C" fn flatshard_checkpoint_consolidate(
    comm: *mut flatshard_comm,
    src_dir: *const c_char,
    dst_dir: *const c_char,
    max_file_bytes: u64,
) -> flatshard_status {
    boundary("flatshard_checkpoint_consolidate", || {
        // SAFETY: the pointers come from the C caller; the helpers check NULL
        // (and the handle tag) before reading.
        let (c, dirs) = unsafe { (comm_ref(comm, "comm")?, c_str(src_dir, "src_dir").and_then(|s| Ok((s, c_str(dst_dir, "dst_dir")?)))) };
        checkpoint::consolidate_arg(c, dirs, max_file_bytes)
    })
}
