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
        let n = self.size;
        struct P {
            fd: i32,
            hdr_out: [u8; HDR],
            body: (*const u8, usize),
            s_pos: usize,
            hdr_in: [u8; HDR],
            h_pos: usize,
            dst: *mut u8,
            want: usize,
            body_len: usize,
            b_pos: usize,
            drain: bool,
        }
        let mut ps: Vec<P> = Vec::with_capacity(n - 1);
        for p in (0..n).filter(|p| *p != self.rank) {
            let body = send(p);
            let (dst, want) = slot(p);
            ps.push(P {
                fd: self.fd(p),
                hdr_out: desc.encode(seq, body.1 as u64),
                body,
                s_pos: 0,
                hdr_in: [0; HDR],
                h_pos: 0,
                dst,
                want,
                body_len: 0,
                b_pos: 0,
                drain: false,
            });
        }
        let peer_of = |i: usize| if i < self.rank { i } else { i + 1 };
        let mut mismatch: Vec<String> = Vec::new();
        let mut drain_buf = [0u8; 16 << 10];
        let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(n);
        loop {
            let mut all_done = true;
            let mut progress = false;
            for (i, p) in ps.iter_mut().enumerate() {
                let peer = peer_of(i);
                // send header then body
                let total = HDR + p.body.1;
                while p.s_pos < total {
                    let (ptr, len) =
                        if p.s_pos < HDR { (p.hdr_out[p.s_pos..].as_ptr(), HDR - p.s_pos) } else { (unsafe { p.body.0.add(p.s_pos - HDR) }, total - p.s_pos) };
                    match sys_send(p.fd, ptr, len) {
                        Ok(k) => {
                            p.s_pos += k;
                            progress = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(lost(peer, what, &e)),
                    }
                }
                // receive header, then body (or drain it)
                loop {
                    if p.h_pos < HDR {
                        match sys_recv(p.fd, p.hdr_in[p.h_pos..].as_mut_ptr(), HDR - p.h_pos) {
                            Ok(0) => return Err(closed(peer, what)),
                            Ok(k) => {
                                p.h_pos += k;
                                progress = true;
                                if p.h_pos == HDR {
                                    let (theirs, len) = OpDesc::decode_in_step(&p.hdr_in, seq).map_err(|e| e.context(format!("{what}: rank {peer}")))?;
                                    p.body_len = len as usize;
                                    if theirs != *desc {
                                        mismatch.push(format!("rank {peer} called {}", theirs.describe()));
                                        p.drain = true;
                                    } else if p.body_len != p.want {
                                        mismatch.push(format!("rank {peer} sent {len} payload bytes, expected {}", p.want));
                                        p.drain = true;
                                    }
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(lost(peer, what, &e)),
                        }
                    } else if p.b_pos < p.body_len {
                        let left = p.body_len - p.b_pos;
                        let r = if p.drain {
                            sys_recv(p.fd, drain_buf.as_mut_ptr(), left.min(drain_buf.len()))
                        } else {
                            sys_recv(p.fd, unsafe { p.dst.add(p.b_pos) }, left)
                        };
                        match r {
                            Ok(0) => return Err(closed(peer, what)),
                            Ok(k) => {
                                p.b_pos += k;
                                progress = true;
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(lost(peer, what, &e)),
                        }
                    } else {
                        break;
                    }
                }
                if p.s_pos < total || p.h_pos < HDR || p.b_pos < p.body_len {
                    all_done = false;
                }
            }
            if all_done {
                break;
            }
            if !progress {
                let t = w.check()?;
                pfds.clear();
                for p in &ps {
                    let mut ev = 0;
                    if p.s_pos < HDR + p.body.1 {
                        ev |= libc::POLLOUT;
                    }
                    if p.h_pos < HDR || p.b_pos < p.body_len {
                        ev |= libc::POLLIN;
                    }
                    pfds.push(libc::pollfd { fd: p.fd, events: ev, revents: 0 });
                }
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

    /// Run the ring stream: send `sends` to `next` in order, receive `recvs`
    /// from `prev` in order; each send segment may wait for a receive segment.
    #[allow(clippy::too_many_arguments)] // the ring's whole description, used by four collectives
    fn stream(&self, next: usize, prev: usize, sends: &[SendSeg], recvs: &[RecvSeg], dt: DType, op: ReduceOp, tmp: &mut [u8], what: &str) -> Result<()> {
        let w = self.wait(what);
        let (nfd, pfd) = (self.fd(next), self.fd(prev));
        let es = dt.size();
        let cap = tmp.len();
        let tmp_ptr = tmp.as_mut_ptr();
        let (mut si, mut sp) = (0usize, 0usize);
        let (mut ri, mut rp, mut rd) = (0usize, 0usize, 0usize); // segment, received, done
                                                                 // bytes of send segment j already sent
        let sent = |si: usize, sp: usize, j: usize| {
            if si > j {
                usize::MAX
            } else if si == j {
                sp
            } else {
                0
            }
        };
        // bytes of send segment si that may be sent now
        let avail = |si: usize, ri: usize, rd: usize| {
            let s = &sends[si];
            match s.gate {
                None => s.len,
                Some(g) if ri > g => s.len,
                Some(g) if ri == g => rd.min(s.len),
                Some(_) => 0,
            }
        };
        loop {
            let mut progress = false;
            // --- send ---
            while si < sends.len() {
                let s = &sends[si];
                let a = avail(si, ri, rd);
                if sp < a {
                    match sys_send(nfd, unsafe { s.ptr.add(sp) }, a - sp) {
                        Ok(k) => {
                            sp += k;
                            progress = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(lost(next, what, &e)),
                    }
                }
                if sp == s.len {
                    si += 1;
                    sp = 0;
                    continue;
                }
                break;
            }
            // --- receive ---
            let mut room = 0;
            while ri < recvs.len() {
                let r = &recvs[ri];
                if rd == r.len {
                    ri += 1;
                    rp = 0;
                    rd = 0;
                    progress = true;
                    continue;
                }
                let mut moved = false;
                let mut eagain = false;
                let (ptr, rm) = match r.kind {
                    RecvKind::Into(dst) => (unsafe { dst.add(rp) }, r.len - rp),
                    RecvKind::Reduce { .. } => {
                        let off = rp % cap;
                        (unsafe { tmp_ptr.add(off) }, (r.len - rp).min(cap - off).min(rd + cap - rp))
                    }
                };
                room = rm;
                if room > 0 {
                    match sys_recv(pfd, ptr, room) {
                        Ok(0) => return Err(closed(prev, what)),
                        Ok(k) => {
                            rp += k;
                            moved = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => eagain = true,
                        Err(e) => return Err(lost(prev, what, &e)),
                    }
                }
                match r.kind {
                    RecvKind::Into(_) => rd = rp,
                    RecvKind::Reduce { dst, local } => {
                        let whole = if rp == r.len { rp } else { rp - rp % es };
                        let lim = match r.after_sent {
                            Some(g) => {
                                let s = sent(si, sp, g);
                                if s >= whole {
                                    whole
                                } else {
                                    s - s % es
                                }
                            }
                            None => whole,
                        };
                        let waiting = lim.saturating_sub(rd);
                        if waiting > 0 && (waiting >= REDUCE_GRAIN || lim == r.len || eagain || rp - rd >= cap) {
                            while rd < lim {
                                let off = rd % cap;
                                let k = (lim - rd).min(cap - off);
                                unsafe {
                                    reduce::reduce_n_raw(dst.add(rd), &[local.add(rd), tmp_ptr.add(off)], k / es, dt, op, 0.0);
                                }
                                rd += k;
                            }
                            moved = true;
                        }
                    }
                }
                progress |= moved;
                if rd == r.len {
                    continue;
                }
                if eagain || !moved {
                    break;
                }
            }
            if si == sends.len() && ri == recvs.len() {
                return Ok(());
            }
            if !progress {
                let t = w.check()?;
                let want_out = si < sends.len() && sp < avail(si, ri, rd);
                let want_in = ri < recvs.len() && room > 0;
                if !want_out && !want_in {
                    return Err(Error::internal(format!("{what}: ring stream stalled (send {si}/{}, recv {ri}/{})", sends.len(), recvs.len())));
                }
                let mut pfds = [libc::pollfd { fd: -1, events: 0, revents: 0 }; 2];
                if nfd == pfd {
                    pfds[0] =
                        libc::pollfd { fd: nfd, events: (if want_out { libc::POLLOUT } else { 0 }) | (if want_in { libc::POLLIN } else { 0 }), revents: 0 };
                } else {
                    if want_out {
                        pfds[0] = libc::pollfd { fd: nfd, events: libc::POLLOUT, revents: 0 };
                    }
                    if want_in {
                        pfds[1] = libc::pollfd { fd: pfd, events: libc::POLLIN, revents: 0 };
                    }
                }
                sys_poll(&mut pfds, t)?;
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

/// Element range [start, end) in bytes of chunk c when `n` elements are split in `w`.
fn chunk(n: usize, w: usize, c: usize, es: usize) -> (usize, usize) {
    let (base, rem) = (n / w, n % w);
    let start = c * base + c.min(rem);
    let len = base + usize::from(c < rem);
    (start * es, len * es)
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
            self.exchange(&desc, &|_| (bp as *const u8, nbytes), &|p| (unsafe { sp.add(slot_of(p) * nbytes) }, nbytes), "all_reduce")?;
            let srcs: Vec<*const u8> = (0..w).map(|p| if p == r { bp as *const u8 } else { unsafe { sp.add(slot_of(p) * nbytes) as *const u8 } }).collect();
            unsafe { reduce::reduce_n_raw(bp, &srcs, nbytes / es, dt, op, 0.0) };
            return Ok(());
        }
        self.exchange(&desc, &|_| (std::ptr::null(), 0), &|_| (std::ptr::null_mut(), 0), "all_reduce")?;
        let n = nbytes / es;
        let ch = |c: usize| chunk(n, w, c % w, es);
        let mut sends = Vec::with_capacity(2 * w);
        let mut recvs = Vec::with_capacity(2 * w);
        for s in 0..w - 1 {
            let (so, sl) = ch(r + 2 * w - s - 1);
            sends.push(SendSeg { ptr: unsafe { bp.add(so) }, len: sl, gate: s.checked_sub(1) });
            let (ro, rl) = ch(r + 2 * w - s - 2);
            let d = unsafe { bp.add(ro) };
            recvs.push(RecvSeg { kind: RecvKind::Reduce { dst: d, local: d }, len: rl, after_sent: None });
        }
        for t in 0..w - 1 {
            let k = w - 1 + t;
            let (so, sl) = ch(r + 2 * w - t);
            sends.push(SendSeg { ptr: unsafe { bp.add(so) }, len: sl, gate: Some(k - 1) });
            let (ro, rl) = ch(r + 2 * w - t - 1);
            recvs.push(RecvSeg { kind: RecvKind::Into(unsafe { bp.add(ro) }), len: rl, after_sent: None });
        }
        let mut tmp = self.scratch(TMP_BYTES)?;
        let (next, prev) = self.ring();
        self.stream(next, prev, &sends, &recvs, dt, op, &mut tmp[..TMP_BYTES], "all_reduce")
    }

    fn all_gather(&self, send: &[u8], recv: &mut [u8], dt: DType) -> Result<()> {
        let (w, r) = (self.size, self.rank);
        let cb = send.len();
        let desc = OpDesc::new(OpKind::AllGather, (cb / dt.size()) as u64, dt, ReduceOp::Sum, -1);
        recv[r * cb..(r + 1) * cb].copy_from_slice(send);
        let rp = recv.as_mut_ptr();
        if cb <= SMALL_BYTES {
            let own = unsafe { rp.add(r * cb) as *const u8 };
            return self.exchange(&desc, &|_| (own, cb), &|p| (unsafe { rp.add(p * cb) }, cb), "all_gather");
        }
        self.exchange(&desc, &|_| (std::ptr::null(), 0), &|_| (std::ptr::null_mut(), 0), "all_gather")?;
        let mut sends = Vec::with_capacity(w);
        let mut recvs = Vec::with_capacity(w);
        for t in 0..w - 1 {
            let sc = (r + w - t) % w;
            let rc = (r + 2 * w - t - 1) % w;
            sends.push(SendSeg { ptr: unsafe { rp.add(sc * cb) }, len: cb, gate: t.checked_sub(1) });
            recvs.push(RecvSeg { kind: RecvKind::Into(unsafe { rp.add(rc * cb) }), len: cb, after_sent: None });
        }
        let (next, prev) = self.ring();
        self.stream(next, prev, &sends, &recvs, dt, ReduceOp::Sum, &mut [0u8; 64], "all_gather")
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
            self.exchange(&desc, &|p| (unsafe { sp.add(p * cb) }, cb), &|p| (unsafe { tp.add(slot_of(p) * cb) }, cb), "reduce_scatter")?;
            let srcs: Vec<*const u8> =
                (0..w).map(|p| if p == r { unsafe { sp.add(r * cb) } } else { unsafe { tp.add(slot_of(p) * cb) as *const u8 } }).collect();
            unsafe { reduce::reduce_n_raw(rp, &srcs, cb / es, dt, op, 0.0) };
            return Ok(());
        }
        self.exchange(&desc, &|_| (std::ptr::null(), 0), &|_| (std::ptr::null_mut(), 0), "reduce_scatter")?;
        // Two chunk-sized buffers ping-pong for the partial sums in flight, then TMP.
        let mut sc = self.scratch(2 * cb + TMP_BYTES)?;
        let (pp, tmp) = sc.split_at_mut(2 * cb);
        let pp = pp.as_mut_ptr();
        let part = |s: usize| unsafe { pp.add((s % 2) * cb) };
        let mut sends = Vec::with_capacity(w);
        let mut recvs = Vec::with_capacity(w);
        for s in 0..w - 1 {
            let sptr = if s == 0 { unsafe { sp.add(((r + w - 1) % w) * cb) } } else { part(s - 1) as *const u8 };
            sends.push(SendSeg { ptr: sptr, len: cb, gate: s.checked_sub(1) });
            let c = (r + 2 * w - s - 2) % w;
            let dst = if s == w - 2 { rp } else { part(s) };
            let after = if s >= 2 { Some(s - 1) } else { None };
            recvs.push(RecvSeg { kind: RecvKind::Reduce { dst, local: unsafe { sp.add(c * cb) } }, len: cb, after_sent: after });
        }
        let (next, prev) = self.ring();
        self.stream(next, prev, &sends, &recvs, dt, op, &mut tmp[..TMP_BYTES], "reduce_scatter")
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
        // Pipelined chain root -> root+1 -> ... -> root-1.
        let pos = (r + w - root) % w;
        let (next, prev) = self.ring();
        let mut sends = Vec::new();
        let mut recvs = Vec::new();
        if pos > 0 {
            recvs.push(RecvSeg { kind: RecvKind::Into(bp), len: nb, after_sent: None });
        }
        if pos < w - 1 {
            sends.push(SendSeg { ptr: bp, len: nb, gate: if pos > 0 { Some(0) } else { None } });
        }
        self.stream(next, prev, &sends, &recvs, dt, ReduceOp::Sum, &mut [0u8; 64], "broadcast")
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
