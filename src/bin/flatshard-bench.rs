//! `flatshard-bench`: the same measurements as ../shared/bench/torch_baseline.py,
//! printed in the same JSON-lines format so the two compare row by row.
//!
//! ```text
//! cargo run --release --bin flatshard-bench -- --world 2 --sizes 4K,1M,16M,256M \
//!     [--ops all_reduce,all_gather,reduce_scatter,broadcast] [--transport auto|tcp|shm] [--iters 5]
//! cargo run --release --bin flatshard-bench -- --device cuda --transport nccl --world 1 \
//!     --ops memcpy_d2d,fsdp_unshard,average_parameters,all_reduce
//! ```
//! cargo run --release --bin flatshard-bench -- --ops train_step --world 2 --transport shm \
//!     [--layers 8] [--layer-bytes 4M] [--compute-ms auto|X] [--prefetch 2]
//! ```
//! `train_step` (bench_parts/train_step.rs) times an FSDP step of L layers,
//! blocking and with prefetch / async gradient reduction (API §7), compute
//! modelled as a sleep per layer (default: as long as the communication).
//! `--device cuda` puts every buffer in device memory (rank r on GPU
//! r % device count): `--transport nccl` gives `flatshard-nccl` rows, a host
//! transport gives `flatshard-cuda-staged` rows (staged through pinned host
//! memory), and `memcpy_d2d` is the device-to-device copy of the same size
//! (`cuda-memcpy` rows), the bound to compare unshard + reshard against.
//! The parent re-executes itself once per rank (env FLATSHARD_BENCH_WORKER=1
//! plus torchrun's variables); rank 0 prints one row per (op, size):
//! bytes = the full buffer (all_gather / reduce_scatter: the gathered total),
//! median_s = the largest per-rank median, busbw = algbw × the nccl-tests
//! factor, peak_rss_bytes = rank 0's peak RSS so far (getrusage).

#![warn(clippy::undocumented_unsafe_blocks)]

#[path = "bench_parts/train_step.rs"]
mod train_step;

use flatshard::{Comm, CommOptions, DType, ReduceOp, Transport};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every op of the baseline, in its order. Ops this build cannot run yet
/// produce an "error" row, as the baseline does.
const ALL_OPS: &[&str] = &["all_reduce", "all_gather", "reduce_scatter", "broadcast", "average_parameters", "fsdp_unshard", "memcpy_d2d", "train_step"];

/// nccl-tests bus-bandwidth factor (same table as the baseline).
fn factor(op: &str, n: usize) -> f64 {
    let n = n as f64;
    match op {
        "all_reduce" | "average_parameters" => 2.0 * (n - 1.0) / n,
        "all_gather" | "reduce_scatter" | "fsdp_unshard" => (n - 1.0) / n,
        _ => 1.0,
    }
}

type Step = Box<dyn FnMut(&Comm) -> flatshard::Result<()>>;

/// Build the timed operation for `op` on a buffer of `nbytes` (f32, like the
/// baseline). Buffers are allocated (and touched) here, outside the timing.
fn make_op(op: &str, rank: usize, world: usize, nbytes: usize, dev: Option<i32>) -> Result<Step, String> {
    if let Some(d) = dev {
        return make_device_op(op, rank, world, nbytes, d);
    }
    if op == "memcpy_d2d" {
        return Err("memcpy_d2d is a device row: use --device cuda".into());
    }
    let numel = nbytes / 4;
    let fill = |n: usize| -> Vec<u8> { (0..n).flat_map(|i| (((i + rank) % 13) as f32).to_ne_bytes()).collect() };
    Ok(match op {
        "all_reduce" => {
            let mut x = fill(numel);
            Box::new(move |c| c.all_reduce(&mut x, DType::F32, ReduceOp::Sum))
        }
        "broadcast" => {
            let mut x = fill(numel);
            Box::new(move |c| c.broadcast(&mut x, DType::F32, 0))
        }
        "all_gather" => {
            let inp = fill(numel / world);
            let mut out = vec![0u8; numel / world * world * 4];
            Box::new(move |c| c.all_gather(&inp, &mut out, DType::F32))
        }
        "reduce_scatter" => {
            let inp = fill(numel / world * world);
            let mut out = vec![0u8; numel / world * 4];
            Box::new(move |c| c.reduce_scatter(&inp, &mut out, DType::F32, ReduceOp::Sum))
        }
        // As torch_baseline.py: 10 tensors of numel/10, averaged in place.
        "average_parameters" => {
            let mut bufs: Vec<Vec<u8>> = (0..10).map(|_| fill(numel / 10)).collect();
            Box::new(move |c| {
                let ts: Vec<flatshard::tensor::TensorRef> = bufs.iter_mut().map(|b| flatshard::tensor::TensorRef::host(b, DType::F32)).collect();
                // SAFETY: the tensors point into `bufs`, alive and unaliased here.
                unsafe { flatshard::averaging::average_parameters(c, &ts, 0) }
            })
        }
        // As torch_baseline.py: one FSDP unit of 10 Linear(numel/10 -> 1)
        // layers; summon_full_params(writeback=True) = unshard + reshard.
        "fsdp_unshard" => {
            let layer = numel / 10;
            let bufs: Vec<Vec<u8>> = (0..10).map(|_| fill(layer)).collect();
            let mut fp: Option<flatshard::flat_param::FlatParam> = None;
            Box::new(move |c| {
                use flatshard::flat_param::{FlatParam, FlatParamOptions, ParamInput, UnshardOptions};
                if fp.is_none() {
                    // built during the untimed warm-up call
                    let ins: Vec<ParamInput> = bufs.iter().map(|b| ParamInput::host(b, DType::F32)).collect();
                    fp = Some(FlatParam::new(c, None, &ins, &FlatParamOptions::default())?);
                }
                let fp = fp.as_mut().ok_or_else(|| flatshard::Error::internal("flat param missing"))?;
                fp.unshard(c, UnshardOptions { writeback: true, ..Default::default() })?;
                fp.reshard(c)
            })
        }
        other => return Err(format!("unknown op '{other}'")),
    })
}

/// Device memory holding `numel` f32 values (the same fill as host buffers).
fn dev_fill(d: i32, rank: usize, numel: usize) -> Result<flatshard::cuda::DevMem, String> {
    let host: Vec<u8> = (0..numel).flat_map(|i| (((i + rank) % 13) as f32).to_ne_bytes()).collect();
    let m = flatshard::cuda::DevMem::zeroed(d, host.len(), "benchmark buffer").map_err(|e| e.to_string())?;
    // SAFETY: m holds host.len() device bytes.
    unsafe { flatshard::cuda::copy_to_device(m.ptr(), host.as_ptr(), host.len()) }.map_err(|e| e.to_string())?;
    Ok(m)
}

/// The `--device cuda` operations; each step waits for its device work.
fn make_device_op(op: &str, rank: usize, world: usize, nbytes: usize, d: i32) -> Result<Step, String> {
    use flatshard::tensor::{Device, TensorRef};
    let numel = nbytes / 4;
    let dev_t = move |m: &flatshard::cuda::DevMem| TensorRef {
        data: m.ptr(),
        grad: std::ptr::null_mut(),
        numel: (m.len() / 4) as u64,
        dtype: DType::F32,
        device: Device::Cuda(d),
    };
    let need_nccl = |c: &Comm| {
        if c.is_device() {
            Ok(())
        } else {
            Err(flatshard::Error::unsupported("device collectives need --transport nccl"))
        }
    };
    Ok(match op {
        "memcpy_d2d" => {
            let (a, b) = (dev_fill(d, rank, numel)?, dev_fill(d, rank, numel)?);
            Box::new(move |c| {
                // SAFETY: two device buffers of nbytes.
                unsafe { flatshard::cuda::copy_async(b.ptr(), a.ptr(), a.len(), flatshard::cuda::Dir::DtoD, c.stream())? };
                flatshard::cuda::stream_sync(d, c.stream())
            })
        }
        "all_reduce" | "broadcast" => {
            let x = dev_fill(d, rank, numel)?;
            let bc = op == "broadcast";
            Box::new(move |c| {
                need_nccl(c)?;
                // SAFETY: a device buffer of numel f32 on the comm's device.
                unsafe {
                    if bc {
                        c.dev_broadcast(x.ptr(), numel, DType::F32, 0)?
                    } else {
                        c.dev_all_reduce(x.ptr(), x.ptr(), numel, DType::F32, ReduceOp::Sum)?
                    }
                };
                c.synchronize()
            })
        }
        "all_gather" | "reduce_scatter" => {
            let part = numel / world;
            let (small, big) = (dev_fill(d, rank, part)?, dev_fill(d, rank, part * world)?);
            let ag = op == "all_gather";
            Box::new(move |c| {
                need_nccl(c)?;
                // SAFETY: device buffers of part and part × world f32.
                unsafe {
                    if ag {
                        c.dev_all_gather(small.ptr(), big.ptr(), part, DType::F32)?
                    } else {
                        c.dev_reduce_scatter(big.ptr(), small.ptr(), part, DType::F32, ReduceOp::Sum)?
                    }
                };
                c.synchronize()
            })
        }
        "average_parameters" => {
            let bufs: Vec<_> = (0..10).map(|_| dev_fill(d, rank, numel / 10)).collect::<Result<_, _>>()?;
            Box::new(move |c| {
                let ts: Vec<TensorRef> = bufs.iter().map(dev_t).collect();
                // SAFETY: device tensors alive in `bufs`.
                unsafe { flatshard::averaging::average_parameters(c, &ts, 0)? };
                c.synchronize()
            })
        }
        "fsdp_unshard" => {
            let bufs: Vec<_> = (0..10).map(|_| dev_fill(d, rank, numel / 10)).collect::<Result<_, _>>()?;
            let mut fp: Option<flatshard::flat_param::FlatParam> = None;
            Box::new(move |c| {
                use flatshard::flat_param::{FlatParam, FlatParamOptions, ParamInput, UnshardOptions};
                if fp.is_none() {
                    // SAFETY: device tensors alive in `bufs`.
                    let ins: Vec<ParamInput> =
                        bufs.iter().map(|m| unsafe { ParamInput::raw(m.ptr(), (m.len() / 4) as u64, DType::F32, Device::Cuda(d)) }).collect();
                    fp = Some(FlatParam::new(c, None, &ins, &FlatParamOptions::default())?);
                }
                let fp = fp.as_mut().ok_or_else(|| flatshard::Error::internal("flat param missing"))?;
                fp.unshard(c, UnshardOptions { writeback: true, ..Default::default() })?;
                fp.reshard(c)
            })
        }
        other => return Err(format!("unknown op '{other}'")),
    })
}

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1usize << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>().map(|n| n * mult).map_err(|_| format!("bad size '{s}' (e.g. 4K, 16M, 1G, 4096)"))
}

struct Opts {
    world: usize,
    sizes: Vec<usize>,
    ops: Vec<String>,
    transport: Transport,
    nccl: bool,
    device: Option<()>,
    iters: usize,
    layers: usize,
    layer_bytes: usize,
    compute_ms: Option<f64>,
    prefetch: usize,
    raw: Vec<String>,
}

const USAGE: &str =
    "usage: flatshard-bench [--world N] [--sizes 4K,1M,16M,256M] [--ops all_reduce,...] [--transport auto|tcp|shm|nccl] [--device cpu|cuda] [--iters 5] [--layers 8 --layer-bytes 4M --compute-ms auto|X --prefetch 2 (train_step)]";

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        world: 2,
        sizes: "4K,1M,16M,256M".split(',').map(|s| parse_size(s).unwrap()).collect(),
        ops: ALL_OPS[..4].iter().map(|s| s.to_string()).collect(),
        transport: Transport::Auto,
        nccl: false,
        device: None,
        iters: 5,
        layers: 8,
        layer_bytes: 4 << 20,
        compute_ms: None,
        prefetch: 2,
        raw: args.to_vec(),
    };
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).ok_or_else(|| format!("{} needs a value", args[i]))?;
        match args[i].as_str() {
            "--world" => o.world = v.parse().ok().filter(|w| *w >= 1).ok_or(format!("--world: bad value '{v}'"))?,
            "--sizes" => o.sizes = v.split(',').map(parse_size).collect::<Result<_, _>>()?,
            "--ops" => {
                o.ops = v.split(',').map(str::to_string).collect();
                if let Some(bad) = o.ops.iter().find(|op| !ALL_OPS.contains(&op.as_str())) {
                    return Err(format!("--ops: unknown op '{bad}' (known: {})", ALL_OPS.join(",")));
                }
            }
            "--transport" => {
                o.transport = match v.as_str() {
                    "auto" => Transport::Auto,
                    "tcp" => Transport::Tcp,
                    "shm" => Transport::Shm,
                    "nccl" => {
                        o.nccl = true;
                        Transport::Tcp
                    }
                    _ => return Err(format!("--transport: '{v}' is not auto, tcp, shm or nccl")),
                }
            }
            "--device" => {
                o.device = match v.as_str() {
                    "cpu" => None,
                    "cuda" => Some(()),
                    _ => return Err(format!("--device: '{v}' is not cpu or cuda")),
                }
            }
            "--layers" => o.layers = v.parse().ok().filter(|n| *n >= 1).ok_or(format!("--layers: bad value '{v}'"))?,
            "--prefetch" => o.prefetch = v.parse().ok().filter(|n| *n >= 1).ok_or(format!("--prefetch: bad value '{v}'"))?,
            "--layer-bytes" => o.layer_bytes = parse_size(v)?,
            "--compute-ms" => {
                o.compute_ms = match v.as_str() {
                    "auto" => None,
                    _ => Some(v.parse::<f64>().ok().filter(|x| *x >= 0.0).ok_or(format!("--compute-ms: bad value '{v}'"))?),
                }
            }
            "--iters" => o.iters = v.parse().ok().filter(|n| *n >= 1).ok_or(format!("--iters: bad value '{v}'"))?,
            other => return Err(format!("unknown argument '{other}'")),
        }
        i += 2;
    }
    if o.ops.iter().any(|op| op == "train_step") && (o.ops.len() > 1 || o.device.is_some()) {
        return Err("--ops train_step runs alone, on host memory".into());
    }
    if o.nccl && o.device.is_none() {
        return Err("--transport nccl needs --device cuda".into());
    }
    Ok(o)
}

fn peak_rss_bytes() -> u64 {
    // SAFETY: rusage is plain data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a writable rusage struct.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss as u64 * 1024 // kilobytes on Linux
}

/// A JSON number the way Python's json prints a float (always with a point).
fn num(x: f64) -> String {
    let s = format!("{x}");
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        s + ".0"
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn worker(o: &Opts) -> Result<(), String> {
    if o.ops.iter().any(|op| op == "train_step") {
        let transport = match o.transport {
            Transport::Auto => 0,
            Transport::Tcp => 1,
            Transport::Shm => 2,
        };
        let cfg = train_step::Cfg { layers: o.layers, layer_bytes: o.layer_bytes, compute_ms: o.compute_ms, iters: o.iters, transport, prefetch: o.prefetch };
        return train_step::run(&cfg);
    }
    let copts = CommOptions { transport: o.transport, timeout: Duration::from_secs(600), ..Default::default() };
    let dev = match o.device {
        None => None,
        Some(()) => Some(gpu_for_this_rank()?),
    };
    let comm = if o.nccl { init_nccl(copts, dev.unwrap_or(0))? } else { Comm::init_from_env(copts).map_err(|e| format!("init: {e}"))? };
    let (rank, world) = (comm.rank(), comm.size());
    let implname = match (dev, comm.is_device()) {
        (None, _) => format!("flatshard-{}", comm.transport_name()),
        (Some(_), true) => "flatshard-nccl".to_string(),
        (Some(_), false) => "flatshard-cuda-staged".to_string(),
    };
    for op in &o.ops {
        for &nbytes in &o.sizes {
            // Median of `iters` timed runs after one warm-up, as the baseline.
            let result: Result<f64, String> = make_op(op, rank, world, nbytes, dev).and_then(|mut step| {
                step(&comm).map_err(|e| e.to_string())?;
                comm.barrier().map_err(|e| e.to_string())?;
                let mut ts = Vec::with_capacity(o.iters);
                for _ in 0..o.iters {
                    let t = Instant::now();
                    step(&comm).map_err(|e| e.to_string())?;
                    ts.push(t.elapsed().as_secs_f64());
                }
                Ok(median(ts))
            });
            // Max over ranks of the median; a failed rank sends -1.
            let mine = result.as_ref().copied().unwrap_or(-1.0);
            let mut all = vec![0u8; 8 * world];
            comm.all_gather(&mine.to_ne_bytes(), &mut all, DType::F64).map_err(|e| format!("gathering timings: {e}"))?;
            let meds: Vec<f64> = all.chunks_exact(8).map(|c| f64::from_ne_bytes(c.try_into().unwrap())).collect();
            if rank == 0 {
                let implname = if op == "memcpy_d2d" { "cuda-memcpy" } else { implname.as_str() };
                let head = format!(r#"{{"impl": "{implname}", "op": "{op}", "world": {world}, "bytes": {nbytes}, "dtype": "f32""#);
                let row = match &result {
                    Err(e) => format!(r#"{head}, "error": "{}"}}"#, e.replace('\\', "\\\\").replace('"', "\\\"")),
                    Ok(_) if meds.iter().any(|m| *m < 0.0) => {
                        format!(r#"{head}, "error": "failed on another rank"}}"#)
                    }
                    Ok(_) => {
                        let t = meds.iter().cloned().fold(0.0, f64::max);
                        let algbw = nbytes as f64 / t / 1e9;
                        format!(
                            r#"{head}, "median_s": {}, "algbw_GBps": {}, "busbw_GBps": {}, "peak_rss_bytes": {}}}"#,
                            num(round(t, 6)),
                            num(round(algbw, 3)),
                            num(round(algbw * factor(op, world), 3)),
                            peak_rss_bytes()
                        )
                    }
                };
                println!("{row}");
            }
        }
    }
    comm.barrier().map_err(|e| format!("final barrier: {e}"))?;
    Ok(())
}

/// GPU LOCAL_RANK % device count (all ranks share GPU 0 on a one-GPU machine).
fn gpu_for_this_rank() -> Result<i32, String> {
    flatshard::cuda::driver().map_err(|e| e.to_string())?;
    let local: i32 = std::env::var("LOCAL_RANK").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(local % flatshard::cuda::device_count().map_err(|e| e.to_string())?.max(1))
}

fn init_nccl(o: CommOptions, device: i32) -> Result<Comm, String> {
    #[cfg(feature = "cuda")]
    {
        let v = |k: &str| std::env::var(k).map_err(|_| format!("{k} is not set"));
        let num = |k: &str| -> Result<i32, String> { v(k)?.parse().map_err(|_| format!("{k} is not a number")) };
        let port = num("MASTER_PORT")? as u16;
        Comm::init_nccl(&v("MASTER_ADDR")?, port, num("RANK")?, num("WORLD_SIZE")?, device, std::ptr::null_mut(), o).map_err(|e| format!("init_nccl: {e}"))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (o, device);
        Err("built without the cuda feature".into())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return;
    }
    let o = parse(&args).unwrap_or_else(|e| {
        eprintln!("flatshard-bench: {e}\n{USAGE}");
        std::process::exit(2)
    });
    if std::env::var_os("FLATSHARD_BENCH_WORKER").is_some() {
        if let Err(e) = worker(&o) {
            eprintln!("flatshard-bench rank {}: {e}", std::env::var("RANK").unwrap_or_default());
            std::process::exit(1);
        }
        return;
    }
    // Parent: start the ranks (this same binary), rank 0's stdout is ours.
    let exe = std::env::current_exe().expect("own path");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port");
    let mut token = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").expect("/dev/urandom"), &mut token).expect("random token");
    let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
    let mut children: Vec<_> = (0..o.world)
        .map(|r| {
            Command::new(&exe)
                .args(&o.raw)
                .env("FLATSHARD_BENCH_WORKER", "1")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", o.world.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("LOCAL_WORLD_SIZE", o.world.to_string())
                .env("FLATSHARD_TOKEN", &token)
                .stdin(Stdio::null())
                .stdout(if r == 0 { Stdio::inherit() } else { Stdio::null() })
                .spawn()
                .expect("start a benchmark rank")
        })
        .collect();
    let mut code = 0;
    for (r, c) in children.iter_mut().enumerate() {
        let st = c.wait().expect("wait for a rank");
        if !st.success() {
            eprintln!("flatshard-bench: rank {r} failed ({st})");
            code = 1;
        }
    }
    std::process::exit(code);
}
