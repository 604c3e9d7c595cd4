//! Multi-process test harness: a test re-runs its own test binary once per
//! rank (real processes, real sockets), with torchrun's variables set.
#![allow(dead_code)]

pub mod netbed;

use flatshard::{Comm, CommOptions, Transport};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const RANK_ENV: &str = "FLATSHARD_TEST_WORKER";

// free_port(): a free loopback port for a test's rendezvous store.
include!("../support/free_port.rs");

pub fn is_worker() -> bool {
    std::env::var(RANK_ENV).is_ok()
}

pub fn env_rank() -> usize {
    std::env::var("RANK").unwrap().parse().unwrap()
}

/// Spawn `world` ranks of test `name` (this binary) with extra env; return the children.
pub fn spawn(name: &str, world: usize, extra: &[(&str, String)]) -> Vec<Child> {
    spawn_on_port(name, world, free_port(), extra)
}

pub fn spawn_on_port(name: &str, world: usize, port: u16, extra: &[(&str, String)]) -> Vec<Child> {
    let all: Vec<usize> = (0..world).collect();
    spawn_on_port_ranks(name, world, port, extra, &all)
}

/// Spawn only the given ranks of a `world`-rank job on `port`.
pub fn spawn_on_port_ranks(name: &str, world: usize, port: u16, extra: &[(&str, String)], which: &[usize]) -> Vec<Child> {
    if let Some(kids) = netbed::spawn_from_env(name, world, port, extra, which) {
        return kids;
    }
    let exe = std::env::current_exe().unwrap();
    which
        .iter()
        .map(|&r| {
            let mut c = Command::new(&exe);
            c.args([name, "--exact", "--nocapture", "--test-threads=1", "--include-ignored"])
                .env(RANK_ENV, "1")
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            for (k, v) in extra {
                c.env(k, v);
            }
            c.spawn().unwrap()
        })
        .collect()
}

/// Wait for every child (killing all after `limit`); return (exit codes, outputs).
pub fn wait_all(children: Vec<Child>, limit: Duration) -> Vec<(Option<i32>, String)> {
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    let res = wait_all_inner(children, limit);
    netbed::release(&pids);
    res
}

fn wait_all_inner(children: Vec<Child>, limit: Duration) -> Vec<(Option<i32>, String)> {
    let start = Instant::now();
    let mut children: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    let mut codes: Vec<Option<Option<i32>>> = vec![None; children.len()];
    while codes.iter().any(|c| c.is_none()) {
        for (i, ch) in children.iter_mut().enumerate() {
            if codes[i].is_none() {
                if let Some(st) = ch.as_mut().unwrap().try_wait().unwrap() {
                    codes[i] = Some(st.code());
                }
            }
        }
        if start.elapsed() > limit {
            for (i, ch) in children.iter_mut().enumerate() {
                if codes[i].is_none() {
                    let _ = ch.as_mut().unwrap().kill();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    children
        .into_iter()
        .zip(codes)
        .map(|(ch, code)| {
            let out = ch.unwrap().wait_with_output().unwrap();
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            (code.unwrap(), text)
        })
        .collect()
}

/// Options for a worker: 60 s timeout; FLATSHARD_TEST_TRANSPORT=tcp|shm|auto picks the transport.
pub fn worker_options() -> CommOptions {
    let transport = match std::env::var("FLATSHARD_TEST_TRANSPORT").as_deref() {
        Ok("tcp") => Transport::Tcp,
        Ok("shm") => Transport::Shm,
        _ => Transport::Auto,
    };
    CommOptions { timeout: Duration::from_secs(60), transport, ..Default::default() }
}

/// Env for `ranks`/`spawn` that forces a transport.
pub fn transport_env(t: &str) -> (&'static str, String) {
    ("FLATSHARD_TEST_TRANSPORT", t.to_string())
}

/// Run `body` on `world` ranks (as separate processes) and require all to succeed.
pub fn ranks(name: &str, world: usize, extra: &[(&str, String)], body: impl FnOnce(Comm)) {
    if is_worker() {
        let comm = Comm::init_from_env(worker_options()).unwrap_or_else(|e| panic!("rank {}: init failed: {e}", env_rank()));
        body(comm);
        return;
    }
    let res = wait_all(spawn(name, world, extra), Duration::from_secs(120));
    // Every failed rank's output (the first failure is often on another rank
    // than the lowest one that reports an error).
    let failed: Vec<String> =
        res.iter().enumerate().filter(|(_, (c, _))| *c != Some(0)).map(|(r, (c, out))| format!("--- rank {r} (exit {c:?}):\n{out}")).collect();
    assert!(failed.is_empty(), "{name}: {} of {world} ranks failed:\n{}", failed.len(), failed.join("\n"));
    for (r, (code, out)) in res.iter().enumerate() {
        assert_eq!(*code, Some(0));
        // a name that matches no test would make every worker pass vacuously
        assert!(out.contains("running 1 test"), "rank {r} of {name} ran no test (is '{name}' the test function's name?):\n{out}");
        // lines a worker marks with "#: " are figures worth showing
        for l in out.lines().filter_map(|l| l.find("#: ").map(|i| &l[i..])) {
            println!("{l}");
        }
    }
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}
pub fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_ne_bytes(c.try_into().unwrap())).collect()
}

/// `v` in `dt`'s bytes (native endian; halves rounded by the `half` crate).
pub fn encode(dt: flatshard::DType, v: f64) -> Vec<u8> {
    use flatshard::DType;
    match dt {
        DType::F32 => (v as f32).to_ne_bytes().to_vec(),
        DType::F64 => v.to_ne_bytes().to_vec(),
        DType::F16 => half::f16::from_f64(v).to_bits().to_ne_bytes().to_vec(),
        DType::BF16 => half::bf16::from_f64(v).to_bits().to_ne_bytes().to_vec(),
        DType::I32 => (v as i32).to_ne_bytes().to_vec(),
        DType::I64 => (v as i64).to_ne_bytes().to_vec(),
        DType::U8 => vec![v as u8],
    }
}

/// Every dtype, SUM and MAX, small and chunked all_reduce on exact
/// small-integer data: every transport must give the exact answer on every
/// rank.
pub fn exact_all_reduce_every_dtype(c: &Comm) {
    use flatshard::{DType, ReduceOp};
    let (r, w) = (c.rank(), c.size());
    let val = |q: usize, i: usize| ((i * 5 + q * 3) % 11) as f64;
    for dt in [DType::F64, DType::F16, DType::BF16, DType::I32, DType::I64, DType::U8] {
        for n in [7usize, 300_001] {
            for op in [ReduceOp::Sum, ReduceOp::Max] {
                let mut buf: Vec<u8> = (0..n).flat_map(|i| encode(dt, val(r, i))).collect();
                c.all_reduce(&mut buf, dt, op).unwrap();
                let want: Vec<u8> = (0..n)
                    .flat_map(|i| {
                        let vals = (0..w).map(|q| val(q, i));
                        encode(dt, if op == ReduceOp::Sum { vals.sum() } else { vals.fold(0.0, f64::max) })
                    })
                    .collect();
                assert!(buf == want, "all_reduce {} {op:?} n={n} rank {r}", dt.name());
            }
        }
    }
}
