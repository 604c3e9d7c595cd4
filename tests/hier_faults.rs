//! Faults across hosts, in the multi-host test bed (scripts/netbed.sh):
//! a link cut in the middle of a collective (a silent partition: packets
//! dropped, no reset), every rank of one host killed, and hostile peers
//! attacking the job's ports from another host (namespace). Skips with a
//! reason where network namespaces are unavailable.
mod common;
use common::netbed::{self, NetBed};
use common::*;
use flatshard::comm::{auth, net};
use flatshard::{Comm, CommOptions, DType, ErrorKind, ReduceOp};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
}

fn ready_dir() -> PathBuf {
    PathBuf::from(std::env::var("FLATSHARD_TEST_READY_DIR").unwrap())
}

/// Parent: a fresh directory the workers mark themselves ready in.
fn new_ready_dir(bed: &NetBed) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flatshard-{}-ready", bed.name()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn wait_ready(dir: &PathBuf, n: usize, limit: Duration) {
    let t = Instant::now();
    while std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0) < n {
        assert!(t.elapsed() < limit, "ranks not ready after {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Worker: collectives (large ring path and small path, hierarchical) until
/// one fails; print when and how.
fn loop_until_failure(timeout: Duration) {
    let c = Comm::init_from_env(CommOptions { timeout, ..Default::default() }).unwrap();
    let r = c.rank();
    assert_eq!(c.transport_name(), "hier");
    let mut big = vec![0u8; 24 << 20]; // three pipeline pieces
    let mut small = vec![0u8; 4096];
    for i in 0u64.. {
        let res = match i % 3 {
            0 => c.all_reduce(&mut big, DType::F32, ReduceOp::Sum),
            1 => c.all_reduce(&mut small, DType::F32, ReduceOp::Sum),
            _ => c.barrier(),
        };
        if i == 3 {
            std::fs::write(ready_dir().join(r.to_string()), b"1").unwrap();
        }
        if let Err(e) = res {
            println!("FAILED_AT {} kind {:?} msg {}", now_ms(), e.kind, e.msg);
            let e2 = c.barrier().unwrap_err();
            assert_eq!(e2.kind, ErrorKind::Aborted, "{e2}");
            return;
        }
    }
}

/// (ms, kind) from a worker's FAILED_AT line.
fn failure(out: &str) -> Option<(u128, String)> {
    let l = out.lines().find_map(|l| l.find("FAILED_AT ").map(|i| &l[i..]))?;
    let mut it = l.split_whitespace();
    let t = it.nth(1)?.parse().ok()?;
    let kind = it.nth(1)?.to_string();
    Some((t, kind))
}

#[test]
fn partition_mid_collective_fails_every_rank_within_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(4);
    if is_worker() {
        return loop_until_failure(TIMEOUT);
    }
    let name = "partition_mid_collective_fails_every_rank_within_timeout";
    let Some(bed) = netbed::bed_or_skip(name, 2, None) else { return };
    let dir = new_ready_dir(&bed);
    let kids = bed.spawn_ranks(name, &[2, 2], 29500, &[("FLATSHARD_TEST_READY_DIR", dir.display().to_string())]);
    wait_ready(&dir, 4, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(300));
    let cut = now_ms();
    bed.link(1, false);
    let res = wait_all(kids, Duration::from_secs(90));
    let _ = std::fs::remove_dir_all(&dir);
    for (r, (code, out)) in res.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {r}:\n{out}");
        let (t, kind) = failure(out).unwrap_or_else(|| panic!("rank {r} reported no failure:\n{out}"));
        assert!(kind == "Timeout" || kind == "PeerLost", "rank {r}: {kind}\n{out}");
        let after = t.saturating_sub(cut);
        println!("#: partition: rank {r} {kind} {after} ms after the cut (timeout {} ms)", TIMEOUT.as_millis());
        assert!(after <= TIMEOUT.as_millis() + 2000, "rank {r} took {after} ms after the cut (timeout {TIMEOUT:?} + 2 s):\n{out}");
    }
}

#[test]
fn killing_every_rank_of_a_host_is_peer_lost_within_2s() {
    if is_worker() {
        return loop_until_failure(Duration::from_secs(60));
    }
    let name = "killing_every_rank_of_a_host_is_peer_lost_within_2s";
    let Some(bed) = netbed::bed_or_skip(name, 3, None) else { return };
    for (layout, victim) in [(&[2usize, 2][..], 1usize), (&[2, 1, 2][..], 2)] {
        let dir = new_ready_dir(&bed);
        let world: usize = layout.iter().sum();
        let mut kids = bed.spawn_ranks(name, layout, 29500 + victim as u16, &[("FLATSHARD_TEST_READY_DIR", dir.display().to_string())]);
        wait_ready(&dir, world, Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(300));
        let first: usize = layout[..victim].iter().sum();
        let dead: Vec<usize> = (first..first + layout[victim]).collect();
        let killed = now_ms();
        for &r in &dead {
            kids[r].kill().unwrap();
        }
        let res = wait_all(kids, Duration::from_secs(90));
        let _ = std::fs::remove_dir_all(&dir);
        for (r, (code, out)) in res.iter().enumerate() {
            if dead.contains(&r) {
                continue;
            }
            assert_eq!(*code, Some(0), "{layout:?}: rank {r}:\n{out}");
            let (t, kind) = failure(out).unwrap_or_else(|| panic!("{layout:?}: rank {r} reported no failure:\n{out}"));
            assert_eq!(kind, "PeerLost", "{layout:?}: rank {r}:\n{out}");
            let after = t.saturating_sub(killed);
            println!("#: host {victim} of {layout:?} killed: rank {r} PeerLost after {after} ms");
            assert!(after <= 2000, "{layout:?}: rank {r} took {after} ms:\n{out}");
        }
    }
}

// ------------------------------------------------------------ hostile peers

const TOKEN: &str = "s3cret-job-token";

/// Worker: small and large collectives, and new cross-host groups (fresh
/// data listeners) while an intruder attacks; everything must be right.
fn job_under_attack() {
    let c = Comm::init_from_env(CommOptions { timeout: Duration::from_secs(60), ..Default::default() }).unwrap();
    let (r, w) = (c.rank(), c.size());
    assert_eq!(c.transport_name(), "hier");
    let local: i32 = std::env::var("LOCAL_RANK").unwrap().parse().unwrap();
    std::fs::write(ready_dir().join(r.to_string()), b"1").unwrap();
    let done = ready_dir().join("done");
    let mut i = 0usize;
    // run until the intruder is through (and at least 100 rounds)
    loop {
        // rank 0 decides for all (every rank must run the same calls)
        let mut stop = [(r == 0 && i >= 100 && done.exists()) as u8];
        c.broadcast(&mut stop, DType::U8, 0).unwrap();
        if stop[0] == 1 {
            break;
        }
        let n = if i.is_multiple_of(10) { 300_000 } else { 1000 };
        let mut buf = f32_bytes(&vec![(r + i) as f32; n]);
        c.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap();
        let want = (0..w).map(|q| (q + i) as f32).sum::<f32>();
        assert!(bytes_f32(&buf).iter().all(|x| *x == want), "iteration {i}");
        if i.is_multiple_of(2) {
            // a new group across hosts: new listeners, new handshakes
            let sub = c.split(local, r as i32).unwrap().unwrap();
            let mut b = f32_bytes(&[1.0; 64]);
            sub.all_reduce(&mut b, DType::F32, ReduceOp::Sum).unwrap();
            assert_eq!(bytes_f32(&b), vec![sub.size() as f32; 64]);
        }
        std::thread::sleep(Duration::from_millis(5));
        i += 1;
        assert!(i < 20_000, "the intruder never finished");
    }
    c.barrier().unwrap();
}

/// Listening TCP sockets in host `h`'s namespace (address:port).
fn listeners(bed: &NetBed, h: usize) -> Vec<SocketAddr> {
    let out = Command::new("ip").args(["netns", "exec", &bed.hostname(h), "ss", "-ltnH"]).output().unwrap();
    assert!(out.status.success(), "ss: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().nth(3)?.parse().ok()).collect()
}

/// One intruder's attacks on `t`: garbage, a wrong token, then a half-open
/// connection it returns (to hold). (reached, refused, held).
fn attack(t: SocketAddr) -> (usize, usize, Option<TcpStream>) {
    let abort = AtomicBool::new(false);
    let w = net::Wait::new(Duration::from_secs(10), &abort, "intruder");
    let conn = || TcpStream::connect_timeout(&t, Duration::from_secs(5));
    let (mut reached, mut refused) = (0, 0);
    // garbage: the peer must close on us
    if let Ok(mut s) = conn() {
        reached = 1;
        println!("REACHED {t}");
        let _ = s.write_all(&[0xAB; 4096]);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 256];
        loop {
            match s.read(&mut b) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("{t}: garbage was not refused: {e}"),
            }
        }
    }
    refused += 1;
    // wrong token
    if let Ok(mut s) = conn() {
        let e = auth::connect(&mut s, b"wrong token", "store 9", &w, "target").unwrap_err();
        assert!(matches!(e.kind, ErrorKind::Auth | ErrorKind::PeerLost), "{t}: {e}");
    }
    refused += 1;
    (reached, refused, conn().ok())
}

/// Intruder (runs on a host of its own): attack every target (address:port)
/// it reads from stdin at once, as they arrive, until stdin closes.
fn intruder() {
    let mut attacks = Vec::new();
    for line in std::io::stdin().lines() {
        let t: SocketAddr = line.unwrap().trim().parse().unwrap();
        attacks.push(std::thread::spawn(move || attack(t)));
    }
    let (mut reached, mut refused, mut held) = (0, 0, Vec::new());
    for a in attacks {
        let (r, f, h) = a.join().expect("an attack panicked (see above)");
        reached += r;
        refused += f;
        held.extend(h);
    }
    println!("INTRUDER {refused} attempts refused, {reached} ports reached, {} half-open held", held.len());
}

#[test]
fn hostile_peers_from_another_host_are_refused() {
    if std::env::var("FLATSHARD_TEST_INTRUDER").is_ok() {
        return intruder();
    }
    if is_worker() {
        return job_under_attack();
    }
    let name = "hostile_peers_from_another_host_are_refused";
    let Some(bed) = netbed::bed_or_skip(name, 3, None) else { return };
    let dir = new_ready_dir(&bed);
    let env = [("FLATSHARD_TEST_READY_DIR", dir.display().to_string()), ("FLATSHARD_TOKEN", TOKEN.to_string())];
    let kids = bed.spawn_ranks(name, &[2, 2], 29500, &env);
    let exe = std::env::current_exe().unwrap();
    let mut intruder = bed
        .command(2, &exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("FLATSHARD_TEST_INTRUDER", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // every listening port on the job's hosts (the store, and the data
    // listeners of groups being formed) goes to the intruder as it appears
    let mut seen = std::collections::BTreeSet::new();
    let t = Instant::now();
    let mut stdin = intruder.stdin.take().unwrap();
    // A data listener lives only while its group forms (the job forms one
    // every other iteration). Rank 3 is frozen (SIGSTOP) for 300 ms out of
    // every 400: a group forming then waits for it, its listeners open, while
    // they are found (ss) and attacked.
    let rank3 = kids[3].id().to_string();
    let signal = |sig: &str| {
        let _ = Command::new("kill").args([sig, &rank3]).status();
    };
    let (mut frozen, mut since) = (false, Instant::now());
    // the intruder reports each port it reached
    let reached_data = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut out = intruder.stdout.take().unwrap();
    let counter = reached_data.clone();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            let data = text.lines().filter(|l| l.contains("REACHED ") && !l.ends_with(":29500")).count();
            counter.store(data, std::sync::atomic::Ordering::SeqCst);
        }
        text
    });
    while t.elapsed() < Duration::from_secs(40) && reached_data.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        if frozen && since.elapsed() >= Duration::from_millis(300) {
            signal("-CONT");
            (frozen, since) = (false, Instant::now());
        } else if !frozen && since.elapsed() >= Duration::from_millis(100) {
            signal("-STOP");
            (frozen, since) = (true, Instant::now());
        }
        for a in listeners(&bed, 0).into_iter().chain(listeners(&bed, 1)) {
            if a.ip().to_string().starts_with("198.18.") && seen.insert(a) {
                writeln!(stdin, "{a}").unwrap();
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    signal("-CONT");
    drop(stdin);
    wait_ready(&dir, 4, Duration::from_secs(120));
    let status = intruder.wait().unwrap();
    let mut text = reader.join().unwrap();
    let _ = intruder.stderr.take().unwrap().read_to_string(&mut text);
    assert!(status.success() && text.contains("INTRUDER "), "intruder failed:\n{text}");
    let summary = text.lines().find_map(|l| l.find("INTRUDER ").map(|i| l[i..].to_string())).unwrap_or_default();
    assert!(seen.len() >= 2, "only {} listening ports seen (the store and at least one data listener expected)", seen.len());
    let reached: usize = summary.split(", ").find_map(|p| p.strip_suffix(" ports reached")?.parse().ok()).unwrap_or(0);
    assert!(reached >= 3, "the intruder reached {reached} ports (the store and at least 2 data listeners expected): {summary}");
    std::fs::write(dir.join("done"), b"1").unwrap();
    let res = wait_all(kids, Duration::from_secs(180));
    let _ = std::fs::remove_dir_all(&dir);
    for (r, (code, out)) in res.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {r} did not complete under attack:\n{out}");
    }
    println!("#: hostile peers from another host: {} listening ports attacked ({summary}), job completed", seen.len());
}
