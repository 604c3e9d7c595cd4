//! Collectives over real processes and sockets, against sequential references.
mod common;
use common::*;
use flatshard::{DType, ErrorKind, ReduceOp};

/// Deterministic per-rank data: small integers so f32 sums are exact.
fn data(rank: usize, n: usize, salt: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7 + rank * 13 + salt) % 17) as f32 - 8.0).collect()
}

fn check_all(comm: flatshard::Comm, sizes: &[usize]) {
    let (r, w) = (comm.rank(), comm.size());
    if let Ok(t) = std::env::var("FLATSHARD_TEST_TRANSPORT") {
        assert_eq!(comm.transport_name(), t, "forced transport not used");
    }
    for &n in sizes {
        // all_reduce SUM / MAX / AVG
        for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Avg] {
            let mut buf = f32_bytes(&data(r, n, 1));
            comm.all_reduce(&mut buf, DType::F32, op).unwrap();
            let got = bytes_f32(&buf);
            let all: Vec<Vec<f32>> = (0..w).map(|q| data(q, n, 1)).collect();
            for i in 0..n {
                let vals: Vec<f32> = (0..w).map(|q| all[q][i]).collect();
                let want = match op {
                    ReduceOp::Sum => vals.iter().sum::<f32>(),
                    ReduceOp::Max => vals.iter().cloned().fold(f32::MIN, f32::max),
                    _ => vals.iter().sum::<f32>() / w as f32,
                };
                assert_eq!(got[i], want, "all_reduce {op:?} n={n} i={i} rank {r}");
            }
        }
        // all_gather
        let send = f32_bytes(&data(r, n, 2));
        let mut recv = vec![0u8; send.len() * w];
        comm.all_gather(&send, &mut recv, DType::F32).unwrap();
        let got = bytes_f32(&recv);
        for q in 0..w {
            assert_eq!(&got[q * n..(q + 1) * n], &data(q, n, 2)[..], "all_gather n={n} block {q}");
        }
        // reduce_scatter
        let send = f32_bytes(&data(r, n * w, 3));
        let mut recv = vec![0u8; n * 4];
        comm.reduce_scatter(&send, &mut recv, DType::F32, ReduceOp::Sum).unwrap();
        let got = bytes_f32(&recv);
        let all: Vec<Vec<f32>> = (0..w).map(|q| data(q, n * w, 3)).collect();
        for i in 0..n {
            let want: f32 = (0..w).map(|q| all[q][r * n + i]).sum();
            assert_eq!(got[i], want, "reduce_scatter n={n} i={i}");
        }
        // broadcast from the last rank
        let root = w - 1;
        let mut buf = f32_bytes(&data(r, n, 4));
        comm.broadcast(&mut buf, DType::F32, root as i32).unwrap();
        assert_eq!(bytes_f32(&buf), data(root, n, 4), "broadcast n={n}");
    }
    comm.barrier().unwrap();
}

const SIZES: &[usize] = &[0, 1, 5, 1000, 8191, 300_000, 1_000_003];

/// One test per (transport, world size): `$name` must be the function name.
macro_rules! suite {
    ($name:ident, $t:expr, $w:expr) => {
        #[test]
        fn $name() {
            ranks(stringify!($name), $w, &[transport_env($t)], |c| check_all(c, SIZES));
        }
    };
}
suite!(tcp_collectives_w2, "tcp", 2);
suite!(tcp_collectives_w3, "tcp", 3);
suite!(tcp_collectives_w4, "tcp", 4);
suite!(shm_collectives_w2, "shm", 2);
suite!(shm_collectives_w3, "shm", 3);
suite!(shm_collectives_w4, "shm", 4);

/// Small shm chunks so every collective takes many rounds with ragged ends.
#[test]
fn shm_collectives_small_chunks_w3() {
    let env = [transport_env("shm"), ("FLATSHARD_SHM_CHUNK", "65536".into()), ("FLATSHARD_SHM_SMALL", "4000".into())];
    ranks("shm_collectives_small_chunks_w3", 3, &env, |c| check_all(c, SIZES));
}

/// The TCP socket-buffer setting: kernel autotuning (0) and the smallest
/// fixed size (every send and receive partial) give the same results.
#[test]
fn tcp_collectives_autotuned_socket_buffers_w3() {
    let env = [transport_env("tcp"), ("FLATSHARD_TCP_SOCKBUF", "0".into())];
    ranks("tcp_collectives_autotuned_socket_buffers_w3", 3, &env, |c| check_all(c, SIZES));
}

#[test]
fn tcp_collectives_small_socket_buffers_w3() {
    let env = [transport_env("tcp"), ("FLATSHARD_TCP_SOCKBUF", "16384".into())];
    ranks("tcp_collectives_small_socket_buffers_w3", 3, &env, |c| check_all(c, SIZES));
}

/// A malformed or out-of-range FLATSHARD_TCP_SOCKBUF fails init on every
/// rank at once with INVALID_ARGUMENT naming the variable and the limits
/// (checked before the rendezvous, so no rank is left waiting).
#[test]
fn bad_tcp_socket_buffer_setting_is_invalid_argument() {
    const NAME: &str = "bad_tcp_socket_buffer_setting_is_invalid_argument";
    if is_worker() {
        let v = std::env::var("FLATSHARD_TCP_SOCKBUF").unwrap();
        let t = std::time::Instant::now();
        let e = flatshard::Comm::init_from_env(worker_options()).err().unwrap_or_else(|| panic!("FLATSHARD_TCP_SOCKBUF={v}: init succeeded"));
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{v}: {e}");
        assert!(e.msg.contains("FLATSHARD_TCP_SOCKBUF") && e.msg.contains(&format!("rank {}", env_rank())), "{v}: {e}");
        if v != "lots" {
            assert!(e.msg.contains("16384") && e.msg.contains("1073741824"), "{v}: the limits are not named: {e}");
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "{v}: took {:?}", t.elapsed());
        return;
    }
    for v in ["lots", "4096", "2147483648"] {
        let res = wait_all(spawn(NAME, 2, &[("FLATSHARD_TCP_SOCKBUF", v.into())]), std::time::Duration::from_secs(60));
        for (r, (code, out)) in res.iter().enumerate() {
            assert_eq!(*code, Some(0), "FLATSHARD_TCP_SOCKBUF={v}: rank {r} failed:\n{out}");
            assert!(out.contains("running 1 test"), "rank {r} ran no test:\n{out}");
        }
    }
}

fn mismatch_body(c: flatshard::Comm) {
    let r = c.rank();
    // rank 1 passes a different count (small and large paths)
    for n in [10usize, 200_000] {
        let cnt = if r == 1 { n + 1 } else { n };
        let mut buf = vec![0u8; cnt * 4];
        let e = c.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Mismatch, "{e}");
    }
    // different op
    let mut buf = vec![0u8; 16];
    let op = if r == 0 { ReduceOp::Max } else { ReduceOp::Sum };
    assert_eq!(c.all_reduce(&mut buf, DType::F32, op).unwrap_err().kind, ErrorKind::Mismatch);
    // different collective altogether
    let e = if r == 2 { c.barrier().unwrap_err() } else { c.broadcast(&mut buf, DType::F32, 0).unwrap_err() };
    assert_eq!(e.kind, ErrorKind::Mismatch, "{e}");
    // still usable
    let mut buf = f32_bytes(&[r as f32; 4]);
    c.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap();
    assert_eq!(bytes_f32(&buf), vec![3.0; 4]);
    let mut big = f32_bytes(&vec![r as f32; 300_000]);
    c.all_reduce(&mut big, DType::F32, ReduceOp::Sum).unwrap();
    assert!(bytes_f32(&big).iter().all(|x| *x == 3.0));
}

#[test]
fn mismatch_is_reported_everywhere_and_comm_survives() {
    ranks("mismatch_is_reported_everywhere_and_comm_survives", 3, &[transport_env("tcp")], mismatch_body);
}

#[test]
fn shm_mismatch_is_reported_everywhere_and_comm_survives() {
    ranks("shm_mismatch_is_reported_everywhere_and_comm_survives", 3, &[transport_env("shm")], mismatch_body);
}

fn split_body(c: flatshard::Comm) {
    let r = c.rank();
    let sub = c.new_subgroups(2).unwrap();
    assert_eq!(sub.size(), 2);
    assert_eq!(sub.rank(), r % 2);
    assert_eq!(sub.transport_name(), c.transport_name());
    let mut buf = f32_bytes(&[r as f32]);
    sub.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap();
    let want = if r < 2 { 1.0 } else { 5.0 };
    assert_eq!(bytes_f32(&buf), vec![want]);
    // odd ranks, reversed order by key; rank 0 opts out
    let color = if r == 0 { -1 } else { (r % 2) as i32 };
    let s = c.split(color, -(r as i32)).unwrap();
    match r {
        0 => assert!(s.is_none()),
        1 | 3 => {
            let s = s.unwrap();
            assert_eq!(s.size(), 2);
            assert_eq!(s.rank(), if r == 3 { 0 } else { 1 });
            let mut b = f32_bytes(&[r as f32; 3]);
            s.all_reduce(&mut b, DType::F32, ReduceOp::Sum).unwrap();
            assert_eq!(bytes_f32(&b), vec![4.0; 3]);
        }
        _ => assert_eq!(s.unwrap().size(), 1),
    }
    // rank 0 serves the store: keep it alive until every group is built
    c.barrier().unwrap();
}

#[test]
fn split_and_subgroups() {
    ranks("split_and_subgroups", 4, &[transport_env("tcp")], split_body);
}

#[test]
fn shm_split_and_subgroups() {
    ranks("shm_split_and_subgroups", 4, &[transport_env("shm")], split_body);
}

/// Every dtype, SUM and MAX, small and chunked: exact small-integer data, so
/// both transports must give the exact answer on every rank.
fn dtypes_body(c: flatshard::Comm) {
    exact_all_reduce_every_dtype(&c);
}

#[test]
fn tcp_dtypes_w3() {
    ranks("tcp_dtypes_w3", 3, &[transport_env("tcp")], dtypes_body);
}

#[test]
fn shm_dtypes_w3() {
    ranks("shm_dtypes_w3", 3, &[transport_env("shm")], dtypes_body);
}

/// Misaligned buffers (C callers may pass any address): the kernels use
/// unaligned loads, results are exact.
#[test]
fn misaligned_buffers() {
    ranks("misaligned_buffers", 2, &[], |c| {
        let r = c.rank();
        for n in [7usize, 100_000] {
            let vals: Vec<f32> = (0..n).map(|i| (i % 11) as f32 + r as f32).collect();
            let mut storage = vec![0u8; n * 4 + 1];
            storage[1..].copy_from_slice(&f32_bytes(&vals));
            c.all_reduce(&mut storage[1..], DType::F32, ReduceOp::Sum).unwrap();
            let got = bytes_f32(&storage[1..]);
            assert!(got.iter().enumerate().all(|(i, x)| *x == 2.0 * (i % 11) as f32 + 1.0), "n={n}");
        }
    });
}
