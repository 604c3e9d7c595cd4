//! The rendezvous store: a small key-value server that rank 0 runs on
//! `master_addr:master_port`, as torch's TCPStore does, but every connection
//! first passes the job-token handshake and every length is checked.
//!
//! Request:  op u8 | key_len u16 | val_len u32 | wait_ms u32 | key | value
//! Response: found u8 | val_len u32 | value

use super::auth;
use super::net::{self, Wait};
use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
pub(crate) const MAX_KEY: usize = 1024;
pub(crate) const MAX_VALUE: usize = 1 << 20;
/// Connections that may be in the handshake or connected at once.
const MAX_CONNECTIONS: usize = 4096;
/// A connecting peer must finish the handshake within this.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Shared {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
    ranks: Mutex<HashSet<String>>,
    connections: AtomicUsize,
    refused: AtomicUsize,
}

/// Owned by rank 0's job context; stops serving when dropped.
pub struct StoreServer {
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    pub addr: SocketAddr,
}

impl StoreServer {
    pub fn start(listener: TcpListener, key: Vec<u8>) -> Result<StoreServer> {
        let addr = listener.local_addr().map_err(|e| Error::io(format!("store listener: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        let (st, sh) = (stop.clone(), shared.clone());
        std::thread::Builder::new()
            .name("flatshard-store".into())
            .spawn(move || accept_loop(listener, key, st, sh))
            .map_err(|e| Error::io(format!("cannot start the store thread: {e}")))?;
        Ok(StoreServer { stop, shared, addr })
    }
    /// Connections refused so far (bad token, duplicate rank, garbage).
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::Relaxed)
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
    }
}

fn accept_loop(listener: TcpListener, key: Vec<u8>, stop: Arc<AtomicBool>, shared: Arc<Shared>) {
    let forever = Duration::from_secs(100 * 365 * 86400);
    let key = Arc::new(key);
    while !stop.load(Ordering::Relaxed) {
        let w = Wait::new(forever, &stop, "store");
        let Ok(s) = net::accept(&listener, &w) else {
            break;
        };
        if shared.connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            continue; // dropped: closes the socket
        }
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let (key2, stop2, shared2) = (key.clone(), stop.clone(), shared.clone());
        let spawned = std::thread::Builder::new().name("flatshard-store-conn".into()).spawn(move || {
            let _ = serve_conn(s, &key2, &stop2, &shared2);
            shared2.connections.fetch_sub(1, Ordering::Relaxed);
        });
        if spawned.is_err() {
            // The closure (and its socket) is gone; nothing else to undo but the count.
            shared.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn serve_conn(mut s: TcpStream, key: &[u8], stop: &AtomicBool, shared: &Shared) -> Result<()> {
    let hw = Wait::new(HANDSHAKE_LIMIT, stop, "store handshake");
    let mut registered: Option<String> = None;
    let ident = auth::serve(&mut s, key, &hw, &mut |ident| {
        // "store <rank>": one connection per rank; anything else is refused.
        let Some(rank) = ident.strip_prefix("store ") else {
            return false;
        };
        let mut ranks = shared.ranks.lock().unwrap_or_else(|p| p.into_inner());
        if ranks.insert(rank.to_string()) {
            registered = Some(rank.to_string());
            true
        } else {
            false
        }
    });
    if ident.is_err() {
        shared.refused.fetch_add(1, Ordering::Relaxed);
    }
    let result = ident.and_then(|_| serve_requests(&mut s, stop, shared));
    if let Some(r) = registered {
        shared.ranks.lock().unwrap_or_else(|p| p.into_inner()).remove(&r);
    }
    result
}

fn serve_requests(s: &mut TcpStream, stop: &AtomicBool, shared: &Shared) -> Result<()> {
    let forever = Duration::from_secs(100 * 365 * 86400);
    loop {
        let w = Wait::new(forever, stop, "store");
        let mut head = [0u8; 11];
        net::read_exact(s, &mut head, &w, "store client")?;
        let op = head[0];
        let klen = u16::from_le_bytes([head[1], head[2]]) as usize;
        let vlen = u32::from_le_bytes(head[3..7].try_into().expect("4")) as usize;
        let wait_ms = u32::from_le_bytes(head[7..11].try_into().expect("4"));
        if klen > MAX_KEY || vlen > MAX_VALUE || (op != OP_SET && op != OP_GET) || (op == OP_GET && vlen != 0) {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Error::peer_lost("store: malformed request"));
        }
        let mut kv = vec![0u8; klen + vlen];
        net::read_exact(s, &mut kv, &w, "store client")?;
        let k = String::from_utf8_lossy(&kv[..klen]).into_owned();
        match op {
            OP_SET => {
                let v = kv[klen..].to_vec();
                shared.map.lock().unwrap_or_else(|p| p.into_inner()).insert(k, v);
                shared.changed.notify_all();
                net::write_all(s, &[1, 0, 0, 0, 0], &w, "store client")?;
            }
            _ => {
                let deadline = Instant::now() + Duration::from_millis(wait_ms as u64);
                let mut map = shared.map.lock().unwrap_or_else(|p| p.into_inner());
                let found = loop {
                    if let Some(v) = map.get(&k) {
                        break Some(v.clone());
                    }
                    let now = Instant::now();
                    if now >= deadline || stop.load(Ordering::Relaxed) {
                        break None;
                    }
                    let slice = (deadline - now).min(net::ABORT_POLL);
                    map = shared.changed.wait_timeout(map, slice).unwrap_or_else(|p| p.into_inner()).0;
                };
                drop(map);
                let mut reply = Vec::with_capacity(5 + found.as_ref().map_or(0, |v| v.len()));
                reply.push(found.is_some() as u8);
                let v = found.unwrap_or_default();
                reply.extend_from_slice(&(v.len() as u32).to_le_bytes());
                reply.extend_from_slice(&v);
                net::write_all(s, &reply, &w, "store client")?;
            }
        }
    }
}

/// A rank's connection to the store: flatshard's own (rank 0 serves it) or
/// torchrun's agent store (super::torchstore). Calls are serialised by a mutex.
pub struct StoreClient {
    conn: Conn,
    pub addr: SocketAddr,
}

enum Conn {
    Own(Mutex<TcpStream>),
    Torch(super::torchstore::TorchStore),
}

impl StoreClient {
    pub fn connect(addr: SocketAddr, key: &[u8], rank: usize, w: &Wait) -> Result<StoreClient> {
        let what = format!("rank {rank}: rendezvous with the store at {addr}");
        let ww = Wait { what: &what, ..*w };
        let mut s = net::connect_retry(addr, &ww)?;
        auth::connect(&mut s, key, &format!("store {rank}"), &ww, &format!("store at {addr}"))?;
        Ok(StoreClient { conn: Conn::Own(Mutex::new(s)), addr })
    }

    /// Publish through torchrun's agent store instead.
    pub fn torch(t: super::torchstore::TorchStore) -> StoreClient {
        StoreClient { addr: t.addr, conn: Conn::Torch(t) }
    }

    pub fn set(&self, key: &str, val: &[u8], w: &Wait) -> Result<()> {
        if let Conn::Torch(t) = &self.conn {
            return t.set(key, val, w);
        }
        self.request(OP_SET, key, val, 0, w).map(|_| ())
    }

    /// Wait until `key` exists (or the deadline) and return its value.
    pub fn get(&self, key: &str, w: &Wait) -> Result<Vec<u8>> {
        if let Conn::Torch(t) = &self.conn {
            return t.get(key, w);
        }
        loop {
            let left = w.deadline.saturating_duration_since(Instant::now());
            let slice = left.min(Duration::from_millis(200)).as_millis() as u32;
            if let Some(v) = self.request(OP_GET, key, &[], slice, w)? {
                return Ok(v);
            }
            w.check().map_err(|e| e.context(format!("waiting for '{key}' in the store")))?;
        }
    }

    fn request(&self, op: u8, key: &str, val: &[u8], wait_ms: u32, w: &Wait) -> Result<Option<Vec<u8>>> {
        if key.len() > MAX_KEY || val.len() > MAX_VALUE {
            return Err(Error::internal(format!("store key/value too long ({} / {})", key.len(), val.len())));
        }
        let Conn::Own(conn) = &self.conn else {
            return Err(Error::internal("flatshard store request on torchrun's store"));
        };
        let mut s = conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut msg = Vec::with_capacity(11 + key.len() + val.len());
        msg.push(op);
        msg.extend_from_slice(&(key.len() as u16).to_le_bytes());
        msg.extend_from_slice(&(val.len() as u32).to_le_bytes());
        msg.extend_from_slice(&wait_ms.to_le_bytes());
        msg.extend_from_slice(key.as_bytes());
        msg.extend_from_slice(val);
        let peer = format!("store at {} (rank 0)", self.addr);
        // A reply may take wait_ms to come; give it that much beyond our deadline.
        let rw = Wait { deadline: w.deadline.max(Instant::now() + Duration::from_millis(wait_ms as u64 + 1000)), ..*w };
        net::write_all(&mut s, &msg, &rw, &peer)?;
        let mut head = [0u8; 5];
        net::read_exact(&mut s, &mut head, &rw, &peer)?;
        let len = u32::from_le_bytes(head[1..5].try_into().expect("4")) as usize;
        if len > MAX_VALUE {
            return Err(Error::peer_lost(format!("{peer} sent a {len}-byte value (limit {MAX_VALUE})")));
        }
        let mut v = vec![0u8; len];
        net::read_exact(&mut s, &mut v, &rw, &peer)?;
        Ok(if head[0] == 1 { Some(v) } else { None })
    }
}
