//! `flatshard-bench`: the same measurements as ../shared/bench/torch_baseline.py,
//! printed in the same JSON-lines format so the two compare row by row.
//!
//! ```text
//! cargo run --release --bin flatshard-bench -- --world 2 --sizes 4K,1M,16M,256M \
//!     [--ops all_reduce,all_gather,reduce_scatter,broadcast] [--transport auto|tcp|shm] [--iters 5]
//! ```
//! The parent re-executes itself once per rank (env FLATSHARD_BENCH_WORKER=1
//! plus torchrun's variables); rank 0 prints one row per (op, size):
//! bytes = the full buffer (all_gather / reduce_scatter: the gathered total),
//! median_s = the largest per-rank median, busbw = algbw × the nccl-tests
//! factor, peak_rss_bytes = rank 0's peak RSS so far (getrusage).

use flatshard::{Comm, CommOptions, DType, ReduceOp, Transport};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every op of the baseline, in its order. Ops this build cannot run yet
/// produce an "error" row, as the baseline does.
const ALL_OPS: &[&str] = &["all_reduce", "all_gather", "reduce_scatter", "broadcast", "average_parameters", "fsdp_unshard"];

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
fn make_op(op: &str, rank: usize, world: usize, nbytes: usize) -> Result<Step, String> {
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
                let ts: Vec<flatshard::tensor::TensorRef> = bufs
                    .iter_mut()
                    .map(|b| flatshard::tensor::TensorRef::host(b, DType::F32))
                    .collect();
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
    iters: usize,
    raw: Vec<String>,
}

const USAGE: &str = "usage: flatshard-bench [--world N] [--sizes 4K,1M,16M,256M] [--ops all_reduce,...] [--transport auto|tcp|shm] [--iters 5]";

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        world: 2,
        sizes: "4K,1M,16M,256M".split(',').map(|s| parse_size(s).unwrap()).collect(),
        ops: ALL_OPS[..4].iter().map(|s| s.to_string()).collect(),
        transport: Transport::Auto,
        iters: 5,
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
                    _ => return Err(format!("--transport: '{v}' is not auto, tcp or shm")),
                }
            }
            "--iters" => o.iters = v.parse().ok().filter(|n| *n >= 1).ok_or(format!("--iters: bad value '{v}'"))?,
            other => return Err(format!("unknown argument '{other}'")),
        }
        i += 2;
    }
    Ok(o)
}

fn peak_rss_bytes() -> u64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
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
    let comm = Comm::init_from_env(CommOptions { transport: o.transport, timeout: Duration::from_secs(600), ..Default::default() })
        .map_err(|e| format!("init: {e}"))?;
    let (rank, world) = (comm.rank(), comm.size());
    let implname = format!("flatshard-{}", comm.transport_name());
    for op in &o.ops {
        for &nbytes in &o.sizes {
            // Median of `iters` timed runs after one warm-up, as the baseline.
            let result: Result<f64, String> = make_op(op, rank, world, nbytes).and_then(|mut step| {
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
                let head = format!(r#"{{"impl": "{implname}", "op": "{op}", "world": {world}, "bytes": {nbytes}, "dtype": "f32""#);
                let row = match &result {
                    Err(e) => format!(r#"{head}, "error": "{}"}}"#, e.replace('\\', "\\\\").replace('"', "\\\"")),
                    Ok(_) if meds.iter().any(|m| *m < 0.0) => format!(r#"{head}, "error": "failed on another rank"}}"#),
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
