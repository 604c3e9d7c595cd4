//! The library's memory layer: host, pinned-host and device buffers
//! (`Buf`), byte ranges of them or of a caller's tensors (`Region`), the
//! host buffer cache (`host_cache`), and the handful of operations flat
//! params, averaging and the C boundary need on them (`Ops`: fill, copy,
//! convert, add, and the four collectives, staged where the communicator
//! cannot read the memory). One code path serves host and CUDA memory, so a
//! device flat param follows exactly the logic the host suites verify.
//!
//! Collectives take buffers wherever they are and stage what the
//! communicator cannot read: a host communicator gets device regions through
//! pinned host memory, an NCCL communicator gets host regions through device
//! memory. Staging buffers are the size of the region of that one call and
//! are freed before the call returns, so e.g. rank0_only + offload_to_cpu on
//! NCCL keeps device memory at one shard-sized chunk.
//!
//! Ordering: device work is queued on one stream (`Ops::stream`: the NCCL
//! communicator's, else the legacy default stream); every device-to-host copy
//! waits for its stream before host code reads the result, and every flat
//! param call ends with `Ops::finish`, so flat-param calls complete before
//! they return, as host ones do.

use crate::comm::Comm;
use crate::cuda::{self, Dir, Stream};
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use crate::tensor::Device;

/// Where a buffer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Ordinary (pageable) host memory.
    Host,
    /// Page-locked host memory (offload_to_cpu of device params, staging).
    Pinned,
    /// Device memory of CUDA device `n`.
    Device(i32),
}

impl Place {
    pub fn device(self) -> Device {
        match self {
            Place::Device(d) => Device::Cuda(d),
            _ => Device::Cpu,
        }
    }
    pub fn is_host(self) -> bool {
        !matches!(self, Place::Device(_))
    }
    /// Can a communicator that wants `want` read this place directly?
    fn serves(self, want: Place) -> bool {
        match want {
            Place::Device(d) => self == Place::Device(d),
            _ => self.is_host(),
        }
    }
}

enum Store {
    /// Small host buffers.
    Host(Vec<u64>),
    /// Host buffers of at least `host_cache::LARGE` bytes: a mapping of their
    /// own, returned to the host cache when dropped.
    Pages(host_cache::Pages),
    Pinned(cuda::PinnedMem),
    Device(cuda::DevMem),
}

/// A library-owned buffer (8-byte aligned on the host, 256 on the device),
/// zero-filled unless made by `for_overwrite`.
pub struct Buf {
    store: Store,
    len: usize,
}

impl Buf {
    /// Host memory.
    pub fn zeroed(len: usize, what: &str) -> Result<Buf> {
        if len >= host_cache::LARGE {
            // A recycled buffer zeroed here rather than a fresh mapping: the
            // kernel zeroes fresh pages too, at a page fault per 4 KiB (or,
            // with huge pages, at the risk of a synchronous compaction that
            // stalled single writes for 5 ms here). A fresh one is zero.
            let (p, recycled) = Buf::large(len, what)?;
            if recycled {
                // SAFETY: p maps at least len writable bytes.
                unsafe { std::ptr::write_bytes(p.ptr(), 0, len) };
            }
            return Ok(Buf { store: Store::Pages(p), len });
        }
        let n = len.div_ceil(8);
        if n == 0 {
            return Ok(Buf { store: Store::Host(Vec::new()), len });
        }
        // Unlike vec![0; n], try_reserve reports failure instead of aborting.
        let mut words = Vec::new();
        words.try_reserve_exact(n).map_err(|_| Error::oom(format!("cannot allocate {len} bytes for {what}")))?;
        words.resize(n, 0u64);
        Ok(Buf { store: Store::Host(words), len })
    }

    /// Host memory of `len` bytes that the caller overwrites completely before
    /// reading it (a gathered full parameter): a recycled buffer of the same
    /// size if the cache holds one (its old contents, not zeros), else zeroed.
    pub fn for_overwrite(len: usize, what: &str) -> Result<Buf> {
        if len < host_cache::LARGE {
            return Buf::zeroed(len, what);
        }
        Ok(Buf { store: Store::Pages(Buf::large(len, what)?.0), len })
    }

    /// A large host buffer: a cached one of the same size (true: its old
    /// contents) or a fresh mapping (false: zeros).
    fn large(len: usize, what: &str) -> Result<(host_cache::Pages, bool)> {
        if let Some(p) = host_cache::take(len) {
            return Ok((p, true));
        }
        let p = host_cache::Pages::new(len).ok_or_else(|| Error::oom(format!("cannot allocate {len} bytes for {what}")))?;
        Ok((p, false))
    }

    /// `for_overwrite` at `place` (zeroed_on where it is not the host).
    pub fn for_overwrite_on(place: Place, len: usize, what: &str) -> Result<Buf> {
        match place {
            Place::Host => Buf::for_overwrite(len, what),
            _ => Buf::zeroed_on(place, len, what),
        }
    }

    /// Zero-filled memory at `place`; device memory is zeroed before this returns.
    pub fn zeroed_on(place: Place, len: usize, what: &str) -> Result<Buf> {
        match place {
            Place::Host => Buf::zeroed(len, what),
            Place::Pinned => Ok(Buf { store: Store::Pinned(cuda::PinnedMem::zeroed(len, what)?), len }),
            Place::Device(d) => Ok(Buf { store: Store::Device(cuda::DevMem::zeroed(d, len, what)?), len }),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn place(&self) -> Place {
        match &self.store {
            Store::Host(_) | Store::Pages(_) => Place::Host,
            Store::Pinned(_) => Place::Pinned,
            Store::Device(m) => Place::Device(m.device()),
        }
    }
    /// Null for an empty buffer.
    pub fn ptr(&self) -> *mut u8 {
        if self.len == 0 {
            return std::ptr::null_mut();
        }
        match &self.store {
            Store::Host(w) => w.as_ptr() as *mut u8,
            Store::Pages(p) => p.ptr(),
            Store::Pinned(m) => m.ptr(),
            Store::Device(m) => m.ptr(),
        }
    }
    pub fn region(&self) -> Region {
        Region { ptr: self.ptr(), len: self.len, place: self.place() }
    }
    /// `len` bytes from byte `off`.
    pub fn at(&self, off: usize, len: usize) -> Region {
        self.region().sub(off, len)
    }
    /// The bytes, for host and pinned buffers (None on the device).
    pub fn host_bytes(&self) -> Option<&[u8]> {
        // SAFETY: a host-visible allocation of len initialised bytes.
        self.place().is_host().then(|| unsafe { self.region().bytes() })
    }
    pub fn host_bytes_mut(&mut self) -> Option<&mut [u8]> {
        // SAFETY: as above, and we hold &mut self.
        self.place().is_host().then(|| unsafe { self.region().bytes_mut() })
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Store::Pages(p) = std::mem::replace(&mut self.store, Store::Host(Vec::new())) {
            host_cache::give(p);
        }
    }
}

pub mod host_cache;

/// A byte range of a buffer (or of a caller's tensor). Plain pointers: the
/// state machine guarantees the buffer outlives the region's use.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    pub ptr: *mut u8,
    pub len: usize,
    pub place: Place,
}

impl Region {
    pub fn new(ptr: *mut u8, len: usize, place: Place) -> Region {
        Region { ptr, len, place }
    }
    /// The place of a caller's tensor on `device`.
    pub fn place_of(device: Device) -> Place {
        match device {
            Device::Cpu => Place::Host,
            Device::Cuda(d) => Place::Device(d),
        }
    }
    pub fn sub(self, off: usize, len: usize) -> Region {
        assert!(off.checked_add(len).is_some_and(|e| e <= self.len), "region [{off}, +{len}) outside {} bytes", self.len);
        let ptr = if len == 0 || self.ptr.is_null() { self.ptr } else { self.ptr.wrapping_add(off) };
        Region { ptr, len, place: self.place }
    }
    /// The region's bytes to read.
    ///
    /// # Safety
    /// A host-visible region of live memory that nothing writes meanwhile.
    pub unsafe fn bytes<'a>(self) -> &'a [u8] {
        debug_assert!(self.place.is_host());
        if self.len == 0 || self.ptr.is_null() {
            return &[];
        }
        // SAFETY: the caller's contract above.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    /// The region's bytes to write.
    ///
    /// # Safety
    /// A host-visible region of live memory that nothing else accesses
    /// meanwhile (no other slice over it may be alive).
    pub unsafe fn bytes_mut<'a>(self) -> &'a mut [u8] {
        debug_assert!(self.place.is_host());
        if self.len == 0 || self.ptr.is_null() {
            return &mut [];
        }
        // SAFETY: the caller's contract above.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    /// Do two regions share a byte? (Compared as addresses, before any slice
    /// is made over them.)
    pub fn overlaps(self, other: Region) -> bool {
        let (a, b) = (self.ptr as usize, other.ptr as usize);
        self.len > 0 && other.len > 0 && a < b.saturating_add(other.len) && b < a.saturating_add(self.len)
    }
}

pub use crate::convert::convert_host;

/// The operations of one flat-param call; see the module docs for ordering.
pub struct Ops<'c> {
    /// The call's communicator: its stream orders the device work, and
    /// waiting for NCCL work goes through it (with its deadline).
    comm: Option<&'c Comm>,
    stream: Stream,
    /// The device of the queued work, while there is some.
    pending: Option<i32>,
    /// Temporaries that queued device work may still use: freed only after
    /// that work is done (or leaked if waiting for it failed).
    held: Vec<Buf>,
}

impl<'c> Ops<'c> {
    /// Device work of this call goes on `comm`'s stream.
    pub fn new(comm: &'c Comm) -> Ops<'c> {
        Ops { comm: Some(comm), stream: comm.stream(), pending: None, held: Vec::new() }
    }
    /// For calls without a communicator (zero_grad, reading a shard).
    pub fn local() -> Ops<'static> {
        Ops { comm: None, stream: std::ptr::null_mut(), pending: None, held: Vec::new() }
    }

    fn queued(&mut self, device: i32) {
        self.pending = Some(device);
    }

    /// Wait for the queued device work: through the NCCL communicator when it
    /// owns our stream (deadline, asynchronous errors), else a stream sync.
    fn sync(&mut self) -> Result<()> {
        let Some(dev) = self.pending.take() else {
            return Ok(());
        };
        let r = match self.comm {
            Some(c) if c.is_device() && c.stream() == self.stream => c.synchronize(),
            _ => cuda::stream_sync(dev, self.stream),
        };
        if r.is_err() {
            // Kernels may still use our buffers: from now on they are leaked,
            // not freed (cuMemFree would wait for them, maybe forever).
            cuda::mark_failed();
        }
        r
    }

    /// Keep `b` alive until this call's device work is done.
    pub fn hold(&mut self, b: Buf) {
        if !b.is_empty() {
            self.held.push(b);
        }
    }

    /// A zero-filled temporary for this call, freed when the call's device
    /// work is done (`finish`, or `drop` on an error path).
    pub fn temp_buf(&mut self, place: Place, len: usize, what: &str) -> Result<Region> {
        Ok(self.keep(Buf::zeroed_on(place, len, what)?))
    }

    /// A temporary that the call overwrites completely before reading it
    /// (`Buf::for_overwrite_on`: maybe a recycled host buffer, not zeros).
    pub fn temp_overwrite(&mut self, place: Place, len: usize, what: &str) -> Result<Region> {
        Ok(self.keep(Buf::for_overwrite_on(place, len, what)?))
    }

    /// `hold(b)`, returning its region.
    pub fn keep(&mut self, b: Buf) -> Region {
        let r = b.region();
        self.hold(b);
        r
    }

    /// Wait for this call's device work, then free what it held.
    pub fn finish(mut self) -> Result<()> {
        self.sync()?;
        self.held.clear();
        Ok(())
    }

    /// Wait for the device work so far.
    pub fn finish_step(&mut self) -> Result<()> {
        self.sync()
    }

    pub fn fill0(&mut self, r: Region) -> Result<()> {
        if r.place.is_host() {
            // Queued device work may still write it (a device-to-host copy).
            self.sync()?;
            // SAFETY: a live host region (Region's contract).
            unsafe { r.bytes_mut().fill(0) };
            return Ok(());
        }
        if let Place::Device(d) = r.place {
            self.queued(d);
        }
        // SAFETY: a live device region.
        unsafe { cuda::memset0_async(r.ptr, r.len, self.stream) }
    }

    /// Copy `src` into `dst` (same length; they may be in different places).
    pub fn copy(&mut self, dst: Region, src: Region) -> Result<()> {
        assert_eq!(dst.len, src.len, "copy between regions of different lengths");
        if dst.len == 0 {
            return Ok(());
        }
        let dir = match (src.place.is_host(), dst.place.is_host()) {
            (true, true) => {
                // Host side: wait for queued device writes into it first.
                self.sync()?;
                let apart = src.ptr as usize + src.len <= dst.ptr as usize || dst.ptr as usize + dst.len <= src.ptr as usize;
                // SAFETY: live host regions; memcopy only when they do not overlap.
                unsafe {
                    if apart {
                        crate::memcopy::copy(src.ptr, dst.ptr, src.len)
                    } else {
                        std::ptr::copy(src.ptr, dst.ptr, src.len)
                    }
                };
                return Ok(());
            }
            (true, false) => Dir::HtoD,
            (false, true) => Dir::DtoH,
            (false, false) => Dir::DtoD,
        };
        if dir == Dir::HtoD {
            // The host source may be the target of queued device writes.
            self.sync()?;
        }
        let dev = match (dst.place, src.place) {
            (Place::Device(d), _) | (_, Place::Device(d)) => d,
            _ => unreachable!("a host-to-host copy returned above"),
        };
        self.queued(dev);
        // SAFETY: live regions on the sides dir names.
        unsafe { cuda::copy_async(dst.ptr, src.ptr, src.len, dir, self.stream)? };
        if dir == Dir::DtoH {
            // Host code reads dst next.
            self.sync()?;
        }
        Ok(())
    }

    /// A temporary at `place` holding a copy of `r` (or zeros if !copy_in).
    fn temp(&mut self, r: Region, place: Place, copy_in: bool, what: &str) -> Result<Buf> {
        let place = if place == Place::Host && !r.place.is_host() { Place::Pinned } else { place };
        let t = Buf::zeroed_on(place, r.len, what)?;
        if copy_in {
            self.copy(t.region(), r)?;
        }
        Ok(t)
    }

    /// `dst = (to) src`, element-wise.
    pub fn convert(&mut self, src: Region, from: DType, dst: Region, to: DType) -> Result<()> {
        if from == to {
            return self.copy(dst, src);
        }
        let n = src.len / from.size();
        assert_eq!(dst.len, n * to.size(), "convert between regions of different numel");
        if src.place.is_host() && dst.place.is_host() {
            self.sync()?;
            // SAFETY: live, distinct host regions.
            unsafe { convert_host(src.bytes(), from, dst.bytes_mut(), to) };
            return Ok(());
        }
        if let (Place::Device(a), Place::Device(b)) = (src.place, dst.place) {
            if a == b {
                // SAFETY: live device regions of n elements each.
                if unsafe { cuda::launch_convert(src.ptr, from, dst.ptr, to, n, a, self.stream)? } {
                    self.queued(a);
                    return Ok(());
                }
            }
        }
        // Different places (or a pair without a kernel): convert on the host.
        let s = self.temp(src, Place::Host, true, "conversion staging")?;
        let mut d = Buf::zeroed_on(if dst.place.is_host() { Place::Host } else { Place::Pinned }, dst.len, "conversion staging")?;
        convert_host(s.host_bytes().unwrap_or(&[]), from, d.host_bytes_mut().unwrap_or(&mut []), to);
        self.copy(dst, d.region())?;
        self.hold(s);
        self.hold(d);
        Ok(())
    }

    /// `dst += src`, element-wise (f16/bf16 in f32, rounded to nearest-even).
    pub fn add(&mut self, dst: Region, src: Region, dt: DType) -> Result<()> {
        assert_eq!(dst.len, src.len, "add of regions of different lengths");
        if dst.place.is_host() {
            let s = if src.place.is_host() { None } else { Some(self.temp(src, Place::Host, true, "gradient staging")?) };
            self.sync()?;
            let sr = s.as_ref().map_or(src, |b| b.region());
            // SAFETY: live, distinct host regions.
            unsafe { crate::reduce::reduce_into(dst.bytes_mut(), sr.bytes(), dt, ReduceOp::Sum) };
            return Ok(());
        }
        let Place::Device(d) = dst.place else { unreachable!() };
        let s = if src.place == dst.place { None } else { Some(self.temp(src, dst.place, true, "gradient staging")?) };
        let sr = s.as_ref().map_or(src, |b| b.region());
        // SAFETY: live device regions of the same length on device d.
        unsafe { cuda::launch_add(dst.ptr, sr.ptr, dt, dst.len / dt.size(), d, self.stream)? };
        self.queued(d);
        if let Some(s) = s {
            self.hold(s);
        }
        Ok(())
    }

    /// The place `comm` reads directly.
    fn want(comm: &Comm) -> Place {
        comm.device_index().map_or(Place::Host, Place::Device)
    }

    /// Run a collective on regions `comm` can read, staging the others:
    /// `(region, copy in, copy out)` each. Staging buffers are freed before
    /// returning (so a loop of these stays at one region's worth of memory).
    fn staged(&mut self, comm: &Comm, rs: &[(Region, bool, bool)], f: impl FnOnce(&mut Ops<'c>, &[Region]) -> Result<()>) -> Result<()> {
        let want = Self::want(comm);
        if let Place::Device(d) = want {
            if let Some(r) = rs.iter().find(|(r, _, _)| matches!(r.place, Place::Device(x) if x != d)) {
                return Err(Error::invalid_arg(format!(
                    "rank {}: a buffer on {} given to an NCCL communicator on cuda:{d}; use buffers on the communicator's GPU",
                    comm.rank(),
                    r.0.place.device().describe()
                )));
            }
        }
        let mut temps: Vec<Option<Buf>> = Vec::with_capacity(rs.len());
        for (r, cin, _) in rs {
            temps.push(if r.place.serves(want) { None } else { Some(self.temp(*r, want, *cin, "collective staging")?) });
        }
        let use_: Vec<Region> = rs.iter().zip(&temps).map(|((r, _, _), t)| t.as_ref().map_or(*r, |b| b.region())).collect();
        let other_stream = comm.is_device() && comm.stream() != self.stream;
        if want.is_host() || other_stream {
            // Host collectives read host memory now; another stream must not
            // overtake our queued writes.
            self.sync()?;
        }
        let run = || -> Result<()> {
            let r = f(self, &use_);
            if other_stream {
                // The collective ran on comm's stream: wait for it there.
                let w = comm.synchronize();
                if w.is_err() {
                    cuda::mark_failed();
                }
                r?;
                w?;
            } else {
                r?;
            }
            for ((r, _, cout), t) in rs.iter().zip(&temps) {
                if let (true, Some(t)) = (*cout, t) {
                    self.copy(*r, t.region())?;
                }
            }
            if temps.iter().any(|t| t.is_some()) {
                self.sync()?;
            }
            Ok(())
        };
        let r = run();
        if r.is_err() {
            // Queued work may still use the staging buffers: keep them until
            // it is waited for (Ops::drop).
            for t in temps.into_iter().flatten() {
                self.hold(t);
            }
        }
        r
    }

    pub fn all_gather(&mut self, comm: &Comm, src: Region, dst: Region, dt: DType) -> Result<()> {
        self.staged(comm, &[(src, true, false), (dst, false, true)], |ops, r| {
            if let Some(d) = comm.device_index() {
                if comm.stream() == ops.stream {
                    ops.queued(d);
                }
                // SAFETY: device regions on comm's device; dst holds size × src.
                unsafe { comm.dev_all_gather(r[0].ptr, r[1].ptr, r[0].len / dt.size(), dt) }
            } else if r[0].overlaps(r[1]) {
                // In place (send inside recv): read our piece out first, so no
                // shared and mutable slice ever cover the same bytes.
                // SAFETY: live host regions; the shared slice ends before the
                // mutable one is made.
                let own = unsafe { r[0].bytes() }.to_vec();
                // SAFETY: a live host region, no other slice over it now.
                unsafe { comm.all_gather(&own, r[1].bytes_mut(), dt) }
            } else {
                // SAFETY: distinct live host regions.
                unsafe { comm.all_gather(r[0].bytes(), r[1].bytes_mut(), dt) }
            }
        })
    }

    pub fn reduce_scatter(&mut self, comm: &Comm, src: Region, dst: Region, dt: DType, op: ReduceOp) -> Result<()> {
        self.staged(comm, &[(src, true, false), (dst, false, true)], |ops, r| {
            if let Some(d) = comm.device_index() {
                if comm.stream() == ops.stream {
                    ops.queued(d);
                }
                // SAFETY: device regions on comm's device; src holds size × dst.
                unsafe { comm.dev_reduce_scatter(r[0].ptr, r[1].ptr, r[1].len / dt.size(), dt, op) }
            } else if r[0].overlaps(r[1]) {
                // SAFETY: as in all_gather: the copy's shared slice ends first.
                let send = unsafe { r[0].bytes() }.to_vec();
                // SAFETY: a live host region, no other slice over it now.
                unsafe { comm.reduce_scatter(&send, r[1].bytes_mut(), dt, op) }
            } else {
                // SAFETY: distinct live host regions.
                unsafe { comm.reduce_scatter(r[0].bytes(), r[1].bytes_mut(), dt, op) }
            }
        })
    }

    pub fn all_reduce(&mut self, comm: &Comm, buf: Region, dt: DType, op: ReduceOp) -> Result<()> {
        self.staged(comm, &[(buf, true, true)], |ops, r| {
            if let Some(d) = comm.device_index() {
                if comm.stream() == ops.stream {
                    ops.queued(d);
                }
                // SAFETY: a device region on comm's device, reduced in place.
                unsafe { comm.dev_all_reduce(r[0].ptr, r[0].ptr, r[0].len / dt.size(), dt, op) }
            } else {
                // SAFETY: a live host region.
                unsafe { comm.all_reduce(r[0].bytes_mut(), dt, op) }
            }
        })
    }

    pub fn broadcast(&mut self, comm: &Comm, buf: Region, dt: DType, root: i32) -> Result<()> {
        self.staged(comm, &[(buf, comm.rank() as i32 == root, true)], |ops, r| {
            if let Some(d) = comm.device_index() {
                if comm.stream() == ops.stream {
                    ops.queued(d);
                }
                // SAFETY: a device region on comm's device.
                unsafe { comm.dev_broadcast(r[0].ptr, r[0].len / dt.size(), dt, root) }
            } else {
                // SAFETY: a live host region.
                unsafe { comm.broadcast(r[0].bytes_mut(), dt, root) }
            }
        })
    }

    /// Collectives on small host arrays (agreement, flags), whatever the comm.
    pub fn all_gather_host(&mut self, comm: &Comm, send: &[u8], recv: &mut [u8], dt: DType) -> Result<()> {
        let s = Region::new(send.as_ptr() as *mut u8, send.len(), Place::Host);
        let r = Region::new(recv.as_mut_ptr(), recv.len(), Place::Host);
        self.all_gather(comm, s, r, dt)
    }
    pub fn all_reduce_host(&mut self, comm: &Comm, buf: &mut [u8], dt: DType, op: ReduceOp) -> Result<()> {
        self.all_reduce(comm, Region::new(buf.as_mut_ptr(), buf.len(), Place::Host), dt, op)
    }
    pub fn broadcast_host(&mut self, comm: &Comm, buf: &mut [u8], dt: DType, root: i32) -> Result<()> {
        self.broadcast(comm, Region::new(buf.as_mut_ptr(), buf.len(), Place::Host), dt, root)
    }
}

/// The one entry point for a collective on memory wherever it lives: host
/// memory on a host communicator goes straight to the transport; device
/// memory on an NCCL communicator's own GPU goes to NCCL on its stream;
/// anything else (device memory on a host communicator, host or another
/// GPU's memory on an NCCL one) is staged by `Ops`. Complete when it returns
/// (NCCL work on the comm's own memory stays stream-ordered, API §6).
pub fn collective(comm: &Comm, f: impl FnOnce(&mut Ops) -> Result<()>) -> Result<()> {
    let mut ops = Ops::new(comm);
    f(&mut ops)?;
    if comm.is_device() && ops.held.is_empty() {
        // Nothing staged (staging waits for itself): NCCL work on the comm's
        // own memory stays stream-ordered; flatshard_comm_synchronize waits.
        ops.pending = None;
    }
    ops.finish()
}

impl Drop for Ops<'_> {
    fn drop(&mut self) {
        // An error path left device work queued: wait for it before the
        // buffers it uses are freed. If that wait fails (a dead NCCL peer on
        // a wrapped comm), `sync` marked the process failed and every device
        // and pinned buffer is leaked from then on instead of freed.
        if self.pending.is_some() {
            let _ = self.sync();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_overlap_by_address() {
        let mut v = vec![0u8; 64];
        let p = v.as_mut_ptr();
        let r = |off: usize, len: usize| Region::new(p.wrapping_add(off), len, Place::Host);
        assert!(r(0, 16).overlaps(r(8, 16)));
        assert!(r(8, 16).overlaps(r(0, 16)));
        assert!(!r(0, 16).overlaps(r(16, 16)));
        assert!(!r(0, 0).overlaps(r(0, 16)), "an empty region overlaps nothing");
        assert_eq!(r(0, 64).sub(8, 4).ptr, p.wrapping_add(8));
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn sub_region_out_of_range_panics() {
        let mut v = vec![0u8; 8];
        Region::new(v.as_mut_ptr(), 8, Place::Host).sub(4, 5);
    }

    /// Host buffers: zeroed really is zero, host ops copy and convert.
    #[test]
    fn host_buffers_and_local_ops() {
        let mut a = Buf::zeroed(1000, "a").unwrap();
        assert!(a.host_bytes().unwrap().iter().all(|b| *b == 0));
        a.host_bytes_mut().unwrap()[..4].copy_from_slice(&1.5f32.to_ne_bytes());
        let b = Buf::zeroed(1000, "b").unwrap();
        let mut ops = Ops::local();
        ops.copy(b.region(), a.region()).unwrap();
        assert_eq!(&b.host_bytes().unwrap()[..4], &1.5f32.to_ne_bytes());
        let h = Buf::zeroed(500, "h").unwrap();
        ops.convert(a.region(), DType::F32, h.region(), DType::BF16).unwrap();
        assert_eq!(&h.host_bytes().unwrap()[..2], &crate::convert::f32_to_bf16_bits(1.5).to_ne_bytes());
        ops.fill0(a.region()).unwrap();
        assert!(a.host_bytes().unwrap().iter().all(|b| *b == 0));
        ops.finish().unwrap();
    }

    /// The host cache hands back a buffer of the same size only, and keeps
    /// nothing when its limit is 0.
    #[test]
    fn host_cache_recycles_by_size() {
        let n = 8 << 20;
        let p = host_cache::Pages::new(n).unwrap();
        // SAFETY: n writable bytes of a fresh mapping.
        unsafe { std::ptr::write_bytes(p.ptr(), 7, n) };
        host_cache::give(p);
        if let Some(v) = host_cache::take(n) {
            assert_eq!(v.mapped_bytes(), n);
        }
        assert!(host_cache::take(n + 4096).is_none());
        assert!(host_cache::take(16).is_none(), "small buffers are never cached");
    }

    /// A large zeroed buffer reads as zeros even when it reuses a dirty
    /// cached one.
    #[test]
    fn large_buffers_zeroed_after_reuse() {
        let len = (4 << 20) + 12;
        for _ in 0..3 {
            let mut b = Buf::for_overwrite(len, "b").unwrap();
            b.host_bytes_mut().unwrap().fill(0xab);
            drop(b);
            let mut z = Buf::zeroed(len, "z").unwrap();
            assert!(z.host_bytes().unwrap().iter().all(|x| *x == 0));
            z.host_bytes_mut().unwrap().fill(3);
        }
    }
}
