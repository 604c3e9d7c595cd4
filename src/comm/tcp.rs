//! The TCP transport: a full mesh of authenticated connections per group.
//!
//! Every collective starts with a 32-byte header to every peer (what it is,
//! count, dtype, op, root, and the length of an optional payload). Each rank
//! compares every peer's header with its own, so all ranks see the same
//! disagreement and return MISMATCH together, and payloads of a different
//! length are drained, never stored, so the streams stay in step.
//!
//! Small messages ride in the header exchange (one hop: every rank reduces the
//! peers' buffers itself, in rank order, so results are bit-identical).
//! Large ones run a ring: reduce-scatter then all-gather as one continuous
//! stream, where each outgoing segment is released as soon as the bytes it
//! depends on have been received (and reduced), so sending, receiving and
//! reducing overlap across ring steps.

use super::backend::chunk_range;
use super::net::{self, Wait};
use super::{Backend, OpDesc, OpKind};
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use crate::reduce;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Payloads up to this many bytes per peer go in the header exchange.
pub(crate) const SMALL_BYTES: usize = 32 << 10;
/// Receive window for data that must be reduced before it can be forwarded.
const TMP_BYTES: usize = 4 << 20;
/// Reduce as soon as this many received bytes are waiting.
const REDUCE_GRAIN: usize = 256 << 10;

/// SO_SNDBUF and SO_RCVBUF for connections to a peer on this host (the
/// kernel doubles it). Over loopback the sender's copy into the socket and
/// the receiver's copy out of it are most of the cost; with kernel
/// autotuning the buffers grow to several MiB and the data leaves the cache
/// between the two copies. Fixed 512 KiB buffers made a 4-rank 256 MiB
/// all_reduce on 2 cores 11–17% faster (A/B, same minutes; 1.5 MiB and
/// more were slower at 2 ranks). Peers on other hosts keep autotuning,
/// which a network's bandwidth-delay product needs. The kernel caps the
/// value at net.core.wmem_max / rmem_max (212992 on a stock kernel, about
/// the 256 KiB that was best in a bare C loopback test).
pub(crate) const LOCAL_SOCKBUF: usize = 512 << 10;
// FLATSHARD_TCP_SOCKBUF is range-checked by config.rs: at least 16 KiB
// (with a few KiB every window update waits for a delayed ACK and a transfer
// crawls), at most 1 GiB (the kernel caps it further at net.core.wmem_max /
// rmem_max).
use crate::config::TCP_SOCKBUF_MAX as MAX_SOCKBUF;
const HDR: usize = 32;

/// A peer's data listener, and the socket buffer size for the connection
/// to it (None: kernel autotuning).
pub struct Peer {
    pub addr: std::net::SocketAddr,
    pub sockbuf: Option<usize>,
}

pub struct TcpBackend {
    rank: usize,
    size: usize,
    peers: Vec<Option<TcpStream>>,
    abort: Arc<AtomicBool>,
    timeout: Duration,
    seq: AtomicU32,
    /// Serialises collectives on this communicator and holds reusable scratch.
    scratch: Mutex<Vec<u8>>,
}

impl TcpBackend {
    /// Build the mesh: connect to every lower rank, accept every higher one.
    /// `peers[r]` is rank r's data listener; `ident` names job + group.
    #[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
    pub fn connect(
        rank: usize,
        size: usize,
        listener: TcpListener,
        peers_at: &[Peer],
        key: &[u8],
        ident: &str,
        timeout: Duration,
        abort: Arc<AtomicBool>,
    ) -> Result<TcpBackend> {
        let what = format!("rank {rank}: connecting group {ident}");
        let w = Wait::new(timeout, &abort, &what);
        let mut peers: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
        for (j, p) in peers_at.iter().enumerate().take(rank) {
            let addr = p.addr;
            let mut s = net::connect_retry(addr, &w)?;
            super::auth::connect(&mut s, key, &format!("data {ident} {rank}"), &w, &format!("rank {j} at {addr}"))?;
            set_sockbuf(&s, p.sockbuf, j)?;
            peers[j] = Some(s);
        }
        let mut missing = size - rank - 1;
        while missing > 0 {
            let mut s = net::accept(&listener, &w).map_err(|e| {
                let want: Vec<usize> = (rank + 1..size).filter(|j| peers[*j].is_none()).collect();
                e.context(format!("ranks {want:?} never connected"))
            })?;
            // A peer that does not finish the handshake quickly is an intruder.
            let hs = Wait { deadline: w.deadline.min(std::time::Instant::now() + Duration::from_secs(5)), ..w };
            let mut who = None;
            let res = super::auth::serve(&mut s, key, &hs, &mut |id: &str| {
                let Some(r) = id.strip_prefix(&format!("data {ident} ")) else {
                    return false;
                };
                match r.parse::<usize>() {
                    Ok(j) if j > rank && j < size && peers[j].is_none() => {
                        who = Some(j);
                        true
                    }
                    _ => false,
                }
            });
            match (res, who) {
                (Ok(_), Some(j)) => {
                    set_sockbuf(&s, peers_at[j].sockbuf, j)?;
                    peers[j] = Some(s);
                    missing -= 1;
                }
                (Err(e), _) => crate::log::warn(rank, &format!("refused a data connection: {}", e.msg)),
                _ => {}
            }
        }
        drop(listener); // nobody else may join this group
        Ok(TcpBackend { rank, size, peers, abort, timeout, seq: AtomicU32::new(0), scratch: Mutex::new(Vec::new()) })
    }

    fn fd(&self, peer: usize) -> i32 {
        self.peers[peer].as_ref().map(|s| s.as_raw_fd()).unwrap_or(-1)
    }

    fn wait<'a>(&'a self, what: &'a str) -> Wait<'a> {
        Wait::new(self.timeout, &self.abort, what)
    }

    /// Header exchange with every peer, optionally carrying payloads.
    /// `send(p)`: bytes for peer p. `slot(p)`: where p's payload goes and its
    /// expected length. Returns Err(MISMATCH) if any header differs.
    fn exchange(&self, desc: &OpDesc, send: &dyn Fn(usize) -> (*const u8, usize), slot: &dyn Fn(usize) -> (*mut u8, usize), what: &str) -> Result<()> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let w = self.wait(what);
        let mut peers: Vec<PeerXfer> =
            (0..self.size).filter(|p| *p != self.rank).map(|p| PeerXfer::new(p, self.fd(p), desc.encode(seq, send(p).1 as u64), send(p), slot(p))).collect();
        let mut mismatch: Vec<String> = Vec::new();
        let mut drain = [0u8; 16 << 10];
        let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(peers.len());
        loop {
            let mut progress = false;
            for p in peers.iter_mut() {
                progress |= p.pump_send(what)?;
                progress |= p.pump_recv(desc, seq, what, &mut mismatch, &mut drain)?;
            }
            if peers.iter().all(PeerXfer::done) {
                break;
            }
            if !progress {
                let t = w.check()?;
                pfds.clear();
                pfds.extend(peers.iter().map(|p| libc::pollfd { fd: p.fd, events: p.events(), revents: 0 }));
                sys_poll(&mut pfds, t)?;
            }
        }
        if !mismatch.is_empty() {
            return Err(Error::mismatch(format!(
                "rank {}: ranks disagree on the collective: this rank called {}; {}",
                self.rank,
                desc.describe(),
                mismatch.join("; ")
            )));
        }
        Ok(())
    }

    /// Run a ring plan: send its segments to the next rank and receive its
    /// segments from the previous one, both in order, releasing each send
    /// segment as its gate allows (see `RingPlan`).
    fn stream(&self, plan: &RingPlan, dt: DType, op: ReduceOp, tmp: &mut [u8], what: &str) -> Result<()> {
        let (next, prev) = self.ring();
        let w = self.wait(what);
        let mut run = RingRun {
            plan,
            next,
            prev,
            nfd: self.fd(next),
            pfd: self.fd(prev),
            dt,
            op,
            tmp: tmp.as_mut_ptr(),
            cap: tmp.len(),
            send: SendCursor::default(),
            recv: RecvCursor::default(),
            room: 0,
            what,
        };
        loop {
            let progress = run.pump_send()? | run.pump_recv()?;
            if run.finished() {
                return Ok(());
            }
            if !progress {
                run.poll(w.check()?)?;
            }
        }
    }

    fn scratch(&self, len: usize) -> Result<std::sync::MutexGuard<'_, Vec<u8>>> {
        let mut g = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() < len {
            g.clear();
            g.try_reserve_exact(len).map_err(|_| Error::oom(format!("cannot allocate {len} bytes of scratch")))?;
            g.resize(len, 0);
        }
        Ok(g)
    }

    fn ring(&self) -> (usize, usize) {
        ((self.rank + 1) % self.size, (self.rank + self.size - 1) % self.size)
    }
}

/// One peer's side of a header exchange: our header and payload going out,
/// its header and payload coming in (or drained, when its header differs).
struct PeerXfer {
    peer: usize,
    fd: i32,
    hdr_out: [u8; HDR],
    body: (*const u8, usize),
    /// Bytes of header + body sent.
    sent: usize,
    hdr_in: [u8; HDR],
    hdr_got: usize,
    dst: *mut u8,
    want: usize,
    /// Payload length the peer announced, and how much of it arrived.
    body_len: usize,
    body_got: usize,
    drain: bool,
}

impl PeerXfer {
    fn new(peer: usize, fd: i32, hdr_out: [u8; HDR], body: (*const u8, usize), slot: (*mut u8, usize)) -> PeerXfer {
        PeerXfer { peer, fd, hdr_out, body, sent: 0, hdr_in: [0; HDR], hdr_got: 0, dst: slot.0, want: slot.1, body_len: 0, body_got: 0, drain: false }
    }

    fn done(&self) -> bool {
        self.sent == HDR + self.body.1 && self.hdr_got == HDR && self.body_got == self.body_len
    }

    fn events(&self) -> i16 {
        let mut ev = 0;
        if self.sent < HDR + self.body.1 {
            ev |= libc::POLLOUT;
        }
        if self.hdr_got < HDR || self.body_got < self.body_len {
            ev |= libc::POLLIN;
        }
        ev
    }

    /// Send what the socket takes of header, then body.
    fn pump_send(&mut self, what: &str) -> Result<bool> {
        let total = HDR + self.body.1;
        let mut progress = false;
        while self.sent < total {
            let (ptr, len) = if self.sent < HDR {
                (self.hdr_out[self.sent..].as_ptr(), HDR - self.sent)
            } else {
                // SAFETY: the payload is `body.1` readable bytes (exchange's callers); sent - HDR < body.1.
                (unsafe { self.body.0.add(self.sent - HDR) }, total - self.sent)
            };
            match sys_send(self.fd, ptr, len) {
                Ok(k) => {
                    self.sent += k;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(lost(self.peer, what, &e)),
            }
        }
        Ok(progress)
    }

    /// Receive the peer's header, check it against ours (`desc`, call number
    /// `seq`), then its payload into `dst`, or drain it when the call differs.
    fn pump_recv(&mut self, desc: &OpDesc, seq: u32, what: &str, mismatch: &mut Vec<String>, drain: &mut [u8]) -> Result<bool> {
        let peer = self.peer;
        let mut progress = false;
        loop {
            let r = if self.hdr_got < HDR {
                sys_recv(self.fd, self.hdr_in[self.hdr_got..].as_mut_ptr(), HDR - self.hdr_got)
            } else if self.body_got < self.body_len {
                let left = self.body_len - self.body_got;
                if self.drain {
                    sys_recv(self.fd, drain.as_mut_ptr(), left.min(drain.len()))
                } else {
                    // SAFETY: not draining means body_len == want, and `dst` has `want`
                    // writable bytes (exchange's callers); body_got < body_len.
                    sys_recv(self.fd, unsafe { self.dst.add(self.body_got) }, left)
                }
            } else {
                return Ok(progress);
            };
            let k = match r {
                Ok(0) => return Err(closed(peer, what)),
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(progress),
                Err(e) => return Err(lost(peer, what, &e)),
            };
            progress = true;
            if self.hdr_got < HDR {
                self.hdr_got += k;
                if self.hdr_got == HDR {
                    let (theirs, len) = OpDesc::decode_in_step(&self.hdr_in, seq).map_err(|e| e.context(format!("{what}: rank {peer}")))?;
                    self.body_len = len as usize;
                    if theirs != *desc {
                        mismatch.push(format!("rank {peer} called {}", theirs.describe()));
                        self.drain = true;
                    } else if self.body_len != self.want {
                        mismatch.push(format!("rank {peer} sent {len} payload bytes, expected {}", self.want));
                        self.drain = true;
                    }
                }
            } else {
                self.body_got += k;
            }
        }
    }
}

// The ring schedules (a ring of w ranks; rank r sends to r+1 and receives
// from r-1; chunk c of a buffer is `chunk_range(n, w, c)`, so chunks differ
// by at most one element; all chunk indices are mod w):
//
// all_reduce = reduce-scatter then all-gather, as one stream of 2(w-1)
// steps. Reduce-scatter step s = 0..w-2: rank r sends chunk r-1-s and
// receives chunk r-2-s, which it reduces into its own copy. The chunk it
// sends at step s is the one it finished reducing at step s-1, so after w-1
// steps rank r holds chunk r reduced over all ranks:
//
//   w = 3, chunks a b c          step 0        step 1
//   rank 0 sends                 c (own)       b (own + rank 2's)
//   rank 1 sends                 a (own)       c (own + rank 0's)
//   rank 2 sends                 b (own)       a (own + rank 1's)
//   after step 1: rank 0 has a, rank 1 has b, rank 2 has c complete.
//
// All-gather step t = 0..w-2: rank r sends chunk r-t (complete) and receives
// chunk r-1-t into place. all_gather alone is that second half, with rank
// r's own block as chunk r; reduce_scatter alone is the first half, shifted
// so that rank r ends with block r in its receive buffer (partial sums
// travel through two ping-pong buffers instead of the caller's send buffer,
// which is read-only). broadcast is a chain root -> root+1 -> ... -> root-1.
//
// Pipelining: a step does not wait for the previous one to finish. Each send
// segment has a gate, the receive segment whose bytes it forwards: it may
// send as many bytes as that segment has completed (received, and reduced
// if it reduces). A receive segment that reduces into a buffer that an
// earlier send segment still reads waits for those bytes to go (`after_sent`).
// Reductions are done in grains (REDUCE_GRAIN) as data arrives, out of a
// receive window of TMP_BYTES, so sending, receiving and reducing overlap.

/// A ring plan: what to send to the next rank and receive from the previous
/// one, in order.
#[derive(Default)]
struct RingPlan {
    sends: Vec<SendSeg>,
    recvs: Vec<RecvSeg>,
}

struct SendSeg {
    ptr: *const u8,
    len: usize,
    /// Only bytes already done in this receive segment may be sent.
    gate: Option<usize>,
}

#[derive(Clone, Copy)]
enum RecvKind {
    Into(*mut u8),
    /// dst = local op received (dst may equal local).
    Reduce {
        dst: *mut u8,
        local: *const u8,
    },
}

struct RecvSeg {
    kind: RecvKind,
    len: usize,
    /// Do not overwrite dst before this send segment has sent those bytes.
    after_sent: Option<usize>,
}

impl RingPlan {
    /// In-place all_reduce of `n` elements of `es` bytes at `buf` on rank
    /// `r` of `w` (see the schedule above).
    fn all_reduce(buf: *mut u8, n: usize, w: usize, r: usize, es: usize) -> RingPlan {
        let at = |c: usize| {
            let (off, len) = chunk_range(n, w, c % w, es);
            (buf.wrapping_add(off), len)
        };
        let mut plan = RingPlan::default();
        // reduce-scatter: step s sends chunk r-1-s (gated on the receive of
        // step s-1, which reduced it) and reduces chunk r-2-s into place
        for s in 0..w - 1 {
            let (sp, sl) = at(r + 2 * w - s - 1);
            plan.sends.push(SendSeg { ptr: sp, len: sl, gate: s.checked_sub(1) });
            let (rp, rl) = at(r + 2 * w - s - 2);
            plan.recvs.push(RecvSeg { kind: RecvKind::Reduce { dst: rp, local: rp }, len: rl, after_sent: None });
        }
        // all-gather: step t sends chunk r-t, complete once receive segment
        // w-2+t is done (t = 0: our own chunk r, finished by the last
        // reduce-scatter step), and receives chunk r-1-t into place
        for t in 0..w - 1 {
            let k = w - 1 + t;
            let (sp, sl) = at(r + 2 * w - t);
            plan.sends.push(SendSeg { ptr: sp, len: sl, gate: Some(k - 1) });
            let (rp, rl) = at(r + 2 * w - t - 1);
            plan.recvs.push(RecvSeg { kind: RecvKind::Into(rp), len: rl, after_sent: None });
        }
        plan
    }

    /// all_gather of blocks of `cb` bytes into `recv` (rank r's own block
    /// already in place): step t sends block r-t, receives block r-1-t.
    fn all_gather(recv: *mut u8, cb: usize, w: usize, r: usize) -> RingPlan {
        let mut plan = RingPlan::default();
        for t in 0..w - 1 {
            let (sc, rc) = ((r + w - t) % w, (r + 2 * w - t - 1) % w);
            plan.sends.push(SendSeg { ptr: recv.wrapping_add(sc * cb), len: cb, gate: t.checked_sub(1) });
            plan.recvs.push(RecvSeg { kind: RecvKind::Into(recv.wrapping_add(rc * cb)), len: cb, after_sent: None });
        }
        plan
    }

    /// reduce_scatter of `w` blocks of `cb` bytes at `send` into `recv`:
    /// step s sends the partial sum of block r-1-s (the caller's block at
    /// s = 0, then the ping-pong buffer reduced at step s-1) and reduces
    /// block r-2-s, into a ping-pong buffer (`part(s)`) or, at the last step,
    /// into `recv` (block r, complete). A ping-pong buffer is reused two steps
    /// later, once the send that reads it has gone (`after_sent`).
    fn reduce_scatter(send: *const u8, recv: *mut u8, cb: usize, w: usize, r: usize, part: impl Fn(usize) -> *mut u8) -> RingPlan {
        let mut plan = RingPlan::default();
        for s in 0..w - 1 {
            let sptr = if s == 0 { send.wrapping_add(((r + w - 1) % w) * cb) } else { part(s - 1) as *const u8 };
            plan.sends.push(SendSeg { ptr: sptr, len: cb, gate: s.checked_sub(1) });
            let c = (r + 2 * w - s - 2) % w;
            let dst = if s == w - 2 { recv } else { part(s) };
            let after_sent = if s >= 2 { Some(s - 1) } else { None };
            plan.recvs.push(RecvSeg { kind: RecvKind::Reduce { dst, local: send.wrapping_add(c * cb) }, len: cb, after_sent });
        }
        plan
    }

    /// broadcast of `nb` bytes at `buf` down the chain from `root`: rank at
    /// position pos = r - root receives everything (unless it is the root)
    /// and forwards what it has received (unless it is the last).
    fn broadcast(buf: *mut u8, nb: usize, w: usize, r: usize, root: usize) -> RingPlan {
        let pos = (r + w - root) % w;
        let mut plan = RingPlan::default();
        if pos > 0 {
            plan.recvs.push(RecvSeg { kind: RecvKind::Into(buf), len: nb, after_sent: None });
        }
        if pos < w - 1 {
            plan.sends.push(SendSeg { ptr: buf, len: nb, gate: if pos > 0 { Some(0) } else { None } });
        }
        plan
    }
}

/// The sender's place in a plan: segment `seg`, `pos` bytes of it sent.
#[derive(Default, Clone, Copy)]
struct SendCursor {
    seg: usize,
    pos: usize,
}

impl SendCursor {
    /// Bytes of send segment `j` already sent (MAX once it is behind us).
    fn sent_of(&self, j: usize) -> usize {
        match self.seg.cmp(&j) {
            std::cmp::Ordering::Greater => usize::MAX,
            std::cmp::Ordering::Equal => self.pos,
            std::cmp::Ordering::Less => 0,
        }
    }
}

/// The receiver's place in a plan: segment `seg`, `got` bytes of it
/// received, `done` of them finished (received in place, or reduced).
#[derive(Default, Clone, Copy)]
struct RecvCursor {
    seg: usize,
    got: usize,
    done: usize,
}

/// One run of a ring plan.
struct RingRun<'a> {
    plan: &'a RingPlan,
    next: usize,
    prev: usize,
    nfd: i32,
    pfd: i32,
    dt: DType,
    op: ReduceOp,
    /// Receive window for bytes that are reduced before they are used.
    tmp: *mut u8,
    cap: usize,
    send: SendCursor,
    recv: RecvCursor,
    /// Bytes the last receive attempt had room for (0: waiting on a gate).
    room: usize,
    what: &'a str,
}

impl RingRun<'_> {
    fn finished(&self) -> bool {
        self.send.seg == self.plan.sends.len() && self.recv.seg == self.plan.recvs.len()
    }

    /// Bytes of the current send segment its gate releases now.
    fn sendable(&self) -> usize {
        let s = &self.plan.sends[self.send.seg];
        match s.gate {
            None => s.len,
            Some(g) if self.recv.seg > g => s.len,
            Some(g) if self.recv.seg == g => self.recv.done.min(s.len),
            Some(_) => 0,
        }
    }

    fn pump_send(&mut self) -> Result<bool> {
        let mut progress = false;
        while self.send.seg < self.plan.sends.len() {
            let s = &self.plan.sends[self.send.seg];
            let a = self.sendable();
            if self.send.pos < a {
                // SAFETY: the segment is `len` readable bytes (the plan's buffers
                // outlive the run); pos < a <= len.
                match sys_send(self.nfd, unsafe { s.ptr.add(self.send.pos) }, a - self.send.pos) {
                    Ok(k) => {
                        self.send.pos += k;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(lost(self.next, self.what, &e)),
                }
            }
            if self.send.pos == s.len {
                self.send = SendCursor { seg: self.send.seg + 1, pos: 0 };
                continue;
            }
            break;
        }
        Ok(progress)
    }

    fn pump_recv(&mut self) -> Result<bool> {
        let (es, cap) = (self.dt.size(), self.cap);
        let mut progress = false;
        self.room = 0;
        while self.recv.seg < self.plan.recvs.len() {
            let r = &self.plan.recvs[self.recv.seg];
            let RecvCursor { got, done, .. } = self.recv;
            if done == r.len {
                self.recv = RecvCursor { seg: self.recv.seg + 1, got: 0, done: 0 };
                progress = true;
                continue;
            }
            let (mut moved, mut eagain) = (false, false);
            // SAFETY (both arms): `dst` has `len` writable bytes and got < len;
            // the window offset got % cap is inside `tmp` (cap bytes).
            let (ptr, room) = match r.kind {
                // SAFETY: as above (got < len).
                RecvKind::Into(dst) => (unsafe { dst.add(got) }, r.len - got),
                RecvKind::Reduce { .. } => {
                    let off = got % cap;
                    // never overwrite window bytes not yet reduced
                    // SAFETY: as above (off < cap).
                    (unsafe { self.tmp.add(off) }, (r.len - got).min(cap - off).min(done + cap - got))
                }
            };
            self.room = room;
            if room > 0 {
                match sys_recv(self.pfd, ptr, room) {
                    Ok(0) => return Err(closed(self.prev, self.what)),
                    Ok(k) => {
                        self.recv.got += k;
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => eagain = true,
                    Err(e) => return Err(lost(self.prev, self.what, &e)),
                }
            }
            let got = self.recv.got;
            match r.kind {
                RecvKind::Into(_) => self.recv.done = got,
                RecvKind::Reduce { dst, local } => {
                    // Whole elements received, and not past what the send
                    // that still reads `dst` has sent.
                    let whole = if got == r.len { got } else { got - got % es };
                    let lim = match r.after_sent {
                        Some(g) => {
                            let s = self.send.sent_of(g);
                            if s >= whole {
                                whole
                            } else {
                                s - s % es
                            }
                        }
                        None => whole,
                    };
                    let waiting = lim.saturating_sub(self.recv.done);
                    if waiting > 0 && (waiting >= REDUCE_GRAIN || lim == r.len || eagain || got - self.recv.done >= cap) {
                        while self.recv.done < lim {
                            let d = self.recv.done;
                            let off = d % cap;
                            let k = (lim - d).min(cap - off);
                            // SAFETY: bytes [d, d + k) of dst and local are inside
                            // their `len`-byte buffers, and the window holds them at
                            // off..off + k (received, not yet reduced).
                            unsafe { reduce::reduce_n_raw(dst.add(d), &[local.add(d), self.tmp.add(off)], k / es, self.dt, self.op, 0.0) };
                            self.recv.done += k;
                        }
                        moved = true;
                    }
                }
            }
            progress |= moved;
            if self.recv.done == r.len {
                continue;
            }
            if eagain || !moved {
                break;
            }
        }
        Ok(progress)
    }

    /// Nothing moved: wait until a socket we need is ready (or the deadline).
    fn poll(&self, timeout_ms: i32) -> Result<()> {
        let want_out = self.send.seg < self.plan.sends.len() && self.send.pos < self.sendable();
        let want_in = self.recv.seg < self.plan.recvs.len() && self.room > 0;
        if !want_out && !want_in {
            return Err(Error::internal(format!(
                "{}: ring stream stalled (send {}/{}, recv {}/{})",
                self.what,
                self.send.seg,
                self.plan.sends.len(),
                self.recv.seg,
                self.plan.recvs.len()
            )));
        }
        let mut pfds = [libc::pollfd { fd: -1, events: 0, revents: 0 }; 2];
        if self.nfd == self.pfd {
            let events = (if want_out { libc::POLLOUT } else { 0 }) | (if want_in { libc::POLLIN } else { 0 });
            pfds[0] = libc::pollfd { fd: self.nfd, events, revents: 0 };
        } else {
            if want_out {
                pfds[0] = libc::pollfd { fd: self.nfd, events: libc::POLLOUT, revents: 0 };
            }
            if want_in {
                pfds[1] = libc::pollfd { fd: self.pfd, events: libc::POLLIN, revents: 0 };
            }
        }
        sys_poll(&mut pfds, timeout_ms)
    }
}

impl Backend for TcpBackend {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn transport_name(&self) -> &'static str {
        "tcp"
    }

    fn all_reduce(&self, buf: &mut [u8], dt: DType, op: ReduceOp) -> Result<()> {
        let (w, r, es) = (self.size, self.rank, dt.size());
        let desc = OpDesc::new(OpKind::AllReduce, (buf.len() / es) as u64, dt, op, -1);
        let nbytes = buf.len();
        let bp = buf.as_mut_ptr();
        if nbytes <= SMALL_BYTES {
            let mut sc = self.scratch(nbytes * (w - 1))?;
            let sp = sc.as_mut_ptr();
            let slot_of = |p: usize| if p < r { p } else { p - 1 };
            // SAFETY (pointer arithmetic below): the scratch holds w - 1 slots of
            // nbytes; slot_of(p) < w - 1 for every peer p.
            self.exchange(&desc, &|_| (bp as *const u8, nbytes), &|p| (sp.wrapping_add(slot_of(p) * nbytes), nbytes), "all_reduce")?;
            // SAFETY: as above.
            let srcs: Vec<*const u8> = (0..w).map(|p| if p == r { bp as *const u8 } else { unsafe { sp.add(slot_of(p) * nbytes) as *const u8 } }).collect();
            // SAFETY: every source is nbytes of live memory (ours and the peers' slots), bp is ours.
            unsafe { reduce::reduce_n_raw(bp, &srcs, nbytes / es, dt, op, 0.0) };
            return Ok(());
        }
        self.exchange(&desc, &|_| (std::ptr::null(), 0), &|_| (std::ptr::null_mut(), 0), "all_reduce")?;
        let plan = RingPlan::all_reduce(bp, nbytes / es, w, r, es);
        let mut tmp = self.scratch(TMP_BYTES)?;
        self.stream(&plan, dt, op, &mut tmp[..TMP_BYTES], "all_reduce")
    }

    fn all_gather(&self, send: &[u8], recv: &mut [u8], dt: DType) -> Result<()> {
        let (w, r) = (self.size, self.rank);
        let cb = send.len();
        let desc = OpDesc::new(OpKind::AllGather, (cb / dt.size()) as u64, dt, ReduceOp::Sum, -1);
        recv[r * cb..(r + 1) * cb].copy_from_slice(send);
        let rp = recv.as_mut_ptr();
        if cb <= SMALL_BYTES {
            // SAFETY: recv holds w blocks of cb bytes; r, p < w.
            let own = unsafe { rp.add(r * cb) as *const u8 };
            // SAFETY: as above.
            return self.exchange(&desc, &|_| (own, cb), &|p| (unsafe { rp.add(p * cb) }, cb), "all_gather");
        }
        self.exchange(&desc, &|_| (std::ptr::null(), 0), &|_| (std::ptr::null_mut(), 0), "all_gather")?;
        self.stream(&RingPlan::all_gather(rp, cb, w, r), dt, ReduceOp::Sum, &mut [0u8; 64], "all_gather")
    }

    fn reduce_scatter(&self, send: &[u8], recv: &mut [u8], dt: DType, op: ReduceOp) -> Result<()> {
        let (w, r, es) = (self.size, self.rank, dt.size());
        let cb = recv.len();
        let desc = OpDesc::new(OpKind::ReduceScatter, (cb / es) as u64, dt, op, -1);
        let sp = send.as_ptr();
        let rp = recv.as_mut_ptr();
        if cb <= SMALL_BYTES {
            let mut sc = self.scratch(cb * (w - 1))?;
            let tp = sc.as_mut_ptr();
            let slot_of = |p: usize| if p < r { p } else { p - 1 };
            // SAFETY (pointer arithmetic below): send holds w blocks of cb bytes,
            // the scratch w - 1 slots of cb; p < w and slot_of(p) < w - 1.
            self.exchange(&desc, &|p| (sp.wrapping_add(p * cb), cb), &|p| (tp.wrapping_add(slot_of(p) * cb), cb), "reduce_scatter")?;
            let srcs: Vec<*const u8> =
                // SAFETY: as above.
                (0..w).map(|p| if p == r { unsafe { sp.add(r * cb) } } else { unsafe { tp.add(slot_of(p) * cb) as *const u8 } }).collect();
            // SAFETY: every source is cb bytes of live memory; recv is ours, cb bytes.
            unsafe { reduce::reduce_n_raw(rp, &srcs, cb / es, dt, op, 0.0) };
            return Ok(());
        }
        self.exchange(&desc, &|_| (std::ptr::null(), 0), &|_| (std::ptr::null_mut(), 0), "reduce_scatter")?;
        // Two chunk-sized buffers ping-pong for the partial sums in flight, then TMP.
        let mut sc = self.scratch(2 * cb + TMP_BYTES)?;
        let (pp, tmp) = sc.split_at_mut(2 * cb);
        let pp = pp.as_mut_ptr();
        let plan = RingPlan::reduce_scatter(sp, rp, cb, w, r, |s| pp.wrapping_add((s % 2) * cb));
        self.stream(&plan, dt, op, &mut tmp[..TMP_BYTES], "reduce_scatter")
    }

    fn broadcast(&self, buf: &mut [u8], dt: DType, root: usize) -> Result<()> {
        let (w, r) = (self.size, self.rank);
        let nb = buf.len();
        let desc = OpDesc::new(OpKind::Broadcast, (nb / dt.size()) as u64, dt, ReduceOp::Sum, root as i32);
        let bp = buf.as_mut_ptr();
        if nb <= SMALL_BYTES * 4 {
            let send = |_p: usize| {
                if r == root {
                    (bp as *const u8, nb)
                } else {
                    (std::ptr::null(), 0)
                }
            };
            let slot = |p: usize| {
                if p == root {
                    (bp, nb)
                } else {
                    (std::ptr::null_mut(), 0)
                }
            };
            return self.exchange(&desc, &send, &slot, "broadcast");
        }
        self.exchange(&desc, &|_| (std::ptr::null(), 0), &|_| (std::ptr::null_mut(), 0), "broadcast")?;
        self.stream(&RingPlan::broadcast(bp, nb, w, r, root), dt, ReduceOp::Sum, &mut [0u8; 64], "broadcast")
    }

    fn barrier(&self) -> Result<()> {
        let desc = OpDesc::new(OpKind::Barrier, 0, DType::U8, ReduceOp::Sum, -1);
        self.exchange(&desc, &|_| (std::ptr::null(), 0), &|_| (std::ptr::null_mut(), 0), "barrier")
    }

    fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
        for s in self.peers.iter().flatten() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The socket buffer size for a connection to a peer (None: kernel
/// autotuning), from FLATSHARD_TCP_SOCKBUF (`setting`: None when unset,
/// Some(0) = autotuning) and whether the peer is on this host.
pub(crate) fn peer_sockbuf(setting: Option<usize>, same_host: bool) -> Option<usize> {
    match setting {
        Some(0) => None,
        Some(b) => Some(b),
        None => same_host.then_some(LOCAL_SOCKBUF),
    }
}

/// Fix both socket buffers of the connection to `peer` at `bytes` (None:
/// leave kernel autotuning on).
fn set_sockbuf(s: &TcpStream, bytes: Option<usize>, peer: usize) -> Result<()> {
    let Some(b) = bytes else { return Ok(()) };
    let v = libc::c_int::try_from(b.min(MAX_SOCKBUF)).unwrap_or(libc::c_int::MAX);
    for (opt, name) in [(libc::SO_SNDBUF, "SO_SNDBUF"), (libc::SO_RCVBUF, "SO_RCVBUF")] {
        // SAFETY: a live socket; `v` is a c_int of the size passed.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(Error::io(format!("{name}={b} on the connection to rank {peer}: {}", io::Error::last_os_error())));
        }
    }
    Ok(())
}

/// The (SO_SNDBUF, SO_RCVBUF) the kernel reports for a connection.
#[cfg(test)]
fn sockbufs(s: &TcpStream) -> (i32, i32) {
    let get = |opt| {
        let mut v: libc::c_int = 0;
        let mut l = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a live socket; v and l sized as passed.
        unsafe { libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, opt, &mut v as *mut libc::c_int as *mut libc::c_void, &mut l) };
        v
    };
    (get(libc::SO_SNDBUF), get(libc::SO_RCVBUF))
}

fn lost(peer: usize, what: &str, e: &io::Error) -> Error {
    Error::peer_lost(format!("{what}: connection to rank {peer} failed: {e}"))
}

fn closed(peer: usize, what: &str) -> Error {
    Error::peer_lost(format!("{what}: rank {peer} closed the connection (process exited or aborted)"))
}

fn sys_send(fd: i32, p: *const u8, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: the callers pass `len` readable bytes at `p`; send only reads them.
        let r = unsafe { libc::send(fd, p as *const libc::c_void, len, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn sys_recv(fd: i32, p: *mut u8, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: the callers pass `len` writable bytes at `p`.
        let r = unsafe { libc::recv(fd, p as *mut libc::c_void, len, libc::MSG_DONTWAIT) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn sys_poll(pfds: &mut [libc::pollfd], t: i32) -> Result<()> {
    // SAFETY: a live slice of pollfd structs and its length.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, t) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(Error::io(format!("poll: {e}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ranks of one group in this process (one thread each).
    fn pair(sockbuf: Option<usize>) -> Vec<TcpBackend> {
        let ls: Vec<TcpListener> = (0..2).map(|_| net::listen("127.0.0.1:0".parse().unwrap()).unwrap()).collect();
        let peers: Vec<Peer> = ls.iter().map(|l| Peer { addr: l.local_addr().unwrap(), sockbuf }).collect();
        let peers = Arc::new(peers);
        let hs: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let peers = peers.clone();
                std::thread::spawn(move || {
                    let abort = Arc::new(AtomicBool::new(false));
                    TcpBackend::connect(r, 2, l, &peers, b"k", "unit/w", Duration::from_secs(30), abort).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn socket_buffer_choice() {
        // unset: fixed for peers on this host, autotuned for others
        assert_eq!(peer_sockbuf(None, true), Some(LOCAL_SOCKBUF));
        assert_eq!(peer_sockbuf(None, false), None);
        // 0: autotuned everywhere; a size: that size everywhere
        assert_eq!(peer_sockbuf(Some(0), true), None);
        assert_eq!(peer_sockbuf(Some(0), false), None);
        assert_eq!(peer_sockbuf(Some(65536), true), Some(65536));
        assert_eq!(peer_sockbuf(Some(65536), false), Some(65536));
    }

    #[test]
    fn socket_buffers_are_fixed_where_asked_and_left_to_the_kernel_elsewhere() {
        // Linux caps the value at net.core.{w,r}mem_max and reports twice
        // what it keeps (room for its bookkeeping).
        let max = |f: &str| std::fs::read_to_string(format!("/proc/sys/net/core/{f}")).unwrap().trim().parse::<usize>().unwrap();
        let want = |m: usize| 2 * LOCAL_SOCKBUF.min(m) as i32;
        for b in pair(Some(LOCAL_SOCKBUF)) {
            let s = b.peers[1 - b.rank].as_ref().unwrap();
            assert_eq!(sockbufs(s), (want(max("wmem_max")), want(max("rmem_max"))), "rank {}", b.rank);
        }
        for b in pair(None) {
            let s = b.peers[1 - b.rank].as_ref().unwrap();
            let (snd, rcv) = sockbufs(s);
            assert!(snd != 2 * LOCAL_SOCKBUF as i32 && rcv != 2 * LOCAL_SOCKBUF as i32, "rank {}: autotuned buffers fixed at {snd}/{rcv}", b.rank);
        }
    }

    /// The smallest socket buffer allowed makes sends and receives partial:
    /// the ring's event loop must still move every byte (3 MiB, in place).
    #[test]
    fn ring_all_reduce_with_tiny_socket_buffers() {
        let bs = pair(Some(crate::config::TCP_SOCKBUF_MIN));
        let n = 3 << 18;
        let hs: Vec<_> = bs
            .into_iter()
            .map(|b| {
                std::thread::spawn(move || {
                    let r = b.rank;
                    let mut v: Vec<u8> = (0..n).flat_map(|i| ((i % 1000 + r * 7) as f32).to_ne_bytes()).collect();
                    b.all_reduce(&mut v, DType::F32, ReduceOp::Sum).unwrap();
                    for (i, c) in v.chunks_exact(4).enumerate() {
                        let want = (2 * (i % 1000) + 7) as f32;
                        assert_eq!(f32::from_ne_bytes([c[0], c[1], c[2], c[3]]), want, "rank {r} element {i}");
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    }
}
