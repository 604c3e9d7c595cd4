//! CUDA / NCCL. Without a driver (this project's CI machines) the entry points
//! must report UNSUPPORTED with a clear message; the GPU tests are #[ignore]d
//! (reported as ignored = skipped by cargo, never as passed) and run with
//! `scripts/gpu-test.sh` (`cargo test --test cuda -- --ignored`) on a GPU.
use flatshard::ffi::comm::flatshard_comm;
use flatshard::ffi::cuda::*;
use flatshard::ffi::{flatshard_last_error, flatshard_status};
use std::ffi::CStr;

fn has_gpu() -> bool {
    flatshard::cuda::driver().is_ok()
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(flatshard_last_error()).to_string_lossy().into_owned() }
}

#[test]
fn without_a_driver_cuda_entry_points_are_unsupported() {
    if has_gpu() {
        eprintln!("a CUDA driver is present: the no-driver paths are not reachable here");
        return;
    }
    let mut out: *mut flatshard_comm = std::ptr::null_mut();
    let st = unsafe { flatshard_comm_init_nccl(c"127.0.0.1".as_ptr(), 29999, 0, 1, 0, std::ptr::null_mut(), std::ptr::null(), &mut out) };
    assert_eq!(st, flatshard_status::FLATSHARD_ERR_UNSUPPORTED);
    assert!(out.is_null(), "out-param written on failure");
    let msg = last_error();
    assert!(msg.contains("CUDA driver") || msg.contains("cuda"), "unclear message: {msg}");
    let mut fake = 0u64;
    let st = unsafe { flatshard_comm_wrap_nccl(&mut fake as *mut u64 as *mut _, 0, std::ptr::null_mut(), &mut out) };
    assert_eq!(st, flatshard_status::FLATSHARD_ERR_UNSUPPORTED);
    assert!(!flatshard::cuda::is_device_ptr(&fake as *const u64 as *const u8));
    // NULL handle still INVALID_ARGUMENT, driver or not
    assert_eq!(unsafe { flatshard_comm_synchronize(std::ptr::null_mut()) }, flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT);
}

#[test]
#[ignore = "needs a CUDA GPU with NCCL: scripts/gpu-test.sh"]
fn nccl_world_one_all_reduce_on_device() {
    assert!(has_gpu(), "skipped: no CUDA driver");
    let mut c: *mut flatshard_comm = std::ptr::null_mut();
    let st = unsafe { flatshard_comm_init_nccl(std::ptr::null(), 0, 0, 1, 0, std::ptr::null_mut(), std::ptr::null(), &mut c) };
    assert_eq!(st, flatshard_status::FLATSHARD_OK, "{}", last_error());
    assert_eq!(unsafe { flatshard::ffi::comm::flatshard_barrier(c) }, flatshard_status::FLATSHARD_OK, "{}", last_error());
    assert_eq!(unsafe { flatshard_comm_synchronize(c) }, flatshard_status::FLATSHARD_OK, "{}", last_error());
    unsafe { flatshard::ffi::comm::flatshard_comm_free(c) };
}

#[test]
fn averaging_cuda_tensors_without_a_driver_is_unsupported() {
    use flatshard::ffi::averaging::flatshard_average_parameters;
    use flatshard::ffi::comm::{flatshard_comm_free, flatshard_comm_init};
    use flatshard::ffi::{flatshard_device, flatshard_tensor, DeviceTypeArg, DtypeArg};
    if has_gpu() {
        eprintln!("a CUDA driver is present: the no-driver path is not reachable here");
        return;
    }
    let mut c: *mut flatshard_comm = std::ptr::null_mut();
    unsafe {
        assert_eq!(flatshard_comm_init(std::ptr::null(), 0, 0, 1, std::ptr::null(), &mut c), flatshard_status::FLATSHARD_OK);
        let mut fake = [0f32; 4];
        let mut t = [flatshard_tensor {
            data: fake.as_mut_ptr() as *mut _,
            grad: std::ptr::null_mut(),
            numel: 4,
            dtype: DtypeArg(0),
            device: flatshard_device { r#type: DeviceTypeArg(1), index: 0 },
        }];
        assert_eq!(flatshard_average_parameters(c, t.as_mut_ptr(), 1, 0), flatshard_status::FLATSHARD_ERR_UNSUPPORTED);
        assert!(last_error().contains("CUDA"), "{}", last_error());
        assert_eq!(fake, [0.0; 4]);
        flatshard_comm_free(c);
    }
}

// ---------------------------------------------------------------------------
// Flat parameters and averaging on CUDA tensors. Each scenario runs twice in
// the same process on the same communicator — once with host tensors, once
// with device tensors — and every observable (shards, views, gradients) must
// be bit-identical: the device path must give exactly the CPU path's numbers.

mod common;
use flatshard::comm::Comm;
use flatshard::cuda::DevMem;
use flatshard::dtype::DType;
use flatshard::flat_param::{FlatParam, FlatParamOptions, ParamInput, Sharding, UnshardOptions};
use flatshard::tensor::{Device, TensorRef};

/// Host bytes of a tensor wherever it lives.
fn read(t: &TensorRef) -> Vec<u8> {
    let n = t.bytes().unwrap();
    let mut v = vec![0u8; n];
    if n == 0 {
        return v;
    }
    match t.device {
        Device::Cpu => v.copy_from_slice(unsafe { std::slice::from_raw_parts(t.data, n) }),
        Device::Cuda(_) => unsafe { flatshard::cuda::copy_to_host(v.as_mut_ptr(), t.data, n).unwrap() },
    }
    v
}

fn read_grad(t: &TensorRef) -> Option<Vec<u8>> {
    (!t.grad.is_null()).then(|| read(&TensorRef { data: t.grad, ..*t }))
}

/// Write host bytes into a tensor's data (or grad) wherever it lives.
fn write(t: &TensorRef, grad: bool, bytes: &[u8]) {
    let p = if grad { t.grad } else { t.data };
    assert!(!p.is_null() && bytes.len() == t.bytes().unwrap());
    match t.device {
        Device::Cpu => unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) },
        Device::Cuda(_) => unsafe { flatshard::cuda::copy_to_device(p, bytes.as_ptr(), bytes.len()).unwrap() },
    }
}

fn values(seed: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| (((seed * 7919 + i * 104_729) % 1000) as f32 - 500.0) / 97.0).collect()
}

/// Params of the given numels on `dev` (None = host); returns the inputs and
/// the memory that backs them.
struct Placed {
    host: Vec<Vec<u8>>,
    dev: Vec<DevMem>,
}

impl Placed {
    fn new(rank: usize, numels: &[usize], dev: Option<i32>) -> Placed {
        let host: Vec<Vec<u8>> = numels.iter().enumerate().map(|(i, &n)| common::f32_bytes(&values(rank * 31 + i, n))).collect();
        let dev = match dev {
            None => Vec::new(),
            Some(d) => host
                .iter()
                .map(|h| {
                    let m = DevMem::zeroed(d, h.len(), "test param").unwrap();
                    unsafe { flatshard::cuda::copy_to_device(m.ptr(), h.as_ptr(), h.len()).unwrap() };
                    m
                })
                .collect(),
        };
        Placed { host, dev }
    }
    fn inputs(&self) -> Vec<ParamInput<'_>> {
        if self.dev.is_empty() {
            return self.host.iter().map(|h| ParamInput::host(h, DType::F32)).collect();
        }
        self.dev.iter().map(|m| unsafe { ParamInput::raw(m.ptr(), (m.len() / 4) as u64, DType::F32, Device::Cuda(m.device())) }).collect()
    }
}

/// Everything a flat-param user can observe, in order.
fn flat_param_scenario(comm: &Comm, dev: Option<i32>, sharding: Sharding, log: &mut Vec<(String, Vec<u8>)>) {
    let rank = comm.rank();
    let numels = [37usize, 64, 5];
    let placed = Placed::new(rank, &numels, dev);
    let opts = FlatParamOptions { sharding, sync_from_rank0: true, param_dtype: Some(DType::BF16), ..Default::default() };
    let mut fp = FlatParam::new(comm, None, &placed.inputs(), &opts).unwrap();
    assert_eq!(fp.device(), dev.map_or(Device::Cpu, Device::Cuda));
    log.push(("shard after new".into(), fp.read_shard().unwrap().0));
    for step in 0..2 {
        // training: bf16 gather, grads into the views, reduce-scatter
        fp.unshard(comm, UnshardOptions::default()).unwrap();
        for i in 0..numels.len() as u64 {
            let v = fp.view(i).unwrap();
            assert_eq!(v.dtype, DType::BF16);
            log.push((format!("step {step} view {i}"), read(&v)));
            let g: Vec<u8> =
                values(rank * 13 + i as usize + step, numels[i as usize]).iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_ne_bytes()).collect();
            write(&v, true, &g);
        }
        fp.reduce_grads(comm, None).unwrap();
        fp.reshard(comm).unwrap();
        let (_, g) = fp.read_shard().unwrap();
        log.push((format!("step {step} shard grad"), g.unwrap()));
    }
    // summon with writeback: every rank edits param 1
    fp.unshard(comm, UnshardOptions { writeback: true, ..Default::default() }).unwrap();
    let v = fp.view(1).unwrap();
    assert_eq!(v.device, dev.map_or(Device::Cpu, Device::Cuda));
    write(&v, false, &common::f32_bytes(&values(99, numels[1])));
    fp.reshard(comm).unwrap();
    log.push(("shard after writeback".into(), fp.read_shard().unwrap().0));
    // rank0_only + offload_to_cpu + writeback + with_grads: views are host memory on rank 0
    let o = UnshardOptions { writeback: true, rank0_only: true, offload_to_cpu: true, with_grads: true, forward_only: false };
    fp.unshard(comm, o).unwrap();
    if rank == 0 {
        for i in 0..numels.len() as u64 {
            let v = fp.view(i).unwrap();
            assert_eq!(v.device, Device::Cpu, "offload_to_cpu views are host memory");
            log.push((format!("offloaded view {i}"), read(&v)));
            log.push((format!("offloaded grad {i}"), read_grad(&v).unwrap_or_default()));
        }
        let v = fp.view(2).unwrap();
        write(&v, false, &common::f32_bytes(&[1.5; 5]));
        write(&v, true, &common::f32_bytes(&[-2.5; 5]));
    } else {
        assert!(fp.view(0).is_err());
    }
    fp.reshard(comm).unwrap();
    let (d, g) = fp.read_shard().unwrap();
    log.push(("shard after rank0 writeback".into(), d));
    log.push(("grad after rank0 writeback".into(), g.unwrap()));
    fp.zero_grad(comm).unwrap();
    log.push(("grad after zero_grad".into(), fp.read_shard().unwrap().1.unwrap()));
    // average_parameters on the placed tensors themselves
    let ts: Vec<TensorRef> = placed
        .inputs()
        .iter()
        .zip(&numels)
        .enumerate()
        .map(|(i, (p, &n))| TensorRef {
            data: if dev.is_some() { placed.dev[i].ptr() } else { placed.host[i].as_ptr() as *mut u8 },
            grad: std::ptr::null_mut(),
            numel: n as u64,
            dtype: DType::F32,
            device: p.device,
        })
        .collect();
    unsafe { flatshard::averaging::average_parameters(comm, &ts, 0).unwrap() };
    comm.synchronize().unwrap();
    for (i, t) in ts.iter().enumerate() {
        log.push((format!("averaged param {i}"), read(t)));
    }
}

fn compare(rank: usize, host: &[(String, Vec<u8>)], dev: &[(String, Vec<u8>)]) {
    assert_eq!(host.len(), dev.len(), "rank {rank}: the device run observed a different number of things");
    for ((k, h), (_, d)) in host.iter().zip(dev) {
        assert!(h == d, "rank {rank}: {k}: device result differs from the CPU path");
    }
    println!("#: rank {rank}: {} observables bit-identical between host and device", host.len());
}

fn host_vs_device(comm: &Comm, sharding: Sharding) {
    let mut host = Vec::new();
    let mut dev = Vec::new();
    // The host reference runs on a host communicator of the same ranks.
    flat_param_scenario(comm, None, sharding, &mut host);
    flat_param_scenario(comm, Some(0), sharding, &mut dev);
    compare(comm.rank(), &host, &dev);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-test.sh"]
fn device_flat_params_match_cpu_path_one_rank() {
    assert!(has_gpu(), "skipped: no CUDA driver");
    let c = Comm::init("127.0.0.1", 0, 0, 1, Default::default()).unwrap();
    host_vs_device(&c, Sharding::FullShard);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-test.sh"]
fn device_flat_params_match_cpu_path_two_ranks_sharing_one_gpu() {
    common::ranks("device_flat_params_match_cpu_path_two_ranks_sharing_one_gpu", 2, &[], |c| {
        assert!(has_gpu(), "skipped: no CUDA driver");
        host_vs_device(&c, Sharding::FullShard);
        host_vs_device(&c, Sharding::NoShard);
    });
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-test.sh"]
fn device_flat_params_match_cpu_path_four_ranks_over_tcp() {
    common::ranks("device_flat_params_match_cpu_path_four_ranks_over_tcp", 4, &[common::transport_env("tcp")], |c| {
        assert!(has_gpu(), "skipped: no CUDA driver");
        host_vs_device(&c, Sharding::ShardGradOp);
    });
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-test.sh"]
fn nccl_world_one_flat_param_matches_host() {
    assert!(has_gpu(), "skipped: no CUDA driver");
    let nccl = Comm::init_nccl("127.0.0.1", 0, 0, 1, 0, std::ptr::null_mut(), Default::default()).unwrap();
    let nccl = &nccl;
    assert!(nccl.is_device());
    let host = Comm::init("127.0.0.1", 0, 0, 1, Default::default()).unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    flat_param_scenario(&host, None, Sharding::FullShard, &mut a);
    flat_param_scenario(nccl, Some(0), Sharding::FullShard, &mut b);
    compare(0, &a, &b);
    // ncclCommSplit (NCCL >= 2.18): a world-1 split is a working communicator of one
    match nccl.split(0, 0) {
        Err(e) if e.kind == flatshard::error::ErrorKind::Unsupported => {
            eprintln!("split skipped: {e}")
        }
        r => {
            let sub = r.unwrap().expect("color 0 joins a group");
            assert_eq!((sub.size(), sub.rank()), (1, 0));
            sub.barrier().unwrap();
            assert!(nccl.split(-1, 0).unwrap().is_none());
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-test.sh"]
fn rank0_only_offload_keeps_device_memory_bounded() {
    common::ranks("rank0_only_offload_keeps_device_memory_bounded", 4, &[], |c| {
        assert!(has_gpu(), "skipped: no CUDA driver");
        let rank = c.rank();
        let n = 4 << 20; // 16 MiB of f32
        let placed = Placed::new(rank, &[n], Some(0));
        let mut fp = FlatParam::new(&c, None, &placed.inputs(), &FlatParamOptions::default()).unwrap();
        let shard_bytes = fp.shard_numel() as usize * 4;
        flatshard::cuda::reset_device_peak();
        let (before, _) = flatshard::cuda::device_bytes();
        fp.unshard(&c, UnshardOptions { rank0_only: true, offload_to_cpu: true, ..Default::default() }).unwrap();
        let (_, peak) = flatshard::cuda::device_bytes();
        if rank == 0 {
            let v = fp.view(0).unwrap();
            assert_eq!(v.device, Device::Cpu);
        }
        fp.reshard(&c).unwrap();
        let extra = peak - before;
        println!("#: rank {rank}: device memory during rank0_only+offload unshard: +{extra} bytes (shard {shard_bytes}, full {})", shard_bytes * 4);
        assert!(extra <= shard_bytes, "rank {rank}: +{extra} device bytes > one shard ({shard_bytes})");
    });
}

#[test]
fn cuda_flat_params_without_a_driver_are_unsupported_and_peers_are_told() {
    if has_gpu() {
        eprintln!("a CUDA driver is present: the no-driver path is not reachable here");
        return;
    }
    common::ranks("cuda_flat_params_without_a_driver_are_unsupported_and_peers_are_told", 2, &[], |c| {
        let rank = c.rank();
        let buf = [0u8; 64];
        // rank 0 passes CUDA tensors, rank 1 host ones: rank 0 UNSUPPORTED, rank 1 MISMATCH, nobody waits
        let dev = if rank == 0 { Device::Cuda(0) } else { Device::Cpu };
        let p = [unsafe { ParamInput::raw(buf.as_ptr(), 16, DType::F32, dev) }];
        let t = std::time::Instant::now();
        let e = FlatParam::new(&c, None, &p, &FlatParamOptions::default()).err().expect("must fail");
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "rank {rank} waited for its peer");
        if rank == 0 {
            assert_eq!(e.kind, flatshard::error::ErrorKind::Unsupported, "{e}");
            assert!(e.msg.contains("cuda:0") && e.msg.contains("CUDA driver"), "{e}");
        } else {
            assert_eq!(e.kind, flatshard::error::ErrorKind::Mismatch, "{e}");
            assert!(e.msg.contains("rank 0"), "{e}");
        }
        // the communicator is still usable
        c.barrier().unwrap();
    });
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-test.sh"]
fn host_comm_collectives_on_device_pointers_are_staged() {
    common::ranks("host_comm_collectives_on_device_pointers_are_staged", 2, &[("FLATSHARD_BUCKET_BYTES", "1000".into())], |c| {
        assert!(has_gpu(), "skipped: no CUDA driver");
        let rank = c.rank();
        // mixed sizes so the 1000-byte pinned bucket packs some and splits others
        let numels = [3usize, 700, 1, 64];
        let host: Vec<Vec<u8>> = numels.iter().enumerate().map(|(i, &n)| common::f32_bytes(&values(rank * 5 + i, n))).collect();
        let devs: Vec<DevMem> = host
            .iter()
            .map(|h| {
                let d = DevMem::zeroed(0, h.len(), "test").unwrap();
                unsafe { flatshard::cuda::copy_to_device(d.ptr(), h.as_ptr(), h.len()).unwrap() };
                d
            })
            .collect();
        let mut want = host.clone();
        let hts: Vec<TensorRef> = want.iter_mut().map(|b| TensorRef::host(b, DType::F32)).collect();
        unsafe { flatshard::averaging::average_parameters(&c, &hts, 0).unwrap() };
        let dts: Vec<TensorRef> = devs
            .iter()
            .map(|d| TensorRef { data: d.ptr(), grad: std::ptr::null_mut(), numel: (d.len() / 4) as u64, dtype: DType::F32, device: Device::Cuda(0) })
            .collect();
        // From a fresh thread with no CUDA context current: flatshard must
        // find the context itself (pointer queries, pinned memory, syncs).
        let addrs: Vec<(usize, u64)> = dts.iter().map(|t| (t.data as usize, t.numel)).collect();
        std::thread::scope(|sc| {
            sc.spawn(|| {
                let ts: Vec<TensorRef> = addrs
                    .iter()
                    .map(|&(p, n)| TensorRef { data: p as *mut u8, grad: std::ptr::null_mut(), numel: n, dtype: DType::F32, device: Device::Cuda(0) })
                    .collect();
                unsafe { flatshard::averaging::average_parameters(&c, &ts, 0).unwrap() }
            });
        });
        for (i, t) in dts.iter().enumerate() {
            assert!(read(t) == want[i], "rank {rank}: params[{i}] averaged on the device differs from the host path");
        }
    });
}

/// NCCL with two ranks, each on its own GPU (needs >= 2 GPUs; scripts/gpu-test.sh
/// skips it on a one-GPU machine). NCCL reduces in its own order, so values are
/// compared with the host path within a tolerance, not bit for bit.
#[test]
#[ignore = "needs two CUDA GPUs: scripts/gpu-test.sh"]
fn nccl_two_gpus_flat_param_matches_host() {
    common::ranks("nccl_two_gpus_flat_param_matches_host", 2, &[], |host| {
        assert!(has_gpu(), "skipped: no CUDA driver");
        assert!(flatshard::cuda::device_count().unwrap() >= 2, "needs two GPUs");
        let rank = host.rank();
        let port: u16 = std::env::var("MASTER_PORT").unwrap().parse::<u16>().unwrap() + 1;
        let nccl = Comm::init_nccl("127.0.0.1", port, rank as i32, 2, rank as i32, std::ptr::null_mut(), Default::default()).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        flat_param_scenario(&host, None, Sharding::FullShard, &mut a);
        flat_param_scenario(&nccl, Some(rank as i32), Sharding::FullShard, &mut b);
        assert_eq!(a.len(), b.len());
        for ((k, x), (_, y)) in a.iter().zip(&b) {
            let bf16 = k.contains("view") && !k.contains("offloaded");
            let (x, y): (Vec<f32>, Vec<f32>) = if bf16 {
                let f = |v: &Vec<u8>| v.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_ne_bytes([c[0], c[1]])).to_f32()).collect();
                (f(x), f(y))
            } else {
                (common::bytes_f32(x), common::bytes_f32(y))
            };
            for (u, v) in x.iter().zip(&y) {
                assert!((u - v).abs() <= 1e-2 * (1.0 + u.abs()), "rank {rank}: {k}: host {u} vs NCCL {v}");
            }
        }
        match nccl.split(rank as i32, 0) {
            Err(e) if e.kind == flatshard::error::ErrorKind::Unsupported => {
                eprintln!("split skipped: {e}")
            }
            r => assert_eq!(r.unwrap().map(|s| (s.size(), s.rank())), Some((1, 0))),
        }
    });
}

// ---- API §7: asynchronous operations on CUDA ------------------------------

fn ok(s: flatshard_status) {
    assert_eq!(s, flatshard_status::FLATSHARD_OK, "{}", last_error());
}

/// GPU-free paths: on a host communicator `wait_stream` is `wait`; a CUDA
/// event cannot be recorded without a driver (UNSUPPORTED, clear message).
#[test]
fn async_wait_stream_on_host_work_is_wait() {
    use flatshard::ffi::comm::{flatshard_all_reduce, flatshard_comm_free, flatshard_comm_init};
    use flatshard::ffi::work::*;
    use flatshard::ffi::{DtypeArg, ReduceOpArg};
    let mut c: *mut flatshard_comm = std::ptr::null_mut();
    unsafe {
        ok(flatshard_comm_init(std::ptr::null(), 0, 0, 1, std::ptr::null(), &mut c));
        let mut x = [3f32; 16];
        let mut w = std::ptr::null_mut();
        ok(flatshard_all_reduce_async(c, x.as_mut_ptr() as *mut _, 16, DtypeArg(0), ReduceOpArg(0), &mut w));
        ok(flatshard_work_wait_stream(w, std::ptr::null_mut()));
        let mut done = 0;
        ok(flatshard_work_test(w, &mut done));
        assert_eq!(done, 1, "wait_stream on host work must wait");
        flatshard_work_free(w);
        ok(flatshard_all_reduce(c, x.as_mut_ptr() as *mut _, 16, DtypeArg(0), ReduceOpArg(0)));
        flatshard_comm_free(c);
    }
    if !has_gpu() {
        let e = flatshard::cuda::event::Event::record(0, std::ptr::null_mut()).err().expect("no driver: no event");
        assert_eq!(e.kind, flatshard::error::ErrorKind::Unsupported, "{}", e.msg);
    }
}

/// NCCL (world 1): async collectives enqueue on the comm's stream and record
/// an event; wait syncs it, test polls it, wait_stream makes another stream
/// wait; a device flat param prefetched with unshard_async gives the same
/// full parameter as the blocking unshard.
#[test]
#[ignore = "needs a CUDA GPU with NCCL: scripts/gpu-test.sh"]
fn nccl_async_work_events() {
    use flatshard::ffi::comm::{flatshard_all_reduce, flatshard_comm_free};
    use flatshard::ffi::flat_param::*;
    use flatshard::ffi::work::*;
    use flatshard::ffi::{flatshard_device, flatshard_tensor, DeviceTypeArg, DtypeArg, ReduceOpArg};
    assert!(has_gpu(), "skipped: no CUDA driver");
    let mut c: *mut flatshard_comm = std::ptr::null_mut();
    unsafe {
        ok(flatshard_comm_init_nccl(std::ptr::null(), 0, 0, 1, 0, std::ptr::null_mut(), std::ptr::null(), &mut c));
        let n = 1 << 20;
        let host: Vec<u8> = common::f32_bytes(&values(3, n));
        let d = DevMem::zeroed(0, host.len(), "test").unwrap();
        flatshard::cuda::copy_to_device(d.ptr(), host.as_ptr(), host.len()).unwrap();
        let mut ws = Vec::new();
        for _ in 0..4 {
            let mut w = std::ptr::null_mut();
            ok(flatshard_all_reduce_async(c, d.ptr() as *mut _, n as u64, DtypeArg(0), ReduceOpArg(0), &mut w));
            ws.push(w);
        }
        let mut done = -1;
        ok(flatshard_work_test(ws[0], &mut done));
        assert!(done == 0 || done == 1);
        ok(flatshard_work_wait_stream(ws[3], std::ptr::null_mut())); // the legacy stream waits
        flatshard::cuda::stream_sync(0, std::ptr::null_mut()).unwrap();
        for w in ws {
            ok(flatshard_work_wait(w));
            ok(flatshard_work_wait(w));
            flatshard_work_free(w);
        }
        let mut back = vec![0u8; host.len()];
        flatshard::cuda::copy_to_host(back.as_mut_ptr(), d.ptr(), back.len()).unwrap();
        assert!(back == host, "world-1 all_reduce changed the data");
        // a blocking call behind async work on the same stream
        ok(flatshard_all_reduce(c, d.ptr() as *mut _, n as u64, DtypeArg(0), ReduceOpArg(0)));

        // device flat param: unshard_async then view, equal to the blocking unshard
        let t = flatshard_tensor {
            data: d.ptr() as *mut _,
            grad: std::ptr::null_mut(),
            numel: n as u64,
            dtype: DtypeArg(0),
            device: flatshard_device { r#type: DeviceTypeArg(1), index: 0 },
        };
        let mut fp = std::ptr::null_mut();
        ok(flatshard_flat_param_new(c, &t, 1, std::ptr::null(), &mut fp));
        let mut w = std::ptr::null_mut();
        ok(flatshard_flat_param_unshard_async(fp, std::ptr::null(), &mut w));
        let mut v: flatshard_tensor = std::mem::zeroed();
        ok(flatshard_flat_param_view(fp, 0, &mut v));
        let mut got = vec![0u8; host.len()];
        flatshard::cuda::copy_to_host(got.as_mut_ptr(), v.data as *const u8, got.len()).unwrap();
        assert!(got == host, "unshard_async gave a different full parameter");
        ok(flatshard_work_wait(w));
        flatshard_work_free(w);
        ok(flatshard_flat_param_reshard(fp));
        flatshard_flat_param_free(fp);
        flatshard_comm_free(c);
    }
}

/// A host communicator with device pointers: async work is staged through
/// pinned memory on the progress thread (no CUDA context current there).
#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-test.sh"]
fn host_comm_async_on_device_pointers() {
    use flatshard::ffi::comm::{flatshard_comm_free, flatshard_comm_init};
    use flatshard::ffi::work::*;
    use flatshard::ffi::{DtypeArg, ReduceOpArg};
    assert!(has_gpu(), "skipped: no CUDA driver");
    let mut c: *mut flatshard_comm = std::ptr::null_mut();
    unsafe {
        ok(flatshard_comm_init(std::ptr::null(), 0, 0, 1, std::ptr::null(), &mut c));
        let host = common::f32_bytes(&values(5, 4096));
        let d = DevMem::zeroed(0, host.len(), "test").unwrap();
        flatshard::cuda::copy_to_device(d.ptr(), host.as_ptr(), host.len()).unwrap();
        let mut w = std::ptr::null_mut();
        ok(flatshard_all_reduce_async(c, d.ptr() as *mut _, 4096, DtypeArg(0), ReduceOpArg(1), &mut w));
        ok(flatshard_work_wait(w));
        flatshard_work_free(w);
        let mut back = vec![0u8; host.len()];
        flatshard::cuda::copy_to_host(back.as_mut_ptr(), d.ptr(), back.len()).unwrap();
        assert!(back == host);
        flatshard_comm_free(c);
    }
}
