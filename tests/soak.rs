//! Soak: many small collectives back to back; resident memory and open file
//! descriptors must stay flat. Prints start/end figures (scripts/reliability.sh
//! collects them). FLATSHARD_SOAK_ITERS overrides the count (default 10000).
mod common;
use common::*;
use flatshard::{DType, ReduceOp};

pub fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap()
}

pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn soak_small_collectives() {
    ranks("soak_small_collectives", 3, &[], |c| {
        let iters: usize = std::env::var("FLATSHARD_SOAK_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
        let w = c.size() as f32;
        let mut buf = f32_bytes(&[1.0; 64]);
        let mut send = vec![1u8; 256];
        let mut recv = vec![0u8; 256 * c.size()];
        // warm up allocations, then measure
        for _ in 0..200 {
            c.all_reduce(&mut buf, DType::F32, ReduceOp::Avg).unwrap();
        }
        let (rss0, fd0) = (rss_kib(), open_fds());
        for i in 0..iters {
            match i % 4 {
                0 => c.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap(),
                1 => c.all_gather(&send, &mut recv, DType::U8).unwrap(),
                2 => c.broadcast(&mut send, DType::U8, (i % c.size()) as i32).unwrap(),
                _ => c.barrier().unwrap(),
            }
            if i % 4 == 0 {
                buf = f32_bytes(&[1.0; 64]);
            }
        }
        let (rss1, fd1) = (rss_kib(), open_fds());
        assert_eq!(bytes_f32(&buf)[0], 1.0);
        let _ = w;
        println!("#: soak rank {}: {iters} collectives, RSS {rss0} -> {rss1} KiB, fds {fd0} -> {fd1}", c.rank());
        assert!(fd1 <= fd0, "file descriptors leaked: {fd0} -> {fd1}");
        assert!(rss1 < rss0 + 2048, "resident memory grew from {rss0} to {rss1} KiB");
    });
}
