//! A client of PyTorch's TCPStore, the key-value store that torchrun's agent
//! hosts on MASTER_ADDR:MASTER_PORT (`TORCHELASTIC_USE_AGENT_STORE=True`).
//! flatshard publishes its own rendezvous there instead of serving a store of
//! its own on a port the agent already holds.
//!
//! The wire format is PyTorch 2.x's (both server back ends, libuv and the
//! classic one, speak it); every integer is little-endian on the hosts
//! PyTorch supports:
//!
//! ```text
//! connect:  VALIDATE(0) u8 | magic u32 = 0x3C85F7CE           (no reply)
//! string:   len u64 | bytes                                    (keys and values)
//!           keys start with "/", as PyTorch's client writes them
//! SET(1):   key | value                                        (no reply)
//! GET(3):   key                      → value (empty if the key is missing)
//! ADD(4):   key | delta i64          → new value i64
//! CHECK(5): n u64 | n × key          → 0 READY (all exist) | 1 NOT_READY
//! ```
//!
//! The store is not authenticated (anyone who reaches the port may write),
//! so its replies are untrusted input: every length is checked before
//! anything is allocated, every read and write has the caller's deadline,
//! the ranks prove the job token to each other through it (`check_members`)
//! and the data connections that follow still pass flatshard's job-token
//! handshake. Waiting for a key polls CHECK (never the blocking WAIT), so a
//! deadline or an abort is noticed without having to cancel a request the
//! server still holds.

use super::net::{self, Wait};
use crate::error::{Error, Result};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const VALIDATE: u8 = 0;
const SET: u8 = 1;
const GET: u8 = 3;
const ADD: u8 = 4;
const CHECK: u8 = 5;
const MAGIC: u32 = 0x3C85_F7CE;
const READY: u8 = 0;
const NOT_READY: u8 = 1;
/// The first round trip must come back within this.
const PROBE_LIMIT: Duration = Duration::from_secs(30);

/// Longest value this client sends or accepts (flatshard's values are
/// addresses and ids, far below this; the same limit as flatshard's store).
const MAX_VALUE: usize = 1 << 20;
/// Longest key, scope included.
const MAX_KEY: usize = 1024;

/// One connection to a TCPStore; calls are serialised by a mutex. Every key
/// is prefixed with `prefix` (the job's scope in a store others share).
pub struct TorchStore {
    conn: Mutex<TcpStream>,
    pub addr: SocketAddr,
    prefix: String,
}

impl TorchStore {
    /// Connect (retrying until the deadline: the agent may still be starting
    /// its store), validate, and check that the peer answers like a TCPStore.
    pub fn connect(host: &str, port: u16, prefix: &str, w: &Wait) -> Result<TorchStore> {
        let addrs: Vec<SocketAddr> =
            (host, port).to_socket_addrs().map_err(|e| Error::invalid_arg(format!("environment: MASTER_ADDR: cannot resolve '{host}': {e}")))?.collect();
        let first = *addrs.first().ok_or_else(|| Error::invalid_arg(format!("environment: MASTER_ADDR: '{host}' has no address")))?;
        let mut s = connect_any(&addrs, w)?;
        let addr = s.peer_addr().unwrap_or(first);
        let mut hello = [0u8; 5];
        hello[0] = VALIDATE;
        hello[1..].copy_from_slice(&MAGIC.to_le_bytes());
        let peer = format!("torchrun's agent store at {addr}");
        net::write_all(&mut s, &hello, w, &peer)?;
        let store = TorchStore { conn: Mutex::new(s), addr, prefix: prefix.to_string() };
        // A round trip proves the peer speaks the protocol (a wrong port fails
        // here with a clear message, not later with a garbled value). A store
        // that stays silent is given 30 s, not the whole rendezvous timeout.
        let what = format!("{peer} does not answer as a PyTorch TCPStore (check MASTER_ADDR/MASTER_PORT)");
        let pw = Wait { deadline: w.deadline.min(Instant::now() + PROBE_LIMIT), ..*w };
        let n = store.add("clients", 1, &pw).map_err(|e| e.context(&what))?;
        if !(1..=1 << 30).contains(&n) {
            return Err(Error::peer_lost(format!("{what}: it counted {n} clients")));
        }
        Ok(store)
    }

    fn peer(&self) -> String {
        format!("torchrun's agent store at {}", self.addr)
    }

    /// The key on the wire: PyTorch's client puts "/" before every key, so
    /// ours do too (a Python `TCPStore.get("flatshard/...")` sees them).
    fn full_key(&self, key: &str) -> Result<String> {
        let k = format!("/{}{}", self.prefix, key);
        if k.len() > MAX_KEY {
            return Err(Error::internal(format!("store key of {} bytes (limit {MAX_KEY}): '{k}'", k.len())));
        }
        Ok(k)
    }

    pub fn set(&self, key: &str, val: &[u8], w: &Wait) -> Result<()> {
        if val.len() > MAX_VALUE {
            return Err(Error::internal(format!("store value of {} bytes (limit {MAX_VALUE})", val.len())));
        }
        let k = self.full_key(key)?;
        let mut msg = Vec::with_capacity(17 + k.len() + val.len());
        msg.push(SET);
        put_bytes(&mut msg, k.as_bytes());
        put_bytes(&mut msg, val);
        let mut s = self.lock();
        net::write_all(&mut s, &msg, w, &self.peer())
    }

    /// Add `delta` to the integer at `key` (created as 0) and return the sum.
    pub fn add(&self, key: &str, delta: i64, w: &Wait) -> Result<i64> {
        let k = self.full_key(key)?;
        let mut msg = Vec::with_capacity(17 + k.len());
        msg.push(ADD);
        put_bytes(&mut msg, k.as_bytes());
        msg.extend_from_slice(&delta.to_le_bytes());
        let mut s = self.lock();
        net::write_all(&mut s, &msg, w, &self.peer())?;
        let mut v = [0u8; 8];
        net::read_exact(&mut s, &mut v, w, &self.peer())?;
        Ok(i64::from_le_bytes(v))
    }

    /// Does `key` exist (now)?
    pub fn check(&self, key: &str, w: &Wait) -> Result<bool> {
        let k = self.full_key(key)?;
        let mut msg = Vec::with_capacity(17 + k.len());
        msg.push(CHECK);
        msg.extend_from_slice(&1u64.to_le_bytes());
        put_bytes(&mut msg, k.as_bytes());
        let mut s = self.lock();
        net::write_all(&mut s, &msg, w, &self.peer())?;
        let mut r = [0u8; 1];
        net::read_exact(&mut s, &mut r, w, &self.peer())?;
        match r[0] {
            READY => Ok(true),
            NOT_READY => Ok(false),
            x => Err(Error::peer_lost(format!("{} answered CHECK with {x} (expected 0 or 1)", self.peer()))),
        }
    }

    /// Wait until `key` exists (or the deadline / an abort) and return its value.
    pub fn get(&self, key: &str, w: &Wait) -> Result<Vec<u8>> {
        let mut backoff = Duration::from_millis(2);
        let waiting = |e: Error| e.context(format!("waiting for '{}{key}' in {}", self.prefix, self.peer()));
        while !self.check(key, w).map_err(waiting)? {
            w.check().map_err(waiting)?;
            std::thread::sleep(backoff.min(w.deadline.saturating_duration_since(Instant::now())));
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
        let k = self.full_key(key)?;
        let mut msg = Vec::with_capacity(9 + k.len());
        msg.push(GET);
        put_bytes(&mut msg, k.as_bytes());
        let mut s = self.lock();
        let peer = self.peer();
        net::write_all(&mut s, &msg, w, &peer)?;
        let mut head = [0u8; 8];
        net::read_exact(&mut s, &mut head, w, &peer)?;
        let len = u64::from_le_bytes(head);
        if len > MAX_VALUE as u64 {
            return Err(Error::peer_lost(format!("{peer} sent a {len}-byte value for '{k}' (limit {MAX_VALUE})")));
        }
        let mut v = vec![0u8; len as usize];
        net::read_exact(&mut s, &mut v, w, &peer)?;
        Ok(v)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TcpStream> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn put_bytes(msg: &mut Vec<u8>, b: &[u8]) {
    msg.extend_from_slice(&(b.len() as u64).to_le_bytes());
    msg.extend_from_slice(b);
}

/// Connect to the first of `addrs` that accepts, retrying all of them until
/// the deadline ("localhost" may resolve to ::1 and 127.0.0.1, and the agent
/// listens on one or both).
fn connect_any(addrs: &[SocketAddr], w: &Wait) -> Result<TcpStream> {
    let mut backoff = Duration::from_millis(5);
    loop {
        let mut last = String::new();
        for a in addrs {
            let left = w.deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(a, left.clamp(Duration::from_millis(1), Duration::from_secs(2))) {
                Ok(s) => {
                    net::tune(&s)?;
                    return Ok(s);
                }
                Err(e) => last = format!("{a}: {e}"),
            }
        }
        w.check().map_err(|err| err.context(format!("connecting to torchrun's agent store ({last})")))?;
        std::thread::sleep(backoff.min(w.deadline.saturating_duration_since(Instant::now())));
        backoff = (backoff * 2).min(Duration::from_millis(200));
    }
}

/// The agent's store lets anyone in, so the job token is checked here: each
/// rank publishes HMAC(token, job id | rank) and checks every other rank's
/// (constant-time). A rank with another token fails every rank with AUTH,
/// as flatshard's own (authenticated) store would have refused it; the
/// token itself never crosses the wire. The TCP data connections that
/// follow pass the usual handshake as well.
/// `set` and `get` are the job's store (a StoreClient over this client).
pub fn check_members(
    set: &dyn Fn(&str, &[u8]) -> Result<()>,
    get: &dyn Fn(&str) -> Result<Vec<u8>>,
    key: &[u8],
    job_id: &str,
    rank: usize,
    world: usize,
) -> Result<()> {
    use hmac::{Hmac, Mac};
    let proof = |r: usize| -> Vec<u8> {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
        m.update(b"flatshard-agent-store");
        m.update(&(job_id.len() as u64).to_le_bytes());
        m.update(job_id.as_bytes());
        m.update(&(r as u64).to_le_bytes());
        m.finalize().into_bytes().to_vec()
    };
    set(&format!("auth/{rank}"), &proof(rank))?;
    let mut bad = Vec::new();
    for r in (0..world).filter(|r| *r != rank) {
        let got = get(&format!("auth/{r}"))?;
        let want = proof(r);
        if got.len() != want.len() || got.iter().zip(&want).fold(0u8, |a, (x, y)| a | (x ^ y)) != 0 {
            bad.push(r);
        }
    }
    if !bad.is_empty() {
        return Err(Error::auth(format!(
            "rank {rank}: ranks {bad:?} of job {job_id} do not hold this rank's job token (set the same FLATSHARD_TOKEN / options.token on every rank, \
             e.g. in the environment of every torchrun agent)"
        )));
    }
    Ok(())
}
