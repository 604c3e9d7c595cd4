//! Sharded checkpoints (API §8, SPEC §4): each rank writes its own shard as
//! N-d boxes in safetensors files that PyTorch's `HuggingFaceStorageReader`
//! loads; load reshards to any world size, sharding or alignment, reading
//! only the bytes a rank needs; consolidation writes Hugging Face files.
//!
//! - `safetensors`: header encoding and strict parsing.
//! - `boxes`: pure geometry (a shard range as boxes, a box as runs).
//! - `io`: positioned I/O, fsync, the atomic directory swap, conversions.
//!
//! Files of a save: every save call writes its own files, one per box index
//! (`shard-<rank>-<call>-<box>.safetensors`), header first, then each box's
//! bytes straight from the shard with positioned writes; nothing is
//! buffered (the header of a file is known when the call starts, so no
//! space is reserved and nothing is moved later). Rank 0 also writes
//! `flatshard_checkpoint.json` (the tensors in save order, for
//! consolidation; not a `.safetensors` file, so PyTorch ignores it).
//!
//! Collective calls: every call begins with a small all-gather in which each
//! rank states which call it is making, whether its arguments were valid and
//! a digest of names, shapes and dtypes; so a bad argument on one rank is
//! INVALID_ARGUMENT there and MISMATCH everywhere else, in the same call, and
//! a checkpoint object that failed earlier still takes part (then returns
//! INVALID_STATE) instead of leaving its peers waiting.

pub mod boxes;
pub mod io;
pub mod safetensors;

use crate::comm::Comm;
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, ErrorKind, Result};
use crate::flat_param::FlatParam;
use crate::tensor::Device;
use safetensors::{Entry, Header};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use CallKind as Call;

#[cfg(target_endian = "big")]
compile_error!("checkpoints are little-endian files written straight from memory: big-endian hosts are not supported");

/// One param's name and shape (C `flatshard_param_info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<u64>,
}

/// The index file rank 0 writes beside the shards (save order, for consolidation).
pub(crate) const INDEX_FILE: &str = "flatshard_checkpoint.json";
/// Hugging Face's index of a consolidated checkpoint.
pub(crate) const HF_INDEX_FILE: &str = "model.safetensors.index.json";

// ------------------------------------------------------------- agreement

/// The collective checkpoint calls (what ranks agree they are making).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u64)]
pub enum CallKind {
    SaveBegin = 1,
    SaveFlatParam,
    SaveTensor,
    Commit,
    LoadBegin,
    LoadFlatParam,
    LoadTensor,
    Consolidate,
    /// After the data moved: did every rank succeed?
    Done,
}

const CALL_NAMES: [&str; 10] = [
    "?",
    "checkpoint_save_begin",
    "checkpoint_save_flat_param",
    "checkpoint_save_tensor",
    "checkpoint_commit",
    "checkpoint_load_begin",
    "checkpoint_load_flat_param",
    "checkpoint_load_tensor",
    "checkpoint_consolidate",
    "(end of a checkpoint call)",
];

fn call_name(v: u64) -> &'static str {
    CALL_NAMES.get(v as usize).copied().unwrap_or("?")
}

/// What a rank brings to the agreement.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Local {
    Ok = 0,
    /// This call's arguments or state were bad here.
    Bad = 1,
    /// The checkpoint object failed in an earlier call.
    FailedBefore = 2,
}

/// FNV-1a digest of what ranks must agree on.
#[derive(Clone, Copy)]
struct Digest(u64);

impl Digest {
    fn new() -> Digest {
        Digest(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(mut self, b: &[u8]) -> Digest {
        for x in b {
            self.0 = (self.0 ^ *x as u64).wrapping_mul(0x100_0000_01b3);
        }
        self
    }
    fn u64(self, v: u64) -> Digest {
        self.bytes(&v.to_le_bytes())
    }
    fn str(self, s: &str) -> Digest {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    fn shape(self, s: &[u64]) -> Digest {
        s.iter().fold(self.u64(s.len() as u64), |d, &x| d.u64(x))
    }
}

fn u64s_to_bytes(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_to_u64s(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8).map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect()
}

/// The agreement step of every collective call (`crate::agree`): each rank
/// states which call it is making and a digest of its arguments, or refuses
/// when its own arguments were bad or its object failed earlier. Ok when all
/// agree; MISMATCH otherwise (a refusing rank gets Ok back and reports its
/// own error).
fn agree(comm: &Comm, call: Call, local: Local, digest: u64) -> Result<()> {
    let fields: [crate::agree::Field; 2] =
        [("checkpoint call (1 = save_begin .. 9 = end of a call)", call as u64), ("arguments (names, shapes, dtypes, paths)", digest)];
    let mine = if local == Local::Ok { Ok(&fields[..]) } else { Err(()) };
    crate::agree::agree(comm, call_name(call as u64), fields.len(), mine)
}

/// Broadcast rank 0's outcome of a step only it performs; other ranks turn a
/// failure into an error of the same kind.
fn share_outcome(comm: &Comm, mine: Result<()>, what: &str) -> Result<()> {
    let code = match &mine {
        Ok(()) => 0u64,
        Err(e) => 1 + e.kind as u64,
    };
    let mut buf = code.to_le_bytes();
    crate::mem::collective(comm, |ops| ops.broadcast_host(comm, &mut buf, DType::I64, 0))?;
    let code = u64::from_le_bytes(buf);
    if comm.rank() == 0 {
        return mine;
    }
    if code == 0 {
        return Ok(());
    }
    let kind = KINDS.get(code as usize - 1).copied().unwrap_or(ErrorKind::Io);
    Err(Error::new(kind, format!("rank {}: rank 0 failed to {what} (see rank 0's error)", comm.rank())))
}

const KINDS: [ErrorKind; 13] = [
    ErrorKind::InvalidArgument,
    ErrorKind::InvalidState,
    ErrorKind::Unsupported,
    ErrorKind::Mismatch,
    ErrorKind::Timeout,
    ErrorKind::PeerLost,
    ErrorKind::Auth,
    ErrorKind::Aborted,
    ErrorKind::OutOfMemory,
    ErrorKind::Io,
    ErrorKind::Cuda,
    ErrorKind::Nccl,
    ErrorKind::Internal,
];

// ------------------------------------------------------------ the object

struct SaveState {
    dir: PathBuf,
    tmp: PathBuf,
    calls: u64,
    /// Files this rank wrote (fsync'd at commit, removed if discarded).
    files: Vec<PathBuf>,
    names: HashSet<String>,
    /// (name, dtype, shape) in save order.
    order: Vec<(String, DType, Vec<u64>)>,
    /// Per call: elements this rank wrote, and the call's total.
    written: Vec<u64>,
    expected: Vec<u64>,
}

/// One saved box of a tensor.
#[derive(Debug, Clone)]
struct Chunk {
    file: usize,
    offsets: Vec<u64>,
    sizes: Vec<u64>,
    /// Absolute file offset of the box's data.
    data: u64,
}

#[derive(Debug, Clone)]
struct Stored {
    dtype: DType,
    /// The full tensor's shape: the largest extent of any box (as PyTorch's reader).
    shape: Vec<u64>,
    chunks: Vec<Chunk>,
}

struct LoadState {
    dir: PathBuf,
    files: Vec<PathBuf>,
    tensors: HashMap<String, Stored>,
}

enum Mode {
    Save(SaveState),
    Load(LoadState),
}

/// One save or load (API §8). Methods are collective over the comm given to
/// `save_begin` / `load_begin`, which must be passed to every call.
pub struct Checkpoint {
    rank: usize,
    mode: Mode,
    failed: bool,
    committed: bool,
}

/// Where a flat param's shard comes from (save) or goes (load).
pub enum ShardData<'a> {
    /// The flat param's own shard (its parameters).
    Params,
    /// A buffer of `shard_numel` elements of the flat param's dtype.
    Buffer(&'a [u8]),
}

pub enum ShardDest<'a> {
    Params,
    Buffer(&'a mut [u8]),
}

fn resolve_dir(dir: &str) -> Result<(PathBuf, PathBuf, String)> {
    if dir.is_empty() {
        return Err(Error::invalid_arg("dir is empty"));
    }
    let p = Path::new(dir);
    let base = p
        .file_name()
        .and_then(|b| b.to_str())
        .filter(|b| *b != "." && *b != "..")
        .ok_or_else(|| Error::invalid_arg(format!("dir {dir:?} has no final component to name the checkpoint (e.g. \"ckpt/step100\")")))?
        .to_string();
    let parent = match p.parent() {
        Some(q) if !q.as_os_str().is_empty() => q.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let parent = parent.canonicalize().map_err(|e| io::io_err("the parent directory of the checkpoint does not exist or is unreachable:", &parent, e))?;
    Ok((parent.join(&base), parent, base))
}

fn tmp_prefix(base: &str) -> String {
    format!(".{base}.flatshard-tmp-")
}

fn nonce(rank: usize) -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    Digest::new().u64(t).u64(std::process::id() as u64).u64(rank as u64).0
}

/// Remove stale temporary (and old) directories of earlier saves to `base`.
fn remove_stale(parent: &Path, base: &str, rank: usize) {
    let prefix = tmp_prefix(base);
    let Ok(rd) = std::fs::read_dir(parent) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        if name.to_str().is_some_and(|n| n.starts_with(&prefix)) {
            let p = e.path();
            crate::log::info(rank, &format!("checkpoint: removing {} left by an earlier save", p.display()));
            if let Err(err) = std::fs::remove_dir_all(&p) {
                crate::log::warn(rank, &format!("checkpoint: could not remove stale {}: {err}", p.display()));
            }
        }
    }
}

fn check_infos(infos: &[ParamInfo], prefix: Option<&str>, numels: &[u64], what: &str) -> Result<Vec<String>> {
    if infos.len() != numels.len() {
        return Err(Error::invalid_arg(format!("n: {} infos given but the flat param has {} params", infos.len(), numels.len())));
    }
    let mut names = Vec::with_capacity(infos.len());
    let mut seen = HashSet::new();
    for (i, (info, &n)) in infos.iter().zip(numels).enumerate() {
        let name = format!("{}{}", prefix.unwrap_or(""), info.name);
        safetensors::check_name(&name).map_err(|m| Error::invalid_arg(format!("{what}infos[{i}].name: {m}")))?;
        check_shape(&info.shape, n, &format!("{what}infos[{i}] ({name})"))?;
        if !seen.insert(name.clone()) {
            return Err(Error::invalid_arg(format!("{what}infos[{i}].name: {name:?} appears twice in this call")));
        }
        names.push(name);
    }
    Ok(names)
}

fn check_shape(shape: &[u64], numel: u64, what: &str) -> Result<()> {
    if shape.len() > safetensors::MAX_NDIM {
        return Err(Error::invalid_arg(format!("{what}: ndim {} is over the limit of {}", shape.len(), safetensors::MAX_NDIM)));
    }
    match safetensors::numel(shape) {
        Some(p) if p == numel => Ok(()),
        Some(p) => Err(Error::invalid_arg(format!("{what}: shape {shape:?} has {p} elements but the param has {numel}"))),
        None => Err(Error::invalid_arg(format!("{what}: shape {shape:?} overflows 64 bits"))),
    }
}

/// One box to write: its entry in a file and where its bytes are in the shard.
struct Planned {
    name: String,
    dtype: DType,
    sizes: Vec<u64>,
    offsets: Vec<u64>,
    /// Byte range in the source buffer.
    src: std::ops::Range<usize>,
}

/// Write one file: header, then each box from `src` at its offset.
fn write_file(path: &Path, boxes: &[Planned], src: &[u8]) -> Result<()> {
    let mut entries = Vec::with_capacity(boxes.len());
    let mut at = 0u64;
    for b in boxes {
        let n = (b.src.end - b.src.start) as u64;
        entries.push(Entry { name: b.name.clone(), dtype: b.dtype, shape: b.sizes.clone(), begin: at, end: at + n });
        at += n;
    }
    let info: Vec<(&str, &[u64])> = boxes.iter().map(|b| (b.name.as_str(), b.offsets.as_slice())).collect();
    let info = safetensors::sharding_info(&info);
    let header = safetensors::encode(&entries, &[("format", "pt"), ("DCP_VERSION", "1.0"), ("DCP_SHARDING_INFO", &info)]);
    let f = io::create_new(path)?;
    io::pwrite_all(&f, &header, 0, path)?;
    let base = header.len() as u64;
    for (b, e) in boxes.iter().zip(&entries) {
        io::pwrite_all(&f, &src[b.src.clone()], base + e.begin, path)?;
    }
    Ok(())
}

impl Checkpoint {
    fn fail<T>(&mut self, e: Error) -> Result<T> {
        self.failed = true;
        Err(e)
    }

    /// The common opening of every collective call: the local check, then
    /// the agreement. On any error the object is failed.
    fn open_call<T>(&mut self, comm: &Comm, call: Call, local: Result<(T, Digest)>) -> Result<T> {
        if self.failed {
            let _ = agree(comm, call, Local::FailedBefore, 0);
            return Err(Error::invalid_state(format!(
                "rank {}: {}: an earlier checkpoint call failed; this checkpoint only accepts flatshard_checkpoint_free",
                self.rank,
                call_name(call as u64)
            )));
        }
        match local {
            Ok((v, d)) => match agree(comm, call, Local::Ok, d.0) {
                Ok(()) => Ok(v),
                Err(e) => self.fail(e),
            },
            Err(e) => {
                let _ = agree(comm, call, Local::Bad, 0);
                let e = if e.msg.starts_with("rank ") { e } else { e.context(format!("rank {}", self.rank)) };
                self.fail(e)
            }
        }
    }

    /// Take part in `call` for a rank whose C arguments were unusable: the
    /// peers get MISMATCH, this rank `e` (or INVALID_STATE after an earlier
    /// failure), and the object is failed.
    pub fn reject(&mut self, comm: &Comm, call: CallKind, e: Error) -> Result<()> {
        self.open_call::<()>(comm, call, Err(e))
    }

    /// After the data moved: every rank learns whether all succeeded.
    fn close_call(&mut self, comm: &Comm, r: Result<()>) -> Result<()> {
        let local = if r.is_ok() { Local::Ok } else { Local::Bad };
        let agreed = agree(comm, Call::Done, local, 0);
        match (r, agreed) {
            (Err(e), _) | (Ok(()), Err(e)) => self.fail(e),
            (Ok(()), Ok(())) => Ok(()),
        }
    }

    fn save_state(&mut self, what: &str) -> Result<&mut SaveState> {
        match &mut self.mode {
            Mode::Save(s) if !self.committed => Ok(s),
            Mode::Save(_) => Err(Error::invalid_state(format!("{what}: this checkpoint was already committed"))),
            Mode::Load(_) => Err(Error::invalid_state(format!("{what}: this checkpoint object is a load (from flatshard_checkpoint_load_begin)"))),
        }
    }

    fn load_state(&self, what: &str) -> Result<&LoadState> {
        match &self.mode {
            Mode::Load(s) => Ok(s),
            Mode::Save(_) => Err(Error::invalid_state(format!("{what}: this checkpoint object is a save (from flatshard_checkpoint_save_begin)"))),
        }
    }

    // ------------------------------------------------------------ save

    /// Start a save into `dir` (collective): rank 0 removes temporary
    /// directories left by earlier saves and creates this save's temporary
    /// sibling directory.
    pub fn save_begin(comm: &Comm, dir: &str) -> Result<Checkpoint> {
        Self::save_begin_arg(comm, Ok(dir.to_string()))
    }

    /// `save_begin` with a `dir` argument that may have failed to convert
    /// (this rank then still takes part, so its peers get MISMATCH).
    pub fn save_begin_arg(comm: &Comm, dir: Result<String>) -> Result<Checkpoint> {
        let rank = comm.rank();
        let mut ck = Checkpoint {
            rank,
            mode: Mode::Save(SaveState {
                dir: PathBuf::new(),
                tmp: PathBuf::new(),
                calls: 0,
                files: vec![],
                names: HashSet::new(),
                order: vec![],
                written: vec![],
                expected: vec![],
            }),
            failed: false,
            committed: false,
        };
        let local = dir.and_then(|d| resolve_dir(&d)).map(|r| {
            let d = Digest::new().str(&r.0.to_string_lossy());
            (r, d)
        });
        let (abs, parent, base) = ck.open_call(comm, Call::SaveBegin, local)?;
        let mut n = 0u64;
        let made = if rank == 0 {
            remove_stale(&parent, &base, rank);
            n = nonce(rank);
            let tmp = parent.join(format!("{}{n:016x}", tmp_prefix(&base)));
            std::fs::create_dir(&tmp).map_err(|e| io::io_err("cannot create the temporary checkpoint directory", &tmp, e))
        } else {
            Ok(())
        };
        share_outcome(comm, made, "create the temporary checkpoint directory").or_else(|e| ck.fail(e))?;
        let mut buf = n.to_le_bytes();
        crate::mem::collective(comm, |ops| ops.broadcast_host(comm, &mut buf, DType::I64, 0)).or_else(|e| ck.fail(e))?;
        let n = u64::from_le_bytes(buf);
        if let Mode::Save(s) = &mut ck.mode {
            s.tmp = parent.join(format!("{}{n:016x}", tmp_prefix(&base)));
            s.dir = abs;
        }
        Ok(ck)
    }

    /// Save a flat param's shard (or a shard-shaped buffer), one tensor per
    /// param. `replicate`: the flat param's HYBRID_SHARD replicate comm (only
    /// its rank 0 writes; the replicas hold the same shard).
    pub fn save_flat_param(
        &mut self,
        comm: &Comm,
        fp: &FlatParam,
        replicate: Option<&Comm>,
        infos: &[ParamInfo],
        prefix: Option<&str>,
        data: ShardData<'_>,
    ) -> Result<()> {
        let what = "checkpoint_save_flat_param";
        let local = (|| {
            let s = self.save_state(what)?;
            let names = check_infos(infos, prefix, &fp.layout().numels, "")?;
            if let Some((i, n)) = names.iter().enumerate().find(|(_, n)| s.names.contains(*n)) {
                return Err(Error::invalid_arg(format!("infos[{i}].name: {n:?} was already saved in this checkpoint")));
            }
            if fp.device() != Device::Cpu {
                return Err(Error::unsupported(format!(
                    "fp: checkpoints of flat params on {} are not implemented; copy the shard to host memory",
                    fp.device().describe()
                )));
            }
            if fp.is_unsharded() {
                return Err(Error::invalid_state("fp is unsharded: call flatshard_flat_param_reshard before saving its shard"));
            }
            let want = fp.shard_numel() as usize * fp.dtype().size();
            if let ShardData::Buffer(b) = &data {
                if b.len() != want {
                    return Err(Error::internal(format!("shard_data: {} bytes, the shard has {want}", b.len())));
                }
            }
            let mut d = Digest::new().u64(fp.dtype() as u64).u64(names.len() as u64);
            for (n, info) in names.iter().zip(infos) {
                d = d.str(n).shape(&info.shape);
            }
            Ok((names, d))
        })();
        let names = self.open_call(comm, Call::SaveFlatParam, local)?;
        let r = self.write_flat_param(comm, fp, replicate, infos, names, data);
        r.or_else(|e| self.fail(e))
    }

    fn write_flat_param(
        &mut self,
        comm: &Comm,
        fp: &FlatParam,
        replicate: Option<&Comm>,
        infos: &[ParamInfo],
        names: Vec<String>,
        data: ShardData<'_>,
    ) -> Result<()> {
        let rank = comm.rank();
        let layout = fp.layout();
        let (dt, es) = (fp.dtype(), fp.dtype().size());
        let src: &[u8] = match data {
            ShardData::Params => fp.shard_bytes(),
            ShardData::Buffer(b) => b,
        };
        // One holder of each shard writes it: a replicate group's rank 0,
        // and for an unsharded layout (NO_SHARD, world 1) the fp comm's rank 0.
        let writer = (layout.world > 1 || fp.comm_rank() == 0) && replicate.is_none_or(|r| r.rank() == 0);
        let mut files: Vec<Vec<Planned>> = Vec::new();
        let mut written = 0u64;
        for (i, (name, info)) in names.iter().zip(infos).enumerate() {
            let n = layout.numels[i];
            if n == 0 {
                if rank == 0 {
                    if files.is_empty() {
                        files.push(vec![]);
                    }
                    let offsets = vec![0; info.shape.len()];
                    files[0].push(Planned { name: name.clone(), dtype: dt, sizes: info.shape.clone(), offsets, src: 0..0 });
                }
                continue;
            }
            if !writer {
                continue;
            }
            let v = layout.shard_view(i, fp.shard_rank());
            if v.numel == 0 {
                continue;
            }
            for (k, p) in boxes::decompose(&info.shape, v.offset_in_param, v.offset_in_param + v.numel).into_iter().enumerate() {
                let at = (v.offset_in_shard + p.start - v.offset_in_param) as usize * es;
                if files.len() <= k {
                    files.resize_with(k + 1, Vec::new);
                }
                written += p.numel;
                files[k].push(Planned { name: name.clone(), dtype: dt, sizes: p.sizes, offsets: p.offsets, src: at..at + p.numel as usize * es });
            }
        }
        let s = self.save_state("checkpoint_save_flat_param")?;
        let call = s.calls;
        s.calls += 1;
        s.written.push(written);
        s.expected.push(layout.numels.iter().sum());
        for (name, info) in names.iter().zip(infos) {
            s.names.insert(name.clone());
            s.order.push((name.clone(), dt, info.shape.clone()));
        }
        for (k, boxes) in files.iter().enumerate().filter(|(_, b)| !b.is_empty()) {
            let path = s.tmp.join(format!("shard-{rank:05}-{call:05}-{k}.safetensors"));
            s.files.push(path.clone());
            write_file(&path, boxes, src)?;
        }
        Ok(())
    }

    /// Save a tensor every rank holds identically; rank 0 writes it whole.
    pub fn save_tensor(&mut self, comm: &Comm, info: &ParamInfo, data: &[u8], dtype: DType) -> Result<()> {
        let what = "checkpoint_save_tensor";
        let numel = (data.len() / dtype.size()) as u64;
        let local = (|| {
            let s = self.save_state(what)?;
            safetensors::check_name(&info.name).map_err(|m| Error::invalid_arg(format!("info.name: {m}")))?;
            check_shape(&info.shape, numel, &format!("info ({})", info.name))?;
            if s.names.contains(&info.name) {
                return Err(Error::invalid_arg(format!("info.name: {:?} was already saved in this checkpoint", info.name)));
            }
            Ok(((), Digest::new().u64(dtype as u64).str(&info.name).shape(&info.shape)))
        })();
        self.open_call(comm, Call::SaveTensor, local)?;
        let rank = comm.rank();
        let s = self.save_state(what)?;
        let call = s.calls;
        s.calls += 1;
        s.written.push(if rank == 0 { numel } else { 0 });
        s.expected.push(numel);
        s.names.insert(info.name.clone());
        s.order.push((info.name.clone(), dtype, info.shape.clone()));
        if rank != 0 {
            return Ok(());
        }
        let path = s.tmp.join(format!("shard-{rank:05}-{call:05}-0.safetensors"));
        s.files.push(path.clone());
        let b = Planned { name: info.name.clone(), dtype, sizes: info.shape.clone(), offsets: vec![0; info.shape.len()], src: 0..data.len() };
        let r = write_file(&path, &[b], data);
        r.or_else(|e| self.fail(e))
    }

    /// Make the save durable and visible (collective): every rank fsyncs its
    /// files, the ranks agree that every call was written completely, then
    /// rank 0 writes the index, fsyncs the directory and swaps it into place.
    pub fn commit(&mut self, comm: &Comm) -> Result<()> {
        let what = "checkpoint_commit";
        let local = (|| {
            let s = self.save_state(what)?;
            for f in &s.files {
                io::fsync_path(f)?;
            }
            let d = s.order.iter().fold(Digest::new().u64(s.calls), |d, (n, dt, sh)| d.str(n).u64(*dt as u64).shape(sh));
            Ok(((), d))
        })();
        self.open_call(comm, Call::Commit, local)?;
        let s = self.save_state(what)?;
        // Every element of every call written exactly once, across ranks.
        let mut sums = u64s_to_bytes(&s.written);
        if !sums.is_empty() {
            crate::mem::collective(comm, |ops| ops.all_reduce_host(comm, &mut sums, DType::I64, ReduceOp::Sum)).or_else(|e| self.fail(e))?;
        }
        let me = self.rank;
        let s = self.save_state(what)?;
        let sums = bytes_to_u64s(&sums);
        if let Some(k) = (0..sums.len()).find(|&k| sums[k] != s.expected[k]) {
            let e = Error::mismatch(format!(
                "rank {}: {what}: save call {k} wrote {} elements over all ranks but has {} (each shard must be saved by exactly one rank: \
                 under HYBRID_SHARD pass the flat param's replicate comm, and save over a comm that holds every shard)",
                me, sums[k], s.expected[k]
            ));
            return self.fail(e);
        }
        let mine = if me == 0 { finalize(s) } else { Ok(()) };
        share_outcome(comm, mine, "make the checkpoint visible").or_else(|e| self.fail(e))?;
        self.committed = true;
        Ok(())
    }

    // ------------------------------------------------------------ load

    /// Open a checkpoint directory (collective): every rank reads and checks
    /// every file's header (not the data).
    pub fn load_begin(comm: &Comm, dir: &str) -> Result<Checkpoint> {
        Self::load_begin_arg(comm, Ok(dir.to_string()))
    }

    /// `load_begin` with a `dir` argument that may have failed to convert.
    pub fn load_begin_arg(comm: &Comm, dir: Result<String>) -> Result<Checkpoint> {
        let mut ck = Checkpoint {
            rank: comm.rank(),
            mode: Mode::Load(LoadState { dir: PathBuf::new(), files: vec![], tensors: HashMap::new() }),
            failed: false,
            committed: false,
        };
        let local = dir.and_then(|d| resolve_dir(&d)).and_then(|(abs, _, _)| {
            let d = Digest::new().str(&abs.to_string_lossy());
            index_dir(&abs).map(|st| (st, d))
        });
        let st = ck.open_call(comm, Call::LoadBegin, local)?;
        ck.mode = Mode::Load(st);
        Ok(ck)
    }

    /// Load a flat param's shard (or a shard-shaped buffer) from the saved
    /// boxes, reading only the bytes this rank's shard needs.
    pub fn load_flat_param(&mut self, comm: &Comm, fp: &mut FlatParam, infos: &[ParamInfo], prefix: Option<&str>, dest: ShardDest<'_>) -> Result<()> {
        let what = "checkpoint_load_flat_param";
        let local = (|| {
            let st = self.load_state(what)?;
            let names = check_infos(infos, prefix, &fp.layout().numels, "")?;
            if fp.device() != Device::Cpu {
                return Err(Error::unsupported(format!(
                    "fp: checkpoints of flat params on {} are not implemented; load into host memory",
                    fp.device().describe()
                )));
            }
            if fp.is_unsharded() {
                return Err(Error::invalid_state("fp is unsharded: call flatshard_flat_param_reshard before loading into its shard"));
            }
            let want = fp.shard_numel() as usize * fp.dtype().size();
            if let ShardDest::Buffer(b) = &dest {
                if b.len() != want {
                    return Err(Error::internal(format!("shard_data: {} bytes, the shard has {want}", b.len())));
                }
            }
            let mut d = Digest::new().u64(fp.dtype().is_float() as u64).u64(names.len() as u64);
            for (name, info) in names.iter().zip(infos) {
                lookup(st, name, &info.shape, fp.dtype())?;
                d = d.str(name).shape(&info.shape);
            }
            Ok((names, d))
        })();
        let names = self.open_call(comm, Call::LoadFlatParam, local)?;
        let st = self.load_state(what)?;
        let (dt, es) = (fp.dtype(), fp.dtype().size());
        let layout = fp.layout().clone();
        let shard_rank = fp.shard_rank();
        let dst: &mut [u8] = match dest {
            ShardDest::Params => fp.shard_bytes_mut(),
            ShardDest::Buffer(b) => b,
        };
        let r = (|| {
            let mut reader = Reader::new(&st.files);
            for (i, name) in names.iter().enumerate() {
                let v = layout.shard_view(i, shard_rank);
                if v.numel == 0 {
                    continue;
                }
                let at = v.offset_in_shard as usize * es;
                let stored = &st.tensors[name];
                reader.read(name, stored, v.offset_in_param, v.offset_in_param + v.numel, &mut dst[at..at + v.numel as usize * es], dt)?;
            }
            Ok(())
        })();
        self.close_call(comm, r)
    }

    /// Load a whole tensor (every rank reads it).
    pub fn load_tensor(&mut self, comm: &Comm, info: &ParamInfo, dst: &mut [u8], dtype: DType) -> Result<()> {
        let what = "checkpoint_load_tensor";
        let numel = (dst.len() / dtype.size()) as u64;
        let local = (|| {
            let st = self.load_state(what)?;
            check_shape(&info.shape, numel, &format!("info ({})", info.name))?;
            lookup(st, &info.name, &info.shape, dtype)?;
            Ok(((), Digest::new().u64(dtype.is_float() as u64).str(&info.name).shape(&info.shape)))
        })();
        self.open_call(comm, Call::LoadTensor, local)?;
        let st = self.load_state(what)?;
        let r = Reader::new(&st.files).read(&info.name, &st.tensors[&info.name], 0, numel, dst, dtype);
        self.close_call(comm, r)
    }

    /// The directory of this save or load.
    pub fn dir(&self) -> &Path {
        match &self.mode {
            Mode::Save(s) => &s.dir,
            Mode::Load(l) => &l.dir,
        }
    }
}

impl Drop for Checkpoint {
    /// An uncommitted save is discarded: each rank removes its own files and
    /// then the temporary directory if it is empty, so the last rank to free
    /// removes it (a rank that died leaves it to the next save).
    fn drop(&mut self) {
        if let Mode::Save(s) = &self.mode {
            if self.committed || s.tmp.as_os_str().is_empty() {
                return;
            }
            for f in &s.files {
                let _ = std::fs::remove_file(f);
            }
            if self.rank == 0 {
                let _ = std::fs::remove_file(s.tmp.join(INDEX_FILE));
            }
            let _ = std::fs::remove_dir(&s.tmp);
        }
    }
}

/// Rank 0's part of commit: index, fsync, swap, remove the old one.
fn finalize(s: &SaveState) -> Result<()> {
    let index = s.tmp.join(INDEX_FILE);
    let mut j = String::from("{\"format\":\"flatshard-checkpoint\",\"version\":1,\"tensors\":[");
    for (i, (name, dt, shape)) in s.order.iter().enumerate() {
        if i > 0 {
            j.push(',');
        }
        j.push_str("\n{\"name\":");
        safetensors::json_string(&mut j, name);
        j.push_str(&format!(",\"dtype\":\"{}\",\"shape\":{shape:?}}}", safetensors::dtype_code(*dt)));
    }
    j.push_str("\n]}\n");
    let f = io::create_new(&index)?;
    io::pwrite_all(&f, j.as_bytes(), 0, &index)?;
    f.sync_all().map_err(|e| io::io_err("fsync failed on", &index, e))?;
    drop(f);
    io::fsync_path(&s.tmp)?;
    let parent = s.dir.parent().unwrap_or(Path::new("/")).to_path_buf();
    let had_old = io::swap_into_place(&s.tmp, &s.dir)?;
    io::fsync_path(&parent)?;
    if had_old {
        if let Err(e) = std::fs::remove_dir_all(&s.tmp) {
            crate::log::warn(0, &format!("checkpoint: could not remove the previous checkpoint at {}: {e} (the next save removes it)", s.tmp.display()));
        }
        io::fsync_path(&parent)?;
    }
    Ok(())
}

/// A saved tensor by name, checked against what the caller expects.
fn lookup<'a>(st: &'a LoadState, name: &str, shape: &[u64], dtype: DType) -> Result<&'a Stored> {
    let t = st.tensors.get(name).ok_or_else(|| Error::invalid_arg(format!("tensor {name:?} is not in the checkpoint {}", st.dir.display())))?;
    if t.shape != shape {
        return Err(Error::invalid_arg(format!("tensor {name:?}: the checkpoint has shape {:?}, the caller's info says {shape:?}", t.shape)));
    }
    if t.dtype != dtype && !(t.dtype.is_float() && dtype.is_float()) {
        return Err(Error::invalid_arg(format!("tensor {name:?}: saved as {} but loaded as {} (only floating dtypes convert)", t.dtype.name(), dtype.name())));
    }
    Ok(t)
}

/// List and parse every `*.safetensors` file directly in `dir` (hidden ones
/// too, as PyTorch's reader does) into an index of boxes per tensor.
fn index_dir(dir: &Path) -> Result<LoadState> {
    let rd = std::fs::read_dir(dir).map_err(|e| io::io_err("cannot read the checkpoint directory", dir, e))?;
    let mut files = Vec::new();
    for e in rd {
        let e = e.map_err(|e| io::io_err("cannot list", dir, e))?;
        if e.file_name().as_encoded_bytes().ends_with(b".safetensors") {
            files.push(e.path());
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::invalid_arg(format!("{}: no *.safetensors files (not a checkpoint)", dir.display())));
    }
    let mut tensors: HashMap<String, Stored> = HashMap::new();
    for (fi, path) in files.iter().enumerate() {
        let (h, _) = read_header(path)?;
        let info = match h.meta("DCP_SHARDING_INFO") {
            Some(s) => Some(parse_sharding_info(s, path)?),
            None => None,
        };
        for e in h.entries {
            let file = path.display();
            let offsets = match &info {
                Some(m) => m
                    .get(&e.name)
                    .cloned()
                    .ok_or_else(|| Error::invalid_arg(format!("{file}: __metadata__.DCP_SHARDING_INFO has no entry for tensor {:?}", e.name)))?,
                None => vec![0; e.shape.len()],
            };
            if offsets.len() != e.shape.len() {
                return Err(Error::invalid_arg(format!(
                    "{file}: DCP_SHARDING_INFO[{:?}].saved_offsets has {} entries for a {}-d tensor",
                    e.name,
                    offsets.len(),
                    e.shape.len()
                )));
            }
            let mut ext = Vec::with_capacity(offsets.len());
            for (o, s) in offsets.iter().zip(&e.shape) {
                ext.push(
                    o.checked_add(*s)
                        .filter(|x| safetensors::numel(&[*x]).is_some())
                        .ok_or_else(|| Error::invalid_arg(format!("{file}: DCP_SHARDING_INFO[{:?}].saved_offsets {offsets:?} + shape overflows", e.name)))?,
                );
            }
            let chunk = Chunk { file: fi, offsets, sizes: e.shape.clone(), data: h.data_start + e.begin };
            match tensors.get_mut(&e.name) {
                None => {
                    tensors.insert(e.name.clone(), Stored { dtype: e.dtype, shape: ext, chunks: vec![chunk] });
                }
                Some(t) => {
                    if t.dtype != e.dtype || t.shape.len() != ext.len() {
                        return Err(Error::invalid_arg(format!(
                            "{file}: tensor {:?} is {} with {} dims here but {} with {} dims in another file",
                            e.name,
                            e.dtype.name(),
                            ext.len(),
                            t.dtype.name(),
                            t.shape.len()
                        )));
                    }
                    for (a, b) in t.shape.iter_mut().zip(&ext) {
                        *a = (*a).max(*b);
                    }
                    t.chunks.push(chunk);
                }
            }
        }
    }
    // Boxes must hold each tensor's elements exactly once.
    for (name, t) in &tensors {
        let total = safetensors::numel(&t.shape).ok_or_else(|| Error::invalid_arg(format!("tensor {name:?}: shape {:?} overflows", t.shape)))?;
        let held = t.chunks.iter().try_fold(0u64, |a, c| a.checked_add(safetensors::numel(&c.sizes).unwrap_or(u64::MAX)));
        if held != Some(total) {
            return Err(Error::invalid_arg(format!(
                "{}: tensor {name:?} of shape {:?} ({total} elements): its saved boxes hold {} elements (boxes missing or saved twice)",
                dir.display(),
                t.shape,
                held.map_or("over 2^64".to_string(), |h| h.to_string())
            )));
        }
    }
    Ok(LoadState { dir: dir.to_path_buf(), files, tensors })
}

/// Read and parse one file's header; returns it and the file's length.
pub fn read_header(path: &Path) -> Result<(Header, u64)> {
    let f = io::open_read(path)?;
    let len = f.metadata().map_err(|e| io::io_err("cannot stat", path, e))?.len();
    let file = path.display().to_string();
    if len < 8 {
        return Err(Error::invalid_arg(format!("{file}: {len} bytes, shorter than the 8-byte header length (truncated)")));
    }
    let mut prefix = [0u8; 8];
    io::pread_exact(&f, &mut prefix, 0, path)?;
    let n = safetensors::header_len(&prefix, len, &file)?;
    let mut json = crate::error::try_zeroed(n as usize, "a safetensors header")?;
    io::pread_exact(&f, &mut json, 8, path)?;
    Ok((safetensors::parse(&json, len, &file)?, len))
}

fn parse_sharding_info(s: &str, path: &Path) -> Result<HashMap<String, Vec<u64>>> {
    use safetensors::Json;
    let file = path.display();
    let bad = |m: String| Error::invalid_arg(format!("{file}: __metadata__.DCP_SHARDING_INFO: {m}"));
    let Json::Object(m) = safetensors::parse_json(s.as_bytes()).map_err(bad)? else {
        return Err(bad("not a JSON object".into()));
    };
    let mut out = HashMap::new();
    for (name, v) in m {
        let offs = match &v {
            Json::Object(f) => f.iter().find(|(k, _)| k == "saved_offsets").map(|(_, v)| v),
            _ => None,
        };
        let Some(Json::Array(a)) = offs else { return Err(bad(format!("entry {name:?} has no saved_offsets array"))) };
        let v: Option<Vec<u64>> = a.iter().map(|x| if let Json::UInt(u) = x { Some(*u) } else { None }).collect();
        out.insert(name.clone(), v.ok_or_else(|| bad(format!("{name:?}.saved_offsets must hold non-negative integers")))?);
    }
    Ok(out)
}

/// Positioned reads of saved boxes into a destination range.
struct Reader<'a> {
    files: &'a [PathBuf],
    open: HashMap<usize, File>,
    buf: Vec<u8>,
}

/// One contiguous piece: `len` elements at `file_off` go to element `dst` of the destination.
struct Seg {
    file: usize,
    file_off: u64,
    dst: u64,
    len: u64,
}

impl<'a> Reader<'a> {
    fn new(files: &'a [PathBuf]) -> Reader<'a> {
        Reader { files, open: HashMap::new(), buf: Vec::new() }
    }

    fn file(&mut self, i: usize) -> Result<&File> {
        if !self.open.contains_key(&i) {
            let f = io::open_read(&self.files[i])?;
            self.open.insert(i, f);
        }
        Ok(&self.open[&i])
    }

    /// Elements `[lo, hi)` (row-major) of tensor `name` into `dst` (dtype `dd`).
    fn read(&mut self, name: &str, t: &Stored, lo: u64, hi: u64, dst: &mut [u8], dd: DType) -> Result<()> {
        let sd = t.dtype;
        let (ss, ds) = (sd.size() as u64, dd.size() as u64);
        let mut segs = Vec::new();
        for c in &t.chunks {
            boxes::for_each_run(&t.shape, &c.offsets, &c.sizes, |tf, be, n| {
                let (a, b) = (tf.max(lo), (tf + n).min(hi));
                if a < b {
                    segs.push(Seg { file: c.file, file_off: c.data + (be + a - tf) * ss, dst: a - lo, len: b - a });
                }
            });
        }
        segs.sort_by_key(|s| s.dst);
        let mut at = 0;
        for s in &segs {
            if s.dst != at {
                return Err(Error::invalid_arg(format!(
                    "tensor {name:?}: element {} is {} in the saved boxes (checkpoint incomplete or corrupt)",
                    lo + at.min(s.dst),
                    if s.dst > at { "missing" } else { "saved twice" }
                )));
            }
            at += s.len;
        }
        if at != hi - lo {
            return Err(Error::invalid_arg(format!("tensor {name:?}: elements from {} on are missing in the saved boxes", lo + at)));
        }
        for s in &segs {
            let path = self.files[s.file].clone();
            let out = &mut dst[(s.dst * ds) as usize..((s.dst + s.len) * ds) as usize];
            if sd == dd {
                let f = self.file(s.file)?;
                io::pread_exact(f, out, s.file_off, &path)?;
                continue;
            }
            // Convert through the one I/O buffer, a piece at a time.
            let per = (io::IO_BUF as u64 / ss).max(1);
            let mut done = 0u64;
            while done < s.len {
                let n = per.min(s.len - done);
                let mut buf = std::mem::take(&mut self.buf);
                buf.resize((n * ss) as usize, 0);
                let f = self.file(s.file)?;
                io::pread_exact(f, &mut buf, s.file_off + done * ss, &path)?;
                crate::convert::convert_host(&buf, sd, &mut out[(done * ds) as usize..((done + n) * ds) as usize], dd);
                self.buf = buf;
                done += n;
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------ consolidation

/// Write the Hugging Face form of the checkpoint in `src` into `dst`
/// (collective): `model-0000k-of-0000N.safetensors`, each holding at most
/// `max_file_bytes` of tensor data (0 = 5 GiB), and
/// `model.safetensors.index.json`. Rank 0 creates the files with their
/// headers at full size; then every rank copies its share of the saved boxes
/// into place with positioned I/O; rank 0 writes the index last.
pub fn consolidate(comm: &Comm, src: &str, dst: &str, max_file_bytes: u64) -> Result<()> {
    consolidate_arg(comm, Ok((src.to_string(), dst.to_string())), max_file_bytes)
}

/// `consolidate` with (src, dst) arguments that may have failed to convert.
pub fn consolidate_arg(comm: &Comm, dirs: Result<(String, String)>, max_file_bytes: u64) -> Result<()> {
    let rank = comm.rank();
    let max = if max_file_bytes == 0 { 5 << 30 } else { max_file_bytes };
    let mut ck =
        Checkpoint { rank, mode: Mode::Load(LoadState { dir: PathBuf::new(), files: vec![], tensors: HashMap::new() }), failed: false, committed: false };
    let local = (|| {
        let (src, dst) = dirs?;
        let (sabs, _, _) = resolve_dir(&src)?;
        let (dabs, dparent, _) = resolve_dir(&dst)?;
        if sabs == dabs {
            return Err(Error::invalid_arg("dst_dir: must differ from src_dir"));
        }
        let st = index_dir(&sabs)?;
        let order = save_order(&sabs, &st)?;
        let plan = plan_files(&st, &order, max);
        let d = Digest::new().str(&sabs.to_string_lossy()).str(&dabs.to_string_lossy()).u64(max);
        Ok(((st, plan, dabs, dparent), d))
    })();
    let (st, plan, dabs, _) = ck.open_call(comm, Call::Consolidate, local)?;
    let n_files = plan.len();
    let name_of = |k: usize| format!("model-{:05}-of-{:05}.safetensors", k + 1, n_files);
    // Rank 0: the files at full size, headers in place.
    let made = if rank == 0 {
        (|| {
            std::fs::create_dir_all(&dabs).map_err(|e| io::io_err("cannot create", &dabs, e))?;
            remove_hf_files(&dabs)?;
            for (k, f) in plan.iter().enumerate() {
                let p = dabs.join(name_of(k));
                let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&p).map_err(|e| io::io_err("cannot create", &p, e))?;
                io::pwrite_all(&file, &f.header, 0, &p)?;
                file.set_len(f.header.len() as u64 + f.data_len).map_err(|e| io::io_err("cannot size", &p, e))?;
            }
            Ok(())
        })()
    } else {
        Ok(())
    };
    share_outcome(comm, made, "create the consolidated files")?;
    // Every rank: its share of the boxes, balanced by bytes.
    let mut jobs: Vec<(&str, usize)> = Vec::new();
    for f in &plan {
        for name in &f.names {
            for ci in 0..st.tensors[name.as_str()].chunks.len() {
                jobs.push((name.as_str(), ci));
            }
        }
    }
    let mut load = vec![0u64; comm.size()];
    let mut mine = Vec::new();
    for (name, ci) in jobs {
        let t = &st.tensors[name];
        let bytes = safetensors::numel(&t.chunks[ci].sizes).unwrap_or(0) * t.dtype.size() as u64;
        let r = (0..load.len()).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        load[r] += bytes.max(1);
        if r == rank {
            mine.push((name, ci));
        }
    }
    let r = (|| {
        let mut where_: HashMap<&str, (usize, u64)> = HashMap::new();
        for (k, f) in plan.iter().enumerate() {
            for (name, begin) in f.names.iter().zip(&f.begins) {
                where_.insert(name.as_str(), (k, f.header.len() as u64 + begin));
            }
        }
        let mut out_files: HashMap<usize, File> = HashMap::new();
        let mut srcs = Reader::new(&st.files);
        let mut buf = Vec::new();
        for (name, ci) in &mine {
            let t = &st.tensors[*name];
            let c = &t.chunks[*ci];
            let es = t.dtype.size() as u64;
            let (k, base) = where_[*name];
            let dpath = dabs.join(name_of(k));
            if let std::collections::hash_map::Entry::Vacant(slot) = out_files.entry(k) {
                slot.insert(std::fs::OpenOptions::new().write(true).open(&dpath).map_err(|e| io::io_err("cannot open", &dpath, e))?);
            }
            let spath = st.files[c.file].clone();
            let mut runs = Vec::new();
            boxes::for_each_run(&t.shape, &c.offsets, &c.sizes, |tf, be, n| runs.push((tf, be, n)));
            for (tf, be, n) in runs {
                let mut done = 0;
                while done < n * es {
                    let len = (n * es - done).min(io::IO_BUF as u64);
                    buf.resize(len as usize, 0);
                    io::pread_exact(srcs.file(c.file)?, &mut buf, c.data + be * es + done, &spath)?;
                    io::pwrite_all(&out_files[&k], &buf, base + tf * es + done, &dpath)?;
                    done += len;
                }
            }
        }
        for (k, f) in &out_files {
            f.sync_all().map_err(|e| io::io_err("fsync failed on", &dabs.join(name_of(*k)), e))?;
        }
        Ok(())
    })();
    ck.close_call(comm, r)?;
    let done = if rank == 0 { write_hf_index(&dabs, &plan, &name_of) } else { Ok(()) };
    share_outcome(comm, done, "write model.safetensors.index.json")
}

struct PlannedFile {
    names: Vec<String>,
    begins: Vec<u64>,
    header: Vec<u8>,
    data_len: u64,
}

/// Tensor names in save order: from rank 0's index when it lists exactly
/// the saved tensors (a flatshard checkpoint), else sorted by name.
fn save_order(dir: &Path, st: &LoadState) -> Result<Vec<String>> {
    let p = dir.join(INDEX_FILE);
    let mut sorted: Vec<String> = st.tensors.keys().cloned().collect();
    sorted.sort();
    let Ok(text) = std::fs::read(&p) else { return Ok(sorted) };
    use safetensors::Json;
    let bad = |m: &str| Error::invalid_arg(format!("{}: {m}", p.display()));
    let Json::Object(root) = safetensors::parse_json(&text).map_err(|m| bad(&m))? else { return Err(bad("not a JSON object")) };
    let Some((_, Json::Array(ts))) = root.iter().find(|(k, _)| k == "tensors") else { return Err(bad("no \"tensors\" array")) };
    let mut order = Vec::with_capacity(ts.len());
    for t in ts {
        let name = match t {
            Json::Object(f) => f.iter().find(|(k, _)| k == "name").and_then(|(_, v)| if let Json::Str(s) = v { Some(s.clone()) } else { None }),
            _ => None,
        };
        order.push(name.ok_or_else(|| bad("a tensor entry has no \"name\" string"))?);
    }
    let mut check = order.clone();
    check.sort();
    if check != sorted {
        return Err(bad("the tensors it lists differ from those in the *.safetensors files"));
    }
    Ok(order)
}

fn plan_files(st: &LoadState, order: &[String], max: u64) -> Vec<PlannedFile> {
    let mut groups: Vec<Vec<&String>> = Vec::new();
    let mut cur = 0u64;
    for name in order {
        let t = &st.tensors[name];
        let bytes = safetensors::numel(&t.shape).unwrap_or(0) * t.dtype.size() as u64;
        if groups.is_empty() || (cur > 0 && cur + bytes > max) {
            groups.push(vec![]);
            cur = 0;
        }
        groups.last_mut().expect("a group").push(name);
        cur += bytes;
    }
    groups
        .into_iter()
        .map(|g| {
            let mut entries = Vec::new();
            let mut at = 0;
            for name in &g {
                let t = &st.tensors[name.as_str()];
                let n = safetensors::numel(&t.shape).unwrap_or(0) * t.dtype.size() as u64;
                entries.push(Entry { name: (*name).clone(), dtype: t.dtype, shape: t.shape.clone(), begin: at, end: at + n });
                at += n;
            }
            let header = safetensors::encode(&entries, &[("format", "pt")]);
            PlannedFile { names: g.into_iter().cloned().collect(), begins: entries.iter().map(|e| e.begin).collect(), header, data_len: at }
        })
        .collect()
}

/// Remove an earlier consolidation's files from `dst` (only our file names).
fn remove_hf_files(dst: &Path) -> Result<()> {
    let rd = std::fs::read_dir(dst).map_err(|e| io::io_err("cannot read", dst, e))?;
    for e in rd.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if (n.starts_with("model-") && n.contains("-of-") && n.ends_with(".safetensors")) || n == HF_INDEX_FILE {
            std::fs::remove_file(e.path()).map_err(|err| io::io_err("cannot remove", &e.path(), err))?;
        }
    }
    Ok(())
}

fn write_hf_index(dst: &Path, plan: &[PlannedFile], name_of: &dyn Fn(usize) -> String) -> Result<()> {
    let total: u64 = plan.iter().map(|f| f.data_len).sum();
    let mut j = format!("{{\n  \"metadata\": {{\"total_size\": {total}}},\n  \"weight_map\": {{");
    let mut first = true;
    for (k, f) in plan.iter().enumerate() {
        for name in &f.names {
            j.push_str(if first { "\n    " } else { ",\n    " });
            first = false;
            safetensors::json_string(&mut j, name);
            j.push_str(": ");
            safetensors::json_string(&mut j, &name_of(k));
        }
    }
    j.push_str("\n  }\n}\n");
    let tmp = dst.join(format!(".{HF_INDEX_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let f = io::create_new(&tmp)?;
    io::pwrite_all(&f, j.as_bytes(), 0, &tmp)?;
    f.sync_all().map_err(|e| io::io_err("fsync failed on", &tmp, e))?;
    let fin = dst.join(HF_INDEX_FILE);
    std::fs::rename(&tmp, &fin).map_err(|e| io::io_err("cannot rename to", &fin, e))?;
    io::fsync_path(dst)
}
