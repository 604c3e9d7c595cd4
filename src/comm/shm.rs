//! The shared-memory transport, for groups whose ranks are all on this host.
//!
//! Each rank creates one POSIX shared-memory segment per group
//! (`/flatshard-<job>-<group>-<rank>`), maps every peer's, and unlinks its own
//! as soon as every peer reports (through the rendezvous store) that it has
//! mapped it: after that, nothing is left in /dev/shm even if a rank crashes.
//!
//! Segment layout: a 4 KiB header, then three data slots of `slot_bytes`.
//! The header holds static facts (magic, rank, size, pid, pid namespace, slot
//! size) and three words on their own cache lines: `flag` (this rank's phase
//! counter, the only thing peers wait on), `waiters` (how many peers sleep on
//! `flag`, so a signal costs a futex syscall only when someone sleeps) and
//! `dead` (set when the rank aborts or frees the communicator), plus one
//! operation descriptor per slot.
//!
//! Every collective is a sequence of rounds. A round writes into this rank's
//! slot `gen % 3`, bumps `flag`, and waits until every peer's `flag` reached the
//! same value; after that every peer's slot of this round may be read. Writing
//! the slot again (three rounds later) is safe because each peer bumped its
//! flag for a later round only after it finished reading this one (all_reduce
//! writes one round ahead, which is why there are three slots, not two).
//! The first round of every call also carries the call's `OpDesc`: each rank
//! compares all peers' descriptors before using any data, so a disagreement is
//! MISMATCH on every rank after exactly one round, and the group stays in step.
//!
//! Algorithms: all_reduce up to `small_bytes` is one-shot (every rank reduces
//! all slots in rank order into its output, so results are bit-identical on all
//! ranks); larger ones go in slot-sized chunks: copy in, reduce my 1/n slice of
//! everyone's chunk into my slot (copying each cache-sized piece on into my
//! buffer at once), signal, copy every peer's reduced slice out.
//! all_gather, reduce_scatter and broadcast are one round per slot-sized piece.
//!
//! Waiting spins briefly (long only when every rank can have its own core),
//! yields, then sleeps on the futex with a timeout of at most `ABORT_POLL`,
//! checking the deadline, the abort flag and whether the awaited peer died
//! (its `dead` word, or its pid gone) each time it wakes.

use super::net::{Wait, ABORT_POLL};
use super::store::StoreClient;
use super::{Backend, OpDesc, OpKind};
use crate::config::Config;
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use crate::memcopy::{self, copy};
use crate::reduce;
use std::ffi::CString;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const MAGIC: u64 = 0x314d_4853_4853_4c46; // "FLSHSHM1"
const HDR_BYTES: usize = 4096;
const OFF_FLAG: usize = 64;
const OFF_WAITERS: usize = 128;
const OFF_DEAD: usize = 192;
const OFF_DESC: usize = 256; // NSLOTS 64-byte descriptor lines
/// The CPU this rank last ran on (a hint: never spin for a peer that shares
/// our CPU, it cannot run while we spin).
const OFF_CPU: usize = 512;
/// Data slots per segment (see `all_reduce` for why three).
const NSLOTS: usize = 3;
// Slot size (FLATSHARD_SHM_CHUNK, default in config.rs): big enough to
// amortise a round trip, small enough that a round's working set stays in
// cache.
/// `dead` value of a rank that aborted or freed its communicator without
/// blaming a particular peer.
const DEAD_SELF: u32 = u32::MAX;

/// True where POSIX shared memory works (Linux with a writable /dev/shm).
pub fn available() -> bool {
    cfg!(target_os = "linux") && {
        let p = std::path::Path::new("/dev/shm");
        p.is_dir() && std::fs::metadata(p).map(|m| !m.permissions().readonly()).unwrap_or(false)
    }
}

/// One mapped segment (ours or a peer's); unmapped on drop.
struct Seg {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is shared memory that lives as long as `Seg`; all
// cross-process synchronisation goes through the atomics in its header.
unsafe impl Send for Seg {}
// SAFETY: as for Send: shared access only through the header's atomics and
// the slot protocol (a rank writes its own slot, peers read after its flag).
unsafe impl Sync for Seg {}

impl Seg {
    fn word(&self, off: usize) -> &AtomicU32 {
        // SAFETY: off < HDR_BYTES <= len, 4-aligned in a page-aligned mapping;
        // AtomicU32 has the layout of u32 and the memory is only ever accessed
        // atomically at these offsets.
        unsafe { &*(self.base.add(off) as *const AtomicU32) }
    }
    fn flag(&self) -> &AtomicU32 {
        self.word(OFF_FLAG)
    }
    fn waiters(&self) -> &AtomicU32 {
        self.word(OFF_WAITERS)
    }
    fn dead(&self) -> &AtomicU32 {
        self.word(OFF_DEAD)
    }
    fn cpu(&self) -> &AtomicU32 {
        self.word(OFF_CPU)
    }
    fn desc(&self, slot: usize) -> *mut u8 {
        // SAFETY: within the header.
        unsafe { self.base.add(OFF_DESC + 64 * slot) }
    }
    fn slot(&self, slot: usize, slot_bytes: usize) -> *mut u8 {
        // SAFETY: HDR_BYTES + NSLOTS * slot_bytes <= len (checked at map time).
        unsafe { self.base.add(HDR_BYTES + slot * slot_bytes) }
    }
    fn read_u64(&self, off: usize) -> u64 {
        // SAFETY: static header fields, written before the segment was published.
        unsafe { (self.base.add(off) as *const u64).read_volatile() }
    }
    fn write_u64(&self, off: usize, v: u64) {
        // SAFETY: as above; only the owner writes, before publishing.
        unsafe { (self.base.add(off) as *mut u64).write_volatile(v) }
    }
}

impl Drop for Seg {
    fn drop(&mut self) {
        // SAFETY: base/len came from a successful mmap.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

// Static header fields (byte offsets).
const H_MAGIC: usize = 0;
const H_RANK: usize = 8;
const H_SIZE: usize = 16;
const H_PID: usize = 24;
const H_SLOT: usize = 32;
const H_PIDNS: usize = 40;

fn os_err(what: &str, name: &str) -> Error {
    Error::io(format!("{what} '{name}': {}", io::Error::last_os_error()))
}

/// Open (or create) and map a segment of `len` bytes.
fn map_segment(name: &CString, len: usize, create: bool) -> Result<Seg> {
    let shown = name.to_string_lossy();
    let flags = if create { libc::O_CREAT | libc::O_EXCL | libc::O_RDWR } else { libc::O_RDWR };
    // SAFETY: name is a valid NUL-terminated string.
    let fd = unsafe { libc::shm_open(name.as_ptr(), flags, 0o600) };
    if fd < 0 {
        return Err(os_err(if create { "shm_open (create)" } else { "shm_open" }, &shown));
    }
    let res = (|| {
        if create {
            // SAFETY: fd is ours.
            if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
                return Err(os_err("ftruncate", &shown));
            }
            // Reserve the pages now: a full /dev/shm (Docker's default is
            // 64 MiB) must be an error here, not a SIGBUS mid-collective.
            // SAFETY: fd is ours.
            let e = unsafe { libc::posix_fallocate(fd, 0, len as libc::off_t) };
            if e != 0 {
                return Err(Error::io(format!(
                    "reserving {len} bytes for '{shown}' in /dev/shm: {} (enlarge /dev/shm, lower FLATSHARD_SHM_CHUNK, or use FLATSHARD_TRANSPORT_TCP)",
                    io::Error::from_raw_os_error(e)
                )));
            }
        } else {
            // SAFETY: st is plain data filled by fstat.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: a live fd and a writable stat struct.
            if unsafe { libc::fstat(fd, &mut st) } != 0 {
                return Err(os_err("fstat", &shown));
            }
            if (st.st_size as u64) < len as u64 {
                return Err(Error::peer_lost(format!(
                    "segment '{shown}' is {} bytes, expected {len} (a peer with a different FLATSHARD_SHM_CHUNK?)",
                    st.st_size
                )));
            }
        }
        // SAFETY: mapping a shared fd we just sized/checked.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(os_err("mmap", &shown));
        }
        Ok(Seg { base: p as *mut u8, len })
    })();
    // SAFETY: fd is ours; the mapping (if any) stays valid after close.
    unsafe { libc::close(fd) };
    res
}

fn pid_namespace() -> u64 {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|p| p.to_string_lossy().chars().filter(|c| c.is_ascii_digit()).collect::<String>().parse().ok())
        .unwrap_or(0)
}

/// Is the process alive (not gone, not a zombie)?
fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    if unsafe { libc::kill(pid, 0) } != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // state is the field after the ")" that closes the command name
        Ok(s) => !matches!(s.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()), Some('Z') | Some('X')),
        Err(_) => true,
    }
}

fn futex_wait(word: &AtomicU32, val: u32, ms: i32) {
    let ts = libc::timespec { tv_sec: (ms / 1000) as libc::time_t, tv_nsec: ((ms % 1000) as libc::c_long) * 1_000_000 };
    // SAFETY: word points into a live shared mapping; FUTEX_WAIT (not
    // private) because the word is shared between processes.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, val, &ts as *const libc::timespec, 0usize, 0u32) };
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX, 0usize, 0usize, 0u32) };
}

/// Removes our segment's name if connect fails before the normal unlink.
struct NameGuard {
    name: Option<CString>,
}

impl NameGuard {
    fn unlink(&mut self) {
        if let Some(n) = self.name.take() {
            // SAFETY: valid C string.
            unsafe { libc::shm_unlink(n.as_ptr()) };
        }
    }
}

impl Drop for NameGuard {
    fn drop(&mut self) {
        self.unlink();
    }
}

struct State {
    /// Our phase counter (the value last stored in our `flag`).
    phase: u32,
    /// Round counter: selects the slot and travels in the descriptor.
    gen: u32,
}

pub struct ShmBackend {
    rank: usize,
    size: usize,
    segs: Vec<Seg>,
    /// Peer pids to probe, or 0 where the pid means nothing to us (other pid namespace).
    pids: Vec<i32>,
    abort: Arc<AtomicBool>,
    timeout: Duration,
    slot_bytes: usize,
    small_bytes: usize,
    /// Outputs of at least this many bytes are written with streaming stores.
    stream_min: usize,
    spin: Duration,
    yields: u32,
    /// 1 + the rank our last PEER_LOST blamed (DEAD_SELF: none); published in `dead` on abort.
    blame: AtomicU32,
    state: Mutex<State>,
}

/// Build the shm backend for one group (every rank of the group calls this).
#[allow(clippy::too_many_arguments)] // one group's identity, its store, and the job's settings
pub fn connect(
    job: &str,
    gid: &str,
    rank: usize,
    size: usize,
    store: &StoreClient,
    timeout: Duration,
    config: &Config,
    abort: Arc<AtomicBool>,
) -> Result<Box<dyn Backend>> {
    let r = connect_inner(job, gid, rank, size, store, timeout, config, abort);
    if r.is_err() {
        // A peer that died between creating its segment and unlinking it
        // would leave it behind: remove every name of the group (unlinking
        // a name that is already gone is harmless; the group failed anyway).
        for p in 0..size {
            if let Ok(n) = CString::new(segment_name(job, gid, p)) {
                // SAFETY: valid C string.
                unsafe { libc::shm_unlink(n.as_ptr()) };
            }
        }
    }
    r
}

fn segment_name(job: &str, gid: &str, rank: usize) -> String {
    let clean = |s: &str| -> String { s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '_' { c } else { '_' }).collect() };
    format!("/flatshard-{}-{}-{rank}", clean(job), clean(gid))
}

#[allow(clippy::too_many_arguments)] // as `connect`
fn connect_inner(
    job: &str,
    gid: &str,
    rank: usize,
    size: usize,
    store: &StoreClient,
    timeout: Duration,
    config: &Config,
    abort: Arc<AtomicBool>,
) -> Result<Box<dyn Backend>> {
    let what = format!("rank {rank}: shared-memory setup of group {gid}");
    let w = Wait::new(timeout, &abort, &what);
    // Range-checked by config, and equal on every rank (compared at rendezvous).
    let slot_bytes = config.shm_chunk & !63;
    if size * 64 > slot_bytes {
        // reduce_scatter gives every rank a piece of the slot
        return Err(Error::invalid_arg(format!(
            "FLATSHARD_SHM_CHUNK: {slot_bytes} bytes is too small for {size} ranks (need at least {}); raise it or use FLATSHARD_TRANSPORT_TCP",
            size * 64
        )));
    }
    let small_bytes = config.shm_small.min(slot_bytes);
    let seg_len = HDR_BYTES + NSLOTS * slot_bytes;
    let name_of = |r: usize| segment_name(job, gid, r);
    let own_name = name_of(rank);
    if own_name.len() > 250 {
        return Err(Error::invalid_arg(format!("group {gid}: shared-memory name '{own_name}' exceeds 250 characters (too deeply nested splits)")));
    }
    let cname = CString::new(own_name.clone()).map_err(|_| Error::internal("shm name with NUL"))?;
    let own = map_segment(&cname, seg_len, true).map_err(|e| e.context(&what))?;
    let mut guard = NameGuard { name: Some(cname) };
    let ns = pid_namespace();
    own.write_u64(H_RANK, rank as u64);
    own.write_u64(H_SIZE, size as u64);
    own.write_u64(H_PID, std::process::id() as u64);
    own.write_u64(H_SLOT, slot_bytes as u64);
    own.write_u64(H_PIDNS, ns);
    own.write_u64(H_MAGIC, MAGIC);
    std::sync::atomic::fence(Ordering::SeqCst);
    store.set(&format!("{gid}/shm/ready/{rank}"), own_name.as_bytes(), &w)?;

    let mut segs: Vec<Option<Seg>> = (0..size).map(|_| None).collect();
    let mut pids = vec![0i32; size];
    for p in (0..size).filter(|p| *p != rank) {
        let v = store.get(&format!("{gid}/shm/ready/{p}"), &w)?;
        let name = String::from_utf8_lossy(&v).into_owned();
        if name != name_of(p) {
            return Err(Error::peer_lost(format!("{what}: rank {p} published segment '{name}', expected '{}'", name_of(p))));
        }
        let cn = CString::new(name.clone()).map_err(|_| Error::internal("shm name with NUL"))?;
        let seg = map_segment(&cn, HDR_BYTES, false).map_err(|e| {
            e.context(format!("{what}: cannot map rank {p}'s segment (is it in another IPC namespace / container? use FLATSHARD_TRANSPORT_TCP)"))
        })?;
        let (m, r, s, slot) = (seg.read_u64(H_MAGIC), seg.read_u64(H_RANK), seg.read_u64(H_SIZE), seg.read_u64(H_SLOT));
        if m != MAGIC || r != p as u64 || s != size as u64 {
            return Err(Error::peer_lost(format!("{what}: rank {p}'s segment header is not a flatshard segment for rank {p} of {size}")));
        }
        if slot != slot_bytes as u64 {
            return Err(Error::invalid_arg(format!(
                "{what}: FLATSHARD_SHM_CHUNK differs: rank {p} uses {slot} bytes, this rank {slot_bytes}; set it alike on every rank"
            )));
        }
        let pid = seg.read_u64(H_PID) as i32;
        pids[p] = if ns != 0 && seg.read_u64(H_PIDNS) == ns { pid } else { 0 };
        drop(seg);
        segs[p] = Some(map_segment(&cn, seg_len, false).map_err(|e| e.context(&what))?);
    }
    segs[rank] = Some(own);
    // Unlink our name once every peer holds a mapping.
    store.set(&format!("{gid}/shm/mapped/{rank}"), b"1", &w)?;
    for p in (0..size).filter(|p| *p != rank) {
        store.get(&format!("{gid}/shm/mapped/{p}"), &w)?;
    }
    guard.unlink();
    let segs: Vec<Seg> = segs.into_iter().map(|s| s.ok_or_else(|| Error::internal("shm: segment missing"))).collect::<Result<_>>()?;
    let ncpu = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let oversubscribed = size > ncpu;
    let spin_us = config.shm_spin_us.unwrap_or(if oversubscribed { 2 } else { 50 });
    Ok(Box::new(ShmBackend {
        rank,
        size,
        segs,
        pids,
        abort,
        timeout,
        slot_bytes,
        small_bytes,
        stream_min: config.shm_stream_min,
        spin: Duration::from_micros(spin_us as u64),
        yields: if oversubscribed { 8 } else { 2 },
        blame: AtomicU32::new(DEAD_SELF),
        state: Mutex::new(State { phase: 0, gen: 0 }),
    }))
}

#[inline]
fn reached(v: u32, target: u32) -> bool {
    (v.wrapping_sub(target) as i32) >= 0
}

use super::backend::chunk_range as part;

/// all_reduce reduces our slice in pieces of this many bytes, each copied to
/// the caller's buffer while it is still in cache.
const OWN_PIECE: usize = 32 << 10;

// Results of FLATSHARD_SHM_STREAM_MIN bytes or more (default in config.rs)
// are written with non-temporal stores: they do not fit in the last-level
// cache anyway, and streaming them skips the read-for-ownership of every
// destination line.

/// Copy out of a slot into the caller's buffer, streaming if `stream`.
///
/// # Safety
/// As `copy`.
#[inline]
unsafe fn copy_out(src: *const u8, dst: *mut u8, len: usize, stream: bool) {
    // SAFETY: our contract (src readable and dst writable for len bytes, not
    // overlapping) is both copies'.
    unsafe {
        if stream {
            memcopy::copy_stream(src, dst, len)
        } else {
            memcopy::copy(src, dst, len)
        }
    }
}

impl ShmBackend {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot_ptr(&self, p: usize, slot: usize) -> *mut u8 {
        self.segs[p].slot(slot, self.slot_bytes)
    }

    fn lost(&self, p: usize, msg: String) -> Error {
        self.blame.store(p as u32 + 1, Ordering::Relaxed);
        Error::peer_lost(msg)
    }

    /// Why peer `p` can no longer make progress, if it cannot.
    fn peer_gone(&self, p: usize, what: &str) -> Option<Error> {
        let d = self.segs[p].dead().load(Ordering::SeqCst);
        if d != 0 {
            // d = 1 + the rank p blamed, or DEAD_SELF
            let q = (d as usize).wrapping_sub(1);
            let (blamed, msg) = if d == DEAD_SELF || q >= self.size || q == self.rank {
                (p, format!("{what}: rank {p} left the group (it aborted or freed its communicator)"))
            } else {
                (q, format!("{what}: rank {p} gave up after losing rank {q}; rank {q} is lost"))
            };
            return Some(self.lost(blamed, msg));
        }
        let pid = self.pids[p];
        if pid > 0 && !pid_alive(pid) {
            return Some(self.lost(p, format!("{what}: rank {p} (pid {pid}) died")));
        }
        None
    }

    /// Wait until peer `p`'s flag reaches `target`.
    fn wait_peer(&self, p: usize, target: u32, w: &Wait) -> Result<()> {
        let seg = &self.segs[p];
        let f = seg.flag();
        if reached(f.load(Ordering::Acquire), target) {
            return Ok(());
        }
        // SAFETY: no arguments (vDSO on Linux).
        let my_cpu = unsafe { libc::sched_getcpu() } as u32;
        let spin = if seg.cpu().load(Ordering::Relaxed) == my_cpu { Duration::ZERO } else { self.spin };
        let start = Instant::now();
        loop {
            for _ in 0..32 {
                std::hint::spin_loop();
            }
            if reached(f.load(Ordering::Acquire), target) {
                return Ok(());
            }
            if start.elapsed() >= spin {
                break;
            }
        }
        for _ in 0..self.yields {
            // SAFETY: no arguments.
            unsafe { libc::sched_yield() };
            if reached(f.load(Ordering::Acquire), target) {
                return Ok(());
            }
        }
        loop {
            let t = w.check()?;
            if let Some(e) = self.peer_gone(p, w.what) {
                // A rank that finished its last round and then left is fine.
                if reached(f.load(Ordering::SeqCst), target) {
                    return Ok(());
                }
                return Err(e);
            }
            seg.waiters().fetch_add(1, Ordering::SeqCst);
            let v = f.load(Ordering::SeqCst);
            if !reached(v, target) {
                futex_wait(f, v, t.min(ABORT_POLL.as_millis() as i32));
            }
            seg.waiters().fetch_sub(1, Ordering::SeqCst);
            if reached(f.load(Ordering::Acquire), target) {
                return Ok(());
            }
        }
    }

    /// Bump our flag to the next phase; returns its value.
    fn signal(&self, st: &mut State) -> u32 {
        st.phase = st.phase.wrapping_add(1);
        let own = &self.segs[self.rank];
        // SAFETY: no arguments.
        own.cpu().store(unsafe { libc::sched_getcpu() } as u32, Ordering::Relaxed);
        own.flag().store(st.phase, Ordering::SeqCst);
        if own.waiters().load(Ordering::SeqCst) > 0 {
            futex_wake(own.flag());
        }
        st.phase
    }

    /// Wait until every peer's flag reached `target`.
    fn meet(&self, target: u32, w: &Wait) -> Result<()> {
        for k in 1..self.size {
            self.wait_peer((self.rank + k) % self.size, target, w)?;
        }
        Ok(())
    }

    /// Start a round: write the descriptor (if any) and `fill` our slot, then
    /// signal. Returns (slot, round number, phase to meet).
    fn publish(&self, st: &mut State, desc: Option<&OpDesc>, fill: impl FnOnce(*mut u8)) -> (usize, u32, u32) {
        let slot = (st.gen % NSLOTS as u32) as usize;
        let gen = st.gen;
        st.gen = st.gen.wrapping_add(1);
        if let Some(d) = desc {
            let h = d.encode(gen, 0);
            // SAFETY: 32 bytes into our own descriptor line; peers read it only
            // after our flag store in `signal`.
            unsafe { copy(h.as_ptr(), self.segs[self.rank].desc(slot), 32) };
        }
        fill(self.slot_ptr(self.rank, slot));
        (slot, gen, self.signal(st))
    }

    /// Compare every peer's descriptor of round `gen` with ours (after `meet`).
    fn check_descs(&self, slot: usize, gen: u32, d: &OpDesc, w: &Wait) -> Result<()> {
        let mut bad = Vec::new();
        for p in (0..self.size).filter(|p| *p != self.rank) {
            let mut h = [0u8; 32];
            // SAFETY: peer's descriptor line, published before its flag.
            unsafe { copy(self.segs[p].desc(slot), h.as_mut_ptr(), 32) };
            let (theirs, _) = OpDesc::decode_in_step(&h, gen).map_err(|e| self.lost(p, format!("{}: rank {p} {}", w.what, e.msg)))?;
            if theirs != *d {
                bad.push(format!("rank {p} called {}", theirs.describe()));
            }
        }
        if !bad.is_empty() {
            return Err(Error::mismatch(format!(
                "rank {}: ranks disagree on the collective: this rank called {}; {}",
                self.rank,
                d.describe(),
                bad.join("; ")
            )));
        }
        Ok(())
    }

    /// One round: `fill` writes our slot, then we meet every peer. With a
    /// descriptor (first round of a call), check every peer's against ours.
    /// Returns the slot index of the round.
    fn round(&self, st: &mut State, desc: Option<&OpDesc>, w: &Wait, fill: impl FnOnce(*mut u8)) -> Result<usize> {
        let (slot, gen, t) = self.publish(st, desc, fill);
        self.meet(t, w)?;
        if let Some(d) = desc {
            self.check_descs(slot, gen, d, w)?;
        }
        Ok(slot)
    }

    fn wait<'a>(&'a self, what: &'a str) -> Wait<'a> {
        Wait::new(self.timeout, &self.abort, what)
    }
}

impl Backend for ShmBackend {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn transport_name(&self) -> &'static str {
        "shm"
    }

    fn all_reduce(&self, buf: &mut [u8], dt: DType, op: ReduceOp) -> Result<()> {
        let (n, r, es) = (self.size, self.rank, dt.size());
        let nb = buf.len();
        let desc = OpDesc::new(OpKind::AllReduce, (nb / es) as u64, dt, op, -1);
        let w = self.wait("all_reduce");
        let mut st = self.lock();
        let bp = buf.as_mut_ptr();
        if nb <= self.small_bytes {
            // SAFETY: nb <= small_bytes <= slot_bytes; buf is ours.
            let slot = self.round(&mut st, Some(&desc), &w, |dst| unsafe { copy(bp, dst, nb) })?;
            let srcs: Vec<*const u8> = (0..n).map(|p| self.slot_ptr(p, slot) as *const u8).collect();
            // SAFETY: every slot holds nb bytes of this round, published by its flag.
            unsafe { reduce::reduce_n_raw(bp, &srcs, nb / es, dt, op, 0.0) };
            return Ok(());
        }
        let per_round = (self.slot_bytes / es) * es;
        let stream = nb >= self.stream_min;
        let mut srcs: Vec<*const u8> = vec![std::ptr::null(); n];
        let mut piece = srcs.clone();
        // Round k: copy in (all but our slice), meet, reduce our slice into our slot, signal, then
        // (lookahead) copy in and signal round k+1 before meeting the peers'
        // reduced slices of round k and copying them out. Three slots make the
        // early copy-in safe: it overwrites round k-2, which every peer
        // finished copying out before it signalled its reduce of round k-1.
        // Our own slice of a chunk is never read from our slot (peers reduce
        // their slices; we reduce ours straight from buf), so only the rest
        // is copied in: (n-1)/n of the chunk.
        let fill_at = |off: usize| {
            let len = per_round.min(nb - off);
            let (so, sl) = part(len / es, n, r, es);
            // SAFETY: len <= slot_bytes, within buf; [0, so) and [so + sl, len) of the chunk.
            move |dst: *mut u8| unsafe {
                copy(bp.add(off), dst, so);
                copy(bp.add(off + so + sl), dst.add(so + sl), len - so - sl);
            }
        };
        let (mut slot, gen, t) = self.publish(&mut st, Some(&desc), fill_at(0));
        self.meet(t, &w)?;
        self.check_descs(slot, gen, &desc, &w)?;
        let mut off = 0;
        loop {
            let len = per_round.min(nb - off);
            let ne = len / es;
            let (so, sl) = part(ne, n, r, es);
            for (p, s) in srcs.iter_mut().enumerate() {
                // SAFETY: within slot p of this round, or our own slice of buf.
                *s = if p == r { unsafe { bp.add(off + so) } } else { unsafe { self.slot_ptr(p, slot).add(so) } };
            }
            // Reduce our slice into our slot in cache-sized pieces, each
            // copied into our buf while it is still in L1/L2 (then the
            // copy-out below skips our slice).
            // SAFETY: our slice of every slot and of buf; we write only our
            // own slot's slice, which no peer reads before our next signal,
            // and pieces of our buf slice that are already reduced.
            unsafe {
                let mine = self.slot_ptr(r, slot).add(so);
                let mut x = 0;
                while x < sl {
                    let k = (sl - x).min(OWN_PIECE / es * es);
                    for (d, p) in piece.iter_mut().zip(&srcs) {
                        *d = p.add(x);
                    }
                    reduce::reduce_n_raw(mine.add(x), &piece, k / es, dt, op, 0.0);
                    copy_out(mine.add(x), bp.add(off + so + x), k, stream);
                    x += k;
                }
            }
            let reduced = self.signal(&mut st);
            let next = (off + len < nb).then(|| self.publish(&mut st, None, fill_at(off + len)));
            self.meet(reduced, &w)?;
            for p in (0..n).filter(|p| *p != r) {
                let (po, pl) = part(ne, n, p, es);
                // SAFETY: rank p's reduced slice, published by its signal.
                unsafe { copy_out(self.slot_ptr(p, slot).add(po), bp.add(off + po), pl, stream) };
            }
            match next {
                None => return Ok(()),
                Some((s2, _, t2)) => {
                    self.meet(t2, &w)?;
                    slot = s2;
                    off += len;
                }
            }
        }
    }

    fn all_gather(&self, send: &[u8], recv: &mut [u8], dt: DType) -> Result<()> {
        let (n, r) = (self.size, self.rank);
        let cb = send.len();
        let desc = OpDesc::new(OpKind::AllGather, (cb / dt.size()) as u64, dt, ReduceOp::Sum, -1);
        let w = self.wait("all_gather");
        let mut st = self.lock();
        let (sp, rp) = (send.as_ptr(), recv.as_mut_ptr());
        let stream = recv.len() >= self.stream_min;
        let mut off = 0;
        loop {
            let len = self.slot_bytes.min(cb - off);
            let d = (off == 0).then_some(&desc);
            // Our piece goes to our slot and our own block of recv in one pass.
            // SAFETY: len <= slot_bytes, within send; block r of recv.
            let slot = self.round(&mut st, d, &w, |dst| unsafe { memcopy::copy2(sp.add(off), dst, rp.add(r * cb + off), len, stream) })?;
            for p in (0..n).filter(|p| *p != r) {
                let src = self.slot_ptr(p, slot) as *const u8;
                // SAFETY: block p of recv (recv.len() == n * cb).
                unsafe { copy_out(src, rp.add(p * cb + off), len, stream) };
            }
            off += len;
            if off >= cb {
                return Ok(());
            }
        }
    }

    fn reduce_scatter(&self, send: &[u8], recv: &mut [u8], dt: DType, op: ReduceOp) -> Result<()> {
        let (n, r, es) = (self.size, self.rank, dt.size());
        let cb = recv.len();
        let desc = OpDesc::new(OpKind::ReduceScatter, (cb / es) as u64, dt, op, -1);
        let w = self.wait("reduce_scatter");
        let mut st = self.lock();
        let (sp, rp) = (send.as_ptr(), recv.as_mut_ptr());
        let piece = (self.slot_bytes / n / es) * es;
        let mut srcs: Vec<*const u8> = vec![std::ptr::null(); n];
        let mut off = 0;
        loop {
            let len = piece.min(cb - off);
            let d = (off == 0).then_some(&desc);
            let fill = |dst: *mut u8| {
                for q in (0..n).filter(|q| *q != r) {
                    // SAFETY: block q of send (send.len() == n * cb); n * len <= slot_bytes.
                    unsafe { copy(sp.add(q * cb + off), dst.add(q * len), len) };
                }
            };
            let slot = self.round(&mut st, d, &w, fill)?;
            for (p, s) in srcs.iter_mut().enumerate() {
                // SAFETY: piece r of rank p's slot, or our own send block.
                *s = if p == r { unsafe { sp.add(r * cb + off) } } else { unsafe { self.slot_ptr(p, slot).add(r * len) } };
            }
            // SAFETY: len bytes of recv at off.
            unsafe { reduce::reduce_n_raw(rp.add(off), &srcs, len / es, dt, op, 0.0) };
            off += len;
            if off >= cb {
                return Ok(());
            }
        }
    }

    fn broadcast(&self, buf: &mut [u8], dt: DType, root: usize) -> Result<()> {
        let nb = buf.len();
        let desc = OpDesc::new(OpKind::Broadcast, (nb / dt.size()) as u64, dt, ReduceOp::Sum, root as i32);
        let w = self.wait("broadcast");
        let mut st = self.lock();
        let bp = buf.as_mut_ptr();
        let me_root = self.rank == root;
        let mut off = 0;
        loop {
            let len = self.slot_bytes.min(nb - off);
            let d = (off == 0).then_some(&desc);
            let slot = self.round(&mut st, d, &w, |dst| {
                if me_root {
                    // SAFETY: len <= slot_bytes, within buf.
                    unsafe { copy(bp.add(off), dst, len) };
                }
            })?;
            if !me_root {
                // SAFETY: root's slot holds this piece.
                unsafe { copy_out(self.slot_ptr(root, slot), bp.add(off), len, nb >= self.stream_min) };
            }
            off += len;
            if off >= nb {
                return Ok(());
            }
        }
    }

    fn barrier(&self) -> Result<()> {
        let desc = OpDesc::new(OpKind::Barrier, 0, DType::U8, ReduceOp::Sum, -1);
        let w = self.wait("barrier");
        let mut st = self.lock();
        self.round(&mut st, Some(&desc), &w, |_| {}).map(|_| ())
    }

    fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
        let own = &self.segs[self.rank];
        own.dead().store(self.blame.load(Ordering::Relaxed), Ordering::SeqCst);
        // Wake peers sleeping on us (they then see `dead`) and our own
        // threads sleeping on peers (they then see the abort flag).
        for s in &self.segs {
            futex_wake(s.flag());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{on_threads, shm_backends};
    use super::*;
    use crate::error::ErrorKind;

    fn job(name: &str) -> String {
        format!("unit-{name}-{}", std::process::id())
    }

    /// The shared-memory protocol between threads: one-shot (small) and
    /// chunked (large, several rounds through the slots) paths of every
    /// collective, with a chunk small enough that 40,000 floats take many
    /// rounds; results checked against the definition.
    #[test]
    fn collectives_between_threads_small_and_chunked() {
        let config = Config { shm_chunk: 64 << 10, shm_small: 4000, ..Config::default() };
        let out = on_threads(shm_backends(3, &job("coll"), &config), |r, b: Box<dyn Backend>| {
            let w = 3usize;
            for n in [10usize, 40_000] {
                let mut v: Vec<u8> = (0..n).flat_map(|i| ((i % 97 + r) as f32).to_ne_bytes()).collect();
                b.all_reduce(&mut v, DType::F32, ReduceOp::Sum).unwrap();
                for (i, c) in v.chunks_exact(4).enumerate() {
                    assert_eq!(f32::from_ne_bytes(c.try_into().unwrap()), (3 * (i % 97) + 3) as f32, "rank {r} n {n} elem {i}");
                }
                let send: Vec<u8> = (0..n).flat_map(|i| ((i + 1000 * r) as f32).to_ne_bytes()).collect();
                let mut all = vec![0u8; send.len() * w];
                b.all_gather(&send, &mut all, DType::F32).unwrap();
                for p in 0..w {
                    let got = &all[p * send.len()..(p + 1) * send.len()];
                    let want: Vec<u8> = (0..n).flat_map(|i| ((i + 1000 * p) as f32).to_ne_bytes()).collect();
                    assert!(got == want, "rank {r} n {n}: block {p}");
                }
                let big: Vec<u8> = (0..n * w).flat_map(|i| ((i % 13) as f32).to_ne_bytes()).collect();
                let mut mine = vec![0u8; n * 4];
                b.reduce_scatter(&big, &mut mine, DType::F32, ReduceOp::Max).unwrap();
                for (i, c) in mine.chunks_exact(4).enumerate() {
                    assert_eq!(f32::from_ne_bytes(c.try_into().unwrap()), ((r * n + i) % 13) as f32);
                }
                let mut bc = if r == 2 { send.clone() } else { vec![0u8; send.len()] };
                b.broadcast(&mut bc, DType::F32, 2).unwrap();
                let want: Vec<u8> = (0..n).flat_map(|i| ((i + 2000) as f32).to_ne_bytes()).collect();
                assert!(bc == want, "rank {r} n {n}: broadcast");
            }
            b.barrier().unwrap();
            r
        });
        assert_eq!(out, vec![0, 1, 2]);
    }

    /// Ranks that call different collectives get MISMATCH (nothing moved)
    /// and the group goes on; a rank that frees its side makes the others'
    /// next call PEER_LOST, naming it.
    #[test]
    fn mismatch_then_peer_gone() {
        let config = Config::default();
        let out = on_threads(shm_backends(2, &job("mm"), &config), |r, b: Box<dyn Backend>| {
            let mut v = vec![0u8; 40];
            let e = if r == 0 { b.all_reduce(&mut v, DType::F32, ReduceOp::Sum) } else { b.broadcast(&mut v, DType::F32, 0) }.unwrap_err();
            assert_eq!(e.kind, ErrorKind::Mismatch, "rank {r}: {e}");
            b.barrier().unwrap();
            if r == 1 {
                // What freeing its communicator does (Comm's Drop).
                b.abort();
                drop(b);
                return None;
            }
            let e = b.all_reduce(&mut v, DType::F32, ReduceOp::Sum).unwrap_err();
            Some((e.kind, e.msg))
        });
        let (kind, msg) = out[0].clone().unwrap();
        assert_eq!(kind, ErrorKind::PeerLost, "{msg}");
        assert!(msg.contains("rank 1"), "{msg}");
    }
}
