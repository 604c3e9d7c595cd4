//! Flat parameters (FSDP-style sharding), SPEC.md §2.
//!
//! `layout` is the pure math; this file is the state machine
//! (sharded ⇄ unsharded) and the data movement. The communicators are passed
//! to every collective call rather than stored, so the safe Rust API needs no
//! lifetimes or reference counts; the C layer keeps the handles and documents
//! that they must outlive the flat param (as NCCL does for its comms).
//!
//! Memory: the shard (and its gradient) are library-owned host buffers of
//! exactly `c` elements. The full buffer exists only between `unshard` and
//! `reshard`, and with `rank0_only` only on rank 0: other ranks then take
//! part through one broadcast per rank chunk, receiving into one shard-sized
//! scratch buffer (Comm has no point-to-point gather; a broadcast per chunk
//! keeps every non-root rank at O(shard) memory, at the price of each rank
//! seeing every chunk go by, which the ring/shm broadcast forwards anyway).

pub mod layout;

use crate::comm::Comm;
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use crate::tensor::{Device, TensorRef};
pub use layout::{Layout, ShardView};

/// FSDP sharding strategy (C `flatshard_sharding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharding {
    FullShard = 0,
    ShardGradOp = 1,
    NoShard = 2,
    HybridShard = 3,
}

impl Sharding {
    pub fn from_raw(v: i64, what: &str) -> Result<Sharding> {
        match v {
            0 => Ok(Sharding::FullShard),
            1 => Ok(Sharding::ShardGradOp),
            2 => Ok(Sharding::NoShard),
            3 => Ok(Sharding::HybridShard),
            _ => Err(Error::invalid_arg(format!(
                "{what}: {v} is not a flatshard_sharding (valid: 0..=3, FLATSHARD_FULL_SHARD..FLATSHARD_HYBRID_SHARD)"
            ))),
        }
    }
}

/// Options of `FlatParam::new` (C `flatshard_flat_param_options`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlatParamOptions {
    pub sharding: Sharding,
    /// PyTorch `use_orig_params=True` layout (16-byte alignment + world padding).
    pub align_params: bool,
    /// Rank 0's initial values win (PyTorch `sync_module_states`).
    pub sync_from_rank0: bool,
    /// Mixed precision: dtype of the training unshard.
    pub param_dtype: Option<DType>,
    /// Mixed precision: dtype of gradient reduction.
    pub reduce_dtype: Option<DType>,
}

impl Default for FlatParamOptions {
    fn default() -> Self {
        FlatParamOptions { sharding: Sharding::FullShard, align_params: false, sync_from_rank0: false, param_dtype: None, reduce_dtype: None }
    }
}

/// Options of `unshard` (C `flatshard_unshard_options`); all default off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnshardOptions {
    pub writeback: bool,
    pub rank0_only: bool,
    /// Host memory only for now: the full buffer is always in host memory.
    pub offload_to_cpu: bool,
    pub with_grads: bool,
}

/// One input parameter: its bytes (host memory) or, for a device tensor, only
/// its description (`data` None) so that it can be rejected with a message.
#[derive(Debug, Clone, Copy)]
pub struct ParamInput<'a> {
    pub data: Option<&'a [u8]>,
    pub numel: u64,
    pub dtype: DType,
    pub device: Device,
}

impl<'a> ParamInput<'a> {
    /// A host tensor of `dtype` over `data` (whole elements).
    pub fn host(data: &'a [u8], dtype: DType) -> ParamInput<'a> {
        ParamInput { data: Some(data), numel: (data.len() / dtype.size()) as u64, dtype, device: Device::Cpu }
    }
}

/// A library-owned, zero-filled, 8-byte-aligned host buffer.
struct Buf {
    words: Vec<u64>,
    len: usize,
}

impl Buf {
    fn zeroed(len: usize, what: &str) -> Result<Buf> {
        let n = len.div_ceil(8);
        if n == 0 {
            return Ok(Buf { words: Vec::new(), len });
        }
        // alloc_zeroed (calloc) gets fresh zero pages from the OS for large
        // buffers instead of writing zeros that the gather overwrites anyway;
        // unlike vec![0; n] it reports failure instead of aborting.
        let layout = std::alloc::Layout::array::<u64>(n).map_err(|_| Error::oom(format!("{len} bytes for {what} exceed the address space")))?;
        // SAFETY: layout has non-zero size; the pointer is checked for null and
        // owned by the Vec with the same layout (capacity n, all n zeroed).
        let words = unsafe {
            let p = std::alloc::alloc_zeroed(layout) as *mut u64;
            if p.is_null() {
                return Err(Error::oom(format!("cannot allocate {len} bytes for {what}")));
            }
            Vec::from_raw_parts(p, n, n)
        };
        advise_huge_pages(words.as_ptr() as usize, len);
        Ok(Buf { words, len })
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: a Vec<u64> of n words is 8n >= len initialised bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.len) }
    }
    /// Null for an empty buffer (a zero-numel flat param).
    fn ptr(&mut self) -> *mut u8 {
        if self.len == 0 {
            return std::ptr::null_mut();
        }
        self.words.as_mut_ptr() as *mut u8
    }
}

/// Ask for transparent huge pages on a large, still untouched buffer: the
/// gather then takes one page fault per 2 MiB instead of per 4 KiB (the
/// kernel's default THP mode is often `madvise`). Advisory; errors ignored.
fn advise_huge_pages(addr: usize, len: usize) {
    const HUGE: usize = 2 << 20;
    if len < 2 * HUGE {
        return;
    }
    let start = addr.next_multiple_of(HUGE);
    let end = (addr + len) / HUGE * HUGE;
    #[cfg(target_os = "linux")]
    if end > start {
        // SAFETY: [start, end) lies inside a live allocation we own; MADV_HUGEPAGE
        // changes no contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
    let _ = (start, end);
}

/// The full parameter while unsharded.
enum Full {
    /// Views point into the shard itself (unsharded layout, same dtype).
    Shard,
    /// A gathered buffer of `padded_numel` elements of the gather dtype.
    Owned(Buf),
    /// rank0_only on a rank ≠ 0: nothing.
    Absent,
}

/// The full gradient while unsharded.
enum FullGrad {
    /// Training: created zero-filled on the first view.
    Lazy,
    /// with_grads and no rank had a gradient: NULL grad views.
    Null,
    /// Views point into the shard gradient itself (unsharded layout).
    Shard,
    Owned(Buf),
}

struct Unsharded {
    opts: UnshardOptions,
    /// dtype of the full buffer and the views.
    dtype: DType,
    full: Full,
    grad: FullGrad,
}

/// An FSDP flat parameter: this rank's shard plus, while unsharded, the full
/// parameter. Not thread-safe (`&mut self` everywhere it matters).
pub struct FlatParam {
    layout: Layout,
    opts: FlatParamOptions,
    dtype: DType,
    /// Size and rank of the communicator it was built on, checked per call.
    comm_size: usize,
    comm_rank: usize,
    replicate_size: usize,
    /// Sharding rank in the layout (0 when unsharded: NO_SHARD or world 1).
    shard_rank: u64,
    shard: Buf,
    shard_grad: Option<Buf>,
    state: Option<Unsharded>,
}

fn fnv(words: &[u64]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in words {
        for b in w.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// Convert `src` (elements of `from`) into `dst` (elements of `to`); float dtypes.
fn convert(src: &[u8], from: DType, dst: &mut [u8], to: DType) {
    if from == to {
        dst.copy_from_slice(src);
        return;
    }
    let n = src.len() / from.size();
    debug_assert_eq!(dst.len(), n * to.size());
    match (from, to) {
        (DType::F32, DType::BF16) => {
            for (s, d) in src.chunks_exact(4).zip(dst.chunks_exact_mut(2)) {
                let x = f32::from_ne_bytes(s.try_into().expect("4"));
                d.copy_from_slice(&crate::reduce::f32_to_bf16_bits(x).to_ne_bytes());
            }
        }
        (DType::BF16, DType::F32) => {
            for (s, d) in src.chunks_exact(2).zip(dst.chunks_exact_mut(4)) {
                let x = crate::reduce::bf16_bits_to_f32(u16::from_ne_bytes(s.try_into().expect("2")));
                d.copy_from_slice(&x.to_ne_bytes());
            }
        }
        _ => {
            for i in 0..n {
                let x = read_f64(&src[i * from.size()..], from);
                write_f64(&mut dst[i * to.size()..], to, x);
            }
        }
    }
}

fn read_f64(b: &[u8], dt: DType) -> f64 {
    match dt {
        DType::F32 => f32::from_ne_bytes(b[..4].try_into().expect("4")) as f64,
        DType::F64 => f64::from_ne_bytes(b[..8].try_into().expect("8")),
        DType::F16 => half::f16::from_bits(u16::from_ne_bytes(b[..2].try_into().expect("2"))).to_f64(),
        DType::BF16 => half::bf16::from_bits(u16::from_ne_bytes(b[..2].try_into().expect("2"))).to_f64(),
        _ => unreachable!("flat params hold floating dtypes only"),
    }
}

fn write_f64(b: &mut [u8], dt: DType, x: f64) {
    match dt {
        DType::F32 => b[..4].copy_from_slice(&(x as f32).to_ne_bytes()),
        DType::F64 => b[..8].copy_from_slice(&x.to_ne_bytes()),
        DType::F16 => b[..2].copy_from_slice(&half::f16::from_f64(x).to_bits().to_ne_bytes()),
        DType::BF16 => b[..2].copy_from_slice(&half::bf16::from_f64(x).to_bits().to_ne_bytes()),
        _ => unreachable!("flat params hold floating dtypes only"),
    }
}

/// What every rank must agree on; exchanged before any data moves.
const DESC_WORDS: usize = 9;

impl FlatParam {
    /// Collective over `comm` (and `replicate` for HYBRID_SHARD). Copies this
    /// rank's shard out of `params`; they are not referenced afterwards.
    /// Errors: INVALID_ARGUMENT / UNSUPPORTED for this rank's bad input (the
    /// other ranks get MISMATCH naming it), MISMATCH when layouts differ.
    pub fn new(comm: &Comm, replicate: Option<&Comm>, params: &[ParamInput<'_>], opts: &FlatParamOptions) -> Result<FlatParam> {
        let rank = comm.rank();
        let local = Self::validate(comm, replicate, params, opts);
        // Agree before moving data, so one rank's bad input is an error
        // everywhere instead of a hang.
        let mut desc = [0u64; DESC_WORDS];
        match &local {
            Ok(dtype) => {
                let numels: Vec<u64> = params.iter().map(|p| p.numel).collect();
                desc = [
                    1,
                    params.len() as u64,
                    *dtype as u64,
                    numels.iter().sum(),
                    fnv(&numels),
                    opts.sharding as u64,
                    opts.align_params as u64 | (opts.sync_from_rank0 as u64) << 1,
                    opts.param_dtype.map_or(0, |d| d as u64 + 1),
                    opts.reduce_dtype.map_or(0, |d| d as u64 + 1),
                ];
            }
            Err(_) => desc[0] = 0,
        }
        Self::agree(comm, &desc, "comm")?;
        if let Err(e) = local {
            return Err(e.context(format!("rank {rank}")));
        }
        if opts.sharding == Sharding::HybridShard {
            Self::agree(replicate.expect("validated"), &desc, "replicate_comm")?;
        }
        let dtype = local.expect("checked");
        let w = comm.size() as u64;
        let sharded = w > 1 && opts.sharding != Sharding::NoShard;
        let align = opts.align_params.then(|| layout::align_elems(opts.param_dtype.unwrap_or(dtype).size()));
        let numels: Vec<u64> = params.iter().map(|p| p.numel).collect();
        let layout = Layout::new(&numels, align, w, if sharded { w } else { 1 })?;
        let shard_rank = if sharded { rank as u64 } else { 0 };
        let c = layout.chunk;
        let es = dtype.size();
        let shard = Buf::zeroed(dtype.bytes(c, "shard numel")?, "the shard")?;
        let mut fp = FlatParam {
            layout,
            opts: *opts,
            dtype,
            comm_size: comm.size(),
            comm_rank: rank,
            replicate_size: replicate.map_or(1, |r| r.size()),
            shard_rank,
            shard,
            shard_grad: None,
            state: None,
        };
        let srcs: Vec<&[u8]> = params.iter().map(|p| p.data.unwrap_or(&[])).collect();
        let own = fp.shard_rank;
        fp.fill_shard_from(&srcs, own, es);
        if opts.sync_from_rank0 {
            fp.sync_from_rank0(comm, replicate, &srcs)?;
        }
        Ok(fp)
    }

    /// Report an argument error found before `new` (e.g. while converting C
    /// arguments) through the same agreement step, so that the other ranks
    /// get MISMATCH instead of waiting for this rank until the timeout.
    pub fn fail_new(comm: &Comm, e: Error) -> Error {
        let rank = comm.rank();
        match Self::agree(comm, &[0; DESC_WORDS], "comm") {
            Ok(()) => e.context(format!("rank {rank}")),
            Err(agree) => e.context(format!("rank {rank}")).context(format!("(while telling the other ranks: {})", agree.msg)),
        }
    }

    /// Local checks; returns the common dtype.
    fn validate(comm: &Comm, replicate: Option<&Comm>, params: &[ParamInput<'_>], opts: &FlatParamOptions) -> Result<DType> {
        if params.is_empty() {
            return Err(Error::invalid_arg("n_params: 0 params; a flat param needs at least one tensor"));
        }
        let (d0, dev0) = (params[0].dtype, params[0].device);
        for (i, p) in params.iter().enumerate() {
            if p.dtype != d0 {
                return Err(Error::invalid_arg(format!(
                    "params[{i}].dtype: {} differs from params[0].dtype {}; a flat param holds one dtype",
                    p.dtype.name(),
                    d0.name()
                )));
            }
            if p.device != dev0 {
                return Err(Error::invalid_arg(format!(
                    "params[{i}].device: {} differs from params[0].device {}; a flat param lives on one device",
                    p.device.describe(),
                    dev0.describe()
                )));
            }
            if !p.dtype.is_float() {
                return Err(Error::invalid_arg(format!("params[{i}].dtype: {} is an integer dtype; flat params hold f32/f64/f16/bf16", p.dtype.name())));
            }
            if p.device != Device::Cpu {
                return Err(Error::unsupported(format!(
                    "params[{i}].device: {} flat params are not supported yet; pass host (FLATSHARD_DEVICE_CPU) tensors",
                    p.device.describe()
                )));
            }
            let bytes = p.dtype.bytes(p.numel, &format!("params[{i}].numel"))?;
            match p.data {
                Some(d) if d.len() >= bytes => {}
                _ => return Err(Error::invalid_arg(format!("params[{i}].data: NULL or shorter than numel {}", p.numel))),
            }
        }
        for (name, d) in [("param_dtype", opts.param_dtype), ("reduce_dtype", opts.reduce_dtype)] {
            if let Some(d) = d {
                if !d.is_float() {
                    return Err(Error::invalid_arg(format!("options.{name}: {} is not a floating dtype (f32, f64, f16, bf16)", d.name())));
                }
            }
        }
        match (opts.sharding, replicate) {
            (Sharding::HybridShard, None) => {
                return Err(Error::invalid_arg("options.replicate_comm: HYBRID_SHARD needs the communicator of the ranks holding the same shard"))
            }
            (Sharding::HybridShard, Some(r)) if std::ptr::eq(r, comm) && comm.size() > 1 => {
                return Err(Error::invalid_arg("options.replicate_comm: must differ from comm (shard over comm, replicate over replicate_comm)"))
            }
            _ => {}
        }
        Ok(d0)
    }

    /// All-gather `desc` over `c`; any difference → MISMATCH on every rank.
    fn agree(c: &Comm, desc: &[u64; DESC_WORDS], which: &str) -> Result<()> {
        let w = c.size();
        let send: Vec<u8> = desc.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut recv = vec![0u8; send.len() * w];
        c.all_gather(&send, &mut recv, DType::I64)?;
        let all: Vec<Vec<u64>> = recv
            .chunks_exact(8 * DESC_WORDS)
            .map(|b| b.chunks_exact(8).map(|x| u64::from_le_bytes(x.try_into().expect("8"))).collect())
            .collect();
        let me = c.rank();
        if let Some(bad) = all.iter().position(|d| d[0] == 0) {
            if all[me][0] == 0 {
                return Ok(()); // our own error is reported by the caller
            }
            return Err(Error::mismatch(format!(
                "rank {me}: flat_param_new failed on rank {bad} of {which} (invalid arguments there; see its error)"
            )));
        }
        let what = |d: &Vec<u64>| {
            let dt = DType::from_raw(d[2] as i64, "dtype").map(|d| d.name()).unwrap_or("?");
            format!("{} params of {dt}, total numel {}, sharding {}, flags {}, param_dtype {}, reduce_dtype {}", d[1], d[3], d[5], d[6], d[7], d[8])
        };
        for (r, d) in all.iter().enumerate() {
            if d != &all[0] {
                let same = d[1..5] == all[0][1..5];
                return Err(Error::mismatch(format!(
                    "rank {me}: ranks of {which} passed different {}: rank {r} has {} but rank 0 has {}",
                    if same { "options" } else { "param layouts (count, numels, dtype)" },
                    what(d),
                    what(&all[0])
                )));
            }
        }
        Ok(())
    }

    /// Copy sharding-rank `r`'s piece of `srcs` into the shard buffer.
    fn fill_shard_from(&mut self, srcs: &[&[u8]], r: u64, es: usize) {
        let mut out = std::mem::replace(&mut self.shard, Buf { words: Vec::new(), len: 0 });
        Self::fill_chunk(&self.layout, srcs, r, es, out.bytes_mut());
        self.shard = out;
    }

    fn fill_chunk(layout: &Layout, srcs: &[&[u8]], r: u64, es: usize, out: &mut [u8]) {
        out.fill(0);
        for (i, src) in srcs.iter().enumerate() {
            let v = layout.shard_view(i, r);
            if v.numel == 0 {
                continue;
            }
            let (s, p, n) = (v.offset_in_shard as usize * es, v.offset_in_param as usize * es, v.numel as usize * es);
            out[s..s + n].copy_from_slice(&src[p..p + n]);
        }
    }

    fn sync_from_rank0(&mut self, comm: &Comm, replicate: Option<&Comm>, srcs: &[&[u8]]) -> Result<()> {
        let es = self.dtype.size();
        if self.layout.world > 1 {
            // Rank 0 sends each rank's chunk in turn; memory stays O(shard).
            let mut scratch = Buf::zeroed(self.shard.len, "sync scratch")?;
            for q in 0..self.layout.world {
                if comm.rank() == 0 {
                    Self::fill_chunk(&self.layout, srcs, q, es, scratch.bytes_mut());
                }
                comm.broadcast(scratch.bytes_mut(), self.dtype, 0)?;
                if q == self.shard_rank {
                    self.shard.bytes_mut().copy_from_slice(scratch.bytes());
                }
            }
        } else {
            comm.broadcast(self.shard.bytes_mut(), self.dtype, 0)?;
        }
        if let (Sharding::HybridShard, Some(rep)) = (self.opts.sharding, replicate) {
            rep.broadcast(self.shard.bytes_mut(), self.dtype, 0)?;
        }
        Ok(())
    }

    fn check_comm(&self, comm: &Comm, fname: &str) -> Result<()> {
        if comm.size() != self.comm_size || comm.rank() != self.comm_rank {
            return Err(Error::invalid_arg(format!(
                "{fname}: comm has size {} rank {}, but this flat param was built on size {} rank {}",
                comm.size(),
                comm.rank(),
                self.comm_size,
                self.comm_rank
            )));
        }
        Ok(())
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn n_params(&self) -> usize {
        self.layout.numels.len()
    }
    /// Σ param numels, no padding.
    pub fn numel(&self) -> u64 {
        self.layout.numel()
    }
    /// c·W: the unsharded buffer.
    pub fn padded_numel(&self) -> u64 {
        self.layout.padded_numel()
    }
    /// c: elements of this rank's shard.
    pub fn shard_numel(&self) -> u64 {
        self.layout.chunk
    }
    pub fn is_unsharded(&self) -> bool {
        self.state.is_some()
    }
    fn sharded(&self) -> bool {
        self.layout.world > 1
    }
    fn rank(&self) -> usize {
        self.comm_rank
    }

    /// This rank's shard (data + grad, grad null until one exists).
    pub fn shard(&mut self) -> TensorRef {
        TensorRef {
            data: self.shard.ptr(),
            grad: self.shard_grad.as_mut().map_or(std::ptr::null_mut(), |g| g.ptr()),
            numel: self.layout.chunk,
            dtype: self.dtype,
            device: Device::Cpu,
        }
    }
    /// The shard's bytes (for Rust callers and tests).
    pub fn shard_bytes(&self) -> &[u8] {
        self.shard.bytes()
    }
    pub fn shard_bytes_mut(&mut self) -> &mut [u8] {
        self.shard.bytes_mut()
    }
    pub fn shard_grad_bytes(&self) -> Option<&[u8]> {
        self.shard_grad.as_ref().map(|g| g.bytes())
    }

    fn check_index(&self, i: u64, fname: &str) -> Result<usize> {
        let n = self.n_params();
        if i >= n as u64 {
            return Err(Error::invalid_arg(format!("{fname}: i = {i} is out of range; rank {} has {n} params (0..{n})", self.rank())));
        }
        Ok(i as usize)
    }

    /// Param `i`'s slice of this rank's shard and where it starts in param i.
    pub fn shard_view(&mut self, i: u64) -> Result<(TensorRef, u64)> {
        let i = self.check_index(i, "shard_view")?;
        let v = self.layout.shard_view(i, self.shard_rank);
        let es = self.dtype.size();
        let off = v.offset_in_shard as usize * es;
        let (data, grad) = if v.numel == 0 {
            (std::ptr::null_mut(), std::ptr::null_mut())
        } else {
            let d = unsafe { self.shard.ptr().add(off) };
            let g = self.shard_grad.as_mut().map_or(std::ptr::null_mut(), |g| unsafe { g.ptr().add(off) });
            (d, g)
        };
        Ok((TensorRef { data, grad, numel: v.numel, dtype: self.dtype, device: Device::Cpu }, v.offset_in_param))
    }

    /// The flag all ranks of the sharding group agree on: does anyone have a grad?
    fn any_grad(&self, comm: &Comm) -> Result<bool> {
        let mut b = (self.shard_grad.is_some() as i32).to_ne_bytes();
        if self.comm_size > 1 {
            comm.all_reduce(&mut b, DType::I32, ReduceOp::Max)?;
        }
        Ok(i32::from_ne_bytes(b) != 0)
    }

    /// Gather (or, with `rank0_only`, gather to rank 0) the shards of
    /// `src` into a full buffer of `dt`. `None` on ranks ≠ 0 under rank0_only.
    fn gather(&self, comm: &Comm, src: &[u8], dt: DType, rank0_only: bool, what: &str) -> Result<Option<Buf>> {
        let c = self.layout.chunk;
        let part = dt.bytes(c, "shard numel")?;
        let w = self.layout.world as usize;
        let me = comm.rank();
        if !rank0_only {
            let mut full = Buf::zeroed(part * w, what)?;
            if dt == self.dtype {
                comm.all_gather(src, full.bytes_mut(), dt)?;
            } else {
                let mut local = Buf::zeroed(part, what)?;
                convert(src, self.dtype, local.bytes_mut(), dt);
                comm.all_gather(local.bytes(), full.bytes_mut(), dt)?;
            }
            return Ok(Some(full));
        }
        // Rank q broadcasts its chunk; rank 0 receives it in place, the
        // others into (or from) one shard-sized scratch buffer.
        if me == 0 {
            let mut full = Buf::zeroed(part * w, what)?;
            convert(src, self.dtype, &mut full.bytes_mut()[..part], dt);
            for q in 1..w {
                comm.broadcast(&mut full.bytes_mut()[q * part..(q + 1) * part], dt, q as i32)?;
            }
            return Ok(Some(full));
        }
        let mut scratch = Buf::zeroed(part, what)?;
        for q in 1..w {
            if q == me {
                convert(src, self.dtype, scratch.bytes_mut(), dt);
            }
            comm.broadcast(scratch.bytes_mut(), dt, q as i32)?;
        }
        Ok(None)
    }

    /// Materialise the full parameter. Collective over `comm` (except
    /// NO_SHARD / world 1 without grads). INVALID_STATE if already unsharded.
    pub fn unshard(&mut self, comm: &Comm, opts: UnshardOptions) -> Result<()> {
        self.check_comm(comm, "unshard")?;
        if self.state.is_some() {
            return Err(Error::invalid_state(format!(
                "unshard: rank {}: the flat param is already unsharded; call flatshard_flat_param_reshard first (unshard does not nest)",
                self.rank()
            )));
        }
        let training = !opts.writeback && !opts.rank0_only;
        let dt = if training { self.opts.param_dtype.unwrap_or(self.dtype) } else { self.dtype };
        let any_grad = if opts.with_grads { self.any_grad(comm)? } else { false };
        let (full, grad);
        if !self.sharded() {
            full = if opts.rank0_only && self.rank() != 0 {
                Full::Absent
            } else if dt == self.dtype {
                Full::Shard
            } else {
                let mut b = Buf::zeroed(dt.bytes(self.layout.chunk, "padded numel")?, "the full parameter")?;
                convert(self.shard.bytes(), self.dtype, b.bytes_mut(), dt);
                Full::Owned(b)
            };
            grad = if !opts.with_grads {
                FullGrad::Lazy
            } else if !any_grad || matches!(full, Full::Absent) {
                FullGrad::Null
            } else if self.shard_grad.is_some() && dt == self.dtype {
                FullGrad::Shard
            } else {
                let mut b = Buf::zeroed(dt.bytes(self.layout.chunk, "padded numel")?, "the full gradient")?;
                if let Some(g) = &self.shard_grad {
                    convert(g.bytes(), self.dtype, b.bytes_mut(), dt);
                }
                FullGrad::Owned(b)
            };
        } else {
            full = match self.gather(comm, self.shard.bytes(), dt, opts.rank0_only, "the full parameter")? {
                Some(b) => Full::Owned(b),
                None => Full::Absent,
            };
            grad = if !opts.with_grads {
                FullGrad::Lazy
            } else if !any_grad {
                FullGrad::Null
            } else {
                let zeros;
                let src = match &self.shard_grad {
                    Some(g) => g.bytes(),
                    None => {
                        zeros = vec![0u8; self.shard.len];
                        &zeros[..]
                    }
                };
                match self.gather(comm, src, dt, opts.rank0_only, "the full gradient")? {
                    Some(b) => FullGrad::Owned(b),
                    None => FullGrad::Null,
                }
            };
        }
        self.state = Some(Unsharded { opts, dtype: dt, full, grad });
        Ok(())
    }

    /// Param `i` inside the unsharded buffer (zero-copy). INVALID_STATE while
    /// sharded, or on a rank ≠ 0 under rank0_only.
    pub fn view(&mut self, i: u64) -> Result<TensorRef> {
        let i = self.check_index(i, "view")?;
        let rank = self.rank();
        let padded = self.layout.padded_numel();
        let st = self.state.as_mut().ok_or_else(|| {
            Error::invalid_state(format!("view: rank {rank}: the flat param is sharded; call flatshard_flat_param_unshard first"))
        })?;
        let es = st.dtype.size();
        let off = self.layout.offsets[i] as usize * es;
        let data = match &mut st.full {
            Full::Absent => {
                return Err(Error::invalid_state(format!(
                    "view: rank {rank}: unsharded with rank0_only, so only rank 0 holds the full parameters; \
                     use flatshard_flat_param_shard_view here, or unshard without rank0_only"
                )))
            }
            Full::Shard => self.shard.ptr(),
            Full::Owned(b) => b.ptr(),
        };
        if matches!(st.grad, FullGrad::Lazy) {
            st.grad = FullGrad::Owned(Buf::zeroed(st.dtype.bytes(padded, "padded numel")?, "the full gradient")?);
        }
        let grad = match &mut st.grad {
            FullGrad::Lazy | FullGrad::Null => std::ptr::null_mut(),
            FullGrad::Shard => self.shard_grad.as_mut().expect("shard grad exists").ptr(),
            FullGrad::Owned(b) => b.ptr(),
        };
        // SAFETY: offsets[i] + numels[i] <= padded numel elements of each buffer.
        let (data, grad) = unsafe { (data.add(off), if grad.is_null() { grad } else { grad.add(off) }) };
        Ok(TensorRef { data, grad, numel: self.layout.numels[i], dtype: st.dtype, device: Device::Cpu })
    }

    /// Copy the real (non-padding) elements of this rank's range of `full`
    /// (layout of the whole flat param) into `dst` (this rank's shard).
    fn write_own_range(layout: &Layout, shard_rank: u64, full_chunk: &[u8], dst: &mut [u8], es: usize) {
        let (lo, hi) = (layout.chunk * shard_rank, layout.chunk * (shard_rank + 1));
        for (s, n) in layout.real_segments(lo, hi) {
            let a = (s - lo) as usize * es;
            let b = a + n as usize * es;
            dst[a..b].copy_from_slice(&full_chunk[a..b]);
        }
    }

    /// Free the full parameter; with writeback, copy edits into the shards
    /// first (collective under rank0_only). INVALID_STATE if sharded.
    pub fn reshard(&mut self, comm: &Comm) -> Result<()> {
        self.check_comm(comm, "reshard")?;
        let Some(mut st) = self.state.take() else {
            return Err(Error::invalid_state(format!(
                "reshard: rank {}: the flat param is already sharded; call flatshard_flat_param_unshard first",
                self.rank()
            )));
        };
        if !st.opts.writeback {
            return Ok(());
        }
        // The writeback summon gathers in the shard's dtype: no conversion.
        let es = self.dtype.size();
        let part = self.shard.len;
        let off = (self.shard_rank * self.layout.chunk) as usize * es;
        let grad_owned = match &mut st.grad {
            FullGrad::Owned(b) => Some(b),
            _ => None,
        };
        if st.opts.rank0_only && self.sharded() {
            let res = self.scatter_from_rank0(comm, &mut st.full, part, false);
            res?;
            if st.opts.with_grads && self.any_grad_view(comm, grad_owned.is_some())? {
                let mut g = grad_owned.map(|b| Full::Owned(std::mem::replace(b, Buf { words: Vec::new(), len: 0 }))).unwrap_or(Full::Absent);
                self.scatter_from_rank0(comm, &mut g, part, true)?;
            }
            return Ok(());
        }
        if let Full::Owned(f) = &st.full {
            Self::write_own_range(&self.layout, self.shard_rank, &f.bytes()[off..off + part], self.shard.bytes_mut(), es);
        }
        if let Some(g) = grad_owned {
            if st.opts.with_grads {
                let (layout, r) = (self.layout.clone(), self.shard_rank);
                let dst = self.shard_grad_or_zeros()?;
                Self::write_own_range(&layout, r, &g.bytes()[off..off + part], dst, es);
            }
        }
        if st.opts.rank0_only && self.comm_size > 1 {
            // NO_SHARD: every rank holds the whole param; rank 0's edits win
            // (real elements only: padding is never written).
            self.broadcast_no_shard(comm, false)?;
            if st.opts.with_grads && self.any_grad_view(comm, matches!(st.grad, FullGrad::Shard | FullGrad::Owned(_)))? {
                self.broadcast_no_shard(comm, true)?;
            }
        }
        Ok(())
    }

    fn broadcast_no_shard(&mut self, comm: &Comm, grad: bool) -> Result<()> {
        let (dt, es, layout) = (self.dtype, self.dtype.size(), self.layout.clone());
        let mut buf = Buf::zeroed(self.shard.len, "writeback scratch")?;
        if comm.rank() == 0 {
            let src = if grad { self.shard_grad_or_zeros()? } else { self.shard.bytes_mut() };
            buf.bytes_mut().copy_from_slice(src);
        }
        comm.broadcast(buf.bytes_mut(), dt, 0)?;
        if comm.rank() != 0 {
            let dst = if grad { self.shard_grad_or_zeros()? } else { self.shard.bytes_mut() };
            Self::write_own_range(&layout, 0, buf.bytes(), dst, es);
        }
        Ok(())
    }

    /// Under rank0_only, rank 0 tells the others whether grads were gathered.
    fn any_grad_view(&self, comm: &Comm, have: bool) -> Result<bool> {
        let mut b = [have as u8];
        comm.broadcast(&mut b, DType::U8, 0)?;
        Ok(b[0] != 0)
    }

    /// The shard gradient, created zero-filled if there is none yet (for
    /// engines that compute shard gradients themselves).
    pub fn ensure_shard_grad(&mut self) -> Result<&mut [u8]> {
        self.shard_grad_or_zeros()
    }

    fn shard_grad_or_zeros(&mut self) -> Result<&mut [u8]> {
        if self.shard_grad.is_none() {
            self.shard_grad = Some(Buf::zeroed(self.shard.len, "the shard gradient")?);
        }
        Ok(self.shard_grad.as_mut().expect("just created").bytes_mut())
    }

    /// rank0_only + writeback: rank 0 broadcasts each rank's chunk in turn;
    /// rank q keeps its real elements. Non-root ranks hold one scratch chunk.
    fn scatter_from_rank0(&mut self, comm: &Comm, full: &mut Full, part: usize, grad: bool) -> Result<()> {
        let me = comm.rank();
        let es = self.dtype.size();
        let mut scratch = if me == 0 { None } else { Some(Buf::zeroed(part, "writeback scratch")?) };
        if me == 0 {
            // Rank 0's own range needs no message.
            let Full::Owned(f) = &*full else {
                return Err(Error::internal("rank0_only writeback: rank 0 lost its full buffer"));
            };
            let layout = self.layout.clone();
            let dst = if grad { self.shard_grad_or_zeros()? } else { self.shard.bytes_mut() };
            Self::write_own_range(&layout, 0, &f.bytes()[..part], dst, es);
        }
        for q in 1..self.layout.world as usize {
            let buf: &mut [u8] = match (&mut *full, &mut scratch) {
                (Full::Owned(f), _) if me == 0 => &mut f.bytes_mut()[q * part..(q + 1) * part],
                (_, Some(s)) => s.bytes_mut(),
                _ => return Err(Error::internal("rank0_only writeback: rank 0 lost its full buffer")),
            };
            comm.broadcast(buf, self.dtype, 0)?;
            if q == me {
                let layout = self.layout.clone();
                let dst = if grad { self.shard_grad_or_zeros()? } else { self.shard.bytes_mut() };
                Self::write_own_range(&layout, q as u64, buf, dst, es);
            }
        }
        Ok(())
    }

    /// Training: average the full gradients over the sharding ranks (and over
    /// `replicate` for HYBRID_SHARD) and add this rank's range into the shard
    /// gradient; the full gradient is zeroed afterwards, so a second call adds
    /// nothing. Collective. INVALID_STATE unless unsharded for training.
    pub fn reduce_grads(&mut self, comm: &Comm, replicate: Option<&Comm>) -> Result<()> {
        self.check_comm(comm, "reduce_grads")?;
        let rank = self.rank();
        let hybrid = self.opts.sharding == Sharding::HybridShard;
        if hybrid {
            match replicate {
                Some(r) if r.size() == self.replicate_size => {}
                _ => {
                    return Err(Error::invalid_arg(format!(
                        "reduce_grads: rank {rank}: HYBRID_SHARD needs the replicate_comm of size {} it was built with",
                        self.replicate_size
                    )))
                }
            }
        }
        let padded = self.layout.padded_numel();
        let st = self.state.as_mut().ok_or_else(|| {
            Error::invalid_state(format!(
                "reduce_grads: rank {rank}: the flat param is sharded; call flatshard_flat_param_unshard, write the gradients into the views' grad pointers, then reduce_grads"
            ))
        })?;
        if st.opts.with_grads || st.opts.rank0_only {
            return Err(Error::invalid_state(format!(
                "reduce_grads: rank {rank}: the flat param was unsharded with with_grads or rank0_only (a summon, not training); \
                 reshard, then unshard with both off"
            )));
        }
        if matches!(st.grad, FullGrad::Lazy) {
            // No view was taken here: this rank contributes zeros.
            st.grad = FullGrad::Owned(Buf::zeroed(st.dtype.bytes(padded, "padded numel")?, "the full gradient")?);
        }
        let FullGrad::Owned(g) = &mut st.grad else { return Err(Error::internal("reduce_grads: training grad not owned")) };
        let gd = st.dtype;
        let rd = self.opts.reduce_dtype.or(self.opts.param_dtype).unwrap_or(self.dtype);
        let mut send = Buf::zeroed(rd.bytes(padded, "padded numel")?, "the gradient reduction buffer")?;
        convert(g.bytes(), gd, send.bytes_mut(), rd);
        g.bytes_mut().fill(0);
        let c = self.layout.chunk;
        let mut mine = if self.sharded() {
            let mut r = Buf::zeroed(rd.bytes(c, "shard numel")?, "the reduced gradient")?;
            comm.reduce_scatter(send.bytes(), r.bytes_mut(), rd, ReduceOp::Avg)?;
            r
        } else {
            comm.all_reduce(send.bytes_mut(), rd, ReduceOp::Avg)?;
            send
        };
        if let (true, Some(rep)) = (hybrid, replicate) {
            rep.all_reduce(mine.bytes_mut(), rd, ReduceOp::Avg)?;
        }
        let mut add = Buf::zeroed(self.shard.len, "the reduced gradient")?;
        convert(mine.bytes(), rd, add.bytes_mut(), self.dtype);
        let dt = self.dtype;
        let dst = self.shard_grad_or_zeros()?;
        crate::reduce::reduce_into(dst, add.bytes(), dt, ReduceOp::Sum);
        Ok(())
    }

    /// Zero this rank's shard gradient (no-op if none yet).
    pub fn zero_grad(&mut self) {
        if let Some(g) = &mut self.shard_grad {
            g.bytes_mut().fill(0);
        }
    }
}
