//! Flat parameters (FSDP-style sharding), SPEC.md §2.
//!
//! `layout` is the pure math; this file is the state machine
//! (sharded ⇄ unsharded) and the data movement. The communicators are passed
//! to every collective call rather than stored, so the safe Rust API needs no
//! lifetimes or reference counts; the C layer keeps the handles and documents
//! that they must outlive the flat param (as NCCL does for its comms).
//!
//! Memory: the shard (and its gradient) are library-owned buffers of exactly
//! `c` elements, in host memory for host params and in device memory for
//! CUDA params (`mem` holds the buffers and the operations on them; one code
//! path serves both). The full buffer exists only between `unshard` and
//! `reshard`, and with `rank0_only` only on rank 0: other ranks then take
//! part through one broadcast per rank chunk, receiving into one shard-sized
//! scratch buffer (Comm has no point-to-point gather; a broadcast per chunk
//! keeps every non-root rank at O(shard) memory, at the price of each rank
//! seeing every chunk go by, which the ring/shm broadcast forwards anyway).

pub mod layout;
pub mod shared;

use crate::agree;
use crate::comm::Comm;
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use crate::mem::{Buf, Ops, Place, Region};
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
            _ => Err(Error::invalid_arg(format!("{what}: {v} is not a flatshard_sharding (valid: 0..=3, FLATSHARD_FULL_SHARD..FLATSHARD_HYBRID_SHARD)"))),
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
    /// CUDA params: the full buffer goes to pinned host memory. Host params:
    /// nothing changes (the full buffer is host memory anyway).
    pub offload_to_cpu: bool,
    pub with_grads: bool,
    /// Training unshard for a forward pass only: views carry no gradient and
    /// no full gradient buffer is created (reduce_grads is INVALID_STATE).
    pub forward_only: bool,
}

impl UnshardOptions {
    /// INVALID_ARGUMENT for combinations that mean nothing.
    pub fn validate(&self, rank: usize) -> Result<()> {
        if self.forward_only && (self.writeback || self.rank0_only || self.with_grads) {
            return Err(Error::invalid_arg(format!(
                "unshard: rank {rank}: options.forward_only applies to a training unshard (writeback, rank0_only and with_grads all 0); \
                 got writeback {}, rank0_only {}, with_grads {}",
                self.writeback as i32, self.rank0_only as i32, self.with_grads as i32
            )));
        }
        Ok(())
    }
}

/// This rank's averaged gradient range, between the two parts of a
/// gradient reduction (`FlatParam::reduce_grads_local`, `apply_reduced`).
pub struct Reduced {
    buf: Buf,
    dtype: DType,
}

impl Reduced {
    /// HYBRID_SHARD: average over the replicate communicator too.
    pub fn all_reduce(&self, rep: &Comm) -> Result<()> {
        let mut ops = Ops::new(rep);
        ops.all_reduce(rep, self.buf.region(), self.dtype, ReduceOp::Avg)?;
        ops.finish()
    }
}

/// One input parameter: a host byte slice, or a CUDA tensor's device pointer.
#[derive(Debug, Clone, Copy)]
pub struct ParamInput<'a> {
    data: *const u8,
    pub numel: u64,
    pub dtype: DType,
    pub device: Device,
    _borrow: std::marker::PhantomData<&'a [u8]>,
}

impl<'a> ParamInput<'a> {
    /// A host tensor of `dtype` over `data` (whole elements).
    pub fn host(data: &'a [u8], dtype: DType) -> ParamInput<'a> {
        ParamInput { data: data.as_ptr(), numel: (data.len() / dtype.size()) as u64, dtype, device: Device::Cpu, _borrow: std::marker::PhantomData }
    }
    /// A tensor described by pointer (host or CUDA device memory).
    ///
    /// # Safety
    /// `data` valid for `numel` elements of `dtype` on `device` (may be null
    /// to describe a tensor that `FlatParam::new` will reject) while `'a` lasts.
    pub unsafe fn raw(data: *const u8, numel: u64, dtype: DType, device: Device) -> ParamInput<'a> {
        ParamInput { data, numel, dtype, device, _borrow: std::marker::PhantomData }
    }
    fn place(&self) -> Place {
        Region::place_of(self.device)
    }
    fn region(&self) -> Region {
        Region::new(self.data as *mut u8, (self.numel as usize).saturating_mul(self.dtype.size()), self.place())
    }
}

/// The full parameter while unsharded.
enum Full {
    /// Views point into the shard itself (unsharded layout, same dtype and place).
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
    /// Training, forward_only: NULL grad views, no reduction.
    None,
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
    /// Where the full buffer (and gradient) live.
    place: Place,
    full: Full,
    grad: FullGrad,
}

/// An FSDP flat parameter: this rank's shard plus, while unsharded, the full
/// parameter. Not thread-safe (`&mut self` everywhere it matters).
pub struct FlatParam {
    layout: Layout,
    opts: FlatParamOptions,
    dtype: DType,
    /// Where the shard lives: host memory or the params' CUDA device.
    place: Place,
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

/// How many fields every rank's descriptor has (see `FlatParam::fields`).
const N_FIELDS: usize = 8;

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
        let numels: Vec<u64> = params.iter().map(|p| p.numel).collect();
        let fields = local.as_ref().map(|dtype| Self::fields(*dtype, &numels, opts)).map_err(|_| ());
        agree::agree(comm, "flat_param_new over comm", N_FIELDS, fields.as_ref().map(|f| &f[..]).map_err(|_| ()))?;
        if let Err(e) = local {
            return Err(e.context(format!("rank {rank}")));
        }
        if opts.sharding == Sharding::HybridShard {
            agree::agree(replicate.expect("validated"), "flat_param_new over replicate_comm", N_FIELDS, fields.as_ref().map(|f| &f[..]).map_err(|_| ()))?;
        }
        let dtype = local.expect("checked");
        let w = comm.size() as u64;
        let sharded = w > 1 && opts.sharding != Sharding::NoShard;
        let align = opts.align_params.then(|| layout::align_elems(opts.param_dtype.unwrap_or(dtype).size()));
        let numels: Vec<u64> = params.iter().map(|p| p.numel).collect();
        let layout = Layout::new(&numels, align, w, if sharded { w } else { 1 })?;
        let shard_rank = if sharded { rank as u64 } else { 0 };
        let c = layout.chunk;
        let place = params[0].place();
        let shard = Buf::zeroed_on(place, dtype.bytes(c, "shard numel")?, "the shard")?;
        let mut fp = FlatParam {
            layout,
            opts: *opts,
            dtype,
            place,
            comm_size: comm.size(),
            comm_rank: rank,
            replicate_size: replicate.map_or(1, |r| r.size()),
            shard_rank,
            shard,
            shard_grad: None,
            state: None,
        };
        let srcs: Vec<Region> = params.iter().map(|p| p.region()).collect();
        let mut ops = Ops::new(comm);
        Self::fill_chunk(&mut ops, &fp.layout, &srcs, fp.shard_rank, dtype.size(), fp.shard.region())?;
        if opts.sync_from_rank0 {
            fp.sync_from_rank0(&mut ops, comm, replicate, &srcs)?;
        }
        ops.finish()?;
        Ok(fp)
    }

    /// Report an argument error found before `new` (e.g. while converting C
    /// arguments) through the same agreement step, so that the other ranks
    /// get MISMATCH instead of waiting for this rank until the timeout.
    pub fn fail_new(comm: &Comm, e: Error) -> Error {
        let rank = comm.rank();
        match agree::agree(comm, "flat_param_new over comm", N_FIELDS, Err(())) {
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
        if let Device::Cuda(d) = dev0 {
            crate::cuda::driver().map_err(|e| e.context(format!("params[0].device: cuda:{d} flat params need a CUDA driver")))?;
        }
        for (name, c) in [("comm", Some(comm)), ("options.replicate_comm", replicate)] {
            if let Some(cd) = c.and_then(|c| c.device_index()) {
                if dev0 != Device::Cuda(cd) {
                    return Err(Error::invalid_arg(format!("params[0].device: {}, but {name} is an NCCL communicator on cuda:{cd}", dev0.describe())));
                }
            }
        }
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
            p.dtype.bytes(p.numel, &format!("params[{i}].numel"))?;
            if p.numel > 0 && p.data.is_null() {
                return Err(Error::invalid_arg(format!("params[{i}].data: NULL but numel is {}", p.numel)));
            }
            if let (Device::Cuda(d), true) = (p.device, p.numel > 0) {
                crate::cuda::check_on_device(p.data, d, &format!("params[{i}].data"))?;
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

    /// What every rank must agree on before any data moves.
    fn fields(dtype: DType, numels: &[u64], opts: &FlatParamOptions) -> [agree::Field; N_FIELDS] {
        [
            ("param count", numels.len() as u64),
            ("dtype (flatshard_dtype)", dtype as u64),
            ("total numel", numels.iter().sum()),
            ("param numels (fingerprint)", agree::fingerprint(numels.iter().copied())),
            ("sharding (flatshard_sharding)", opts.sharding as u64),
            ("align_params + 2 * sync_from_rank0", opts.align_params as u64 | (opts.sync_from_rank0 as u64) << 1),
            ("param_dtype (flatshard_dtype + 1, 0 = none)", opts.param_dtype.map_or(0, |d| d as u64 + 1)),
            ("reduce_dtype (flatshard_dtype + 1, 0 = none)", opts.reduce_dtype.map_or(0, |d| d as u64 + 1)),
        ]
    }

    /// Copy sharding-rank `r`'s piece of `srcs` into `out` (one chunk).
    fn fill_chunk(ops: &mut Ops, layout: &Layout, srcs: &[Region], r: u64, es: usize, out: Region) -> Result<()> {
        ops.fill0(out)?;
        for (i, src) in srcs.iter().enumerate() {
            let v = layout.shard_view(i, r);
            if v.numel == 0 {
                continue;
            }
            let (s, p, n) = (v.offset_in_shard as usize * es, v.offset_in_param as usize * es, v.numel as usize * es);
            ops.copy(out.sub(s, n), src.sub(p, n))?;
        }
        Ok(())
    }

    fn sync_from_rank0(&mut self, ops: &mut Ops, comm: &Comm, replicate: Option<&Comm>, srcs: &[Region]) -> Result<()> {
        let es = self.dtype.size();
        if self.layout.world > 1 {
            // Rank 0 sends each rank's chunk in turn; memory stays O(shard).
            let scratch = ops.temp_buf(self.place, self.shard.len(), "sync scratch")?;
            for q in 0..self.layout.world {
                if comm.rank() == 0 {
                    Self::fill_chunk(ops, &self.layout, srcs, q, es, scratch)?;
                }
                ops.broadcast(comm, scratch, self.dtype, 0)?;
                if q == self.shard_rank {
                    ops.copy(self.shard.region(), scratch)?;
                }
            }
        } else {
            ops.broadcast(comm, self.shard.region(), self.dtype, 0)?;
        }
        if let (Sharding::HybridShard, Some(rep)) = (self.opts.sharding, replicate) {
            ops.broadcast(rep, self.shard.region(), self.dtype, 0)?;
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
    /// Where the shard lives (Cpu or the params' CUDA device).
    pub fn device(&self) -> Device {
        self.place.device()
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
    /// This rank's index in the layout's shards (0 when unsharded: NO_SHARD
    /// or a world of 1): its shard is layout range `rank_range(shard_rank)`.
    pub fn shard_rank(&self) -> u64 {
        self.shard_rank
    }
    /// Rank in the comm the flat param was built on.
    pub fn comm_rank(&self) -> usize {
        self.comm_rank
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
            grad: self.shard_grad.as_ref().map_or(std::ptr::null_mut(), |g| g.ptr()),
            numel: self.layout.chunk,
            dtype: self.dtype,
            device: self.place.device(),
        }
    }
    /// The shard's bytes (host flat params; empty for CUDA ones: use `read_shard`).
    pub fn shard_bytes(&self) -> &[u8] {
        self.shard.host_bytes().unwrap_or(&[])
    }
    /// As `shard_bytes`, writable.
    pub fn shard_bytes_mut(&mut self) -> &mut [u8] {
        self.shard.host_bytes_mut().unwrap_or(&mut [])
    }
    pub fn shard_grad_bytes(&self) -> Option<&[u8]> {
        self.shard_grad.as_ref().and_then(|g| g.host_bytes())
    }
    /// A host copy of the shard (and of its gradient, if any), wherever it
    /// lives (device flat params: after the flat-param calls, which complete
    /// before returning; the copy runs on the legacy default stream).
    pub fn read_shard(&self) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
        let mut ops = Ops::local();
        let mut read = |b: &Buf| -> Result<Vec<u8>> {
            let mut v = vec![0u8; b.len()];
            ops.copy(Region::new(v.as_mut_ptr(), v.len(), Place::Host), b.region())?;
            Ok(v)
        };
        let d = read(&self.shard)?;
        let g = self.shard_grad.as_ref().map(&mut read).transpose()?;
        ops.finish()?;
        Ok((d, g))
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
            let d = self.shard.ptr().wrapping_add(off);
            let g = self.shard_grad.as_ref().map_or(std::ptr::null_mut(), |g| g.ptr().wrapping_add(off));
            (d, g)
        };
        Ok((TensorRef { data, grad, numel: v.numel, dtype: self.dtype, device: self.place.device() }, v.offset_in_param))
    }

    /// The flag all ranks of the sharding group agree on: does anyone have a grad?
    fn any_grad(&self, ops: &mut Ops, comm: &Comm) -> Result<bool> {
        let mut b = (self.shard_grad.is_some() as i32).to_ne_bytes();
        if self.comm_size > 1 {
            ops.all_reduce_host(comm, &mut b, DType::I32, ReduceOp::Max)?;
        }
        Ok(i32::from_ne_bytes(b) != 0)
    }

    /// Gather (or, with `rank0_only`, gather to rank 0) the shards of `src`
    /// into a full buffer of `dt` at `place`. `None` on ranks ≠ 0 under rank0_only.
    #[allow(clippy::too_many_arguments)]
    fn gather(&self, ops: &mut Ops, comm: &Comm, src: Region, dt: DType, rank0_only: bool, place: Place, what: &str) -> Result<Option<Buf>> {
        let c = self.layout.chunk;
        let part = dt.bytes(c, "shard numel")?;
        let w = self.layout.world as usize;
        let me = comm.rank();
        if !rank0_only {
            // every byte is gathered (padding included): no zeros needed
            let full = Buf::for_overwrite_on(place, part * w, what)?;
            if dt == self.dtype {
                ops.all_gather(comm, src, full.region(), dt)?;
            } else {
                let local = ops.temp_overwrite(self.place, part, what)?;
                ops.convert(src, self.dtype, local, dt)?;
                ops.all_gather(comm, local, full.region(), dt)?;
            }
            return Ok(Some(full));
        }
        // Rank q broadcasts its chunk; rank 0 receives it in place, the
        // others into (or from) one shard-sized scratch buffer.
        if me == 0 {
            let full = Buf::zeroed_on(place, part * w, what)?;
            ops.convert(src, self.dtype, full.at(0, part), dt)?;
            for q in 1..w {
                ops.broadcast(comm, full.at(q * part, part), dt, q as i32)?;
            }
            return Ok(Some(full));
        }
        let scratch = ops.temp_buf(self.place, part, what)?;
        for q in 1..w {
            if q == me {
                ops.convert(src, self.dtype, scratch, dt)?;
            }
            ops.broadcast(comm, scratch, dt, q as i32)?;
        }
        Ok(None)
    }

    /// Materialise the full parameter. Collective over `comm` (except
    /// NO_SHARD / world 1 without grads). INVALID_STATE if already unsharded.
    pub fn unshard(&mut self, comm: &Comm, opts: UnshardOptions) -> Result<()> {
        self.check_unshard(comm)?;
        opts.validate(self.rank())?;
        // training: the full gradient comes with the first view (none at all for forward_only)
        let training_grad = || if opts.forward_only { FullGrad::None } else { FullGrad::Lazy };
        let training = !opts.writeback && !opts.rank0_only;
        let dt = if training { self.opts.param_dtype.unwrap_or(self.dtype) } else { self.dtype };
        let place = if opts.offload_to_cpu && !self.place.is_host() { Place::Pinned } else { self.place };
        let mut ops = Ops::new(comm);
        let any_grad = if opts.with_grads { self.any_grad(&mut ops, comm)? } else { false };
        let (full, grad);
        if !self.sharded() {
            let alias = dt == self.dtype && place == self.place;
            full = if opts.rank0_only && self.rank() != 0 {
                Full::Absent
            } else if alias {
                Full::Shard
            } else {
                let b = Buf::zeroed_on(place, dt.bytes(self.layout.chunk, "padded numel")?, "the full parameter")?;
                ops.convert(self.shard.region(), self.dtype, b.region(), dt)?;
                Full::Owned(b)
            };
            grad = if !opts.with_grads {
                training_grad()
            } else if !any_grad || matches!(full, Full::Absent) {
                FullGrad::Null
            } else if self.shard_grad.is_some() && alias {
                FullGrad::Shard
            } else {
                let b = Buf::zeroed_on(place, dt.bytes(self.layout.chunk, "padded numel")?, "the full gradient")?;
                if let Some(g) = &self.shard_grad {
                    ops.convert(g.region(), self.dtype, b.region(), dt)?;
                }
                FullGrad::Owned(b)
            };
        } else {
            full = match self.gather(&mut ops, comm, self.shard.region(), dt, opts.rank0_only, place, "the full parameter")? {
                Some(b) => Full::Owned(b),
                None => Full::Absent,
            };
            grad = if !opts.with_grads {
                training_grad()
            } else if !any_grad {
                FullGrad::Null
            } else {
                let src = match &self.shard_grad {
                    Some(g) => g.region(),
                    None => ops.temp_buf(self.place, self.shard.len(), "zero gradient")?,
                };
                let g = self.gather(&mut ops, comm, src, dt, opts.rank0_only, place, "the full gradient")?;
                match g {
                    Some(b) => FullGrad::Owned(b),
                    None => FullGrad::Null,
                }
            };
        }
        ops.finish()?;
        self.state = Some(Unsharded { opts, dtype: dt, place, full, grad });
        Ok(())
    }

    /// The argument and state checks of `unshard` (its `_async` form runs
    /// them on the caller's thread).
    pub fn check_unshard(&self, comm: &Comm) -> Result<()> {
        self.check_comm(comm, "unshard")?;
        if self.state.is_some() {
            return Err(Error::invalid_state(format!(
                "unshard: rank {}: the flat param is already unsharded; call flatshard_flat_param_reshard first (unshard does not nest)",
                self.rank()
            )));
        }
        Ok(())
    }

    /// Param `i` inside the unsharded buffer (zero-copy). INVALID_STATE while
    /// sharded, or on a rank ≠ 0 under rank0_only.
    pub fn view(&mut self, i: u64) -> Result<TensorRef> {
        let i = self.check_index(i, "view")?;
        let rank = self.rank();
        let padded = self.layout.padded_numel();
        let st = self
            .state
            .as_mut()
            .ok_or_else(|| Error::invalid_state(format!("view: rank {rank}: the flat param is sharded; call flatshard_flat_param_unshard first")))?;
        let es = st.dtype.size();
        let off = self.layout.offsets[i] as usize * es;
        let data = match &st.full {
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
            st.grad = FullGrad::Owned(Buf::zeroed_on(st.place, st.dtype.bytes(padded, "padded numel")?, "the full gradient")?);
        }
        let grad = match &st.grad {
            FullGrad::Lazy | FullGrad::Null | FullGrad::None => std::ptr::null_mut(),
            FullGrad::Shard => self.shard_grad.as_ref().map_or(std::ptr::null_mut(), |g| g.ptr()),
            FullGrad::Owned(b) => b.ptr(),
        };
        // offsets[i] + numels[i] <= padded numel elements of each buffer.
        let (data, grad) = (data.wrapping_add(off), if grad.is_null() { grad } else { grad.wrapping_add(off) });
        Ok(TensorRef { data, grad, numel: self.layout.numels[i], dtype: st.dtype, device: st.place.device() })
    }

    /// Create the zero-filled full gradient of a training unshard now rather
    /// than at the first view (`unshard_async` does this on the progress
    /// thread, so that the view costs nothing). No-op otherwise.
    pub fn prepare_grad(&mut self) -> Result<()> {
        let padded = self.layout.padded_numel();
        if let Some(st) = self.state.as_mut() {
            if matches!(st.grad, FullGrad::Lazy) {
                st.grad = FullGrad::Owned(Buf::zeroed_on(st.place, st.dtype.bytes(padded, "padded numel")?, "the full gradient")?);
            }
        }
        Ok(())
    }

    /// Copy the real (non-padding) elements of this rank's range of `full`
    /// (layout of the whole flat param) into `dst` (this rank's shard).
    fn write_own_range(ops: &mut Ops, layout: &Layout, shard_rank: u64, full_chunk: Region, dst: Region, es: usize) -> Result<()> {
        let (lo, hi) = (layout.chunk * shard_rank, layout.chunk * (shard_rank + 1));
        for (s, n) in layout.real_segments(lo, hi) {
            let a = (s - lo) as usize * es;
            let n = n as usize * es;
            ops.copy(dst.sub(a, n), full_chunk.sub(a, n))?;
        }
        Ok(())
    }

    /// Free the full parameter; with writeback, copy edits into the shards
    /// first (collective under rank0_only). INVALID_STATE if sharded.
    pub fn reshard(&mut self, comm: &Comm) -> Result<()> {
        self.check_comm(comm, "reshard")?;
        let Some(st) = self.state.take() else {
            return Err(Error::invalid_state(format!(
                "reshard: rank {}: the flat param is already sharded; call flatshard_flat_param_unshard first",
                self.rank()
            )));
        };
        if !st.opts.writeback {
            return Ok(());
        }
        let mut ops = Ops::new(comm);
        self.write_back(&mut ops, comm, st)?;
        ops.finish()
    }

    fn write_back(&mut self, ops: &mut Ops, comm: &Comm, st: Unsharded) -> Result<()> {
        // The writeback summon gathers in the shard's dtype: no conversion.
        let es = self.dtype.size();
        let part = self.shard.len();
        let off = (self.shard_rank * self.layout.chunk) as usize * es;
        let Unsharded { opts, full, grad, .. } = st;
        let grad_shard = matches!(grad, FullGrad::Shard);
        // The full buffers are freed only when this call's device work is done.
        let full = if let Full::Owned(b) = full { Some(ops.keep(b)) } else { None };
        let grad = if let FullGrad::Owned(b) = grad { Some(ops.keep(b)) } else { None };
        if opts.rank0_only && self.sharded() {
            self.scatter_from_rank0(ops, comm, full, part, false)?;
            if opts.with_grads && self.any_grad_view(ops, comm, grad.is_some())? {
                self.scatter_from_rank0(ops, comm, grad, part, true)?;
            }
            return Ok(());
        }
        let layout = self.layout.clone();
        if let Some(f) = full {
            Self::write_own_range(ops, &layout, self.shard_rank, f.sub(off, part), self.shard.region(), es)?;
        }
        if let (Some(g), true) = (grad, opts.with_grads) {
            let dst = self.shard_grad_or_zeros()?;
            Self::write_own_range(ops, &layout, self.shard_rank, g.sub(off, part), dst, es)?;
        }
        if opts.rank0_only && self.comm_size > 1 {
            // NO_SHARD: every rank holds the whole param; rank 0's edits win
            // (real elements only: padding is never written).
            self.broadcast_no_shard(ops, comm, false)?;
            let had = grad.is_some() || grad_shard;
            if opts.with_grads && self.any_grad_view(ops, comm, had)? {
                self.broadcast_no_shard(ops, comm, true)?;
            }
        }
        Ok(())
    }

    fn broadcast_no_shard(&mut self, ops: &mut Ops, comm: &Comm, grad: bool) -> Result<()> {
        let (dt, es, layout) = (self.dtype, self.dtype.size(), self.layout.clone());
        let buf = ops.temp_buf(self.place, self.shard.len(), "writeback scratch")?;
        if comm.rank() == 0 {
            let src = if grad { self.shard_grad_or_zeros()? } else { self.shard.region() };
            ops.copy(buf, src)?;
        }
        ops.broadcast(comm, buf, dt, 0)?;
        if comm.rank() != 0 {
            let dst = if grad { self.shard_grad_or_zeros()? } else { self.shard.region() };
            Self::write_own_range(ops, &layout, 0, buf, dst, es)?;
        }
        Ok(())
    }

    /// Under rank0_only, rank 0 tells the others whether grads were gathered.
    fn any_grad_view(&self, ops: &mut Ops, comm: &Comm, have: bool) -> Result<bool> {
        let mut b = [have as u8];
        ops.broadcast_host(comm, &mut b, DType::U8, 0)?;
        Ok(b[0] != 0)
    }

    /// The shard gradient, created zero-filled if there is none yet (host
    /// flat params; for engines that compute shard gradients themselves).
    pub fn ensure_shard_grad(&mut self) -> Result<&mut [u8]> {
        self.shard_grad_or_zeros()?;
        let rank = self.rank();
        self.shard_grad
            .as_mut()
            .and_then(|g| g.host_bytes_mut())
            .ok_or_else(|| Error::unsupported(format!("rank {rank}: the shard gradient is device memory; use shard().grad")))
    }

    fn shard_grad_or_zeros(&mut self) -> Result<Region> {
        if self.shard_grad.is_none() {
            self.shard_grad = Some(Buf::zeroed_on(self.place, self.shard.len(), "the shard gradient")?);
        }
        Ok(self.shard_grad.as_ref().map_or(self.shard.at(0, 0), |g| g.region()))
    }

    /// rank0_only + writeback: rank 0 broadcasts each rank's chunk in turn
    /// (from `full`, rank 0's full buffer); rank q keeps its real elements.
    /// Non-root ranks hold one scratch chunk.
    fn scatter_from_rank0(&mut self, ops: &mut Ops, comm: &Comm, full: Option<Region>, part: usize, grad: bool) -> Result<()> {
        let me = comm.rank();
        let es = self.dtype.size();
        let layout = self.layout.clone();
        let lost = || Error::internal("rank0_only writeback: rank 0 lost its full buffer");
        let scratch = if me == 0 { None } else { Some(ops.temp_buf(self.place, part, "writeback scratch")?) };
        if me == 0 {
            // Rank 0's own range needs no message.
            let f = full.ok_or_else(lost)?;
            let dst = if grad { self.shard_grad_or_zeros()? } else { self.shard.region() };
            Self::write_own_range(ops, &layout, 0, f.sub(0, part), dst, es)?;
        }
        for q in 1..self.layout.world as usize {
            let buf = match (full, scratch) {
                (Some(f), _) if me == 0 => f.sub(q * part, part),
                (_, Some(s)) => s,
                _ => return Err(lost()),
            };
            ops.broadcast(comm, buf, self.dtype, 0)?;
            if q == me {
                let dst = if grad { self.shard_grad_or_zeros()? } else { self.shard.region() };
                Self::write_own_range(ops, &layout, q as u64, buf, dst, es)?;
            }
        }
        Ok(())
    }

    /// The argument and state checks of `reduce_grads` (its `_async` form
    /// runs them on the caller's thread).
    pub fn check_reduce_grads(&self, comm: &Comm, replicate: Option<&Comm>) -> Result<()> {
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
        let st = self.state.as_ref().ok_or_else(|| {
            Error::invalid_state(format!(
                "reduce_grads: rank {rank}: the flat param is sharded; call flatshard_flat_param_unshard, write the gradients into the views' grad pointers, then reduce_grads"
            ))
        })?;
        if st.opts.forward_only {
            return Err(Error::invalid_state(format!(
                "reduce_grads: rank {rank}: the flat param was unsharded for a forward pass only (flatshard_flat_param_unshard_forward: no gradients); reshard, then unshard for training before backward"
            )));
        }
        if st.opts.with_grads || st.opts.rank0_only {
            return Err(Error::invalid_state(format!(
                "reduce_grads: rank {rank}: the flat param was unsharded with with_grads or rank0_only (a summon, not training); \
                 reshard, then unshard with both off"
            )));
        }
        Ok(())
    }

    /// Training: average the full gradients over the sharding ranks (and over
    /// `replicate` for HYBRID_SHARD) and add this rank's range into the shard
    /// gradient; the full gradient is zeroed afterwards, so a second call adds
    /// nothing. Collective. INVALID_STATE unless unsharded for training.
    pub fn reduce_grads(&mut self, comm: &Comm, replicate: Option<&Comm>) -> Result<()> {
        self.reduce_grads_then(comm, replicate, &|| false)
    }

    /// `reduce_grads`, except that the full gradient is not zeroed if
    /// `freed()` says, once the reduction succeeded, that it is about to be
    /// freed unseen (a reshard is waiting for this reduction: nobody can read
    /// the zeros, and the memset was a fifth of a 4 MiB layer's reduction).
    pub fn reduce_grads_then(&mut self, comm: &Comm, replicate: Option<&Comm>, freed: &dyn Fn() -> bool) -> Result<()> {
        let red = self.reduce_grads_local(comm, replicate)?;
        if let (true, Some(rep)) = (self.opts.sharding == Sharding::HybridShard, replicate) {
            red.all_reduce(rep)?;
        }
        self.apply_reduced(comm, red, freed)
    }

    /// The first part of `reduce_grads`: this rank's range of the full
    /// gradients averaged over `comm` (reduce-scatter; all-reduce for
    /// NO_SHARD), in reduce_dtype. Changes no gradient: `apply_reduced` does,
    /// once every collective (HYBRID_SHARD: also the replicate all-reduce)
    /// succeeded.
    pub fn reduce_grads_local(&mut self, comm: &Comm, replicate: Option<&Comm>) -> Result<Reduced> {
        self.check_reduce_grads(comm, replicate)?;
        let padded = self.layout.padded_numel();
        let sharded = self.sharded();
        let Some(st) = self.state.as_mut() else { return Err(Error::internal("reduce_grads: checked unsharded")) };
        if matches!(st.grad, FullGrad::Lazy) {
            // No view was taken here: this rank contributes zeros.
            st.grad = FullGrad::Owned(Buf::zeroed_on(st.place, st.dtype.bytes(padded, "padded numel")?, "the full gradient")?);
        }
        let FullGrad::Owned(gbuf) = &st.grad else {
            return Err(Error::internal("reduce_grads: training grad not owned"));
        };
        let (g, gd) = (gbuf.region(), st.dtype);
        let rd = self.opts.reduce_dtype.or(self.opts.param_dtype).unwrap_or(self.dtype);
        let mut ops = Ops::new(comm);
        let mine = if sharded {
            // The reduce-scatter reads the full gradient in place when it
            // already is in the reduce dtype.
            let send = if rd == gd {
                g
            } else {
                let send = ops.temp_overwrite(g.place, rd.bytes(padded, "padded numel")?, "the gradient reduction buffer")?;
                ops.convert(g, gd, send, rd)?;
                send
            };
            let r = Buf::for_overwrite_on(g.place, rd.bytes(self.layout.chunk, "shard numel")?, "the reduced gradient")?;
            ops.reduce_scatter(comm, send, r.region(), rd, ReduceOp::Avg)?;
            r
        } else {
            // NO_SHARD: all-reduce a copy (the full gradient stays unchanged)
            let r = Buf::for_overwrite_on(g.place, rd.bytes(padded, "padded numel")?, "the reduced gradient")?;
            ops.convert(g, gd, r.region(), rd)?;
            ops.all_reduce(comm, r.region(), rd, ReduceOp::Avg)?;
            r
        };
        ops.finish()?;
        Ok(Reduced { buf: mine, dtype: rd })
    }

    /// The last part of `reduce_grads`: add `red` into the shard gradient and
    /// zero the full gradient (unless `freed()`: see `reduce_grads_then`).
    /// With no shard gradient (new, or after `drop_grad`) `red` becomes it:
    /// no zero-fill and no add (PyTorch assigns a gradient that is None).
    pub fn apply_reduced(&mut self, comm: &Comm, red: Reduced, freed: &dyn Fn() -> bool) -> Result<()> {
        let Some(Unsharded { grad: FullGrad::Owned(gbuf), .. }) = &self.state else {
            return Err(Error::internal("reduce_grads: the full gradient went away"));
        };
        let g = gbuf.region();
        let mut ops = Ops::new(comm);
        let same = red.dtype == self.dtype && red.buf.place() == self.place && red.buf.len() == self.shard.len();
        if !freed() {
            ops.fill0(g)?;
        }
        if self.shard_grad.is_none() {
            let new = if same {
                red.buf
            } else {
                let b = Buf::for_overwrite_on(self.place, self.shard.len(), "the shard gradient")?;
                ops.convert(red.buf.region(), red.dtype, b.region(), self.dtype)?;
                b
            };
            ops.finish()?;
            self.shard_grad = Some(new);
            return Ok(());
        }
        let add = if same {
            red.buf.region()
        } else {
            let add = ops.temp_overwrite(self.place, self.shard.len(), "the reduced gradient")?;
            ops.convert(red.buf.region(), red.dtype, add, self.dtype)?;
            add
        };
        let dt = self.dtype;
        let dst = self.shard_grad_or_zeros()?;
        ops.add(dst, add, dt)?;
        ops.finish()
    }

    /// Drop this rank's shard gradient (PyTorch `zero_grad(set_to_none=True)`):
    /// `shard` then gives no grad, and the next reduction becomes the
    /// gradient instead of being added to zeros. Local.
    pub fn drop_grad(&mut self, comm: &Comm) -> Result<()> {
        self.check_comm(comm, "drop_grad")?;
        // A host buffer goes back to the host cache (the next reduction's
        // buffer); freeing a CUDA one waits for work still using it.
        self.shard_grad = None;
        Ok(())
    }

    /// Zero this rank's shard gradient (no-op if none yet). Local; on a CUDA
    /// flat param ordered on `comm`'s stream (after the engine's optimizer
    /// step there) and complete when this returns.
    pub fn zero_grad(&mut self, comm: &Comm) -> Result<()> {
        self.check_comm(comm, "zero_grad")?;
        if let Some(g) = &self.shard_grad {
            let mut ops = Ops::new(comm);
            ops.fill0(g.region())?;
            ops.finish()?;
        }
        Ok(())
    }
}
