//! Model averaging over real processes and sockets: PyTorch's own test
//! scenarios rebuilt, the SPEC §1 per-step tables, mixed dtypes, bucket edge
//! cases, every validation error, and resume. Numbers are checked against an
//! independent reference computed here (half conversions included).
mod common;
use common::*;
use flatshard::averaging::{average_parameters, average_parameters_with, Averager, AvgOptions, AVG_ONLY_WITH_GRAD};
use flatshard::ffi::averaging::*;
use flatshard::ffi::comm::{flatshard_comm, flatshard_comm_free, flatshard_comm_init, flatshard_comm_init_from_env};
use flatshard::ffi::{flatshard_device, flatshard_last_error, flatshard_status, flatshard_tensor, DeviceTypeArg, DtypeArg};
use flatshard::reduce::{bf16_bits_to_f32, f32_to_bf16_bits};
use flatshard::tensor::{Device, TensorRef};
use flatshard::{Comm, CommOptions, DType, ErrorKind};
use std::ffi::CStr;
use std::sync::Arc;
use std::time::Duration;

// ---------------------------------------------------------------- helpers

/// Run `body` once per world size (each a separate set of processes).
fn each_world(name: &str, worlds: &[usize], extra: &[(&str, String)], body: impl Fn(Arc<Comm>)) {
    if is_worker() {
        return ranks(name, 0, extra, |c| body(Arc::new(c)));
    }
    for &w in worlds {
        ranks(name, w, extra, |c| body(Arc::new(c)));
    }
}

/// Like `ranks`, but the body gets a communicator made through the C API.
fn c_ranks(name: &str, world: usize, extra: &[(&str, String)], body: impl FnOnce(*mut flatshard_comm)) {
    if is_worker() {
        let mut c: *mut flatshard_comm = std::ptr::null_mut();
        let st = unsafe { flatshard_comm_init_from_env(std::ptr::null(), &mut c) };
        assert_eq!(st, flatshard_status::FLATSHARD_OK, "{}", last_error());
        body(c);
        unsafe { flatshard_comm_free(c) };
        return;
    }
    let res = wait_all(spawn(name, world, extra), Duration::from_secs(120));
    for (r, (code, out)) in res.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {r} of {name} failed (exit {code:?}):\n{out}");
    }
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(flatshard_last_error()) }.to_string_lossy().into_owned()
}

/// f32 → f16 bits, round to nearest-even (normal numbers and zero only): an
/// oracle independent of the library's `half` crate.
fn f16_bits(x: f32) -> u16 {
    if x == 0.0 {
        return ((x.to_bits() >> 16) & 0x8000) as u16;
    }
    let b = x.to_bits();
    let sign = (b >> 16) & 0x8000;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    assert!(exp > 0 && exp < 31, "test value {x} outside the normal f16 range");
    let man = b & 0x7f_ffff;
    let mut h = sign | (exp as u32) << 10 | man >> 13;
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && h & 1 == 1) {
        h += 1;
    }
    h as u16
}

fn f16_value(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let man = (h & 0x3ff) as f32;
    if exp == 0 {
        return sign * man * 2f32.powi(-24);
    }
    sign * (1.0 + man / 1024.0) * 2f32.powi(exp - 15)
}

/// A tensor owned by the test.
struct Buf {
    dtype: DType,
    data: Vec<u8>,
    grad: Option<Vec<u8>>,
}

impl Buf {
    fn new(dtype: DType, vals: &[f64], with_grad: bool) -> Buf {
        let mut b = Buf { dtype, data: Vec::new(), grad: None };
        b.set(vals);
        if with_grad {
            b.grad = Some(vec![0u8; b.data.len()]);
        }
        b
    }
    fn set(&mut self, vals: &[f64]) {
        self.data = vals
            .iter()
            .flat_map(|&v| match self.dtype {
                DType::F32 => (v as f32).to_ne_bytes().to_vec(),
                DType::F64 => v.to_ne_bytes().to_vec(),
                DType::F16 => f16_bits(v as f32).to_ne_bytes().to_vec(),
                DType::BF16 => f32_to_bf16_bits(v as f32).to_ne_bytes().to_vec(),
                d => panic!("no test encoding for {d:?}"),
            })
            .collect();
    }
    fn get(&self) -> Vec<f64> {
        let es = self.dtype.size();
        self.data
            .chunks_exact(es)
            .map(|c| match self.dtype {
                DType::F32 => f32::from_ne_bytes(c.try_into().unwrap()) as f64,
                DType::F64 => f64::from_ne_bytes(c.try_into().unwrap()),
                DType::F16 => f16_value(u16::from_ne_bytes(c.try_into().unwrap())) as f64,
                DType::BF16 => bf16_bits_to_f32(u16::from_ne_bytes(c.try_into().unwrap())) as f64,
                d => panic!("no test decoding for {d:?}"),
            })
            .collect()
    }
    fn numel(&self) -> usize {
        self.data.len() / self.dtype.size()
    }
    fn tref(&mut self) -> TensorRef {
        let grad = self.grad.as_mut().map_or(std::ptr::null_mut(), |g| g.as_mut_ptr());
        TensorRef { data: self.data.as_mut_ptr(), grad, numel: self.numel() as u64, dtype: self.dtype, device: Device::Cpu }
    }
    fn c(&mut self) -> flatshard_tensor {
        let t = self.tref();
        flatshard_tensor {
            data: t.data as *mut _,
            grad: t.grad as *mut _,
            numel: t.numel,
            dtype: DtypeArg(t.dtype as i32),
            device: flatshard_device { r#type: DeviceTypeArg(0), index: 0 },
        }
    }
}

fn refs(bufs: &mut [Buf]) -> Vec<TensorRef> {
    bufs.iter_mut().map(Buf::tref).collect()
}

fn rank_params(rank: usize, n: usize, dtype: DType) -> Vec<Buf> {
    (0..n).map(|i| Buf::new(dtype, &vec![rank as f64; 3 + i], true)).collect()
}

fn all_equal(bufs: &[Buf], want: f64) -> bool {
    bufs.iter().all(|b| b.get().iter().all(|&v| v == want))
}

/// The value of element `i` of tensor `t` on rank `r` (before rounding to the dtype).
fn value(r: usize, t: usize, i: usize) -> f64 {
    (((r * 7 + t * 5 + i * 3) % 23) as f64 - 11.0) * 0.37 + r as f64
}

/// What averaging must produce for element `i` of tensor `t` over `world` ranks.
/// f32/f64: the exact mean (checked with a tolerance). f16/bf16: each rank's
/// value rounded to the dtype, divided in f32 and rounded to the dtype (PyTorch's
/// divided buffer), summed exactly, rounded once (checked bit for bit).
fn expected(dtype: DType, world: usize, t: usize, i: usize) -> f64 {
    let round = |x: f32| -> f32 {
        match dtype {
            DType::F16 => f16_value(f16_bits(x)),
            DType::BF16 => bf16_bits_to_f32(f32_to_bf16_bits(x)),
            _ => x,
        }
    };
    match dtype {
        DType::F16 | DType::BF16 => {
            let q: Vec<f32> = (0..world).map(|r| round(round(value(r, t, i) as f32) / world as f32)).collect();
            let s32: f32 = q.iter().sum();
            let s64: f64 = q.iter().map(|&x| x as f64).sum();
            assert_eq!(s32 as f64, s64, "test values must sum exactly in f32");
            round(s32) as f64
        }
        _ => (0..world).map(|r| value(r, t, i)).sum::<f64>() / world as f64,
    }
}

fn make(rank: usize, spec: &[(DType, usize)]) -> Vec<Buf> {
    spec.iter().enumerate().map(|(t, &(d, n))| Buf::new(d, &(0..n).map(|i| value(rank, t, i)).collect::<Vec<_>>(), true)).collect()
}

fn check(bufs: &[Buf], world: usize, what: &str) {
    for (t, b) in bufs.iter().enumerate() {
        for (i, got) in b.get().into_iter().enumerate() {
            let want = expected(b.dtype, world, t, i);
            let ok = match b.dtype {
                DType::F32 => (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                DType::F64 => (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                _ => got == want,
            };
            assert!(ok, "{what}: tensor {t} ({:?}) element {i}: got {got}, want {want}", b.dtype);
        }
    }
}

/// Mixed dtypes, tensors around and above the bucket, zero-length ones.
fn mixed_spec(big: usize) -> Vec<(DType, usize)> {
    vec![
        (DType::F16, 7),
        (DType::F64, 5),
        (DType::BF16, 11),
        (DType::F32, 0),
        (DType::F32, big),
        (DType::F16, 1),
        (DType::F64, big / 2 + 1),
        (DType::BF16, 0),
        (DType::F32, 3),
        (DType::BF16, big / 3),
    ]
}

// ---------------------------------------------------------------- average_parameters

/// PyTorch test_average_parameters: params = rank → (W-1)/2 everywhere.
#[test]
fn params_equal_to_rank_average_to_the_middle() {
    each_world("params_equal_to_rank_average_to_the_middle", &[1, 2, 3, 4, 8], &[], |c| {
        let (r, w) = (c.rank(), c.size());
        for dt in [DType::F32, DType::F64] {
            let mut p = rank_params(r, 4, dt);
            let before: Vec<*const u8> = p.iter().map(|b| b.data.as_ptr()).collect();
            unsafe { average_parameters(&c, &refs(&mut p), 0) }.unwrap();
            // (W-1)/2 is exact in binary for every W here: the sum of r/W may not be
            for b in &p {
                for v in b.get() {
                    assert!((v - (w as f64 - 1.0) / 2.0).abs() < 1e-6, "rank {r} world {w} {dt:?}: {v}");
                }
            }
            assert_eq!(before, p.iter().map(|b| b.data.as_ptr()).collect::<Vec<_>>(), "addresses changed");
        }
        c.barrier().unwrap();
    });
}

/// PyTorch: averaging over a subgroup {0, 1} → 0.5 there; the others untouched.
#[test]
fn subgroup_of_ranks_0_and_1() {
    each_world("subgroup_of_ranks_0_and_1", &[4, 8], &[], |c| {
        let r = c.rank();
        let sub = c.split(if r < 2 { 0 } else { -1 }, r as i32).unwrap();
        let mut p = rank_params(r, 3, DType::F32);
        if let Some(s) = &sub {
            unsafe { average_parameters(s, &refs(&mut p), 0) }.unwrap();
        }
        assert!(all_equal(&p, if r < 2 { 0.5 } else { r as f64 }), "rank {r}: {:?}", p[0].get());
        c.barrier().unwrap();
    });
}

/// f16 + f64 + bf16 + f32 in one call, against the reference, for several
/// bucket sizes chosen in-process (the environment variable is tested below).
#[test]
fn mixed_dtypes_and_bucket_sizes() {
    each_world("mixed_dtypes_and_bucket_sizes", &[2, 3, 4], &[], |c| {
        let (r, w) = (c.rank(), c.size());
        // 1 byte = one element per bucket; 13 = a prime; 4096 < the big tensors;
        // 64 KiB with a big tensor of 1 MiB: in-place pieces, pipelined.
        for (bucket, big) in [(1usize, 9usize), (13, 40), (4096, 3000), (64 << 10, 1 << 18), (16 << 20, 1 << 18)] {
            for overlap in [true, false] {
                let spec = mixed_spec(big);
                let mut p = make(r, &spec);
                let opts = AvgOptions { bucket_bytes: bucket, overlap };
                unsafe { average_parameters_with(&c, &refs(&mut p), 0, &opts) }.unwrap();
                check(&p, w, &format!("rank {r}/{w} bucket {bucket} overlap {overlap}"));
            }
        }
        c.barrier().unwrap();
    });
}

/// FLATSHARD_BUCKET_BYTES through the environment: 1 byte and a prime.
#[test]
fn bucket_size_from_environment() {
    for bytes in ["1", "13"] {
        let name = "bucket_size_from_environment";
        let extra = [("FLATSHARD_BUCKET_BYTES", bytes.to_string())];
        each_world(name, &[3], &extra, |c| {
            let (r, w) = (c.rank(), c.size());
            let mut p = make(r, &mixed_spec(20));
            unsafe { average_parameters(&c, &refs(&mut p), 0) }.unwrap();
            check(&p, w, &format!("rank {r} FLATSHARD_BUCKET_BYTES={}", std::env::var("FLATSHARD_BUCKET_BYTES").unwrap()));
            c.barrier().unwrap();
        });
        if is_worker() {
            break;
        }
    }
}

/// Peak extra memory of a 48 MiB average with a 1 MiB bucket stays ≤ 3 buckets.
#[test]
fn peak_extra_memory_is_bounded_by_the_bucket() {
    let bucket = 1usize << 20;
    each_world("peak_extra_memory_is_bounded_by_the_bucket", &[2], &[("FLATSHARD_BUCKET_BYTES", bucket.to_string())], move |c| {
        let r = c.rank();
        // 10 tensors summing to 48 MiB, plus 300 tiny ones that must be packed
        let mut spec: Vec<(DType, usize)> = (0..10).map(|i| (DType::F32, (48 << 20) / 40 + i)).collect();
        spec.extend((0..300).map(|i| (if i % 2 == 0 { DType::F32 } else { DType::BF16 }, 1 + i % 7)));
        let mut p: Vec<Buf> = spec.iter().map(|&(d, n)| Buf::new(d, &vec![r as f64; n], false)).collect();
        // warm the transport's fixed scratch so that only averaging is measured
        let mut warm = vec![0u8; 8 << 20];
        c.all_reduce(&mut warm, DType::F32, flatshard::ReduceOp::Sum).unwrap();
        drop(warm);
        let status = |key: &str| -> usize {
            let s = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = s.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} missing"));
            line.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap() * 1024
        };
        if std::fs::write("/proc/self/clear_refs", "5").is_err() {
            eprintln!("skipped: cannot reset the peak RSS (/proc/self/clear_refs)");
            return;
        }
        let before = status("VmRSS:");
        let ts = refs(&mut p);
        unsafe { average_parameters(&c, &ts, 0) }.unwrap();
        let extra = status("VmHWM:").saturating_sub(before);
        assert!(extra <= 3 * bucket, "rank {r}: averaging 48 MiB took {extra} extra bytes; limit 3 x {bucket}");
        assert!(all_equal(&p, 0.5));
        c.barrier().unwrap();
    });
}

#[test]
fn grad_filter_skips_params_without_grad() {
    each_world("grad_filter_skips_params_without_grad", &[3], &[], |c| {
        let r = c.rank();
        let mut p = rank_params(r, 3, DType::F32);
        p[1].grad = None;
        unsafe { average_parameters(&c, &refs(&mut p), AVG_ONLY_WITH_GRAD) }.unwrap();
        assert_eq!(p[0].get()[0], 1.0);
        assert_eq!(p[1].get()[0], r as f64, "a param without grad was averaged");
        assert_eq!(p[2].get()[0], 1.0);
        c.barrier().unwrap();
    });
}

/// Every argument error of average_parameters, with the rank and the argument named.
#[test]
fn average_parameters_validation_errors() {
    each_world("average_parameters_validation_errors", &[1, 2], &[], |c| {
        let r = c.rank();
        let err = |ts: &[TensorRef], flags: u32| unsafe { average_parameters(&c, ts, flags) }.unwrap_err();
        let mut p = rank_params(r, 2, DType::F32);
        let good = refs(&mut p);
        let rk = format!("rank {r}");

        let e = err(&good, 0x6);
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.msg.contains(&rk) && e.msg.contains("flags") && e.msg.contains("0x6"), "{}", e.msg);

        let e = err(&[], 0);
        assert!(e.kind == ErrorKind::InvalidArgument && e.msg.contains("n is 0") && e.msg.contains(&rk), "{}", e.msg);

        let mut q = rank_params(r, 2, DType::F32);
        q.iter_mut().for_each(|b| b.grad = None);
        let e = err(&refs(&mut q), AVG_ONLY_WITH_GRAD);
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.msg.contains("no parameter has a gradient") && e.msg.contains("all 2 params") && e.msg.contains(&rk), "{}", e.msg);

        let mut ints = vec![0u8; 16];
        let t = TensorRef { data: ints.as_mut_ptr(), grad: std::ptr::null_mut(), numel: 4, dtype: DType::I32, device: Device::Cpu };
        let e = err(&[good[0], t], 0);
        assert!(e.kind == ErrorKind::InvalidArgument && e.msg.contains("params[1].dtype: i32"), "{}", e.msg);

        let cuda = TensorRef { device: Device::Cuda(0), ..good[0] };
        let e = err(&[cuda], 0);
        assert!(e.kind == ErrorKind::Unsupported && e.msg.contains("params[0]") && e.msg.contains("cuda:0"), "{}", e.msg);

        let null = TensorRef { data: std::ptr::null_mut(), ..good[1] };
        let e = err(&[good[0], null], 0);
        assert!(e.kind == ErrorKind::InvalidArgument && e.msg.contains("params[1]") && e.msg.contains("NULL"), "{}", e.msg);

        // zero-length tensors and NULL data are fine; nothing was touched above
        let empty = TensorRef { data: std::ptr::null_mut(), numel: 0, ..good[0] };
        unsafe { average_parameters(&c, &[empty, good[0], good[1]], 0) }.unwrap();
        let w = c.size() as f64;
        assert!(all_equal(&p, (w - 1.0) / 2.0), "{:?}", p[0].get());
        c.barrier().unwrap();
    });
}

/// Ranks that disagree about what to average all return at once (no timeout),
/// the odd rank named, nothing averaged; the communicator stays usable.
#[test]
fn ranks_that_disagree_fail_together() {
    each_world("ranks_that_disagree_fail_together", &[3], &[], |c| {
        let r = c.rank();
        let opts = AvgOptions { bucket_bytes: 64, overlap: true };
        let avg = |p: &mut Vec<Buf>, flags: u32, o: &AvgOptions| unsafe { average_parameters_with(&c, &refs(p), flags, o) };
        // rank 1 has one tensor more
        let mut p = rank_params(r, if r == 1 { 3 } else { 2 }, DType::F32);
        let e = avg(&mut p, 0, &opts).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Mismatch, "{}", e.msg);
        assert!(
            e.msg.contains(&format!("rank {r}:"))
                && e.msg.contains("different tensors (count, numel and dtype")
                && e.msg.contains(", rank 1: ")
                && !e.msg.contains(", rank 2: "),
            "{}",
            e.msg
        );
        assert!(all_equal(&p, r as f64), "rank {r}: something was averaged");
        // rank 2 has no grads left under the filter
        let mut p = rank_params(r, 2, DType::F32);
        if r == 2 {
            p.iter_mut().for_each(|b| b.grad = None);
        }
        let e = avg(&mut p, AVG_ONLY_WITH_GRAD, &opts).unwrap_err();
        if r == 2 {
            assert!(e.kind == ErrorKind::InvalidArgument && e.msg.contains("no parameter has a gradient"), "{}", e.msg);
        } else {
            assert!(e.kind == ErrorKind::Mismatch && e.msg.contains("rank 2 refused its arguments"), "{}", e.msg);
        }
        // rank 0 uses another bucket size
        let o = AvgOptions { bucket_bytes: if r == 0 { 128 } else { 64 }, overlap: true };
        let e = avg(&mut p, 0, &o).unwrap_err();
        assert!(e.kind == ErrorKind::Mismatch && e.msg.contains("FLATSHARD_BUCKET_BYTES (rank 0: 128, rank 1: 64, rank 2: 64)"), "{}", e.msg);
        assert!(all_equal(&p, r as f64));
        avg(&mut p, 0, &opts).unwrap();
        assert!(all_equal(&p, 1.0));
        c.barrier().unwrap();
    });
}

// ---------------------------------------------------------------- averagers

/// PyTorch test_periodic_model_averager: period 4, warmup 12..=15, 20 steps,
/// params reset to `rank` before each step.
#[test]
fn periodic_averager_pytorch_scenario() {
    each_world("periodic_averager_pytorch_scenario", &[1, 2, 4], &[], |c| {
        let (r, w) = (c.rank(), c.size());
        let mid = (w as f64 - 1.0) / 2.0;
        for warmup in 12..=15u64 {
            let mut a = Averager::periodic(c.clone(), 4, warmup).unwrap();
            for step in 0..20u64 {
                let mut p = rank_params(r, 2, DType::F32);
                assert_eq!(a.current_step(), step);
                let g = unsafe { a.step(&refs(&mut p), 0) }.unwrap();
                let due = step >= warmup && (step - warmup) % 4 == 0;
                assert_eq!(g, if due { w } else { 0 }, "warmup {warmup} step {step}");
                assert!(all_equal(&p, if due { mid } else { r as f64 }), "warmup {warmup} step {step}: {:?}", p[0].get());
            }
        }
        c.barrier().unwrap();
    });
}

/// PyTorch test_periodic_model_averager_param_group: grads set to `rank`, so
/// rank 0's grad is zero — it still counts as a grad. One param without grad
/// stays untouched.
#[test]
fn periodic_averager_with_grad_filter() {
    each_world("periodic_averager_with_grad_filter", &[2, 4], &[], |c| {
        let (r, w) = (c.rank(), c.size());
        let mid = (w as f64 - 1.0) / 2.0;
        let mut a = Averager::periodic(c.clone(), 4, 13).unwrap();
        for step in 0..20u64 {
            let mut p = rank_params(r, 3, DType::F32);
            for b in &mut p {
                let n = b.numel();
                let mut g = Buf::new(DType::F32, &vec![r as f64; n], false);
                b.grad = Some(std::mem::take(&mut g.data)); // zero on rank 0
            }
            p[2].grad = None;
            unsafe { a.step(&refs(&mut p), AVG_ONLY_WITH_GRAD) }.unwrap();
            let due = step == 13 || step == 17;
            assert!(all_equal(&p[..2], if due { mid } else { r as f64 }), "step {step}");
            assert!(all_equal(&p[2..], r as f64), "step {step}: the param without grad changed");
        }
        c.barrier().unwrap();
    });
}

/// SPEC §1 per step, through the C API: 4 ranks, params reset to `rank`.
fn hierarchical_table(comm: *mut flatshard_comm, periods: &[u64], sizes: &[i32], warmup: u64, want: impl Fn(u64, usize) -> (i32, f64)) {
    let r = std::env::var("RANK").unwrap().parse::<usize>().unwrap();
    let mut a: *mut flatshard_averager = std::ptr::null_mut();
    let st = unsafe { flatshard_hierarchical_averager_new(comm, periods.as_ptr(), sizes.as_ptr(), periods.len() as u64, warmup, &mut a) };
    assert_eq!(st, flatshard_status::FLATSHARD_OK, "{}", last_error());
    for step in 0..25u64 {
        let mut p = vec![Buf::new(DType::F32, &[r as f64; 5], true), Buf::new(DType::F64, &[r as f64; 2], true)];
        let mut cs: Vec<flatshard_tensor> = p.iter_mut().map(Buf::c).collect();
        let mut g = -1;
        assert_eq!(unsafe { flatshard_averager_get_step(a) }, step);
        let st = unsafe { flatshard_averager_step(a, cs.as_mut_ptr(), cs.len() as u64, 0, &mut g) };
        assert_eq!(st, flatshard_status::FLATSHARD_OK, "{}", last_error());
        let (size, value) = want(step, r);
        assert_eq!(g, size, "rank {r} step {step}: averaged group size");
        assert!(all_equal(&p, value), "rank {r} step {step}: {:?}, want {value}", p[0].get());
    }
    unsafe { flatshard_averager_free(a) };
}

#[test]
fn hierarchical_spec_example_two_levels() {
    c_ranks("hierarchical_spec_example_two_levels", 4, &[], |comm| {
        hierarchical_table(comm, &[2, 4], &[2, 4], 3, |s, r| match s {
            4 | 8 | 12 | 16 | 20 | 24 => (4, 1.5),
            6 | 10 | 14 | 18 | 22 => (2, if r < 2 { 0.5 } else { 2.5 }),
            _ => (0, r as f64),
        });
    });
}

#[test]
fn hierarchical_spec_example_three_levels() {
    c_ranks("hierarchical_spec_example_three_levels", 4, &[], |comm| {
        hierarchical_table(comm, &[2, 4, 8], &[2, 4, 4], 10, |s, r| match s {
            16 | 24 | 12 | 20 => (4, 1.5),
            10 | 14 | 18 | 22 => (2, if r < 2 { 0.5 } else { 2.5 }),
            _ => (0, r as f64),
        });
    });
}

/// Group sizes 1, 2 and 8 on 8 ranks, given in an order that is not sorted by
/// period: the scan follows the given order (12, then 2, then 3).
#[test]
fn hierarchical_eight_ranks() {
    each_world("hierarchical_eight_ranks", &[8], &[], |c| {
        let r = c.rank();
        let mut a = Averager::hierarchical(c.clone(), &[3, 2, 12], &[1, 2, 8], 0).unwrap();
        for step in 0..14u64 {
            let mut p = rank_params(r, 1, DType::F32);
            let g = unsafe { a.step(&refs(&mut p), 0) }.unwrap();
            let (size, v) = if step % 12 == 0 {
                (8, 3.5)
            } else if step % 2 == 0 {
                (2, (r - r % 2) as f64 + 0.5)
            } else if step % 3 == 0 {
                (1, r as f64)
            } else {
                (0, r as f64)
            };
            assert_eq!((g, p[0].get()[0]), (size, v), "rank {r} step {step}");
        }
        c.barrier().unwrap();
    });
}

/// Stopping, reading the step, building a new averager and setting the step
/// gives the schedule of an uninterrupted run.
#[test]
fn set_step_resumes_the_schedule() {
    each_world("set_step_resumes_the_schedule", &[4], &[], |c| {
        let r = c.rank();
        let run = |a: &mut Averager, steps: std::ops::Range<u64>| -> Vec<(usize, f64)> {
            steps
                .map(|_| {
                    let mut p = rank_params(r, 1, DType::F32);
                    let g = unsafe { a.step(&refs(&mut p), 0) }.unwrap();
                    (g, p[0].get()[0])
                })
                .collect()
        };
        fn hier(c: &Arc<Comm>) -> Averager {
            Averager::hierarchical(c.clone(), &[2, 4, 8], &[2, 4, 4], 10).unwrap()
        }
        fn per(c: &Arc<Comm>) -> Averager {
            Averager::periodic(c.clone(), 3, 5).unwrap()
        }
        for make in [hier as fn(&Arc<Comm>) -> Averager, per] {
            let whole = run(&mut make(&c), 0..30);
            let mut first = make(&c);
            let mut resumed = run(&mut first, 0..11);
            let saved = first.current_step();
            assert_eq!(saved, 11);
            drop(first);
            let mut second = make(&c);
            second.set_step(saved);
            resumed.extend(run(&mut second, 11..30));
            assert_eq!(resumed, whole, "rank {r}");
            assert!(whole.iter().any(|x| x.0 != 0), "the schedule never averaged");
        }
        c.barrier().unwrap();
    });
}

/// Every constructor check, in SPEC order, on 4 ranks (checks run before any
/// collective, so all ranks fail alike), through the C API: status, message,
/// out-param untouched.
#[test]
fn averager_validation_errors() {
    c_ranks("averager_validation_errors", 4, &[], |comm| {
        let r = std::env::var("RANK").unwrap();
        let sentinel = std::ptr::dangling_mut::<flatshard_averager>();
        let hier = |p: &[u64], g: &[i32]| {
            let mut out = sentinel;
            let st = unsafe { flatshard_hierarchical_averager_new(comm, p.as_ptr(), g.as_ptr(), p.len() as u64, 0, &mut out) };
            assert_eq!(out, sentinel, "out written on failure");
            (st, last_error())
        };
        let bad = flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT;
        let cases: [(&[u64], &[i32], &str); 8] = [
            (&[], &[], "n = 0"),
            (&[0, 4], &[2, 4], "periods[0] is 0: every period must be a positive value"),
            (&[2, 0], &[0, 4], "periods[1] is 0"),
            (&[2, 4], &[0, 4], "group_sizes[0] is 0: every group size must be positive"),
            (&[2, 4], &[2, -4], "group_sizes[1] is -4"),
            (&[2, 4], &[4, 2], "group_sizes[1] is 2: the last group size must equal the size of comm, 4"),
            (&[2, 4], &[3, 4], "group_sizes[0]: world size 4 must be divisible by group size 3"),
            (&[4, 4], &[2, 4], "periods[1] is 4, the same as periods[0]"),
        ];
        for (p, g, want) in cases {
            let (st, msg) = hier(p, g);
            assert_eq!(st, bad, "{p:?} {g:?}: {msg}");
            assert!(msg.contains(want) && msg.contains(&format!("rank {r}")), "{p:?} {g:?}: '{msg}' lacks '{want}'");
        }
        let mut out = sentinel;
        let st = unsafe { flatshard_hierarchical_averager_new(comm, std::ptr::null(), std::ptr::null(), 2, 0, &mut out) };
        assert!(st == bad && last_error().contains("periods is NULL") && out == sentinel);
        let st = unsafe { flatshard_periodic_averager_new(comm, 0, 0, &mut out) };
        assert!(st == bad && last_error().contains("period must be a positive value, got 0") && out == sentinel, "{}", last_error());
        let st = unsafe { flatshard_periodic_averager_new(std::ptr::null_mut(), 4, 0, &mut out) };
        assert!(st == bad && last_error().contains("comm is NULL"));
        let st = unsafe { flatshard_periodic_averager_new(comm, 4, 0, std::ptr::null_mut()) };
        assert!(st == bad && last_error().contains("out is NULL"));

        // step-time argument errors leave the step counter alone
        let mut a: *mut flatshard_averager = std::ptr::null_mut();
        assert_eq!(unsafe { flatshard_periodic_averager_new(comm, 2, 0, &mut a) }, flatshard_status::FLATSHARD_OK);
        let mut p = [Buf::new(DType::F32, &[1.0; 3], false)];
        let mut cs: Vec<flatshard_tensor> = p.iter_mut().map(Buf::c).collect();
        let mut g = -7;
        // step 0 averages: no grad under the filter is an error there
        let st = unsafe { flatshard_averager_step(a, cs.as_mut_ptr(), 1, FLATSHARD_AVG_ONLY_WITH_GRAD, &mut g) };
        assert!(st == bad && last_error().contains("no parameter has a gradient"), "{}", last_error());
        assert_eq!((g, unsafe { flatshard_averager_get_step(a) }), (-7, 0));
        cs[0].dtype = DtypeArg(42);
        let st = unsafe { flatshard_averager_step(a, cs.as_mut_ptr(), 1, 0, &mut g) };
        assert!(st == bad && last_error().contains("params[0].dtype: 42") && last_error().contains(&format!("rank {r}")), "{}", last_error());
        cs[0].dtype = DtypeArg(0);
        cs[0].device.r#type = DeviceTypeArg(1);
        let st = unsafe { flatshard_averager_step(a, cs.as_mut_ptr(), 1, 0, &mut g) };
        assert!(st == flatshard_status::FLATSHARD_ERR_UNSUPPORTED && last_error().contains("cuda"), "{}", last_error());
        cs[0].device.r#type = DeviceTypeArg(0);
        let st = unsafe { flatshard_averager_step(a, std::ptr::null_mut(), 1, 0, &mut g) };
        assert!(st == bad && last_error().contains("params is NULL"));
        assert_eq!(unsafe { flatshard_averager_get_step(a) }, 0);
        // a non-averaging step (1) does not look at "nothing to average"
        assert_eq!(unsafe { flatshard_averager_step(a, cs.as_mut_ptr(), 1, 0, &mut g) }, flatshard_status::FLATSHARD_OK);
        assert_eq!(g, 4);
        let st = unsafe { flatshard_averager_step(a, cs.as_mut_ptr(), 1, FLATSHARD_AVG_ONLY_WITH_GRAD, std::ptr::null_mut()) };
        assert_eq!(st, flatshard_status::FLATSHARD_OK, "{}", last_error());
        assert_eq!(unsafe { flatshard_averager_set_step(a, u64::MAX) }, flatshard_status::FLATSHARD_OK);
        let st = unsafe { flatshard_averager_step(a, cs.as_mut_ptr(), 1, 0, &mut g) };
        assert_eq!(st, flatshard_status::FLATSHARD_ERR_INVALID_STATE, "{}", last_error());
        unsafe { flatshard_averager_free(a) };
        // NULL handles
        assert_eq!(unsafe { flatshard_averager_set_step(std::ptr::null_mut(), 3) }, bad);
        assert_eq!(unsafe { flatshard_averager_get_step(std::ptr::null()) }, 0);
        unsafe { flatshard_averager_free(std::ptr::null_mut()) };
        // average_parameters through C: NULL comm / params, unknown flags
        assert_eq!(unsafe { flatshard_average_parameters(std::ptr::null_mut(), cs.as_mut_ptr(), 1, 0) }, bad);
        assert_eq!(unsafe { flatshard_average_parameters(comm, std::ptr::null_mut(), 1, 0) }, bad);
        assert_eq!(unsafe { flatshard_average_parameters(comm, cs.as_mut_ptr(), 1, 8) }, bad);
        assert!(last_error().contains("flags"));
        assert_eq!(unsafe { flatshard_average_parameters(comm, cs.as_mut_ptr(), 1, 0) }, flatshard_status::FLATSHARD_OK);
        assert_eq!(p[0].get(), vec![1.0; 3]);
    });
}

/// Period 1 (and a largest period of 1) is legal and warns through the log.
#[test]
fn period_one_warns() {
    if is_worker() {
        let c = Arc::new(Comm::init_from_env(CommOptions::default()).unwrap());
        Averager::periodic(c.clone(), 1, 0).unwrap();
        Averager::hierarchical(c.clone(), &[1], &[1], 0).unwrap();
        return;
    }
    let res = wait_all(spawn("period_one_warns", 1, &[("FLATSHARD_DEBUG", "WARN".into())]), Duration::from_secs(60));
    let (code, out) = &res[0];
    assert_eq!(*code, Some(0), "{out}");
    assert_eq!(out.matches("WARN period 1 averages").count(), 2, "{out}");
}

/// A world-1 communicator made through the C API (no processes) averages to
/// itself, and a comm freed under an averager is the caller's bug we document,
/// not test; here: the averager works until freed before its comm.
#[test]
fn c_api_world_one() {
    let mut c: *mut flatshard_comm = std::ptr::null_mut();
    assert_eq!(unsafe { flatshard_comm_init(std::ptr::null(), 0, 0, 1, std::ptr::null(), &mut c) }, flatshard_status::FLATSHARD_OK);
    let mut p = [Buf::new(DType::F16, &[0.1, 3.0], true), Buf::new(DType::BF16, &[7.5], false)];
    let mut cs: Vec<flatshard_tensor> = p.iter_mut().map(Buf::c).collect();
    assert_eq!(unsafe { flatshard_average_parameters(c, cs.as_mut_ptr(), 2, 0) }, flatshard_status::FLATSHARD_OK);
    assert_eq!(p[0].get(), vec![f16_value(f16_bits(0.1)) as f64, 3.0]);
    let mut a: *mut flatshard_averager = std::ptr::null_mut();
    let (periods, sizes) = ([1u64, 5], [1i32, 1]);
    assert_eq!(unsafe { flatshard_hierarchical_averager_new(c, periods.as_ptr(), sizes.as_ptr(), 2, 0, &mut a) }, flatshard_status::FLATSHARD_OK);
    let mut g = -1;
    assert_eq!(unsafe { flatshard_averager_step(a, cs.as_mut_ptr(), 2, FLATSHARD_AVG_ONLY_WITH_GRAD, &mut g) }, flatshard_status::FLATSHARD_OK);
    assert_eq!((g, unsafe { flatshard_averager_get_step(a) }), (1, 1));
    unsafe { flatshard_averager_free(a) };
    unsafe { flatshard_comm_free(c) };
}

/// Not a test: timings of the pipelined and the sequential paths (run with
/// `cargo test --release --test averaging -- --ignored --nocapture measure_overlap`).
#[test]
#[ignore]
fn measure_overlap() {
    if !is_worker() {
        let port = free_port().to_string();
        let kids = (0..2)
            .map(|r| {
                std::process::Command::new(std::env::current_exe().unwrap())
                    .args(["measure_overlap", "--exact", "--nocapture", "--ignored", "--test-threads=1"])
                    .envs([(RANK_ENV, "1"), ("RANK", &r.to_string()), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port)])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let res = wait_all(kids, Duration::from_secs(300));
        for (code, out) in res {
            println!("{out}");
            assert_eq!(code, Some(0));
        }
        return;
    }
    let c = Comm::init_from_env(CommOptions::default()).unwrap();
    let r = c.rank();
    let cases: [(&str, Vec<(DType, usize)>); 3] = [
        ("10 x 6.4 MiB f32", (0..10).map(|_| (DType::F32, (64 << 20) / 40)).collect()),
        ("4096 x 16 KiB f32", (0..4096).map(|_| (DType::F32, 4096)).collect()),
        ("10 x 3.2 MiB bf16", (0..10).map(|_| (DType::BF16, (32 << 20) / 20)).collect()),
    ];
    for (name, spec) in cases {
        let mut p: Vec<Buf> = spec.iter().map(|&(d, n)| Buf::new(d, &vec![r as f64; n], false)).collect();
        let ts = refs(&mut p);
        for bucket in [4usize << 20, 16 << 20] {
            for overlap in [false, true] {
                let o = AvgOptions { bucket_bytes: bucket, overlap };
                unsafe { average_parameters_with(&c, &ts, 0, &o) }.unwrap();
                c.barrier().unwrap();
                let t = std::time::Instant::now();
                for _ in 0..5 {
                    unsafe { average_parameters_with(&c, &ts, 0, &o) }.unwrap();
                }
                c.barrier().unwrap();
                if r == 0 {
                    println!("{name}, bucket {} MiB, overlap {overlap}: {:.1} ms", bucket >> 20, t.elapsed().as_secs_f64() * 200.0);
                }
            }
        }
    }
}
