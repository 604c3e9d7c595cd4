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

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

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

/// Lines of `out` that contain `needle`.
pub fn count(out: &str, needle: &str) -> usize {
    out.lines().filter(|l| l.contains(needle)).count()
}
