//! Helpers for the launcher tests (torchrun, MPI, Slurm/PMI variables):
//! compile C programs against the library of this build, find the test
//! venv's Python/torchrun, run a command with a time limit.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// target/<profile>/deps, beside this test binary: the library cargo test
/// built from the same sources.
pub fn lib_dir() -> PathBuf {
    std::env::current_exe().unwrap().parent().unwrap().to_path_buf()
}

include!("../support/free_port.rs");

/// Compile `src` (relative to the repo) with `compiler` (-Wall -Wextra
/// -Werror plus `flags`) against include/ and the shared library of this
/// build; cached per (compiler, src) within one test binary.
pub fn build_c(compiler: &str, flags: &[&str], src: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    let key = format!("{compiler} {src} {flags:?}");
    let mut built = BUILT.get_or_init(|| Mutex::new(Vec::new())).lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, p)) = built.iter().find(|(k, _)| *k == key) {
        return p.clone();
    }
    let stem = Path::new(src).file_stem().unwrap().to_string_lossy().into_owned();
    let tag: String = compiler.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("launch-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join(format!("{stem}-{tag}-{}-{}", built.len(), std::process::id()));
    let lib = lib_dir();
    assert!(lib.join("libflatshard.so").exists(), "{}/libflatshard.so missing (cargo test builds it)", lib.display());
    let o = Command::new(compiler)
        .args(["-Wall", "-Wextra", "-Werror"])
        .args(flags)
        .arg("-I")
        .arg(repo().join("include"))
        .arg(repo().join(src))
        .arg("-o")
        .arg(&exe)
        .arg(format!("-L{}", lib.display()))
        .arg("-lflatshard")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lm")
        .output()
        .unwrap_or_else(|e| panic!("run {compiler}: {e}"));
    assert!(o.status.success(), "{compiler} {src} failed:\n{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    built.push((key, exe.clone()));
    exe
}

/// The test venv's Python: $FLATSHARD_PYTHON (scripts/test.sh sets it), else
/// scripts/venv.sh (which creates the venv on first use).
pub fn python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        if let Ok(p) = std::env::var("FLATSHARD_PYTHON") {
            if !p.is_empty() {
                return PathBuf::from(p);
            }
        }
        let o = Command::new("bash").arg(repo().join("scripts/venv.sh")).stderr(Stdio::inherit()).output().expect("run scripts/venv.sh");
        assert!(o.status.success(), "scripts/venv.sh failed");
        PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
    })
    .clone()
}

/// torchrun of the test venv.
pub fn torchrun() -> PathBuf {
    let t = python().parent().unwrap().join("torchrun");
    assert!(t.exists(), "{} missing (the venv's torch has no torchrun?)", t.display());
    t
}

/// What a finished command left.
pub struct Ran {
    pub code: Option<i32>,
    pub out: String,
    pub secs: f64,
}

impl Ran {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// Run `cmd` to completion, killing its whole process group after `limit`
/// (torchrun and mpirun start children of their own).
pub fn run_limited(mut cmd: Command, limit: Duration) -> Ran {
    use std::os::unix::process::CommandExt;
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let t0 = Instant::now();
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pgid = child.id() as libc::pid_t;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d2 = done.clone();
    let killer = std::thread::spawn(move || {
        while t0.elapsed() < limit {
            if d2.load(std::sync::atomic::Ordering::SeqCst) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: kill(2) on the process group this test created.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        true
    });
    let o = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let killed = killer.join().unwrap();
    // Leave no stragglers in the group (workers of a launcher that died).
    // SAFETY: as above; ESRCH when the group is already gone is fine.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let mut out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    if killed {
        out += &format!("\n[test: killed after {limit:?}]");
    }
    Ran { code: o.status.code(), out, secs: t0.elapsed().as_secs_f64() }
}

/// Occurrences of `needle` in `out` (not lines: two processes writing to one
/// pipe may interleave a line's text and its newline).
pub fn count(out: &str, needle: &str) -> usize {
    out.matches(needle).count()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// tests/c/launch_job.c built with cc (joins with flatshard_comm_init_from_env).
pub fn launch_job() -> PathBuf {
    build_c("cc", &["-std=c11", "-pedantic", "-O1"], "tests/c/launch_job.c")
}

/// The per-rank hashes of launch_job's results (lines
/// "launch_job: rank R of W ok, ..., hash H", anywhere in a line), by rank.
pub fn hashes(out: &str, world: usize) -> Vec<String> {
    let mut h = vec![String::new(); world];
    for l in out.lines() {
        if let Some(i) = l.find("launch_job: rank ") {
            let rest = &l[i + "launch_job: rank ".len()..];
            let r: usize = rest.split(' ').next().unwrap().parse().unwrap();
            assert!(r < world, "rank {r} of a {world}-rank job:\n{out}");
            h[r] = rest.rsplit(' ').next().unwrap().to_string();
        }
    }
    assert!(h.iter().all(|x| !x.is_empty()), "not every rank reported:\n{out}");
    h
}

/// launch_job through flatshard-run (flatshard's own store and transports):
/// the reference every launcher's results must equal.
pub fn native_hashes(world: usize) -> Vec<String> {
    type ByWorld = Vec<(usize, Vec<String>)>;
    static CACHE: OnceLock<Mutex<ByWorld>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(|| Mutex::new(Vec::new())).lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, h)) = cache.iter().find(|(w, _)| *w == world) {
        return h.clone();
    }
    let mut c = Command::new(env!("CARGO_BIN_EXE_flatshard-run"));
    c.args(["-n", &world.to_string(), "--", s(&launch_job())]);
    let r = run_limited(c, Duration::from_secs(240));
    assert!(r.ok(), "flatshard-run launch_job:\n{}", r.out);
    let h = hashes(&r.out, world);
    cache.push((world, h.clone()));
    h
}
