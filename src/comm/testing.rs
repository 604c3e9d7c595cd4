//! In-process groups for unit tests: real transports (TCP sockets on
//! loopback, shared-memory segments) between threads of one process.

use super::backend::Backend;
use super::{net, shm, store, tcp, Comm};
use crate::config::Config;
use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

pub const TIMEOUT: Duration = Duration::from_secs(30);

/// `n` ranks of one TCP group, connected from `n` threads.
pub fn tcp_backends(n: usize, ident: &str) -> Vec<tcp::TcpBackend> {
    let ls: Vec<TcpListener> = (0..n).map(|_| net::listen("127.0.0.1:0".parse().unwrap()).unwrap()).collect();
    let peers: Arc<Vec<tcp::Peer>> = Arc::new(ls.iter().map(|l| tcp::Peer { addr: l.local_addr().unwrap(), sockbuf: None }).collect());
    let ident = ident.to_string();
    let hs: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let (peers, ident) = (peers.clone(), ident.clone());
            std::thread::spawn(move || tcp::TcpBackend::connect(r, n, l, &peers, b"k", &ident, TIMEOUT, Arc::new(AtomicBool::new(false))).unwrap())
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

/// `n` ranks of one shared-memory group (segments named after `job`), set
/// up through an in-process store.
pub fn shm_backends(n: usize, job: &str, config: &Config) -> Vec<Box<dyn Backend>> {
    let l = net::listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = l.local_addr().unwrap();
    let server = store::StoreServer::start(l, Vec::new()).unwrap();
    let hs: Vec<_> = (0..n)
        .map(|r| {
            let (job, config) = (job.to_string(), config.clone());
            std::thread::spawn(move || {
                let abort = Arc::new(AtomicBool::new(false));
                let w = net::Wait::new(TIMEOUT, &abort, "unit test store");
                let client = store::StoreClient::connect(addr, b"", r, &w).unwrap();
                shm::connect(&job, "w", r, n, &client, TIMEOUT, &config, abort.clone()).unwrap()
            })
        })
        .collect();
    let out = hs.into_iter().map(|h| h.join().unwrap()).collect();
    drop(server);
    out
}

/// `n` communicators over one TCP group.
pub fn tcp_comms(n: usize, ident: &str) -> Vec<Comm> {
    tcp_backends(n, ident).into_iter().map(|b| Comm::from_backend(Box::new(b), Arc::new(AtomicBool::new(false))).unwrap()).collect()
}

/// Run `f(rank, item)` on one thread per item and collect the results in order.
pub fn on_threads<T: Send + 'static, R: Send + 'static>(items: Vec<T>, f: impl Fn(usize, T) -> R + Send + Sync + Clone + 'static) -> Vec<R> {
    let hs: Vec<_> = items
        .into_iter()
        .enumerate()
        .map(|(r, t)| {
            let f = f.clone();
            std::thread::spawn(move || f(r, t))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}
