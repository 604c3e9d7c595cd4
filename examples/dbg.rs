use flatshard::*;
use std::time::Instant;
fn main() {
    let c = Comm::init_from_env(CommOptions::default()).unwrap();
    let w = c.size();
    for nb in [4096usize, 16 << 20, 64 << 20] {
        let mut buf = vec![1u8; nb];
        let mut ts = vec![];
        for _ in 0..6 {
            c.barrier().unwrap();
            let t = Instant::now();
            c.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap();
            ts.push(t.elapsed().as_secs_f64());
        }
        ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let m = ts[3];
        if c.rank() == 0 {
            println!("AR w={w} bytes={nb} median={:.6}s busbw={:.2} GB/s", m, nb as f64 / m / 1e9 * 2.0 * (w - 1) as f64 / w as f64);
        }
    }
}
