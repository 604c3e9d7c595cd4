//! `average_parameters`: every element becomes the mean over the ranks of a
//! communicator, in place, streamed through a bounded bucket.
//!
//! # Numbers (what "the same as PyTorch" means here)
//! PyTorch's `average_parameters` concatenates the tensors into one flat buffer,
//! divides it by the group size *in the buffer's dtype* and SUM-all-reduces it.
//! flatshard does the same per tensor:
//! - f32 / f64: `x / n` in the tensor's dtype, then a SUM in that dtype. Equal to
//!   PyTorch up to the summation order of the all-reduce.
//! - f16 / bf16: `x / n` is computed in f32 and rounded to the tensor's dtype —
//!   bit-identical to PyTorch's divided f16/bf16 buffer — then widened to f32,
//!   summed in f32 and rounded to the tensor's dtype once. PyTorch sums in the
//!   half dtype and rounds at every hop (Gloo pairwise, NCCL per ring step), so
//!   flatshard's result is PyTorch's computation without the intermediate
//!   roundings: equal for 2 ranks, otherwise within PyTorch's own rounding noise
//!   (and independent of the transport and of the rank order). The price is that
//!   half-precision tensors travel as f32 (twice the bytes on the wire).
//! - Mixed dtypes in one call: PyTorch promotes the whole flat buffer to the
//!   widest dtype (f16 + f64 → everything divided and summed in f64), so its f16
//!   result then depends on which other tensors were in the call. flatshard keeps
//!   each tensor's own rule above; the results differ from PyTorch's promoted ones
//!   by at most one rounding of the narrow dtype.
//! - Integer tensors are refused (PyTorch's in-place division of an integer
//!   buffer raises too).
//!
//! # Memory and overlap
//! Tensors are grouped by wire dtype (f32 for f32/f16/bf16, f64 for f64) in the
//! order their dtype first appears, then cut into buckets of at most
//! `bucket_bytes`: a piece of one f32/f64 tensor that is large enough
//! (≥ min(bucket, 256 KiB)) is divided and all-reduced *in the caller's memory*
//! (no copy at all); smaller tensors and tails are packed together into a bucket
//! buffer, reduced, and copied back. With more than one bucket (and more than
//! two cores, see `AvgOptions::default`) a helper thread prepares
//! (packs/divides) bucket k+1 and unpacks bucket k-1 while the calling thread
//! all-reduces bucket k, so two bucket buffers exist at most: peak extra
//! memory ≤ 2 × bucket (plus the transport's own fixed scratch), whatever the
//! model size. The bucket plan depends only on the tensors and `bucket_bytes`,
//! so every rank must pass the same tensors (count, numel, dtype) and the same
//! `FLATSHARD_BUCKET_BYTES`; otherwise the collectives report MISMATCH.
//!
//! On an error the tensors' contents are unspecified (some buckets may be
//! averaged, one may be divided by n); their addresses and dtypes never change.

use crate::comm::Comm;
use crate::convert::{bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits};
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use crate::reduce::reduce_n_raw;
use crate::tensor::TensorRef;
use std::sync::mpsc;

/// Skip tensors whose `grad` is null (PyTorch's `get_params_to_average`).
/// (C: `FLATSHARD_AVG_ONLY_WITH_GRAD`.)
/// cbindgen:ignore
pub const AVG_ONLY_WITH_GRAD: u32 = 1;
/// Bucket size when `FLATSHARD_BUCKET_BYTES` is unset.
/// cbindgen:ignore
pub const DEFAULT_BUCKET_BYTES: usize = crate::config::BUCKET_BYTES_DEFAULT;
/// Environment variable that sets the bucket size in bytes (read by config.rs
/// when the communicator is created).
pub const BUCKET_ENV: &str = crate::config::BUCKET_BYTES;
/// A piece of a tensor at least this large (or a full bucket, if smaller) is
/// reduced in place rather than copied into the bucket.
const DIRECT_MIN_BYTES: usize = 256 << 10;

/// How `average_parameters_with` streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvgOptions {
    /// Upper bound of one bucket in bytes (at least one element is always taken).
    pub bucket_bytes: usize,
    /// Prepare the next bucket on a helper thread while this one is reduced.
    pub overlap: bool,
}

impl Default for AvgOptions {
    /// 16 MiB buckets; overlap only where a core is likely free for the helper.
    fn default() -> Self {
        // Measured (`measure_overlap` in tests/averaging.rs: TCP loopback, 2 ranks
        // on a shared 2-core machine, 64 MiB): the helper thread competes with the
        // ranks for the cores; pipelined vs sequential ranged from 25% slower to 20%
        // faster (debug and release), i.e. no consistent gain. With spare cores it
        // hides the pack/divide pass behind the reduction.
        let spare_cores = std::thread::available_parallelism().is_ok_and(|n| n.get() > 2);
        AvgOptions { bucket_bytes: DEFAULT_BUCKET_BYTES, overlap: spare_cores }
    }
}

impl AvgOptions {
    /// Defaults, with the communicator's `FLATSHARD_BUCKET_BYTES` (read and
    /// compared across ranks when the communicator was created).
    pub fn for_comm(comm: &Comm) -> AvgOptions {
        AvgOptions { bucket_bytes: comm.config().bucket_bytes, ..AvgOptions::default() }
    }
}

/// The dtype a tensor travels in: halves are summed in f32.
fn wire_dtype(dt: DType) -> DType {
    match dt {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// Host tensors' checks (after the flags): host memory, floating dtype,
/// pointers. `rank` names this rank in messages.
pub(crate) fn validate_host(rank: usize, params: &[TensorRef]) -> Result<()> {
    for (i, t) in params.iter().enumerate() {
        let what = format!("rank {rank}: params[{i}]");
        t.check_host(&what).map_err(|e| {
            if e.kind == crate::error::ErrorKind::Unsupported {
                Error::unsupported(format!(
                    "{what}: is a {} tensor; averaging takes host memory for now (CUDA tensors come with the CUDA path)",
                    t.device.describe()
                ))
            } else {
                e
            }
        })?;
        if !t.dtype.is_float() {
            return Err(Error::invalid_arg(format!(
                "{what}.dtype: {} cannot be averaged (the mean of integers is not an integer; PyTorch refuses too); pass f32, f64, f16 or bf16",
                t.dtype.name()
            )));
        }
    }
    Ok(())
}

/// The indices of the tensors to average, after the checks.
pub(crate) fn select(rank: usize, params: &[TensorRef], flags: u32) -> Result<Vec<usize>> {
    if params.is_empty() {
        return Err(Error::invalid_arg(format!("rank {rank}: params: n is 0, nothing to average (PyTorch raises too)")));
    }
    let chosen: Vec<usize> = (0..params.len()).filter(|&i| flags & AVG_ONLY_WITH_GRAD == 0 || !params[i].grad.is_null()).collect();
    if chosen.is_empty() {
        return Err(Error::invalid_arg(format!(
            "rank {rank}: no parameter has a gradient: FLATSHARD_AVG_ONLY_WITH_GRAD skipped all {} params (grad == NULL)",
            params.len()
        )));
    }
    Ok(chosen)
}

/// Stream the chosen tensors through the buckets (arguments already agreed).
///
/// # Safety
/// As for [`super::average_parameters`], for host tensors; `chosen` indexes `params`.
pub(crate) unsafe fn stream(comm: &Comm, params: &[TensorRef], chosen: &[usize], opts: &AvgOptions, world: usize) -> Result<()> {
    let ts = Tensors(params);
    let mut planner = Planner::new(&ts, chosen, opts.bucket_bytes);
    let mut bucket = Bucket::default();
    if !planner.next(&mut bucket) {
        return Ok(()); // only zero-length tensors
    }
    if !opts.overlap || !planner.has_more() {
        loop {
            // SAFETY: the bucket was planned over `ts` by the planner (pieces inside
            // their tensors), and our contract makes the tensors' memory ours for the
            // call; one thread, one bucket at a time.
            unsafe {
                bucket.prepare(&ts, world)?;
                bucket.reduce(comm, &ts)?;
                bucket.finish(&ts);
            }
            if !planner.next(&mut bucket) {
                return Ok(());
            }
        }
    }
    // SAFETY: our contract is pipelined's; `bucket` was planned over `ts` by `planner`.
    unsafe { pipelined(comm, &ts, planner, bucket, world) }
}

/// Two buckets in flight: the helper prepares and finishes, this thread reduces.
///
/// # Safety
/// As for [`average_parameters`], for host tensors; `first` was planned over
/// `ts` by `planner`.
unsafe fn pipelined(comm: &Comm, ts: &Tensors, mut planner: Planner, first: Bucket, world: usize) -> Result<()> {
    std::thread::scope(|s| {
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<Bucket>>(2);
        let (done_tx, done_rx) = mpsc::sync_channel::<Bucket>(2);
        s.spawn(move || {
            // The helper only touches the pieces of the buckets it holds, which
            // are disjoint from the bucket the calling thread is reducing (the
            // planner never hands out an element twice).
            let mut tx = Some(ready_tx);
            let mut in_flight = 0usize;
            let mut spare = vec![first];
            let mut planned = true; // `first` is already planned
            loop {
                while in_flight < 2 {
                    let Some(t) = &tx else { break };
                    let mut b = spare.pop().unwrap_or_default();
                    if !planned && !planner.next(&mut b) {
                        tx = None;
                        break;
                    }
                    planned = false;
                    // SAFETY: `b` was planned over `ts`; our caller's contract makes the
                    // memory ours, and no other bucket covers b's pieces.
                    if let Err(e) = unsafe { b.prepare(ts, world) } {
                        let _ = t.send(Err(e));
                        return;
                    }
                    if t.send(Ok(b)).is_err() {
                        return;
                    }
                    in_flight += 1;
                }
                if in_flight == 0 {
                    return;
                }
                let Ok(b) = done_rx.recv() else { return }; // the caller stopped on an error
                in_flight -= 1;
                // SAFETY: as for prepare; the calling thread is done with `b` (it sent it back).
                unsafe { b.finish(ts) };
                spare.push(b);
            }
        });
        let mut result = Ok(());
        for item in ready_rx.iter() {
            let mut b = match item {
                Ok(b) => b,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            // SAFETY: as in the helper: `b` was planned over `ts` and prepared; the
            // helper does not touch it until it is sent back.
            if let Err(e) = unsafe { b.reduce(comm, ts) } {
                result = Err(e);
                break;
            }
            if done_tx.send(b).is_err() {
                break; // the helper panicked; the scope re-raises it
            }
        }
        drop(done_tx);
        result
    })
}

/// The caller's tensors, shared with the helper thread.
struct Tensors<'a>(&'a [TensorRef]);
// SAFETY: the pointers are only dereferenced under `average_parameters`'
// contract, and the two threads work on disjoint pieces.
unsafe impl Sync for Tensors<'_> {}
// SAFETY: as for Sync: a `Tensors` only describes memory, whose use the same
// contract governs on whichever thread.
unsafe impl Send for Tensors<'_> {}

/// `len` elements of tensor `t` from element `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    t: usize,
    start: usize,
    len: usize,
}

/// One all-reduce: either a piece of one tensor reduced where it lies
/// (`direct`), or pieces packed into `buf` in the wire dtype.
#[derive(Debug)]
struct Bucket {
    wire: DType,
    direct: bool,
    pieces: Vec<Piece>,
    buf: Vec<u8>,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket { wire: DType::F32, direct: false, pieces: Vec::new(), buf: Vec::new() }
    }
}

impl Bucket {
    fn wire_bytes(&self) -> usize {
        self.pieces.iter().map(|p| p.len).sum::<usize>() * self.wire.size()
    }

    /// Write `x / world` into the bucket (or in place when direct).
    ///
    /// # Safety (here and for `data`, `reduce`, `finish`)
    /// The bucket was planned over `ts` (so each piece lies inside its tensor:
    /// `start + len <= numel`), the tensors are host memory valid for reads and
    /// writes of `numel` elements (`average_parameters`' contract), and no other
    /// thread touches this bucket's pieces meanwhile.
    unsafe fn prepare(&mut self, ts: &Tensors, world: usize) -> Result<()> {
        if self.direct {
            let p = self.pieces[0];
            let t = &ts.0[p.t];
            // SAFETY: the piece [start, start + len) lies inside the tensor, which is
            // valid for numel elements and ours (contract); in place is allowed.
            unsafe {
                let ptr = t.data.add(p.start * t.dtype.size());
                reduce_n_raw(ptr, &[ptr as *const u8], p.len, t.dtype, ReduceOp::Sum, world as f64);
            }
            return Ok(());
        }
        let need = self.wire_bytes();
        self.buf.clear();
        if self.buf.capacity() < need {
            self.buf = Vec::new();
            self.buf.try_reserve_exact(need).map_err(|_| Error::oom(format!("cannot allocate a bucket of {need} bytes ({BUCKET_ENV})")))?;
        }
        let dst = self.buf.as_mut_ptr();
        let mut off = 0;
        for p in &self.pieces {
            let t = &ts.0[p.t];
            // SAFETY: the piece lies inside its tensor (contract); off + len wire
            // elements <= need <= the buffer's capacity (the pieces' wire bytes sum
            // to need), and the Vec's spare capacity is not aliased.
            unsafe {
                let src = t.data.add(p.start * t.dtype.size()) as *const u8;
                divide_into(dst.add(off), src, p.len, t.dtype, world);
            }
            off += p.len * self.wire.size();
        }
        // SAFETY: capacity >= need, and every byte up to `need` was written above
        // (divide_into writes len elements of the wire dtype per piece).
        unsafe { self.buf.set_len(need) };
        Ok(())
    }

    /// The bytes to all-reduce.
    ///
    /// # Safety
    /// As for `prepare`; the slice is the only access to the piece while it lives.
    unsafe fn data<'a>(&'a mut self, ts: &Tensors) -> &'a mut [u8] {
        if self.direct {
            let p = self.pieces[0];
            let t = &ts.0[p.t];
            let es = t.dtype.size();
            // SAFETY: the piece lies inside its tensor (valid host memory, contract),
            // and nothing else reads or writes it while the slice lives (contract:
            // the caller's memory is ours, and no other bucket covers the piece).
            return unsafe { std::slice::from_raw_parts_mut(t.data.add(p.start * es), p.len * es) };
        }
        &mut self.buf[..]
    }

    /// SUM-all-reduce the prepared bucket.
    ///
    /// # Safety
    /// As for `prepare`.
    unsafe fn reduce(&mut self, comm: &Comm, ts: &Tensors) -> Result<()> {
        let wire = self.wire;
        // SAFETY: data's contract is ours.
        comm.all_reduce(unsafe { self.data(ts) }, wire, ReduceOp::Sum)
    }

    /// Copy the reduced bucket back into the tensors.
    ///
    /// # Safety
    /// As for `prepare`, after `prepare` (the buffer holds every piece).
    unsafe fn finish(&self, ts: &Tensors) {
        if self.direct {
            return;
        }
        let mut off = 0;
        for p in &self.pieces {
            let t = &ts.0[p.t];
            // SAFETY: the piece lies inside its tensor (contract), and its wire
            // elements [off, off + len * wire size) inside the prepared buffer.
            unsafe {
                let dst = t.data.add(p.start * t.dtype.size());
                store_from(dst, self.buf.as_ptr().add(off), p.len, t.dtype);
            }
            off += p.len * self.wire.size();
        }
    }
}

/// `dst[i] = src[i] / world`, written in the wire dtype of `dt`. Halves are
/// divided in f32 and rounded to their dtype first (PyTorch's divided value).
///
/// # Safety
/// `src` readable for `n` elements of `dt`, `dst` writable for `n` elements of
/// `wire_dtype(dt)`, not overlapping (no alignment needed).
unsafe fn divide_into(dst: *mut u8, src: *const u8, n: usize, dt: DType, world: usize) {
    let w = world as f32;
    let out = dst as *mut f32;
    let inp = src as *const u16;
    match dt {
        DType::F16 => {
            for i in 0..n {
                // SAFETY: i < n: element i of the n-element input (u16) and output (f32); unaligned access.
                unsafe {
                    let x = f16_bits_to_f32(inp.add(i).read_unaligned());
                    out.add(i).write_unaligned(f16_bits_to_f32(f32_to_f16_bits(x / w)));
                }
            }
        }
        DType::BF16 => {
            for i in 0..n {
                // SAFETY: as for F16.
                unsafe {
                    let x = bf16_bits_to_f32(inp.add(i).read_unaligned());
                    out.add(i).write_unaligned(bf16_bits_to_f32(f32_to_bf16_bits(x / w)));
                }
            }
        }
        // SAFETY: the wire dtype is dt itself here, so both are valid for n elements
        // of dt (contract) and do not overlap.
        _ => unsafe { reduce_n_raw(dst, &[src], n, dt, ReduceOp::Sum, world as f64) },
    }
}

/// `dst[i] = src[i]` from the wire dtype back into `dt` (halves round to nearest-even).
///
/// # Safety
/// `src` readable for `n` elements of `wire_dtype(dt)`, `dst` writable for `n`
/// elements of `dt`, not overlapping (no alignment needed).
unsafe fn store_from(dst: *mut u8, src: *const u8, n: usize, dt: DType) {
    let inp = src as *const f32;
    let out = dst as *mut u16;
    match dt {
        DType::F16 => {
            for i in 0..n {
                // SAFETY: i < n: element i of the n-element input (f32) and output (u16); unaligned access.
                unsafe { out.add(i).write_unaligned(f32_to_f16_bits(inp.add(i).read_unaligned())) };
            }
        }
        DType::BF16 => {
            for i in 0..n {
                // SAFETY: as for F16.
                unsafe { out.add(i).write_unaligned(f32_to_bf16_bits(inp.add(i).read_unaligned())) };
            }
        }
        // SAFETY: the wire dtype is dt itself here: n * size bytes each side (contract), disjoint.
        _ => unsafe { std::ptr::copy_nonoverlapping(src, dst, n * dt.size()) },
    }
}

/// Cuts the chosen tensors into buckets, lazily (a tiny bucket over a huge
/// model must not need a huge plan).
struct Planner<'a> {
    ts: &'a [TensorRef],
    /// Tensor indices grouped by wire dtype (first appearance), order kept within.
    order: Vec<usize>,
    pos: usize,
    /// Elements of `order[pos]` already planned.
    off: usize,
    bucket_bytes: usize,
}

// SAFETY: the planner only reads `numel` and `dtype`, never the tensors' memory.
unsafe impl Send for Planner<'_> {}

impl<'a> Planner<'a> {
    fn new(ts: &'a Tensors, chosen: &[usize], bucket_bytes: usize) -> Planner<'a> {
        let ts = ts.0;
        let mut wires: Vec<DType> = Vec::new();
        for &i in chosen {
            let w = wire_dtype(ts[i].dtype);
            if !wires.contains(&w) {
                wires.push(w);
            }
        }
        let order = wires.iter().flat_map(|w| chosen.iter().copied().filter(move |&i| wire_dtype(ts[i].dtype) == *w)).collect();
        Planner { ts, order, pos: 0, off: 0, bucket_bytes }
    }

    fn numel(&self, i: usize) -> usize {
        self.ts[i].numel as usize
    }

    /// Skip finished and zero-length tensors; is anything left?
    fn has_more(&mut self) -> bool {
        while self.pos < self.order.len() && self.off >= self.numel(self.order[self.pos]) {
            self.pos += 1;
            self.off = 0;
        }
        self.pos < self.order.len()
    }

    /// Plan the next bucket into `b` (its buffer is kept); false when done.
    fn next(&mut self, b: &mut Bucket) -> bool {
        b.pieces.clear();
        if !self.has_more() {
            return false;
        }
        let first = self.order[self.pos];
        let dt = self.ts[first].dtype;
        let wire = wire_dtype(dt);
        let cap = (self.bucket_bytes / wire.size()).max(1);
        let direct_min = cap.min(DIRECT_MIN_BYTES / wire.size()).max(1);
        b.wire = wire;
        let rem = self.numel(first) - self.off;
        if dt == wire && rem >= direct_min {
            let len = rem.min(cap);
            b.pieces.push(Piece { t: first, start: self.off, len });
            b.direct = true;
            self.off += len;
            return true;
        }
        b.direct = false;
        let mut used = 0;
        while used < cap && self.has_more() {
            let t = self.order[self.pos];
            if wire_dtype(self.ts[t].dtype) != wire {
                break;
            }
            let rem = self.numel(t) - self.off;
            if self.ts[t].dtype == wire && rem >= direct_min {
                break; // large enough to be reduced in place on its own
            }
            let len = rem.min(cap - used);
            b.pieces.push(Piece { t, start: self.off, len });
            self.off += len;
            used += len;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Device;

    fn t(numel: u64, dtype: DType) -> TensorRef {
        TensorRef { data: std::ptr::NonNull::<u64>::dangling().as_ptr() as *mut u8, grad: std::ptr::null_mut(), numel, dtype, device: Device::Cpu }
    }

    /// (wire dtype, in place?, [(tensor, start, len)]) per bucket.
    type Plan = Vec<(DType, bool, Vec<(usize, usize, usize)>)>;

    fn plan(ts: &[TensorRef], bucket: usize) -> Plan {
        let all: Vec<usize> = (0..ts.len()).collect();
        let tt = Tensors(ts);
        let mut p = Planner::new(&tt, &all, bucket);
        let mut b = Bucket::default();
        let mut out = Vec::new();
        while p.next(&mut b) {
            assert!(b.wire_bytes() <= bucket.max(b.wire.size()), "bucket over the limit: {b:?}");
            out.push((b.wire, b.direct, b.pieces.iter().map(|p| (p.t, p.start, p.len)).collect()));
        }
        out
    }

    #[test]
    fn tiny_tensors_are_packed_and_large_ones_split_in_place() {
        // bucket 40 bytes = 10 f32: direct pieces need >= 10 elements
        let ts = [t(3, DType::F32), t(4, DType::F32), t(25, DType::F32), t(0, DType::F32), t(5, DType::F32)];
        let got = plan(&ts, 40);
        let f = DType::F32;
        assert_eq!(
            got,
            vec![(f, false, vec![(0, 0, 3), (1, 0, 4)]), (f, true, vec![(2, 0, 10)]), (f, true, vec![(2, 10, 10)]), (f, false, vec![(2, 20, 5), (4, 0, 5)]),]
        );
    }

    #[test]
    fn halves_share_f32_buckets_and_f64_goes_last_in_its_own() {
        let ts = [t(2, DType::F16), t(3, DType::F64), t(2, DType::BF16), t(1, DType::F32)];
        let got = plan(&ts, 1 << 20);
        assert_eq!(got, vec![(DType::F32, false, vec![(0, 0, 2), (2, 0, 2), (3, 0, 1)]), (DType::F64, false, vec![(1, 0, 3)])]);
    }

    #[test]
    fn one_element_and_prime_buckets() {
        // 1 byte: one element per bucket, whatever the dtype
        let ts = [t(2, DType::F64), t(2, DType::F16)];
        let got = plan(&ts, 1);
        assert_eq!(got.len(), 4);
        assert!(got.iter().all(|(_, _, p)| p.len() == 1 && p[0].2 == 1));
        // 13 bytes: 3 f32 per bucket; a half tensor of 7 → 3 + 3 + 1 (packed, never direct)
        let got = plan(&[t(7, DType::BF16)], 13);
        assert_eq!(got.iter().map(|(_, d, p)| (*d, p[0].2)).collect::<Vec<_>>(), vec![(false, 3), (false, 3), (false, 1)]);
    }

    #[test]
    fn divide_rounds_halves_like_pytorch() {
        // f16 1.0 / 3 rounds to f16 first (0.33325195), then travels as f32.
        let x = half::f16::from_f32(1.0).to_bits();
        let mut out = 0f32;
        // SAFETY: one f16 in, one f32 out, separate locals.
        unsafe { divide_into(&mut out as *mut f32 as *mut u8, &x as *const u16 as *const u8, 1, DType::F16, 3) };
        assert_eq!(out, half::f16::from_f32(1.0 / 3.0).to_f32());
        let mut back = 0u16;
        // SAFETY: one f32 in, one bf16 out, separate locals.
        unsafe { store_from(&mut back as *mut u16 as *mut u8, &(0.1f32) as *const f32 as *const u8, 1, DType::BF16) };
        assert_eq!(back, f32_to_bf16_bits(0.1));
    }
}
