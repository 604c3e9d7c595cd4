//! Tuning bench for the host transports (the official bench is elsewhere).
//!   cargo run --release --example shm_bench -- [--world 2] [--transport shm|tcp]
//!       [--sizes 4K,16M,256M] [--ops all_reduce,all_gather,reduce_scatter]
//! Spawns `world` copies of itself; prints one JSON line per (op, size) with the
//! median time over iterations (max over ranks) and busbw as nccl-tests counts
//! it (bytes = full buffer; all_gather / reduce_scatter: the gathered total).
use flatshard::{Comm, CommOptions, DType, ReduceOp, Transport};
use std::process::Command;
use std::time::{Duration, Instant};

fn arg(name: &str, default: &str) -> String {
    let a: Vec<String> = std::env::args().collect();
    a.iter().position(|x| x == name).and_then(|i| a.get(i + 1).cloned()).unwrap_or_else(|| default.to_string())
}

fn parse_size(s: &str) -> usize {
    let (num, mul) = match s.chars().last() {
        Some('K') => (&s[..s.len() - 1], 1 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>().expect("size") * mul
}

fn main() {
    let world: usize = arg("--world", "2").parse().expect("world");
    let transport = arg("--transport", "shm");
    let sizes = arg("--sizes", "4K,16M,256M");
    let ops = arg("--ops", "all_reduce,all_gather,reduce_scatter");
    if std::env::args().any(|a| a == "--kernel") {
        // the fused reduction alone: 2 inputs of 4 MiB -> 1 output, best of 20
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let nb = 4 << 20;
            let (a, b) = (vec![0x3cu8; nb], vec![0x3cu8; nb]);
            let mut d = vec![0u8; nb];
            let mut best = f64::MAX;
            for _ in 0..20 {
                let t0 = Instant::now();
                flatshard::reduce::reduce_n(&mut d, &[&a, &b], dt, ReduceOp::Sum);
                best = best.min(t0.elapsed().as_secs_f64());
            }
            println!(
                "{{\"kernel\": \"{}\", \"dtype\": \"{}\", \"in_GBps\": {:.2}}}",
                flatshard::reduce::kernel_name(),
                dt.name(),
                2.0 * nb as f64 / best / 1e9
            );
        }
        return;
    }
    if std::env::args().any(|a| a == "--memcpy") {
        // single-core memcpy of the largest size: the physical bound
        let nbytes = sizes.split(',').map(parse_size).max().unwrap_or(256 << 20);
        let src = vec![1u8; nbytes];
        let mut dst = vec![0u8; nbytes];
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t0 = Instant::now();
            dst.copy_from_slice(&src);
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!("{{\"memcpy_bytes\": {nbytes}, \"best_s\": {best:.6}, \"GBps\": {:.2}}}", nbytes as f64 / best / 1e9);
        return;
    }
    if std::env::var("RANK").is_err() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let exe = std::env::current_exe().unwrap();
        let mut kids: Vec<_> = (0..world)
            .map(|r| {
                Command::new(&exe)
                    .args(std::env::args().skip(1))
                    .env("RANK", r.to_string())
                    .env("WORLD_SIZE", world.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for k in &mut kids {
            k.wait().unwrap();
        }
        return;
    }
    let t = match transport.as_str() {
        "tcp" => Transport::Tcp,
        "shm" => Transport::Shm,
        _ => Transport::Auto,
    };
    let dt = match arg("--dtype", "f32").as_str() {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => DType::F32,
    };
    let c = Comm::init_from_env(CommOptions { timeout: Duration::from_secs(300), transport: t, ..Default::default() }).unwrap();
    let (r, n) = (c.rank(), c.size());
    for op in ops.split(',') {
        for s in sizes.split(',') {
            let nbytes = parse_size(s);
            let iters = if nbytes <= 64 << 10 {
                2000
            } else if nbytes <= 32 << 20 {
                30
            } else {
                5
            };
            let mut times = Vec::with_capacity(iters);
            let (factor, mut a, mut b) = match op {
                "all_reduce" => (2.0 * (n - 1) as f64 / n as f64, vec![1u8; nbytes], vec![]),
                "all_gather" => ((n - 1) as f64 / n as f64, vec![1u8; nbytes / n], vec![0u8; nbytes / n * n]),
                "reduce_scatter" => ((n - 1) as f64 / n as f64, vec![1u8; nbytes / n * n], vec![0u8; nbytes / n]),
                "broadcast" => (1.0, vec![1u8; nbytes], vec![]),
                _ => panic!("unknown op {op}"),
            };
            // small finite values in every dtype (0x3800 = 0.5 in f16, 0x3f00 = 0.5 in bf16)
            let fill = |a: &mut Vec<u8>| match dt {
                DType::F16 => a.chunks_exact_mut(2).for_each(|x| x.copy_from_slice(&0x3800u16.to_ne_bytes())),
                DType::BF16 => a.chunks_exact_mut(2).for_each(|x| x.copy_from_slice(&0x3f00u16.to_ne_bytes())),
                _ => a.chunks_exact_mut(4).for_each(|x| x.copy_from_slice(&0.5f32.to_ne_bytes())),
            };
            fill(&mut a);
            for i in 0..iters + 2 {
                c.barrier().unwrap();
                let t0 = Instant::now();
                match op {
                    "all_reduce" => c.all_reduce(&mut a, dt, ReduceOp::Sum).unwrap(),
                    "all_gather" => c.all_gather(&a, &mut b, dt).unwrap(),
                    "reduce_scatter" => c.reduce_scatter(&a, &mut b, dt, ReduceOp::Sum).unwrap(),
                    _ => c.broadcast(&mut a, dt, 0).unwrap(),
                }
                if op == "all_reduce" && i % 8 == 7 {
                    fill(&mut a);
                }
                if i >= 2 {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
            times.sort_by(|x, y| x.partial_cmp(y).unwrap());
            let med = times[times.len() / 2];
            let mut m = med.to_ne_bytes().to_vec();
            c.all_reduce(&mut m, DType::F64, ReduceOp::Max).unwrap();
            let med = f64::from_ne_bytes(m[..8].try_into().unwrap());
            if r == 0 {
                let algbw = nbytes as f64 / med / 1e9;
                println!(
                    "{{\"impl\": \"flatshard-{}\", \"op\": \"{op}\", \"dtype\": \"{}\", \"world\": {n}, \"bytes\": {nbytes}, \"median_s\": {med:.6}, \"median_us\": {:.1}, \"busbw_GBps\": {:.3}}}",
                    c.transport_name(),
                    dt.name(),
                    med * 1e6,
                    algbw * factor
                );
            }
        }
    }
}
