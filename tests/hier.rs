//! The hierarchical transport (SPEC §5) in the multi-host test bed
//! (scripts/netbed.sh): ranks on simulated hosts (own network namespace and
//! hostname), shared memory inside a host, TCP between hosts. Every rank runs
//! the same collectives on a hierarchical communicator (transport AUTO) and on
//! a flat TCP ring over the same ranks, and checks both against exact
//! references and against each other. Skips with a reason where network
//! namespaces are unavailable.
mod common;
use common::netbed::{self, NetBed};
use common::*;
use flatshard::{Comm, CommOptions, DType, ErrorKind, ReduceOp, Transport};
use std::time::Duration;

/// Deterministic per-rank data: small integers, so sums are exact in any order.
fn ints(rank: usize, n: usize, salt: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7 + rank * 13 + salt) % 17) as f32 - 8.0).collect()
}

/// Non-integer data (sums depend on order only in the last bits).
fn reals(rank: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 * 0.618 + rank as f32 * 1.37).sin()) * 3.3).collect()
}

/// The worker's two communicators over the same ranks: hierarchical (AUTO,
/// on MASTER_PORT) and flat TCP (MASTER_PORT + 1).
fn both() -> (Comm, Comm) {
    let opts = CommOptions { timeout: Duration::from_secs(60), ..Default::default() };
    let h = Comm::init_from_env(opts.clone()).unwrap_or_else(|e| panic!("rank {}: hier init: {e}", env_rank()));
    let port: u16 = std::env::var("MASTER_PORT").unwrap().parse().unwrap();
    let addr = std::env::var("MASTER_ADDR").unwrap();
    let t = Comm::init(&addr, port + 1, h.rank() as i32, h.size() as i32, CommOptions { transport: Transport::Tcp, ..opts })
        .unwrap_or_else(|e| panic!("rank {}: tcp init: {e}", h.rank()));
    (h, t)
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{what} i={i}: hier {x} vs tcp {y}");
    }
}

const SIZES: &[usize] = &[0, 1, 5, 1000, 4097, 8191, 300_000, 1_000_003];

fn collectives_body(h: &Comm, t: &Comm) {
    let (r, w) = (h.rank(), h.size());
    assert_eq!(h.transport_name(), "hier");
    assert_eq!(t.transport_name(), "tcp");
    for &n in SIZES {
        for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min, ReduceOp::Avg] {
            let mut a = f32_bytes(&ints(r, n, 1));
            let mut b = a.clone();
            h.all_reduce(&mut a, DType::F32, op).unwrap();
            t.all_reduce(&mut b, DType::F32, op).unwrap();
            let all: Vec<Vec<f32>> = (0..w).map(|q| ints(q, n, 1)).collect();
            let want: Vec<f32> = (0..n)
                .map(|i| {
                    let v = (0..w).map(|q| all[q][i]);
                    match op {
                        ReduceOp::Sum => v.sum(),
                        ReduceOp::Max => v.fold(f32::MIN, f32::max),
                        ReduceOp::Min => v.fold(f32::MAX, f32::min),
                        _ => v.sum::<f32>() / w as f32,
                    }
                })
                .collect();
            assert_eq!(bytes_f32(&a), want, "hier all_reduce {op:?} n={n} rank {r}");
            assert_eq!(a, b, "hier vs tcp all_reduce {op:?} n={n} rank {r}");
        }
        let mut a = f32_bytes(&reals(r, n));
        let mut b = a.clone();
        h.all_reduce(&mut a, DType::F32, ReduceOp::Sum).unwrap();
        t.all_reduce(&mut b, DType::F32, ReduceOp::Sum).unwrap();
        close(&bytes_f32(&a), &bytes_f32(&b), &format!("all_reduce of reals n={n}"));

        let send = f32_bytes(&ints(r, n, 2));
        let (mut ra, mut rb) = (vec![0u8; send.len() * w], vec![0u8; send.len() * w]);
        h.all_gather(&send, &mut ra, DType::F32).unwrap();
        t.all_gather(&send, &mut rb, DType::F32).unwrap();
        let got = bytes_f32(&ra);
        for q in 0..w {
            assert_eq!(&got[q * n..(q + 1) * n], &ints(q, n, 2)[..], "all_gather n={n} block {q}");
        }
        assert_eq!(ra, rb);

        let send = f32_bytes(&ints(r, n * w, 3));
        let (mut ra, mut rb) = (vec![0u8; n * 4], vec![0u8; n * 4]);
        h.reduce_scatter(&send, &mut ra, DType::F32, ReduceOp::Sum).unwrap();
        t.reduce_scatter(&send, &mut rb, DType::F32, ReduceOp::Sum).unwrap();
        let all: Vec<Vec<f32>> = (0..w).map(|q| ints(q, n * w, 3)).collect();
        let want: Vec<f32> = (0..n).map(|i| (0..w).map(|q| all[q][r * n + i]).sum()).collect();
        assert_eq!(bytes_f32(&ra), want, "reduce_scatter n={n} rank {r}");
        assert_eq!(ra, rb);

        for root in [0, w / 2, w - 1] {
            let mut buf = f32_bytes(&ints(r, n, 4 + root));
            h.broadcast(&mut buf, DType::F32, root as i32).unwrap();
            assert_eq!(bytes_f32(&buf), ints(root, n, 4 + root), "broadcast n={n} root {root} rank {r}");
        }
    }
    // several pipeline pieces (8 MiB), ragged and whole
    for n in [3_000_001usize, 4 << 20] {
        let mut a = f32_bytes(&ints(r, n, 5));
        let mut b = a.clone();
        h.all_reduce(&mut a, DType::F32, ReduceOp::Sum).unwrap();
        t.all_reduce(&mut b, DType::F32, ReduceOp::Sum).unwrap();
        let all: Vec<Vec<f32>> = (0..w).map(|q| ints(q, n, 5)).collect();
        let got = bytes_f32(&a);
        assert!((0..n).all(|i| got[i] == (0..w).map(|q| all[q][i]).sum::<f32>()), "large all_reduce n={n} rank {r}");
        assert!(a == b, "hier vs tcp large all_reduce n={n}");
    }
    h.barrier().unwrap();
}

/// To and from the bits of a half-precision type.
type Conv = (fn(f64) -> u16, fn(u16) -> f64);

/// Every dtype, exact small-integer data, small and large; f16/bf16 of reals
/// against the flat ring within the one-rounding-per-hop rule.
fn dtypes_body(h: &Comm, t: &Comm) {
    let (r, w) = (h.rank(), h.size());
    exact_all_reduce_every_dtype(h);
    // reals in half precision: each result within one rounding per hop of the
    // exact sum (hier: at most L-1 intra + H-1 cross hops; tcp: N-1 hops)
    let n = 100_000;
    for dt in [DType::F16, DType::BF16] {
        let x = |q: usize, i: usize| (i as f64 * 0.37 + q as f64).sin() * 4.0;
        let (to, from): Conv = if dt == DType::F16 {
            (|v| half::f16::from_f64(v).to_bits(), |b| half::f16::from_bits(b).to_f64())
        } else {
            (|v| half::bf16::from_f64(v).to_bits(), |b| half::bf16::from_bits(b).to_f64())
        };
        let mk = |q: usize| -> Vec<u8> { (0..n).flat_map(|i| to(x(q, i)).to_ne_bytes()).collect() };
        let mut a = mk(r);
        h.all_reduce(&mut a, dt, ReduceOp::Sum).unwrap();
        let eps = if dt == DType::F16 { 1.0 / 1024.0 } else { 1.0 / 128.0 };
        for i in 0..n {
            let exact: f64 = (0..w).map(|q| from(to(x(q, i)))).sum();
            let got = from(u16::from_ne_bytes([a[2 * i], a[2 * i + 1]]));
            // each hop rounds a partial sum of at most 4 * w in magnitude
            let bound = (w as f64) * eps * 4.0 * w as f64 / 2.0 + 1e-9;
            assert!((got - exact).abs() <= bound, "{} i={i}: {got} vs {exact}", dt.name());
        }
    }
    let _ = t;
}

/// MISMATCH on every rank, in small and large calls, the communicator usable after.
fn mismatch_body(h: &Comm) {
    let (r, w) = (h.rank(), h.size());
    let last = w - 1;
    // count differs on the last rank (small path and large path)
    for n in [10usize, 100_000] {
        let mut buf = f32_bytes(&vec![1.0; if r == last { n + 1 } else { n }]);
        let e = h.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Mismatch, "rank {r} n={n}: {e}");
    }
    // different collectives (barrier vs small all_reduce vs broadcast)
    let mut buf = f32_bytes(&[1.0; 8]);
    let e = match r % 3 {
        0 => h.barrier().unwrap_err(),
        1 => h.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap_err(),
        _ => h.broadcast(&mut buf, DType::F32, 0).unwrap_err(),
    };
    assert_eq!(e.kind, ErrorKind::Mismatch, "rank {r}: {e}");
    // a root that differs
    let mut buf = vec![0u8; 64];
    let e = h.broadcast(&mut buf, DType::U8, if r == 0 { 1 } else { 0 }).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Mismatch, "rank {r}: {e}");
    // still usable
    let mut big = f32_bytes(&vec![r as f32; 300_000]);
    h.all_reduce(&mut big, DType::F32, ReduceOp::Sum).unwrap();
    let want = (0..w).sum::<usize>() as f32;
    assert!(bytes_f32(&big).iter().all(|x| *x == want));
    h.barrier().unwrap();
}

/// Groups whose ranks sit on one host use shared memory alone; groups
/// across hosts stay hierarchical.
fn splits_body(h: &Comm, t: &Comm) {
    let r = h.rank();
    let host: usize = std::env::var("FLATSHARD_TEST_HOST").unwrap().parse().unwrap();
    let local: usize = std::env::var("LOCAL_RANK").unwrap().parse().unwrap();
    let lws: usize = std::env::var("LOCAL_WORLD_SIZE").unwrap().parse().unwrap();
    let on_host = h.split(host as i32, r as i32).unwrap().unwrap();
    assert_eq!(on_host.size(), lws);
    assert_eq!(on_host.transport_name(), if lws == 1 { "self" } else { "shm" }, "rank {r}: a group on one host");
    let mut b = f32_bytes(&[1.0; 1000]);
    on_host.all_reduce(&mut b, DType::F32, ReduceOp::Sum).unwrap();
    assert_eq!(bytes_f32(&b), vec![lws as f32; 1000]);
    let across = h.split(local as i32, r as i32).unwrap().unwrap();
    if across.size() > 1 {
        // one rank per host: the flat ring is the hierarchical scheme
        assert_eq!(across.transport_name(), "tcp", "rank {r}: a group across hosts, one rank on each");
    }
    let mut b = f32_bytes(&vec![1.0; 300_000]);
    across.all_reduce(&mut b, DType::F32, ReduceOp::Sum).unwrap();
    assert!(bytes_f32(&b).iter().all(|x| *x == across.size() as f32));
    // hosts interleaved in rank order (not torchrun's host-major order)
    let key = (local * 10 + host) as i32;
    let (hi, ti) = (h.split(0, key).unwrap().unwrap(), t.split(0, key).unwrap().unwrap());
    collectives_body(&hi, &ti);
    h.barrier().unwrap();
}

/// Run `body` on the ranks of `per_host` in a fresh bed.
fn in_bed(name: &str, per_host: &[usize], rate: Option<&str>, body: impl FnOnce()) {
    if is_worker() {
        return body();
    }
    let Some(bed) = netbed::bed_or_skip(name, per_host.len(), rate) else { return };
    run_in(&bed, name, per_host);
}

fn run_in(bed: &NetBed, name: &str, per_host: &[usize]) {
    let world: usize = per_host.iter().sum();
    let res = wait_all(bed.spawn_ranks(name, per_host, 29500, &[]), Duration::from_secs(300));
    let failed: Vec<String> =
        res.iter().enumerate().filter(|(_, (c, _))| *c != Some(0)).map(|(r, (c, out))| format!("--- rank {r} (exit {c:?}):\n{out}")).collect();
    assert!(failed.is_empty(), "{name}: {} of {world} ranks failed:\n{}", failed.len(), failed.join("\n"));
    for (r, (_, out)) in res.iter().enumerate() {
        assert!(out.contains("running 1 test"), "rank {r} of {name} ran no test:\n{out}");
    }
}

#[test]
fn hier_collectives_2x2() {
    in_bed("hier_collectives_2x2", &[2, 2], None, || {
        let (h, t) = both();
        collectives_body(&h, &t);
        dtypes_body(&h, &t);
    });
}

#[test]
fn hier_collectives_2_1_2() {
    in_bed("hier_collectives_2_1_2", &[2, 1, 2], None, || {
        let (h, t) = both();
        collectives_body(&h, &t);
        dtypes_body(&h, &t);
    });
}

#[test]
fn hier_mismatch_and_splits_2x2() {
    in_bed("hier_mismatch_and_splits_2x2", &[2, 2], None, || {
        let (h, t) = both();
        mismatch_body(&h);
        splits_body(&h, &t);
    });
}

#[test]
fn hier_mismatch_and_splits_2_1_2() {
    in_bed("hier_mismatch_and_splits_2_1_2", &[2, 1, 2], None, || {
        let (h, t) = both();
        mismatch_body(&h);
        splits_body(&h, &t);
    });
}
