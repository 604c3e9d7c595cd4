//! flatshard under the real torchrun of the test venv: every rendezvous mode
//! (--standalone, --rdzv-backend static and c10d), 2 and 4 processes, the
//! demo (examples-c/train_mlp.c), the collectives tour
//! (examples-c/collectives_demo.c) and tests/c/launch_job.c, an elastic
//! restart after a killed worker, the job token, torch.distributed and
//! flatshard side by side in one worker; and the TCPStore client
//! itself against PyTorch's own TCPStore (both server back ends) and against
//! peers that send garbage.
//!
//! Multi-node torchrun (two agents in two network namespaces) is in
//! tests/torchrun_multinode.rs.

mod launchkit;

use flatshard::comm::net::Wait;
use flatshard::comm::torchstore::TorchStore;
use flatshard::ErrorKind;
use launchkit::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(240);

fn torchrun_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(torchrun());
    c.args(args);
    for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "FLATSHARD_TOKEN", "TORCHELASTIC_USE_AGENT_STORE"] {
        c.env_remove(v);
    }
    c.env("OMP_NUM_THREADS", "1");
    c
}

fn collectives_demo() -> PathBuf {
    build_c("cc", &["-std=c11", "-pedantic", "-O2"], "examples-c/collectives_demo.c")
}
fn train_mlp() -> PathBuf {
    build_c("cc", &["-std=c11", "-pedantic", "-O2"], "examples-c/train_mlp.c")
}
fn expect_demo(out: &str, world: usize) {
    assert!(out.contains(&format!("flatshard 0.1.0: {world} ranks")) || out.contains(&format!(": {world} ranks")), "{out}");
}

// ---- the real torchrun, each rendezvous mode ----------------------------

#[test]
fn standalone_2_collectives_demo() {
    let r = run_limited(torchrun_cmd(&["--standalone", "--nproc-per-node", "2", "--no-python", s(&collectives_demo()), "--quick"]), LIMIT);
    assert!(r.ok(), "{}", r.out);
    assert!(r.out.contains("all results verified on 2 ranks"), "{}", r.out);
}

#[test]
fn standalone_4_train_mlp_demo() {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("mlp-torchrun-{}.safetensors", std::process::id()));
    let r = run_limited(torchrun_cmd(&["--standalone", "--nproc-per-node", "4", "--no-python", s(&train_mlp()), s(&out)]), LIMIT);
    assert!(r.ok(), "{}", r.out);
    expect_demo(&r.out, 4);
    assert!(r.out.contains("wrote ") && out.exists(), "{}", r.out);
    let _ = std::fs::remove_file(out);
}

#[test]
fn static_2_launch_job_equals_native() {
    let port = free_port().to_string();
    let args = ["--rdzv-backend", "static", "--master-addr", "127.0.0.1", "--master-port", &port, "--nnodes", "1", "--node-rank", "0"];
    let r = run_limited(torchrun_cmd(&[&args[..], &["--nproc-per-node", "2", "--no-python", s(&launch_job())]].concat()), LIMIT);
    assert!(r.ok(), "{}", r.out);
    assert_eq!(hashes(&r.out, 2), native_hashes(2), "{}", r.out);
}

#[test]
fn static_4_collectives_demo() {
    let port = free_port().to_string();
    let args = ["--rdzv-backend", "static", "--master-addr", "127.0.0.1", "--master-port", &port, "--nnodes", "1", "--node-rank", "0"];
    let r = run_limited(torchrun_cmd(&[&args[..], &["--nproc-per-node", "4", "--no-python", s(&collectives_demo()), "--quick"]].concat()), LIMIT);
    assert!(r.ok(), "{}", r.out);
    assert!(r.out.contains("all results verified on 4 ranks"), "{}", r.out);
}

#[test]
fn c10d_2_train_mlp_demo() {
    let ep = format!("127.0.0.1:{}", free_port());
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("mlp-c10d-{}.safetensors", std::process::id()));
    let r = run_limited(
        torchrun_cmd(&["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", &ep, "--nproc-per-node", "2", "--no-python", s(&train_mlp()), s(&out)]),
        LIMIT,
    );
    assert!(r.ok(), "{}", r.out);
    expect_demo(&r.out, 2);
    let _ = std::fs::remove_file(out);
}

#[test]
fn c10d_4_launch_job_equals_native() {
    let ep = format!("127.0.0.1:{}", free_port());
    let r = run_limited(
        torchrun_cmd(&["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", &ep, "--nproc-per-node", "4", "--no-python", s(&launch_job())]),
        LIMIT,
    );
    assert!(r.ok(), "{}", r.out);
    assert_eq!(hashes(&r.out, 4), native_hashes(4), "{}", r.out);
}

/// Rank 1 dies (SIGKILL) after the job formed; torchrun restarts every
/// worker (TORCHELASTIC_RESTART_COUNT=1) and the fresh job completes: its
/// keys are scoped by the restart count, so nothing stale is read.
#[test]
fn killed_worker_restarts_into_a_fresh_job() {
    let mut c = torchrun_cmd(&["--standalone", "--nproc-per-node", "4", "--max-restarts", "1", "--no-python", s(&launch_job())]);
    c.env("LAUNCH_JOB_DIE_RANK", "1");
    let r = run_limited(c, LIMIT);
    assert!(r.ok(), "{}", r.out);
    assert!(r.out.contains("launch_job rank 1: killing myself (attempt 0)"), "{}", r.out);
    assert_eq!(count(&r.out, "ok, mode env, restart 1,"), 4, "{}", r.out);
    assert_eq!(count(&r.out, "restart 0, hash"), 0, "{}", r.out);
}

/// FLATSHARD_TOKEN in torchrun's environment reaches every worker and
/// authenticates the data connections; a worker with another token is
/// refused (AUTH), so the agent's unauthenticated store cannot let a
/// stranger in.
#[test]
fn job_token_under_torchrun() {
    let mut c = torchrun_cmd(&["--standalone", "--nproc-per-node", "2", "--no-python", s(&launch_job())]);
    c.env("FLATSHARD_TOKEN", "s3cret-for-this-job");
    let r = run_limited(c, LIMIT);
    assert!(r.ok(), "{}", r.out);
    assert_eq!(count(&r.out, "ok, mode env, restart 0,"), 2, "{}", r.out);

    let script = r#"if [ "$RANK" = 1 ]; then FLATSHARD_TOKEN=another-token; fi; export FLATSHARD_TOKEN; exec "$0""#;
    let mut c = torchrun_cmd(&["--standalone", "--nproc-per-node", "2", "--no-python", "sh", "-c", script, s(&launch_job())]);
    c.env("FLATSHARD_TOKEN", "s3cret-for-this-job");
    let r = run_limited(c, LIMIT);
    assert!(!r.ok(), "{}", r.out);
    assert!(r.out.contains("FLATSHARD_ERR_AUTH"), "{}", r.out);
}

// ---- the TCPStore client against PyTorch's TCPStore ---------------------

const PY_STORE: &str = r#"
import sys, datetime
import torch.distributed as dist
uv = sys.argv[1] == "1"
s = dist.TCPStore("127.0.0.1", 0, is_master=True, use_libuv=uv, wait_for_workers=False,
                  timeout=datetime.timedelta(seconds=120))
print(s.port, flush=True)
v = s.get("flatshard/t/0/from_rust")
s.set("flatshard/t/0/from_py", b"hello " + v)
s.set("flatshard/t/0/echo", s.get("flatshard/t/0/big"))
s.wait(["flatshard/t/0/done"])
print("py saw", v.decode(), "clients", s.get("flatshard/t/0/clients").decode(), "libuv", s.libuvBackend, flush=True)
"#;

fn against_pytorch_store(libuv: bool) {
    let mut py = Command::new(python()).args(["-c", PY_STORE, if libuv { "1" } else { "0" }]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
    let port: u16 = lines.next().expect("python printed the port").unwrap().trim().parse().unwrap();
    let abort = AtomicBool::new(false);
    let w = Wait::new(Duration::from_secs(60), &abort, "test");
    let st = TorchStore::connect("127.0.0.1", port, "flatshard/t/0/", &w).unwrap();
    assert!(!st.check("from_py", &w).unwrap());
    st.set("from_rust", b"rust", &w).unwrap();
    assert_eq!(st.get("from_py", &w).unwrap(), b"hello rust");
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    st.set("big", &big, &w).unwrap();
    assert_eq!(st.get("echo", &w).unwrap(), big);
    assert_eq!(st.add("counter", 5, &w).unwrap(), 5);
    assert_eq!(st.add("counter", -2, &w).unwrap(), 3);
    st.set("done", b"1", &w).unwrap();
    let mut rest = String::new();
    for l in lines {
        rest += &(l.unwrap() + "\n");
    }
    let status = py.wait().unwrap();
    let mut err = String::new();
    py.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "{rest}{err}");
    let backend = if libuv { "True" } else { "False" };
    assert_eq!(rest.trim(), format!("py saw rust clients 1 libuv {backend}"), "{err}");
}

#[test]
fn tcpstore_client_speaks_pytorchs_protocol_libuv() {
    against_pytorch_store(true);
}

#[test]
fn tcpstore_client_speaks_pytorchs_protocol_classic() {
    against_pytorch_store(false);
}

// ---- untrusted replies --------------------------------------------------

fn read_u64(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn skip(s: &mut TcpStream, n: u64) -> std::io::Result<()> {
    std::io::copy(&mut s.take(n), &mut std::io::sink()).map(|_| ())
}

/// Read one TCPStore request; returns its query type.
fn read_request(s: &mut TcpStream) -> std::io::Result<u8> {
    let mut op = [0u8; 1];
    s.read_exact(&mut op)?;
    match op[0] {
        0 => skip(s, 4)?,
        1 => {
            let k = read_u64(s)?;
            skip(s, k)?;
            let v = read_u64(s)?;
            skip(s, v)?;
        }
        3 => {
            let k = read_u64(s)?;
            skip(s, k)?;
        }
        4 => {
            let k = read_u64(s)?;
            skip(s, k + 8)?;
        }
        5 => {
            let n = read_u64(s)?;
            for _ in 0..n {
                let k = read_u64(s)?;
                skip(s, k)?;
            }
        }
        x => panic!("client sent query type {x}"),
    }
    Ok(op[0])
}

/// A fake store that answers per `reply(op) -> bytes` (None = stay silent).
fn fake_store(reply: impl Fn(u8) -> Option<Vec<u8>> + Send + 'static) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        while let Ok(op) = read_request(&mut s) {
            match reply(op) {
                Some(b) => {
                    if s.write_all(&b).is_err() {
                        return;
                    }
                }
                None if op == 0 || op == 1 => {}
                None => {
                    std::thread::sleep(Duration::from_secs(30));
                    return;
                }
            }
        }
    });
    port
}

#[test]
fn tcpstore_replies_are_untrusted() {
    let abort = AtomicBool::new(false);
    // A value length of 2^40: refused before anything is allocated.
    let port = fake_store(|op| match op {
        4 => Some(1i64.to_le_bytes().to_vec()),
        5 => Some(vec![0]),
        3 => Some((1u64 << 40).to_le_bytes().to_vec()),
        _ => None,
    });
    let w = Wait::new(Duration::from_secs(30), &abort, "test");
    let st = TorchStore::connect("127.0.0.1", port, "p/", &w).unwrap();
    let t0 = Instant::now();
    let e = st.get("k", &w).unwrap_err();
    assert_eq!(e.kind, ErrorKind::PeerLost, "{}", e.msg);
    assert!(e.msg.contains("1099511627776-byte value") && e.msg.contains("limit"), "{}", e.msg);
    assert!(t0.elapsed() < Duration::from_secs(5));

    // CHECK answered with something that is neither READY nor NOT_READY.
    let port = fake_store(|op| match op {
        4 => Some(1i64.to_le_bytes().to_vec()),
        5 => Some(vec![7]),
        _ => None,
    });
    let st = TorchStore::connect("127.0.0.1", port, "p/", &w).unwrap();
    let e = st.get("k", &w).unwrap_err();
    assert_eq!(e.kind, ErrorKind::PeerLost, "{}", e.msg);
    assert!(e.msg.contains("answered CHECK with 7"), "{}", e.msg);

    // A store that never answers: the deadline holds.
    let port = fake_store(|op| if op == 4 { Some(1i64.to_le_bytes().to_vec()) } else { None });
    let st = TorchStore::connect("127.0.0.1", port, "p/", &w).unwrap();
    let short = Wait::new(Duration::from_millis(1500), &abort, "test");
    let t0 = Instant::now();
    let e = st.get("k", &short).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Timeout, "{}", e.msg);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());

    // A key that never appears: TIMEOUT naming the key, at the deadline.
    let port = fake_store(|op| match op {
        4 => Some(1i64.to_le_bytes().to_vec()),
        5 => Some(vec![1]),
        _ => None,
    });
    let st = TorchStore::connect("127.0.0.1", port, "p/", &w).unwrap();
    let short = Wait::new(Duration::from_millis(1500), &abort, "test");
    let t0 = Instant::now();
    let e = st.get("never", &short).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Timeout, "{}", e.msg);
    assert!(e.msg.contains("'p/never'"), "{}", e.msg);
    assert!(t0.elapsed() >= Duration::from_millis(1400) && t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());

    // Not a TCPStore at all: flatshard's own store greets first ("FSHS...").
    let l = flatshard::comm::net::listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let server = flatshard::comm::store::StoreServer::start(l, b"k".to_vec()).unwrap();
    let e = match TorchStore::connect("127.0.0.1", server.addr.port(), "p/", &w) {
        Err(e) => e,
        Ok(_) => panic!("flatshard's store passed for a TCPStore"),
    };
    assert!(e.msg.contains("does not answer as a PyTorch TCPStore"), "{}", e.msg);
}

// ---- torch.distributed and flatshard in one process ----------------------

const PY_INTEROP: &str = r#"
import ctypes, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")            # torch's workers join the agent store too
r, w = dist.get_rank(), dist.get_world_size()
lib = ctypes.CDLL(sys.argv[1])
lib.flatshard_last_error.restype = ctypes.c_char_p
lib.flatshard_comm_rank.restype = ctypes.c_int32
lib.flatshard_all_reduce.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int]
comm = ctypes.c_void_p()
st = lib.flatshard_comm_init_from_env(None, ctypes.byref(comm))
assert st == 0, lib.flatshard_last_error()
assert lib.flatshard_comm_rank(comm) == r
t = torch.arange(4096, dtype=torch.float32) * (r + 1) / 8
mine = t.clone()
dist.all_reduce(t)                                               # gloo
st = lib.flatshard_all_reduce(comm, mine.data_ptr(), mine.numel(), 0, 0)   # FLATSHARD_F32, FLATSHARD_SUM
assert st == 0, lib.flatshard_last_error()
assert torch.equal(t, mine), (t[:4], mine[:4])
lib.flatshard_comm_free(comm)
dist.barrier()
dist.destroy_process_group()
sys.stdout.write(f"interop rank {r} of {w} ok\n")  # one write per line
sys.stdout.flush()
"#;

/// A PyTorch worker under torchrun that uses torch.distributed (gloo) and
/// flatshard (ctypes) side by side: both meet in the same agent store
/// without stepping on each other's keys, and their all-reduces agree.
#[test]
fn torch_distributed_and_flatshard_share_the_agent_store() {
    let lib = lib_dir().join("libflatshard.so");
    let py = python();
    let r = run_limited(torchrun_cmd(&["--standalone", "--nproc-per-node", "2", "--no-python", s(&py), "-c", PY_INTEROP, s(&lib)]), LIMIT);
    assert!(r.ok(), "{}", r.out);
    assert_eq!(count(&r.out, "of 2 ok"), 2, "{}", r.out);
}
