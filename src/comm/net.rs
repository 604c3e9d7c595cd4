//! Socket plumbing shared by the rendezvous store, the handshake and the TCP
//! data path: non-blocking I/O where every wait has a deadline and notices an
//! abort flag within `ABORT_POLL`.

use crate::error::{Error, Result};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Longest a blocked wait sleeps before it looks at the abort flag again.
pub const ABORT_POLL: Duration = Duration::from_millis(50);

/// A deadline plus the abort flag of the communicator that waits.
#[derive(Clone, Copy)]
pub struct Wait<'a> {
    pub deadline: Instant,
    pub abort: &'a AtomicBool,
    /// What is being waited for, for messages ("rendezvous", "all_reduce").
    pub what: &'a str,
}

impl<'a> Wait<'a> {
    pub fn new(timeout: Duration, abort: &'a AtomicBool, what: &'a str) -> Self {
        Wait { deadline: Instant::now() + timeout, abort, what }
    }
    /// Err if aborted or past the deadline; else the poll timeout to use (ms).
    pub fn check(&self) -> Result<i32> {
        if self.abort.load(Ordering::Relaxed) {
            return Err(Error::aborted(format!("{}: the communicator was aborted", self.what)));
        }
        let now = Instant::now();
        if now >= self.deadline {
            return Err(Error::timeout(format!("{}: deadline passed", self.what)));
        }
        Ok((self.deadline - now).min(ABORT_POLL).as_millis().max(1) as i32)
    }
}

/// poll(2) one fd for `events`; returns revents (0 on timeout).
pub fn poll_one(fd: i32, events: i16, timeout_ms: i32) -> Result<i16> {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one valid pollfd, exclusively borrowed for the call (nfds = 1); an
    // invalid fd is reported in revents, not undefined behaviour.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(Error::io(format!("poll: {e}")));
    }
    Ok(if r == 0 { 0 } else { p.revents })
}

/// Read exactly `buf.len()` bytes from a non-blocking stream before the deadline.
/// EOF or reset → PEER_LOST with `peer` in the message.
pub fn read_exact(s: &mut TcpStream, buf: &mut [u8], w: &Wait, peer: &str) -> Result<()> {
    let mut pos = 0;
    while pos < buf.len() {
        match s.read(&mut buf[pos..]) {
            Ok(0) => return Err(Error::peer_lost(format!("{}: {peer} closed the connection", w.what))),
            Ok(n) => pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let t = w.check()?;
                poll_one(s.as_raw_fd(), libc::POLLIN, t)?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::peer_lost(format!("{}: {peer}: {e}", w.what))),
        }
    }
    Ok(())
}

/// Write all of `buf` to a non-blocking stream before the deadline.
pub fn write_all(s: &mut TcpStream, buf: &[u8], w: &Wait, peer: &str) -> Result<()> {
    let mut pos = 0;
    while pos < buf.len() {
        match s.write(&buf[pos..]) {
            Ok(0) => return Err(Error::peer_lost(format!("{}: {peer} closed the connection", w.what))),
            Ok(n) => pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let t = w.check()?;
                poll_one(s.as_raw_fd(), libc::POLLOUT, t)?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::peer_lost(format!("{}: {peer}: {e}", w.what))),
        }
    }
    Ok(())
}

/// Set the options every flatshard connection uses.
pub fn tune(s: &TcpStream) -> Result<()> {
    s.set_nodelay(true).map_err(|e| Error::io(format!("TCP_NODELAY: {e}")))?;
    s.set_nonblocking(true).map_err(|e| Error::io(format!("O_NONBLOCK: {e}")))?;
    Ok(())
}

pub fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()
        .map_err(|e| Error::invalid_arg(format!("master_addr: cannot resolve '{host}': {e}")))?
        .next()
        .ok_or_else(|| Error::invalid_arg(format!("master_addr: '{host}' has no address")))
}

/// The local address of the interface that routes to `master` (no packet is sent).
pub fn local_addr_towards(master: SocketAddr) -> Result<std::net::IpAddr> {
    if master.ip().is_loopback() {
        return Ok(master.ip());
    }
    let bind = if master.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let u = UdpSocket::bind(bind).map_err(|e| Error::io(format!("probe socket: {e}")))?;
    u.connect(master).map_err(|e| Error::io(format!("no route to master {master}: {e}")))?;
    Ok(u.local_addr().map_err(|e| Error::io(format!("probe socket: {e}")))?.ip())
}

pub fn listen(addr: SocketAddr) -> Result<TcpListener> {
    let l = TcpListener::bind(addr).map_err(|e| Error::io(format!("cannot listen on {addr}: {e}")))?;
    l.set_nonblocking(true).map_err(|e| Error::io(format!("listener O_NONBLOCK: {e}")))?;
    Ok(l)
}

/// Accept one connection before the deadline.
pub fn accept(l: &TcpListener, w: &Wait) -> Result<TcpStream> {
    loop {
        match l.accept() {
            Ok((s, _)) => {
                tune(&s)?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                let t = w.check()?;
                poll_one(l.as_raw_fd(), libc::POLLIN, t)?;
            }
            Err(e) => return Err(Error::io(format!("{}: accept: {e}", w.what))),
        }
    }
}

/// Connect, retrying until the deadline (the listener may not be up yet).
pub fn connect_retry(addr: SocketAddr, w: &Wait) -> Result<TcpStream> {
    let mut backoff = Duration::from_millis(5);
    loop {
        let left = w.deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&addr, left.clamp(Duration::from_millis(1), Duration::from_secs(2))) {
            Ok(s) => {
                tune(&s)?;
                return Ok(s);
            }
            Err(e) => {
                w.check().map_err(|err| err.context(format!("connecting to {addr} ({e})")))?;
                std::thread::sleep(backoff.min(w.deadline.saturating_duration_since(Instant::now())));
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// Fill `buf` from the kernel's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) -> Result<()> {
    let mut pos = 0;
    while pos < buf.len() {
        // SAFETY: writes at most buf.len() - pos bytes into buf[pos..], which is
        // exclusively borrowed and exactly that long.
        let r = unsafe { libc::getrandom(buf[pos..].as_mut_ptr() as *mut libc::c_void, buf.len() - pos, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io(format!("getrandom: {e}")));
        }
        pos += r as usize;
    }
    Ok(())
}
