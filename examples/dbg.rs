use flatshard::*;
fn main() {
    let c = Comm::init_from_env(CommOptions { timeout: std::time::Duration::from_secs(5), ..Default::default() }).unwrap();
    let w = c.size();
    for n in [0usize, 1, 5, 1000, 300_000] {
        let mut buf = vec![1u8; n * 4];
        let r = c.all_reduce(&mut buf, DType::F32, ReduceOp::Sum);
        eprintln!("rank {} AR n={} {:?}", c.rank(), n, r.err());
        let mut recv = vec![0u8; n * 4 * w];
        let r = c.all_gather(&buf, &mut recv, DType::F32);
        eprintln!("rank {} AG n={} {:?}", c.rank(), n, r.err());
        let r = c.reduce_scatter(&recv, &mut buf, DType::F32, ReduceOp::Sum);
        eprintln!("rank {} RS n={} {:?}", c.rank(), n, r.err());
        let r = c.broadcast(&mut buf, DType::F32, 0);
        eprintln!("rank {} BC n={} {:?}", c.rank(), n, r.err());
    }
}
