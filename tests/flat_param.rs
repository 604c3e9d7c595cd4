//! Flat parameters over real processes and sockets, against sequential
//! references computed here independently of src/flat_param/layout.rs.
mod common;
use common::*;
use flatshard::flat_param::{FlatParam, FlatParamOptions, ParamInput, Sharding, UnshardOptions};
use flatshard::{Comm, DType, ErrorKind};

/// Deterministic param values: param i, element j (distinct, exact in f32).
fn value(i: usize, j: usize) -> f32 {
    (i * 1000 + j) as f32 + 0.5
}

fn params(numels: &[usize]) -> Vec<Vec<u8>> {
    numels.iter().enumerate().map(|(i, &n)| f32_bytes(&(0..n).map(|j| value(i, j)).collect::<Vec<_>>())).collect()
}

fn inputs(bufs: &[Vec<u8>]) -> Vec<ParamInput<'_>> {
    bufs.iter().map(|b| ParamInput::host(b, DType::F32)).collect()
}

/// The SPEC §2 layout, written out naively: Some((i, j)) = param i element j, None = padding.
fn reference_layout(numels: &[usize], align: bool, pad_world: usize, world: usize) -> (Vec<Option<(usize, usize)>>, usize) {
    let mut flat = Vec::new();
    for (i, &n) in numels.iter().enumerate() {
        while align && i > 0 && flat.len() % 4 != 0 {
            flat.push(None);
        }
        flat.extend((0..n).map(|j| Some((i, j))));
    }
    while align && flat.len() % pad_world != 0 {
        flat.push(None);
    }
    let c = flat.len().div_ceil(world);
    flat.resize(c * world, None);
    (flat, c)
}

fn view_f32(t: &flatshard::tensor::TensorRef) -> &'static mut [f32] {
    if t.numel == 0 {
        return &mut [];
    }
    assert!(!t.data.is_null());
    unsafe { std::slice::from_raw_parts_mut(t.data as *mut f32, t.numel as usize) }
}
fn grad_f32(t: &flatshard::tensor::TensorRef) -> Option<&'static mut [f32]> {
    if t.numel == 0 && !t.grad.is_null() {
        return Some(&mut []);
    }
    (!t.grad.is_null()).then(|| unsafe { std::slice::from_raw_parts_mut(t.grad as *mut f32, t.numel as usize) })
}

const CASES: &[&[usize]] = &[&[21, 35, 25], &[110, 11], &[5], &[1], &[7, 3, 13, 2], &[0, 3, 0], &[0]];

fn check_shards(comm: Comm) {
    let (r, w) = (comm.rank(), comm.size());
    for numels in CASES {
        for align in [false, true] {
            for sharding in [Sharding::FullShard, Sharding::ShardGradOp, Sharding::NoShard] {
                let bufs = params(numels);
                let opts = FlatParamOptions { sharding, align_params: align, ..Default::default() };
                let mut fp = FlatParam::new(&comm, None, &inputs(&bufs), &opts).unwrap();
                let sw = if sharding == Sharding::NoShard { 1 } else { w };
                let (flat, c) = reference_layout(numels, align, w, sw);
                let ctx = format!("rank {r}/{w} {numels:?} align {align} {sharding:?}");
                assert_eq!(fp.shard_numel() as usize, c, "{ctx}");
                assert_eq!(fp.padded_numel() as usize, c * sw, "{ctx}");
                assert_eq!(fp.numel() as usize, numels.iter().sum::<usize>(), "{ctx}");
                let me = if sw == 1 { 0 } else { r };
                let want: Vec<f32> = flat[c * me..c * me + c].iter().map(|e| e.map_or(0.0, |(i, j)| value(i, j))).collect();
                assert_eq!(bytes_f32(fp.shard_bytes()), want, "shard {ctx}");
                for i in 0..numels.len() {
                    let (t, off) = fp.shard_view(i as u64).unwrap();
                    let pos: Vec<usize> = (0..c).filter(|k| matches!(flat[c * me + k], Some((pi, _)) if pi == i)).collect();
                    assert_eq!(t.numel as usize, pos.len(), "shard view {i} {ctx}");
                    if let Some(&k0) = pos.first() {
                        assert_eq!(off as usize, flat[c * me + k0].unwrap().1, "offset in param {i} {ctx}");
                        let v = view_f32(&t);
                        for (k, x) in v.iter().enumerate() {
                            assert_eq!(*x, value(i, off as usize + k), "{ctx}");
                        }
                    }
                }
                fp.unshard(&comm, UnshardOptions::default()).unwrap();
                for (i, &n) in numels.iter().enumerate() {
                    let t = fp.view(i as u64).unwrap();
                    assert_eq!(t.numel as usize, n);
                    assert_eq!(view_f32(&t).to_vec(), (0..n).map(|j| value(i, j)).collect::<Vec<_>>(), "view {i} {ctx}");
                    assert!(grad_f32(&t).map_or(n == 0, |g| g.iter().all(|x| *x == 0.0)), "training grad starts at zero");
                }
                fp.reshard(&comm).unwrap();
            }
        }
    }
    comm.barrier().unwrap();
}

#[test]
fn shards_match_reference_w1() {
    ranks("shards_match_reference_w1", 1, &[], check_shards);
}
#[test]
fn shards_match_reference_w2() {
    ranks("shards_match_reference_w2", 2, &[], check_shards);
}
#[test]
fn shards_match_reference_w3() {
    ranks("shards_match_reference_w3", 3, &[], check_shards);
}
#[test]
fn shards_match_reference_w4() {
    ranks("shards_match_reference_w4", 4, &[], check_shards);
}

#[test]
fn sync_from_rank0_and_bf16_training_gather() {
    ranks("sync_from_rank0_and_bf16_training_gather", 3, &[], |comm| {
        let r = comm.rank();
        let numels = [21usize, 35, 25];
        let mut bufs = params(&numels);
        if r != 0 {
            bufs = numels.iter().map(|&n| f32_bytes(&vec![-7.0; n])).collect();
        }
        let opts = FlatParamOptions { sync_from_rank0: true, align_params: true, param_dtype: Some(DType::BF16), ..Default::default() };
        let mut fp = FlatParam::new(&comm, None, &inputs(&bufs), &opts).unwrap();
        // bf16 alignment (a = 8): 21 | 3 | 35 | 5 | 25 → 89, padded to 90 for 3 ranks
        assert_eq!(fp.padded_numel(), 90);
        fp.unshard(&comm, UnshardOptions { writeback: true, ..Default::default() }).unwrap();
        for (i, &n) in numels.iter().enumerate() {
            let t = fp.view(i as u64).unwrap();
            assert_eq!(t.dtype, DType::F32, "summon with writeback gathers in full precision");
            assert_eq!(view_f32(&t).to_vec(), (0..n).map(|j| value(i, j)).collect::<Vec<_>>());
        }
        fp.reshard(&comm).unwrap();
        fp.unshard(&comm, UnshardOptions::default()).unwrap();
        let t = fp.view(1).unwrap();
        assert_eq!(t.dtype, DType::BF16, "training unshard gathers in param_dtype");
        let v = unsafe { std::slice::from_raw_parts(t.data as *const u16, 35) };
        for (j, b) in v.iter().enumerate() {
            assert_eq!(*b, flatshard::reduce::f32_to_bf16_bits(value(1, j)));
        }
        fp.reshard(&comm).unwrap();
    });
}

/// writeback × rank0_only × with_grads × strategy: after reshard each rank's
/// shard holds exactly what SPEC §2 says.
fn writeback_matrix(comm: Comm) {
    let (r, w) = (comm.rank(), comm.size());
    let numels = [21usize, 35, 25];
    for sharding in [Sharding::FullShard, Sharding::ShardGradOp, Sharding::NoShard] {
        for align in [false, true] {
            for writeback in [false, true] {
                for rank0_only in [false, true] {
                    // grads: 0 = none anywhere, 1 = only rank 0, 2 = every rank
                    for (with_grads, grads) in [(false, 2), (true, 0), (true, 1), (true, 2)] {
                        let ctx = format!("rank {r}/{w} {sharding:?} align {align} wb {writeback} r0 {rank0_only} wg {with_grads} grads {grads}");
                        let bufs = params(&numels);
                        let opts = FlatParamOptions { sharding, align_params: align, ..Default::default() };
                        let mut fp = FlatParam::new(&comm, None, &inputs(&bufs), &opts).unwrap();
                        let c = fp.shard_numel() as usize;
                        let sw = if sharding == Sharding::NoShard { 1 } else { w };
                        let me = if sw == 1 { 0 } else { r };
                        let (flat, _) = reference_layout(&numels, align, w, sw);
                        // shard grad = -(flat index) on real elements, 9 on padding
                        let has_grad = grads == 2 || (grads == 1 && r == 0);
                        if has_grad {
                            let g: Vec<f32> = (0..c).map(|k| if flat[c * me + k].is_some() { -((c * me + k) as f32) } else { 9.0 }).collect();
                            fp.ensure_shard_grad().unwrap().copy_from_slice(&f32_bytes(&g));
                        }
                        let before = bytes_f32(fp.shard_bytes());
                        let grad_before = fp.shard_grad_bytes().map(bytes_f32);
                        let uo = UnshardOptions { writeback, rank0_only, with_grads, offload_to_cpu: false, forward_only: false };
                        fp.unshard(&comm, uo).unwrap();
                        let holds_full = !rank0_only || r == 0;
                        for i in 0..numels.len() {
                            let res = fp.view(i as u64);
                            if !holds_full {
                                let e = res.unwrap_err();
                                assert_eq!(e.kind, ErrorKind::InvalidState, "{ctx}");
                                assert!(e.msg.contains("shard_view"), "{}", e.msg);
                                continue;
                            }
                            let t = res.unwrap();
                            let s = fp.layout().offsets[i] as usize;
                            if with_grads {
                                match grad_f32(&t) {
                                    None => assert_eq!(grads, 0, "grad view NULL only when nobody has grads: {ctx}"),
                                    Some(g) => {
                                        assert_ne!(grads, 0, "{ctx}");
                                        for (j, x) in g.iter().enumerate() {
                                            let k = s + j;
                                            let owner = if sw == 1 { r } else { k / c };
                                            let want = if grads == 2 || owner == 0 { -(k as f32) } else { 0.0 };
                                            let want = if sw == 1 && !(grads == 2 || r == 0) { 0.0 } else { want };
                                            assert_eq!(*x, want, "gathered grad param {i} elem {j}: {ctx}");
                                        }
                                        for x in g.iter_mut() {
                                            *x = 500.0;
                                        }
                                    }
                                }
                            }
                            for x in view_f32(&t).iter_mut() {
                                *x = -*x;
                            }
                        }
                        fp.reshard(&comm).unwrap();
                        let after = bytes_f32(fp.shard_bytes());
                        // Which ranks see the edits: writeback → everyone (rank 0's edits
                        // under rank0_only); NO_SHARD without writeback → the editors
                        // themselves (views are the shard).
                        // NO_SHARD views are the shard itself: the editors keep their
                        // edits; writeback brings rank 0's edits everywhere.
                        let edited = if sw == 1 { holds_full || writeback } else { writeback };
                        for k in 0..c {
                            let want = match flat[c * me + k] {
                                None => before[k], // padding is never written
                                Some(_) if edited => -before[k],
                                Some(_) => before[k],
                            };
                            assert_eq!(after[k], want, "shard elem {k}: {ctx}");
                        }
                        let grad_after = fp.shard_grad_bytes().map(bytes_f32);
                        let grads_edited = with_grads && grads != 0 && if sw > 1 { writeback } else { writeback || (holds_full && has_grad) };
                        if grads_edited {
                            let ga = grad_after.expect("edited grads land in the shard grad");
                            for k in 0..c {
                                let want = match flat[c * me + k] {
                                    Some(_) => 500.0,
                                    None => grad_before.as_ref().map_or(0.0, |g| g[k]),
                                };
                                assert_eq!(ga[k], want, "shard grad elem {k}: {ctx}");
                            }
                        } else {
                            assert_eq!(grad_after, grad_before, "grads untouched: {ctx}");
                        }
                    }
                }
            }
        }
    }
    comm.barrier().unwrap();
}

#[test]
fn writeback_matrix_w2() {
    ranks("writeback_matrix_w2", 2, &[], writeback_matrix);
}
#[test]
fn writeback_matrix_w3() {
    ranks("writeback_matrix_w3", 3, &[], writeback_matrix);
}

#[test]
fn singleton_param_writeback() {
    ranks("singleton_param_writeback", 2, &[], |comm| {
        let r = comm.rank();
        let bufs = vec![f32_bytes(&[1.0])];
        let mut fp = FlatParam::new(&comm, None, &inputs(&bufs), &FlatParamOptions::default()).unwrap();
        assert_eq!((fp.numel(), fp.padded_numel(), fp.shard_numel()), (1, 2, 1));
        fp.shard_bytes_mut().copy_from_slice(&f32_bytes(&[r as f32 + 2.0]));
        fp.unshard(&comm, UnshardOptions { writeback: true, ..Default::default() }).unwrap();
        let t = fp.view(0).unwrap();
        assert_eq!(view_f32(&t).to_vec(), vec![2.0]);
        view_f32(&t)[0] = 0.0;
        fp.reshard(&comm).unwrap();
        let want = if r == 0 { 0.0 } else { 3.0 };
        assert_eq!(bytes_f32(fp.shard_bytes()), vec![want], "rank {r}");
    });
}

/// y = W x + b with W 2x4, b 2 (two params), MSE loss, plain SGD.
const IN: usize = 4;
const OUT: usize = 2;
const BATCH: usize = 6;

fn sample(k: usize) -> ([f32; IN], [f32; OUT]) {
    let x: [f32; IN] = std::array::from_fn(|i| (((k * 7 + i * 3) % 11) as f32 - 5.0) / 5.0);
    let y: [f32; OUT] = std::array::from_fn(|o| x.iter().enumerate().map(|(i, v)| v * ((o + i) as f32 * 0.3 - 0.4)).sum::<f32>() + o as f32);
    (x, y)
}

/// Mean-over-batch gradients of 0.5 * |W x + b - y|^2 for samples `ks`.
fn grads(w: &[f32], b: &[f32], ks: std::ops::Range<usize>) -> (Vec<f32>, Vec<f32>) {
    let (mut gw, mut gb) = (vec![0f32; OUT * IN], vec![0f32; OUT]);
    let n = ks.len() as f32;
    for k in ks {
        let (x, y) = sample(k);
        for o in 0..OUT {
            let pred: f32 = (0..IN).map(|i| w[o * IN + i] * x[i]).sum::<f32>() + b[o];
            let e = pred - y[o];
            for i in 0..IN {
                gw[o * IN + i] += e * x[i] / n;
            }
            gb[o] += e / n;
        }
    }
    (gw, gb)
}

const LR: f32 = 0.1;
const STEPS: usize = 20;

fn init() -> (Vec<f32>, Vec<f32>) {
    ((0..OUT * IN).map(|i| (i as f32 * 0.37).sin() * 0.5).collect(), vec![0.1, -0.2])
}

/// `set_to_none`: the optimizer drops the shard gradient (`drop_grad`,
/// PyTorch's default zero_grad) instead of zeroing it.
fn train(comm: Comm, replicate: Option<&Comm>, sharding: Sharding, global_rank: usize, set_to_none: bool) -> (Vec<f32>, Vec<f32>) {
    let (w0, b0) = init();
    let bufs = vec![f32_bytes(&w0), f32_bytes(&b0)];
    let opts = FlatParamOptions { sharding, align_params: true, ..Default::default() };
    let mut fp = FlatParam::new(&comm, replicate, &inputs(&bufs), &opts).unwrap();
    for _ in 0..STEPS {
        fp.unshard(&comm, UnshardOptions::default()).unwrap();
        let (w, b) = (view_f32(&fp.view(0).unwrap()).to_vec(), view_f32(&fp.view(1).unwrap()).to_vec());
        if sharding == Sharding::FullShard {
            fp.reshard(&comm).unwrap(); // after forward
            fp.unshard(&comm, UnshardOptions::default()).unwrap(); // before backward
        }
        let lo = global_rank * BATCH;
        let (gw, gb) = grads(&w, &b, lo..lo + BATCH);
        grad_f32(&fp.view(0).unwrap()).unwrap().copy_from_slice(&gw);
        grad_f32(&fp.view(1).unwrap()).unwrap().copy_from_slice(&gb);
        fp.reduce_grads(&comm, replicate).unwrap();
        fp.reshard(&comm).unwrap();
        let s = fp.shard();
        let (d, g) = (view_f32(&s), grad_f32(&s).unwrap());
        for (x, gx) in d.iter_mut().zip(g.iter()) {
            *x -= LR * gx;
        }
        if set_to_none {
            fp.drop_grad(&comm).unwrap();
            assert!(fp.shard().grad.is_null() && fp.shard_grad_bytes().is_none());
        } else {
            fp.zero_grad(&comm).unwrap();
            assert!(grad_f32(&fp.shard()).unwrap().iter().all(|x| *x == 0.0));
        }
    }
    fp.unshard(&comm, UnshardOptions::default()).unwrap();
    let out = (view_f32(&fp.view(0).unwrap()).to_vec(), view_f32(&fp.view(1).unwrap()).to_vec());
    fp.reshard(&comm).unwrap();
    out
}

fn full_batch(world: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut w, mut b) = init();
    for _ in 0..STEPS {
        let (gw, gb) = grads(&w, &b, 0..BATCH * world);
        w.iter_mut().zip(&gw).for_each(|(x, g)| *x -= LR * g);
        b.iter_mut().zip(&gb).for_each(|(x, g)| *x -= LR * g);
    }
    (w, b)
}

fn assert_close(got: &(Vec<f32>, Vec<f32>), want: &(Vec<f32>, Vec<f32>), ctx: &str) {
    let a = got.0.iter().chain(&got.1);
    let b = want.0.iter().chain(&want.1);
    let d = a.zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(d <= 1e-5, "{ctx}: max abs diff {d} > 1e-5\n got {got:?}\nwant {want:?}");
    // the model actually moved
    assert!(got.1[0] != init().1[0]);
}

fn training(comm: Comm) {
    let (r, w) = (comm.rank(), comm.size());
    let want = full_batch(w);
    // zero_grad and drop_grad (set_to_none) train bit for bit alike: a
    // reduction into no gradient is the reduction added to zeros
    for sharding in [Sharding::FullShard, Sharding::ShardGradOp, Sharding::NoShard] {
        let got = train(comm.split(0, r as i32).unwrap().unwrap(), None, sharding, r, false);
        assert_close(&got, &want, &format!("rank {r}/{w} {sharding:?}"));
        let dropped = train(comm.split(0, r as i32).unwrap().unwrap(), None, sharding, r, true);
        assert_eq!(dropped, got, "rank {r}/{w} {sharding:?}: drop_grad training differs from zero_grad training");
    }
    if w == 4 {
        // HYBRID_SHARD: shard over {0,1} / {2,3}, replicate over {0,2} / {1,3}
        let rep = comm.split((r % 2) as i32, r as i32).unwrap().unwrap();
        let got = train(comm.new_subgroups(2).unwrap(), Some(&rep), Sharding::HybridShard, r, false);
        assert_close(&got, &want, &format!("rank {r}/{w} HYBRID"));
        let dropped = train(comm.new_subgroups(2).unwrap(), Some(&rep), Sharding::HybridShard, r, true);
        assert_eq!(dropped, got, "rank {r}/{w} HYBRID: drop_grad training differs from zero_grad training");
    }
    comm.barrier().unwrap();
}

#[test]
fn training_matches_full_batch_w2() {
    ranks("training_matches_full_batch_w2", 2, &[], training);
}
#[test]
fn training_matches_full_batch_w4() {
    ranks("training_matches_full_batch_w4", 4, &[], training);
}

#[test]
fn mismatch_and_bad_arguments() {
    ranks("mismatch_and_bad_arguments", 3, &[], |comm| {
        let r = comm.rank();
        // rank 1 passes a different layout
        let numels: &[usize] = if r == 1 { &[21, 36, 25] } else { &[21, 35, 25] };
        let bufs = params(numels);
        let e = FlatParam::new(&comm, None, &inputs(&bufs), &FlatParamOptions::default()).err().unwrap();
        assert_eq!(e.kind, ErrorKind::Mismatch, "{e}");
        assert!(e.msg.contains("rank 1"), "{}", e.msg);
        // rank 2 passes different options
        let opts = FlatParamOptions { align_params: r == 2, ..Default::default() };
        let bufs = params(&[21, 35]);
        let e = FlatParam::new(&comm, None, &inputs(&bufs), &opts).err().unwrap();
        assert_eq!(e.kind, ErrorKind::Mismatch, "{e}");
        // rank 2: integer dtype at index 1 → INVALID_ARGUMENT there, MISMATCH elsewhere
        let ints = vec![0u8; 16];
        let mut ins = inputs(&bufs);
        if r == 2 {
            ins[1] = ParamInput::host(&ints, DType::I32);
        }
        let e = FlatParam::new(&comm, None, &ins, &FlatParamOptions::default()).err().unwrap();
        if r == 2 {
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
            assert!(e.msg.contains("params[1]"), "{}", e.msg);
        } else {
            assert_eq!(e.kind, ErrorKind::Mismatch, "{e}");
            assert!(e.msg.contains("rank 2"), "{}", e.msg);
        }
        // empty list everywhere; mixed dtypes on every rank
        let e = FlatParam::new(&comm, None, &[], &FlatParamOptions::default()).err().unwrap();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.msg.contains("n_params"), "{}", e.msg);
        let halves = vec![0u8; 8];
        let mixed = [ParamInput::host(&bufs[0], DType::F32), ParamInput::host(&halves, DType::BF16)];
        let e = FlatParam::new(&comm, None, &mixed, &FlatParamOptions::default()).err().unwrap();
        assert!(e.kind == ErrorKind::InvalidArgument && e.msg.contains("params[1].dtype") && e.msg.contains("f32"), "{e}");
        // HYBRID without a replicate comm
        let opts = FlatParamOptions { sharding: Sharding::HybridShard, ..Default::default() };
        assert_eq!(FlatParam::new(&comm, None, &inputs(&bufs), &opts).err().unwrap().kind, ErrorKind::InvalidArgument);
        // CUDA tensors: UNSUPPORTED without a driver; with one, host memory
        // that claims to be on the device is INVALID_ARGUMENT
        let cuda = [unsafe { ParamInput::raw(bufs[0].as_ptr(), 4, DType::F32, flatshard::tensor::Device::Cuda(0)) }];
        let e = FlatParam::new(&comm, None, &cuda, &FlatParamOptions::default()).err().unwrap();
        if flatshard::cuda::driver().is_err() {
            assert!(e.kind == ErrorKind::Unsupported && e.msg.contains("cuda:0") && e.msg.contains("driver"), "{e}");
        } else {
            assert!(e.kind == ErrorKind::InvalidArgument && e.msg.contains("not CUDA device memory"), "{e}");
        }
        // the communicator is still usable
        let fp = FlatParam::new(&comm, None, &inputs(&bufs), &FlatParamOptions::default()).unwrap();
        assert_eq!(fp.numel(), 56);
        comm.barrier().unwrap();
    });
}

#[test]
fn invalid_state_paths_and_free_while_unsharded() {
    ranks("invalid_state_paths_and_free_while_unsharded", 2, &[], |comm| {
        let r = comm.rank();
        let bufs = params(&[21, 35, 25]);
        let mut fp = FlatParam::new(&comm, None, &inputs(&bufs), &FlatParamOptions::default()).unwrap();
        let st = |e: flatshard::Error, hint: &str| {
            assert_eq!(e.kind, ErrorKind::InvalidState, "{e}");
            assert!(e.msg.contains(hint) && e.msg.contains(&format!("rank {r}")), "message should say to call {hint}: {}", e.msg);
        };
        st(fp.view(0).unwrap_err(), "flatshard_flat_param_unshard");
        st(fp.reshard(&comm).unwrap_err(), "flatshard_flat_param_unshard");
        st(fp.reduce_grads(&comm, None).unwrap_err(), "flatshard_flat_param_unshard");
        assert_eq!(fp.view(3).unwrap_err().kind, ErrorKind::InvalidArgument);
        fp.unshard(&comm, UnshardOptions::default()).unwrap();
        st(fp.unshard(&comm, UnshardOptions::default()).unwrap_err(), "flatshard_flat_param_reshard");
        fp.reshard(&comm).unwrap();
        fp.unshard(&comm, UnshardOptions { rank0_only: true, ..Default::default() }).unwrap();
        if r != 0 {
            st(fp.view(0).unwrap_err(), "flatshard_flat_param_shard_view");
            assert_eq!(fp.shard_view(2).unwrap().0.numel, 25, "shard views still work");
        }
        st(fp.reduce_grads(&comm, None).unwrap_err(), "reshard");
        fp.reshard(&comm).unwrap();
        fp.unshard(&comm, UnshardOptions { with_grads: true, ..Default::default() }).unwrap();
        st(fp.reduce_grads(&comm, None).unwrap_err(), "reshard");
        fp.reshard(&comm).unwrap();
        // free while unsharded (training grads allocated too)
        fp.unshard(&comm, UnshardOptions::default()).unwrap();
        grad_f32(&fp.view(2).unwrap()).unwrap()[0] = 1.0;
        drop(fp);
        comm.barrier().unwrap();
    });
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// rank0_only: the peak memory of ranks ≠ 0 does not grow by the full size.
/// (Without the host cache, which would keep rank 0's full buffer resident
/// from the first unshard to the second.)
#[test]
fn rank0_only_memory_is_bounded() {
    ranks("rank0_only_memory_is_bounded", 4, &[("FLATSHARD_HOST_CACHE_BYTES", "0".into())], |comm| {
        let r = comm.rank();
        let n = 16 << 20; // 64 MiB of f32
        let mut fp = {
            let bufs = vec![f32_bytes(&vec![1.5f32; n])];
            FlatParam::new(&comm, None, &inputs(&bufs), &FlatParamOptions::default()).unwrap()
        };
        let full_kib = (n * 4 / 1024) as u64;
        for writeback in [false, true] {
            comm.barrier().unwrap();
            let base = status_kib("VmRSS:");
            // reset the peak (VmHWM) to the current RSS
            std::fs::write("/proc/self/clear_refs", "5").unwrap();
            fp.unshard(&comm, UnshardOptions { rank0_only: true, writeback, ..Default::default() }).unwrap();
            if r == 0 {
                let t = fp.view(0).unwrap();
                assert!(view_f32(&t).iter().all(|x| *x == 1.5));
            }
            fp.reshard(&comm).unwrap();
            let peak = status_kib("VmHWM:").saturating_sub(base);
            eprintln!("rank {r}: rank0_only unshard+reshard (writeback {writeback}): peak RSS growth {peak} KiB, full param {full_kib} KiB");
            if r == 0 {
                assert!(peak >= full_kib * 9 / 10, "rank 0 must hold the full param (growth {peak} KiB): the measurement works");
            } else {
                assert!(peak < full_kib / 2, "rank {r}: peak grew by {peak} KiB, full param is {full_kib} KiB");
            }
        }
        comm.barrier().unwrap();
    });
}

/// Mixed precision: grads written in param_dtype, reduced in reduce_dtype,
/// accumulated into the full-precision shard grad.
#[test]
fn mixed_precision_reduce_grads() {
    ranks("mixed_precision_reduce_grads", 2, &[], |comm| {
        let r = comm.rank();
        let numels = [21usize, 35, 25];
        let bufs = params(&numels);
        for (pd, rd) in [(DType::BF16, Some(DType::F32)), (DType::F16, None), (DType::BF16, None)] {
            let ctx = format!("rank {r} param {pd:?} reduce {rd:?}");
            let opts = FlatParamOptions { align_params: true, param_dtype: Some(pd), reduce_dtype: rd, ..Default::default() };
            let mut fp = FlatParam::new(&comm, None, &inputs(&bufs), &opts).unwrap();
            for step in 1..=2 {
                fp.unshard(&comm, UnshardOptions::default()).unwrap();
                for i in 0..numels.len() {
                    let t = fp.view(i as u64).unwrap();
                    assert_eq!(t.dtype, pd, "{ctx}");
                    let g = unsafe { std::slice::from_raw_parts_mut(t.grad as *mut u16, t.numel as usize) };
                    let v = (r as f32 + 1.0) * 0.5; // 0.5 / 1.0, exact in bf16 and f16
                    let bits = if pd == DType::BF16 { half::bf16::from_f32(v).to_bits() } else { half::f16::from_f32(v).to_bits() };
                    g.fill(bits);
                }
                fp.reduce_grads(&comm, None).unwrap();
                fp.reduce_grads(&comm, None).unwrap(); // the full grad was zeroed: adds nothing
                fp.reshard(&comm).unwrap();
                let g = bytes_f32(fp.shard_grad_bytes().unwrap());
                let c = fp.shard_numel();
                for (k, x) in g.iter().enumerate() {
                    let real = (0..numels.len()).any(|i| {
                        let (t, _) = fp.shard_view(i as u64).unwrap();
                        let base = fp.shard().data as usize;
                        t.numel > 0 && (t.data as usize - base) / 4 <= k && k < (t.data as usize - base) / 4 + t.numel as usize
                    });
                    let want = if real { 0.75 * step as f32 } else { 0.0 };
                    assert_eq!(*x, want, "shard grad elem {k} of {c} after step {step}: {ctx}");
                }
            }
            fp.zero_grad(&comm).unwrap();
            assert!(bytes_f32(fp.shard_grad_bytes().unwrap()).iter().all(|x| *x == 0.0));
            // set to none: the next reduction (converted from reduce_dtype
            // where it differs) becomes the shard gradient, not added to it
            let before = bytes_f32(fp.shard_grad_bytes().unwrap()).len();
            fp.unshard(&comm, UnshardOptions::default()).unwrap();
            for i in 0..numels.len() {
                let t = fp.view(i as u64).unwrap();
                let g = unsafe { std::slice::from_raw_parts_mut(t.grad as *mut u16, t.numel as usize) };
                let v = (r as f32 + 1.0) * 0.5;
                g.fill(if pd == DType::BF16 { half::bf16::from_f32(v).to_bits() } else { half::f16::from_f32(v).to_bits() });
            }
            fp.drop_grad(&comm).unwrap();
            assert!(fp.shard_grad_bytes().is_none() && fp.shard().grad.is_null(), "{ctx}");
            fp.reduce_grads(&comm, None).unwrap();
            fp.reshard(&comm).unwrap();
            let g = bytes_f32(fp.shard_grad_bytes().unwrap());
            assert_eq!(g.len(), before, "{ctx}");
            let (base, mut real) = (fp.shard().data as usize, vec![false; g.len()]);
            for i in 0..numels.len() {
                let (t, _) = fp.shard_view(i as u64).unwrap();
                if t.numel > 0 {
                    let k = (t.data as usize - base) / 4;
                    real[k..k + t.numel as usize].iter_mut().for_each(|x| *x = true);
                }
            }
            for (k, x) in g.iter().enumerate() {
                assert_eq!(*x, if real[k] { 0.75 } else { 0.0 }, "element {k} after drop_grad + reduce: {ctx}");
            }
        }
    });
}

/// HYBRID_SHARD local SGD: average the shards over the replicate group
/// without unsharding; each shard becomes the mean of its replicas.
#[test]
fn average_flat_params_over_the_replicate_group() {
    ranks("average_flat_params_over_the_replicate_group", 4, &[], |c| {
        let r = c.rank();
        let shard_comm = c.new_subgroups(2).unwrap(); // {0,1} {2,3}
        let rep = c.split((r % 2) as i32, r as i32).unwrap().unwrap(); // {0,2} {1,3}
                                                                       // replica group k = r / 2 holds values 10*k + i
        let vals: Vec<f32> = (0..21).map(|i| (10 * (r / 2)) as f32 + i as f32).collect();
        let buf = f32_bytes(&vals);
        let opts = FlatParamOptions { sharding: Sharding::HybridShard, ..Default::default() };
        let mut fp = FlatParam::new(&shard_comm, Some(&rep), &[ParamInput::host(&buf, DType::F32)], &opts).unwrap();
        let mut fps = [&mut fp];
        flatshard::averaging::average_flat_params(&rep, &mut fps).unwrap();
        // mean over k in {0,1} of 10k + i = 5 + i
        fp.unshard(&shard_comm, UnshardOptions::default()).unwrap();
        let v = fp.view(0).unwrap();
        let got = unsafe { std::slice::from_raw_parts(v.data as *const f32, 21) }.to_vec();
        let want: Vec<f32> = (0..21).map(|i| 5.0 + i as f32).collect();
        assert_eq!(got, want, "rank {r}");
        // averaging while unsharded is refused
        let mut fps = [&mut fp];
        let e = flatshard::averaging::average_flat_params(&rep, &mut fps).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidState, "{e}");
        fp.reshard(&shard_comm).unwrap();
        c.barrier().unwrap();
    });
}

/// Sharded checkpoint: each rank saves its shard and the layout to its own
/// file; a fresh flat param (other initial values) restores them and unshards
/// to exactly the original parameters, bit for bit.
#[test]
fn sharded_save_restore_round_trips_exactly() {
    ranks("sharded_save_restore_round_trips_exactly", 3, &[], |c| {
        let r = c.rank();
        let dir = std::env::temp_dir().join(format!("flatshard-ckpt-{}", std::env::var("MASTER_PORT").unwrap()));
        std::fs::create_dir_all(&dir).unwrap();
        let numels = [21usize, 35, 25];
        let orig: Vec<Vec<f32>> = numels.iter().enumerate().map(|(p, &n)| (0..n).map(|i| (p * 1000 + i) as f32 * 0.37 - 5.0).collect()).collect();
        let bufs: Vec<Vec<u8>> = orig.iter().map(|v| f32_bytes(v)).collect();
        let opts = FlatParamOptions { align_params: true, ..Default::default() };
        let inputs: Vec<ParamInput> = bufs.iter().map(|b| ParamInput::host(b, DType::F32)).collect();
        let fp = FlatParam::new(&c, None, &inputs, &opts).unwrap();
        // save: layout header + shard bytes
        let path = dir.join(format!("rank{r}.shard"));
        let mut file = Vec::new();
        for v in [fp.numel(), fp.padded_numel(), fp.shard_numel(), c.size() as u64] {
            file.extend_from_slice(&v.to_le_bytes());
        }
        file.extend_from_slice(fp.shard_bytes());
        std::fs::write(&path, &file).unwrap();
        drop(fp);
        c.barrier().unwrap();
        // restore into a flat param built from zeros
        let zeros: Vec<Vec<u8>> = numels.iter().map(|&n| vec![0u8; n * 4]).collect();
        let zin: Vec<ParamInput> = zeros.iter().map(|b| ParamInput::host(b, DType::F32)).collect();
        let mut fresh = FlatParam::new(&c, None, &zin, &opts).unwrap();
        let saved = std::fs::read(&path).unwrap();
        let hdr: Vec<u64> = saved[..32].chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(hdr, vec![fresh.numel(), fresh.padded_numel(), fresh.shard_numel(), c.size() as u64], "layout differs");
        fresh.shard_bytes_mut().copy_from_slice(&saved[32..]);
        fresh.unshard(&c, UnshardOptions::default()).unwrap();
        for (p, want) in orig.iter().enumerate() {
            let v = fresh.view(p as u64).unwrap();
            assert_eq!(v.numel as usize, want.len());
            let got = unsafe { std::slice::from_raw_parts(v.data as *const f32, want.len()) };
            assert!(got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "param {p} differs after restore");
        }
        fresh.reshard(&c).unwrap();
        c.barrier().unwrap();
        if r == 0 {
            let _ = std::fs::remove_dir_all(&dir);
        }
    });
}

fn minor_faults() -> i64 {
    // SAFETY: getrusage fills the struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_minflt
}

/// Full params of ≥ 4 MiB are recycled between reshard and the next unshard
/// (no fresh pages to fault in), and a recycled buffer never leaks stale
/// contents: every unshard shows exactly what the previous writeback stored.
/// With FLATSHARD_HOST_CACHE_BYTES=0 the same unshard faults its pages in
/// (which shows the fault count measures the cache). (A malformed value fails
/// creation of the communicator: tests/settings.rs.)
/// The body of the recycling tests, with FLATSHARD_HOST_CACHE_BYTES = `cache`.
fn recycle_check(comm: Comm, cache: &str) {
    let r = comm.rank();
    let numels = [10 << 20, 1001]; // 40 MiB (above glibc's mmap threshold) + a tail that pads the shards
                                   // values that stay exact in f32 after a few +1 edits
    let val = |i: usize, j: usize| ((i * 7919 + j) % 4093) as f32 + 0.5;
    let bufs: Vec<Vec<u8>> = numels.iter().enumerate().map(|(i, &n)| f32_bytes(&(0..n).map(|j| val(i, j)).collect::<Vec<_>>())).collect();
    let mut fp = FlatParam::new(&comm, None, &inputs(&bufs), &FlatParamOptions::default()).unwrap();
    let wb = UnshardOptions { writeback: true, ..Default::default() };
    let mut faults = Vec::new();
    for round in 0..6usize {
        comm.barrier().unwrap();
        let f0 = minor_faults();
        fp.unshard(&comm, wb).unwrap();
        faults.push(minor_faults() - f0);
        // flat index of param i element j (no alignment), and its owner
        let chunk = (numels[0] + numels[1]).div_ceil(2);
        for (i, &n) in numels.iter().enumerate() {
            let v = view_f32(&fp.view(i as u64).unwrap());
            assert_eq!(v.len(), n);
            for (j, x) in v.iter_mut().enumerate() {
                let want = val(i, j) + round.saturating_sub(1) as f32;
                assert_eq!(*x, want, "rank {r} round {round} param {i} element {j}");
                // Edit: +1 in this rank's shard (writeback keeps it); garbage
                // elsewhere, which a stale recycled buffer would show next round.
                let owner = usize::from(if i == 0 { j } else { numels[0] + j } >= chunk);
                if round > 0 {
                    *x = if owner == r { want + 1.0 } else { -7.0 };
                }
            }
        }
        fp.reshard(&comm).unwrap();
    }
    eprintln!("#: rank {r}, FLATSHARD_HOST_CACHE_BYTES='{cache}': page faults per unshard {faults:?}");
    if cache.is_empty() {
        // (the kernel may reclaim a MADV_FREE'd buffer under memory pressure,
        // so one recycled round without faults is what is required)
        assert!(faults[2..].iter().any(|f| *f < 8), "rank {r}: recycled unshards should not fault pages in: {faults:?}");
    } else {
        assert!(faults[2..].iter().all(|f| *f >= 8), "rank {r}: without the cache every unshard maps fresh pages: {faults:?}");
    }
}

#[test]
fn full_param_buffers_are_recycled_without_stale_data() {
    ranks("full_param_buffers_are_recycled_without_stale_data", 2, &[("FLATSHARD_HOST_CACHE_BYTES", String::new())], |c| recycle_check(c, ""));
}

#[test]
fn full_param_buffers_without_the_cache_fault_in_fresh_pages() {
    ranks("full_param_buffers_without_the_cache_fault_in_fresh_pages", 2, &[("FLATSHARD_HOST_CACHE_BYTES", "0".into())], |c| recycle_check(c, "0"));
}

/// Recycled host buffers (full params, full grads and reduction temporaries
/// of ≥ 1 MiB cycle through the host cache, a dirty full parameter's buffer
/// may come back as the next zero-filled gradient) never show stale data:
/// every first view's gradient reads as zeros, reduce_grads (which reads the
/// full gradient in place) adds exactly the mean into the shard gradient and
/// leaves the full gradient zeroed, for several layers of the same size in
/// turn, in f32 and with a bf16 reduce dtype (the converting path).
fn recycled_training_buffers(comm: Comm) {
    let (r, w) = (comm.rank(), comm.size());
    let n: usize = (1 << 20) + 3; // 4 MiB + a tail that pads the shards
    for reduce_bf16 in [false, true] {
        let bufs: Vec<Vec<u8>> = (0..3).map(|l| f32_bytes(&(0..n).map(|j| ((j + l) % 7) as f32).collect::<Vec<_>>())).collect();
        let mut opts = FlatParamOptions::default();
        if reduce_bf16 {
            opts.reduce_dtype = Some(DType::BF16);
        }
        let mut fps: Vec<FlatParam> = bufs.iter().map(|b| FlatParam::new(&comm, None, &[ParamInput::host(b, DType::F32)], &opts).unwrap()).collect();
        for round in 0..3usize {
            for (l, fp) in fps.iter_mut().enumerate() {
                fp.unshard(&comm, UnshardOptions::default()).unwrap();
                let t = fp.view(0).unwrap();
                let data = view_f32(&t);
                assert!(data.iter().enumerate().all(|(j, x)| *x == ((j + l) % 7) as f32), "rank {r} round {round} layer {l}: gathered data");
                let g = grad_f32(&t).expect("training views carry a grad");
                assert!(g.iter().all(|x| *x == 0.0), "rank {r} round {round} layer {l}: a first view's gradient must read as zeros");
                // small integers: exact in bf16 and after averaging over w ranks
                g.iter_mut().enumerate().for_each(|(j, x)| *x = ((j % 3) * w + 2 * r) as f32);
                fp.reduce_grads(&comm, None).unwrap();
                assert!(g.iter().all(|x| *x == 0.0), "rank {r} round {round} layer {l}: reduce_grads zeroes the full gradient");
                fp.reshard(&comm).unwrap();
                let chunk = n.div_ceil(w);
                let sg = fp.shard_grad_bytes().expect("a shard gradient after reduce_grads");
                let sg: Vec<f32> = sg.chunks_exact(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])).collect();
                let mean_r = (w - 1) as f32; // mean over ranks of 2r
                for (k, x) in sg.iter().enumerate() {
                    let j = r * chunk + k;
                    let want = if j < n { (round + 1) as f32 * (((j % 3) * w) as f32 + mean_r) } else { 0.0 };
                    assert_eq!(*x, want, "rank {r} round {round} layer {l} bf16 {reduce_bf16}: shard grad element {k}");
                }
            }
        }
    }
}

#[test]
fn recycled_training_buffers_w2() {
    ranks("recycled_training_buffers_w2", 2, &[], recycled_training_buffers);
}

#[test]
fn recycled_training_buffers_w3() {
    ranks("recycled_training_buffers_w3", 3, &[], recycled_training_buffers);
}
