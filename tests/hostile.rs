//! Hostile peers against a running job: while two ranks with a job token run
//! collectives, an intruder connects to the rendezvous port and tries garbage,
//! an oversized identity length, a wrong token, a replayed handshake, a
//! duplicate rank and a half-open connection. Every attempt must be refused
//! and the job must finish with correct results.
mod common;
use common::*;
use flatshard::comm::{auth, net};
use flatshard::{DType, ErrorKind, ReduceOp};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

const TOKEN: &str = "s3cret-job-token";
const ITERS: usize = 300;

fn job_body(c: flatshard::Comm) {
    let (r, w) = (c.rank(), c.size());
    for i in 0..ITERS {
        let mut buf = f32_bytes(&vec![(r + i) as f32; 1000]);
        c.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap();
        let want = (0..w).map(|q| (q + i) as f32).sum::<f32>();
        assert!(bytes_f32(&buf).iter().all(|x| *x == want), "iteration {i}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // a new group rendezvous through the store after the attacks
    let sub = c.split(0, r as i32).unwrap().unwrap();
    sub.barrier().unwrap();
    c.barrier().unwrap();
}

fn ready_file(port: u16) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("flatshard-hostile-{port}.ready"))
}

fn connect(port: u16) -> TcpStream {
    let abort = AtomicBool::new(false);
    let w = net::Wait::new(Duration::from_secs(20), &abort, "intruder");
    net::connect_retry(format!("127.0.0.1:{port}").parse().unwrap(), &w).unwrap()
}

/// Read until the server closes or 2 s pass; true if it closed on us.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            // unread bytes at close turn the FIN into a reset: refused too
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn intruders_are_refused_and_the_job_completes() {
    if is_worker() {
        let c = flatshard::Comm::init_from_env(Default::default()).unwrap();
        // tell the intruder the job has formed (both ranks registered)
        let _ = std::fs::write(ready_file(std::env::var("MASTER_PORT").unwrap().parse().unwrap()), b"1");
        return job_body(c);
    }
    let port = free_port();
    let extra = [("FLATSHARD_TOKEN", TOKEN.to_string()), ("MASTER_PORT_OVERRIDE", port.to_string())];
    let kids = spawn_on_port("intruders_are_refused_and_the_job_completes", 2, port, &extra);
    let abort = AtomicBool::new(false);
    let w = net::Wait::new(Duration::from_secs(10), &abort, "intruder");
    let mut refused = 0;
    // attack the running job (both ranks registered), not its start-up
    let t = std::time::Instant::now();
    while !ready_file(port).exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(ready_file(port));

    // 1. garbage instead of a handshake
    let mut s = connect(port);
    let _ = s.write_all(&[0xAB; 4096]);
    assert!(closed_by_server(&mut s), "garbage was not refused");
    refused += 1;
    // 2. oversized identity length field
    let mut s = connect(port);
    let mut hello = [0u8; 40];
    net::read_exact(&mut s, &mut hello, &w, "store").unwrap();
    let mut msg = b"FSHC".to_vec();
    msg.extend_from_slice(&[0u8; 32]);
    msg.extend_from_slice(&u16::MAX.to_le_bytes());
    let _ = s.write_all(&msg);
    assert!(closed_by_server(&mut s), "oversized length was not refused");
    refused += 1;
    // 3. wrong token
    let mut s = connect(port);
    let e = auth::connect(&mut s, b"wrong token", "store 5", &w, "store").unwrap_err();
    assert_eq!(e.kind, ErrorKind::Auth, "{e}");
    refused += 1;
    // 4. replay: record a valid client message for one server nonce, replay it on a new connection
    let mut s1 = connect(port);
    let mut hello1 = [0u8; 40];
    net::read_exact(&mut s1, &mut hello1, &w, "store").unwrap();
    drop(s1);
    let mut s2 = connect(port);
    let mut hello2 = [0u8; 40];
    net::read_exact(&mut s2, &mut hello2, &w, "store").unwrap();
    assert_ne!(hello1[8..], hello2[8..], "server nonces repeat");
    // a message valid for hello1's nonce (we know the token here to forge it)
    let forged = client_message(TOKEN.as_bytes(), &hello1[8..40], "store 7");
    net::write_all(&mut s2, &forged, &w, "store").unwrap();
    let mut verdict = [0u8; 33];
    net::read_exact(&mut s2, &mut verdict, &w, "store").unwrap();
    assert_ne!(verdict[0], 0, "a replayed handshake was accepted");
    refused += 1;
    // 5. duplicate rank: the right token, but rank 1 is already registered
    let mut s = connect(port);
    let e = auth::connect(&mut s, TOKEN.as_bytes(), "store 1", &w, "store").unwrap_err();
    assert_eq!(e.kind, ErrorKind::Auth, "{e}");
    refused += 1;
    // 6. half-open connections: connect and say nothing, hold them during the job
    let idle: Vec<TcpStream> = (0..8).map(|_| connect(port)).collect();

    let res = wait_all(kids, Duration::from_secs(60));
    for (r, (code, out)) in res.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {r} did not complete under attack:\n{out}");
    }
    drop(idle);
    println!("hostile peers: {refused} intrusions refused, 8 half-open connections held, job completed");
}

fn client_message(key: &[u8], nonce_s: &[u8], ident: &str) -> Vec<u8> {
    use hmac::{Hmac, Mac};
    let nonce_c = [9u8; 32];
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap();
    m.update(b"flatshard-client");
    m.update(nonce_s);
    m.update(&nonce_c);
    m.update(&(ident.len() as u16).to_le_bytes());
    m.update(ident.as_bytes());
    let mac = m.finalize().into_bytes();
    let mut msg = b"FSHC".to_vec();
    msg.extend_from_slice(&nonce_c);
    msg.extend_from_slice(&(ident.len() as u16).to_le_bytes());
    msg.extend_from_slice(ident.as_bytes());
    msg.extend_from_slice(&mac);
    msg
}

#[test]
fn a_rank_with_the_wrong_token_is_refused() {
    if is_worker() {
        let r = env_rank();
        let res = flatshard::Comm::init_from_env(flatshard::CommOptions { timeout: Duration::from_secs(5), ..Default::default() });
        if r == 1 {
            let e = res.err().expect("rank 1 with the wrong token joined the job");
            assert_eq!(e.kind, ErrorKind::Auth, "{e}");
        }
        return; // rank 0 may time out waiting for rank 1; that is fine
    }
    let port = free_port();
    let mut kids = Vec::new();
    for (r, tok) in [(0, "right"), (1, "wrong")] {
        let mut one = spawn_on_port_ranks("a_rank_with_the_wrong_token_is_refused", 2, port, &[("FLATSHARD_TOKEN", tok.to_string())], &[r]);
        kids.append(&mut one);
    }
    let res = wait_all(kids, Duration::from_secs(30));
    assert_eq!(res[1].0, Some(0), "{}", res[1].1);
}

/// Bounded fuzz of the two parsers a peer can reach: the handshake (over real
/// sockets) and the collective header. Neither may panic or accept garbage.
/// FLATSHARD_FUZZ_ITERS scales it (scripts/reliability.sh runs more).
#[test]
fn fuzz_handshake_and_frame_parsing() {
    let iters: usize = std::env::var("FLATSHARD_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // headers
    let mut accepted = 0;
    for _ in 0..iters * 100 {
        let mut h = [0u8; 32];
        for b in h.iter_mut() {
            *b = next() as u8;
        }
        if next() % 2 == 0 {
            h[0..4].copy_from_slice(b"FSOP"); // get past the magic half the time
        }
        if flatshard::comm::OpDesc::decode(&h).is_ok() {
            accepted += 1;
        }
    }
    // handshakes: random bytes, sometimes after a valid prefix
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    for i in 0..iters {
        let len = (next() % 400) as usize;
        let mut junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 3 == 0 && junk.len() >= 4 {
            junk[0..4].copy_from_slice(b"FSHC");
        }
        let client = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            let _ = c.write_all(&junk);
            let _ = c.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink);
        });
        let (mut s, _) = l.accept().unwrap();
        net::tune(&s).unwrap();
        let abort = AtomicBool::new(false);
        let w = net::Wait::new(Duration::from_secs(2), &abort, "fuzz");
        let r = auth::serve(&mut s, b"token", &w, &mut |_| true);
        assert!(r.is_err(), "garbage passed the handshake: {r:?}");
        drop(s);
        client.join().unwrap();
    }
    println!("fuzz: {} headers ({accepted} well-formed by chance), {iters} handshakes, all refused", iters * 100);
}
