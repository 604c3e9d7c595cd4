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

#[test]
fn soak_unshard_reshard_cycles() {
    use flatshard::flat_param::{FlatParam, FlatParamOptions, ParamInput, UnshardOptions};
    ranks("soak_unshard_reshard_cycles", 2, &[], |c| {
        let cycles: usize = std::env::var("FLATSHARD_SOAK_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
        let w = f32_bytes(&(0..10_000).map(|i| i as f32).collect::<Vec<_>>());
        let b = f32_bytes(&[0.5; 100]);
        let inputs = [ParamInput::host(&w, DType::F32), ParamInput::host(&b, DType::F32)];
        let mut fp = FlatParam::new(&c, None, &inputs, &FlatParamOptions::default()).unwrap();
        let wb = UnshardOptions { writeback: true, ..Default::default() };
        for _ in 0..20 {
            fp.unshard(&c, wb).unwrap();
            fp.reshard(&c).unwrap();
        }
        let (rss0, fd0) = (rss_kib(), open_fds());
        for i in 0..cycles {
            let opts = if i % 3 == 0 { UnshardOptions { rank0_only: true, ..wb } } else { wb };
            fp.unshard(&c, opts).unwrap();
            if !opts.rank0_only || c.rank() == 0 {
                let v = fp.view(1).unwrap();
                // SAFETY: view 1 has 100 f32 elements, valid until reshard.
                unsafe { *(v.data as *mut f32) += 1.0 };
            }
            fp.reshard(&c).unwrap();
        }
        let (rss1, fd1) = (rss_kib(), open_fds());
        fp.unshard(&c, UnshardOptions::default()).unwrap();
        let v = fp.view(1).unwrap();
        // SAFETY: as above.
        let first = unsafe { *(v.data as *const f32) };
        assert_eq!(first, 0.5 + cycles as f32, "writeback lost edits");
        fp.reshard(&c).unwrap();
        println!(
            "#: soak rank {}: {cycles} unshard/reshard cycles (writeback, every third rank0_only), RSS {rss0} -> {rss1} KiB, fds {fd0} -> {fd1}",
            c.rank()
        );
        assert!(fd1 <= fd0, "file descriptors leaked: {fd0} -> {fd1}");
        assert!(rss1 < rss0 + 2048, "resident memory grew from {rss0} to {rss1} KiB");
    });
}
