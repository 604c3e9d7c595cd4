//! The C test programs in tests/c/, compiled against the committed header and
//! the library cargo just built, and run as real processes (one per rank) with
//! torchrun's variables. Each scenario checks exit codes and prints every
//! rank's output on failure.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// target/<profile>/deps, beside this test binary: cargo test builds
/// libflatshard.{so,a} there (it only copies them up to target/<profile> on
/// `cargo build`), so this is the library of the same sources as the test.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().to_path_buf()
}

/// How to link: the shared library (with an rpath), the static one, or the
/// shared one with the C side built under AddressSanitizer + UBSan.
#[derive(Clone, Copy, PartialEq)]
enum Link {
    Shared,
    Static,
    Sanitized,
}

/// Compile tests/c/<name>.c once per test binary run (tests share it).
fn program(name: &str, link: Link) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    let key = format!(
        "{name}-{}",
        match link {
            Link::Shared => "so",
            Link::Static => "a",
            Link::Sanitized => "asan",
        }
    );
    if let Some((_, p)) = built.iter().find(|(k, _)| *k == key) {
        return p.clone();
    }
    let lib = lib_dir();
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("c-tests");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(format!("{key}-{}", std::process::id()));
    let src = repo().join("tests/c").join(format!("{name}.c"));
    let mut cmd = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
    cmd.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O1", "-g"]).arg("-I").arg(repo().join("include")).arg(&src).arg("-o").arg(&out);
    if link == Link::Sanitized {
        cmd.args(["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]);
    }
    match link {
        Link::Shared | Link::Sanitized => {
            assert!(lib.join("libflatshard.so").exists(), "{}/libflatshard.so missing (cargo test builds it)", lib.display());
            cmd.arg(format!("-L{}", lib.display())).arg("-lflatshard").arg(format!("-Wl,-rpath,{}", lib.display()));
        }
        Link::Static => {
            // What a Rust staticlib needs from the system (rustc --print native-static-libs).
            cmd.arg(lib.join("libflatshard.a")).args(["-lgcc_s", "-lutil", "-lrt", "-ldl"]);
        }
    }
    cmd.args(["-lpthread", "-lm"]);
    let o = cmd.output().expect("run the C compiler (cc)");
    assert!(o.status.success(), "compiling {} failed:\n{}{}", src.display(), String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    built.push((key, out.clone()));
    out
}

include!("support/free_port.rs");

/// How one rank ended: exit code, or the signal that killed it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    Code(i32),
    Signal(i32),
}

struct Rank {
    end: End,
    out: String,
    secs: f64,
}

/// Start one process as `rank` of `world` on `port` with extra env.
fn start(prog: &Path, args: &[&str], rank: usize, world: usize, port: u16, env: &[(&str, &str)]) -> Child {
    let mut c = Command::new(prog);
    c.args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env_remove("FLATSHARD_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", prog.display()))
}

/// Wait for all (killing everything left after `limit`).
fn finish(children: Vec<Child>, limit: Duration) -> Vec<Rank> {
    let t0 = Instant::now();
    // Drain pipes on threads so a chatty rank cannot block on a full pipe.
    let handles: Vec<_> = children
        .into_iter()
        .map(|mut ch| {
            let mut so = ch.stdout.take().unwrap();
            let mut se = ch.stderr.take().unwrap();
            let o = std::thread::spawn(move || {
                let mut s = Vec::new();
                std::io::Read::read_to_end(&mut so, &mut s).ok();
                s
            });
            let e = std::thread::spawn(move || {
                let mut s = Vec::new();
                std::io::Read::read_to_end(&mut se, &mut s).ok();
                s
            });
            (ch, o, e)
        })
        .collect();
    let mut ends: Vec<Option<(End, f64)>> = vec![None; handles.len()];
    let mut handles = handles;
    loop {
        for (i, (ch, _, _)) in handles.iter_mut().enumerate() {
            if ends[i].is_none() {
                if let Some(st) = ch.try_wait().unwrap() {
                    let end = match st.code() {
                        Some(c) => End::Code(c),
                        None => End::Signal(st.signal().unwrap_or(0)),
                    };
                    ends[i] = Some((end, t0.elapsed().as_secs_f64()));
                }
            }
        }
        if ends.iter().all(|e| e.is_some()) {
            break;
        }
        if t0.elapsed() > limit {
            for (i, (ch, _, _)) in handles.iter_mut().enumerate() {
                if ends[i].is_none() {
                    let _ = ch.kill();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    handles
        .into_iter()
        .zip(ends)
        .map(|((_, o, e), end)| {
            let (end, secs) = end.unwrap();
            let out = format!("{}{}", String::from_utf8_lossy(&o.join().unwrap()), String::from_utf8_lossy(&e.join().unwrap()));
            Rank { end, out, secs }
        })
        .collect()
}

fn report(what: &str, ranks: &[Rank]) -> String {
    let mut s = format!("{what}:\n");
    for (r, x) in ranks.iter().enumerate() {
        s += &format!("--- rank {r}: {:?} after {:.2} s\n{}", x.end, x.secs, x.out);
    }
    s
}

/// Run `world` ranks of a program and require each rank's end to be `want(rank)`.
fn job(prog: &Path, args: &[&str], world: usize, env: &[(&str, &str)], limit: Duration, want: impl Fn(usize) -> End) -> Vec<Rank> {
    let mut ranks = run_once(prog, args, world, env, limit);
    // free_port() releases the port before rank 0 binds it; if something else
    // took it meanwhile, try once more on a new port.
    if ranks.iter().any(|x| x.out.contains("Address already in use")) {
        ranks = run_once(prog, args, world, env, limit);
    }
    let what = format!("{} {:?} on {world} ranks", prog.display(), args);
    for (r, x) in ranks.iter().enumerate() {
        assert_eq!(x.end, want(r), "rank {r} ended wrong; {}", report(&what, &ranks));
    }
    eprint!("{}", ranks[0].out);
    ranks
}

fn run_once(prog: &Path, args: &[&str], world: usize, env: &[(&str, &str)], limit: Duration) -> Vec<Rank> {
    let port = free_port();
    let children = (0..world).map(|r| start(prog, args, r, world, port, env)).collect();
    finish(children, limit)
}

fn all_ok(_: usize) -> End {
    End::Code(0)
}

const LIMIT: Duration = Duration::from_secs(120);

// ---- every collective x dtype x world size ----------------------------------

#[test]
fn collectives_world_1() {
    job(&program("collectives", Link::Shared), &["full"], 1, &[], LIMIT, all_ok);
}

#[test]
fn collectives_world_2() {
    job(&program("collectives", Link::Shared), &["full"], 2, &[], LIMIT, all_ok);
}

#[test]
fn collectives_world_3() {
    job(&program("collectives", Link::Shared), &["full"], 3, &[], LIMIT, all_ok);
}

#[test]
fn collectives_world_4() {
    job(&program("collectives", Link::Shared), &["full"], 4, &[], LIMIT, all_ok);
}

#[test]
fn collectives_world_8_small() {
    job(&program("collectives", Link::Shared), &["small"], 8, &[], LIMIT, all_ok);
}

/// Forced TCP (AUTO picks shared memory on one host once that transport exists),
/// linked statically.
#[test]
fn collectives_world_3_tcp_static() {
    job(&program("collectives", Link::Static), &["small"], 3, &[("FS_TEST_TRANSPORT", "tcp")], LIMIT, all_ok);
}

#[test]
fn subgroups_and_split_world_4() {
    job(&program("groups", Link::Shared), &[], 4, &[], LIMIT, all_ok);
}

#[test]
fn subgroups_and_split_world_6() {
    job(&program("groups", Link::Shared), &[], 6, &[], LIMIT, all_ok);
}

#[test]
fn api_conventions() {
    job(&program("api", Link::Shared), &[], 1, &[], LIMIT, all_ok);
}

#[test]
fn api_conventions_static() {
    job(&program("api", Link::Static), &[], 1, &[], LIMIT, all_ok);
}

/// The C side under AddressSanitizer + UBSan (leak checks included).
#[test]
fn api_conventions_sanitized() {
    job(&program("api", Link::Sanitized), &[], 1, &[], LIMIT, all_ok);
}

#[test]
fn collectives_world_2_sanitized() {
    job(&program("collectives", Link::Sanitized), &["small"], 2, &[], LIMIT, all_ok);
}

// ---- API §7: asynchronous operations --------------------------------------

#[test]
fn async_world_2_sanitized() {
    job(&program("async", Link::Sanitized), &[], 2, &[], LIMIT, all_ok);
}

#[test]
fn async_world_3_tcp_sanitized() {
    job(&program("async", Link::Sanitized), &[], 3, &[("FS_TEST_TRANSPORT", "tcp")], LIMIT, all_ok);
}

#[test]
fn async_world_4_static() {
    job(&program("async", Link::Static), &[], 4, &[], LIMIT, all_ok);
}

#[test]
fn mismatch_world_3_sanitized() {
    job(&program("failures", Link::Sanitized), &["mismatch"], 3, &[], LIMIT, all_ok);
}

// ---- failures -----------------------------------------------------------------

#[test]
fn mismatch_world_3() {
    job(&program("failures", Link::Shared), &["mismatch"], 3, &[], LIMIT, all_ok);
}

#[test]
fn mismatch_world_2() {
    job(&program("failures", Link::Shared), &["mismatch"], 2, &[], LIMIT, all_ok);
}

#[test]
fn timeout_small_world_3() {
    job(&program("failures", Link::Shared), &["timeout", "16"], 3, &[], LIMIT, all_ok);
}

#[test]
fn timeout_ring_world_4() {
    job(&program("failures", Link::Shared), &["timeout", "1000000"], 4, &[], LIMIT, all_ok);
}

fn dies(world: usize, end: End) -> impl Fn(usize) -> End {
    move |r| if r == world - 1 { end } else { End::Code(0) }
}

#[test]
fn peer_exit_mid_ring_world_3() {
    job(&program("failures", Link::Shared), &["death", "1000000", "exit"], 3, &[], LIMIT, dies(3, End::Code(42)));
}

#[test]
fn peer_abort_small_world_4() {
    job(&program("failures", Link::Shared), &["death", "64", "abort"], 4, &[], LIMIT, dies(4, End::Signal(6)));
}

#[test]
fn peer_exit_world_2() {
    job(&program("failures", Link::Shared), &["death", "100000", "exit"], 2, &[], LIMIT, dies(2, End::Code(42)));
}

#[test]
fn abort_from_another_thread_world_3() {
    job(&program("failures", Link::Shared), &["abort"], 3, &[], LIMIT, all_ok);
}

/// Intruders with a wrong or missing token claim rank 1 while rank 0 waits:
/// both get AUTH, then the real rank 1 joins and the job completes.
#[test]
fn wrong_or_missing_token_is_refused_and_job_goes_on() {
    let prog = program("failures", Link::Shared);
    let port = free_port();
    let good = [("FLATSHARD_TOKEN", "right-token")];
    let rank0 = start(&prog, &["token"], 0, 2, port, &good);
    let intruders = vec![start(&prog, &["intruder"], 1, 2, port, &[("FLATSHARD_TOKEN", "wrong-token")]), start(&prog, &["intruder"], 1, 2, port, &[])];
    let res = finish(intruders, LIMIT);
    for x in &res {
        assert_eq!(x.end, End::Code(0), "{}", report("intruders", &res));
        assert!(x.out.contains("intruder refused"), "{}", report("intruders", &res));
    }
    let rank1 = start(&prog, &["token"], 1, 2, port, &good);
    let res = finish(vec![rank0, rank1], LIMIT);
    for x in &res {
        assert_eq!(x.end, End::Code(0), "{}", report("token job", &res));
    }
    assert!(res[0].out.contains("token: job completed"), "{}", report("token job", &res));
}

/// The API conventions program under valgrind memcheck: no memory errors and
/// no definite leaks, in the C program or in the library.
#[test]
fn api_conventions_under_valgrind() {
    let prog = program("api", Link::Shared);
    let o = Command::new("valgrind")
        .args(["-q", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite"])
        .arg(&prog)
        .output()
        .expect("valgrind is part of this machine image (apt-get install valgrind)");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "valgrind reported errors:\n{text}");
    assert!(text.contains("conventions OK"), "{text}");
}

/// A C program on 2 ranks, both under valgrind memcheck: no memory errors,
/// no definite leaks. Rank 0 starts first (valgrind is slow to start; the
/// rendezvous store must be up before the long retry loop).
fn two_ranks_under_valgrind(name: &str, args: &[&str]) -> Vec<String> {
    let prog = program(name, Link::Shared);
    let port = free_port();
    let spawn = |rank: usize| {
        Command::new("valgrind")
            .args(["-q", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite"])
            .arg(&prog)
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("valgrind")
    };
    let r0 = spawn(0);
    let t = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let r1 = spawn(1);
    let mut outs = Vec::new();
    for (r, child) in [r0, r1].into_iter().enumerate() {
        let o = child.wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert_eq!(o.status.code(), Some(0), "{name}: rank {r} under valgrind:\n{text}");
        outs.push(text);
    }
    outs
}

#[test]
fn collectives_world_2_under_valgrind() {
    two_ranks_under_valgrind("collectives", &["small"]);
}

/// Freeing the communicator before the flat param and the averagers that use
/// it: they keep working (their own references), clean under valgrind.
#[test]
fn comm_freed_before_its_users_under_valgrind() {
    for (r, out) in two_ranks_under_valgrind("lifetimes", &[]).iter().enumerate() {
        assert!(out.contains("lifetimes OK"), "rank {r}:\n{out}");
    }
}

/// The same program on 3 ranks without valgrind (odd world, shard padding).
#[test]
fn comm_freed_before_its_users_world_3() {
    job(&program("lifetimes", Link::Shared), &[], 3, &[], LIMIT, all_ok);
}

/// bench/loopback_tcp.c (the loopback TCP measurement behind the TCP
/// transport's socket buffers; no flatshard) still builds warning-free and
/// moves its bytes, with autotuned and with fixed socket buffers.
#[test]
fn loopback_tcp_measurement_builds_and_runs() {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("loopback_tcp-{}", std::process::id()));
    let o = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&out)
        .arg(repo().join("bench/loopback_tcp.c"))
        .output()
        .expect("run the C compiler (cc)");
    assert!(o.status.success(), "compiling bench/loopback_tcp.c failed:\n{}", String::from_utf8_lossy(&o.stderr));
    for (args, want) in [(&["4", "2"][..], "socket buffers autotuned"), (&["4", "2", "65536"][..], "socket buffers 65536")] {
        let o = Command::new(&out).args(args).output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "loopback_tcp {args:?} failed: {text}{}", String::from_utf8_lossy(&o.stderr));
        assert!(text.starts_with("send, ") && text.contains(want) && text.contains("GB/s"), "loopback_tcp {args:?}: {text}");
    }
}
