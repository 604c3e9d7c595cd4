//! flatshard under real MPI launchers, Open MPI and MPICH (Debian packages,
//! installed by scripts/launcher-deps.sh when missing), 4 ranks each:
//! - include/flatshard_mpi.h compiled by each implementation's own mpicc:
//!   flatshard_comm_init_mpi (MPI bootstraps, flatshard's transports move the
//!   data) and flatshard_comm_from_mpi (MPI's collectives move it);
//! - a program without MPI under each mpirun: flatshard_comm_init_from_env
//!   reads OMPI_COMM_WORLD_* (Open MPI) or PMI_RANK/PMI_SIZE (MPICH's Hydra).
//!
//! Every run executes tests/c/launch_job.c (collectives, a flat parameter,
//! averaging) and its per-rank result hashes must equal flatshard-run's.

mod launchkit;

use launchkit::*;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);
const WORLD: usize = 4;

/// Install Open MPI and MPICH if missing (idempotent; needs root then).
fn ensure_mpi() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let o = Command::new("bash").arg(repo().join("scripts/launcher-deps.sh")).output().expect("run scripts/launcher-deps.sh");
        assert!(o.status.success(), "scripts/launcher-deps.sh failed:\n{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    });
}

/// mpirun of `which` ("openmpi" | "mpich") with `np` ranks of `prog args`;
/// `env` is passed to every rank the way that mpirun does it.
fn mpirun(which: &str, np: usize, env: &[(&str, String)], prog: &str, args: &[&str]) -> Command {
    let mut c = Command::new(format!("mpirun.{which}"));
    for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FLATSHARD_TOKEN", "TORCHELASTIC_USE_AGENT_STORE"] {
        c.env_remove(v);
    }
    if which == "openmpi" {
        // root in CI; 2 cores for 4 ranks.
        c.args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string()]);
        for (k, v) in env {
            c.arg("-x").arg(format!("{k}={v}"));
        }
    } else {
        c.args(["-np", &np.to_string()]);
        for (k, v) in env {
            c.args(["-env", k, v]);
        }
    }
    c.arg(prog).args(args);
    c
}

fn mpi_build(which: &str) -> std::path::PathBuf {
    ensure_mpi();
    build_c(&format!("mpicc.{which}"), &["-std=c11", "-pedantic", "-O1", "-DLAUNCH_JOB_MPI"], "tests/c/launch_job.c")
}

fn header_entry_points(which: &str) {
    let prog = mpi_build(which);
    let want = native_hashes(WORLD);
    for mode in ["init_mpi", "from_mpi"] {
        let r = run_limited(mpirun(which, WORLD, &[], s(&prog), &[mode]), LIMIT);
        assert!(r.ok(), "{which} {mode}:\n{}", r.out);
        assert_eq!(count(&r.out, &format!("ok, mode {mode},")), WORLD, "{}", r.out);
        assert_eq!(hashes(&r.out, WORLD), want, "{which} {mode}: results differ from flatshard-run's:\n{}", r.out);
    }
}

#[test]
fn open_mpi_header_entry_points_equal_native() {
    header_entry_points("openmpi");
}

#[test]
fn mpich_header_entry_points_equal_native() {
    header_entry_points("mpich");
}

/// A program that knows nothing of MPI, started by mpirun: rank and size
/// come from the variables that mpirun sets.
fn env_under_mpirun(which: &str) {
    ensure_mpi();
    let want = native_hashes(WORLD);
    let env = [("MASTER_ADDR", "127.0.0.1".to_string()), ("MASTER_PORT", free_port().to_string()), ("FLATSHARD_DEBUG", "INFO".to_string())];
    let r = run_limited(mpirun(which, WORLD, &env, s(&launch_job()), &[]), LIMIT);
    assert!(r.ok(), "{which}:\n{}", r.out);
    let source = if which == "openmpi" { "Open MPI launch" } else { "PMI launch" };
    assert_eq!(count(&r.out, source), WORLD, "every rank read {source} variables:\n{}", r.out);
    assert_eq!(hashes(&r.out, WORLD), want, "{}", r.out);
}

#[test]
fn open_mpi_mpirun_sets_ranks_for_init_from_env() {
    env_under_mpirun("openmpi");
}

#[test]
fn mpich_mpirun_sets_ranks_for_init_from_env() {
    env_under_mpirun("mpich");
}

/// The header from C++ with each implementation's mpicxx (Open MPI's own
/// C++ bindings skipped, as usual: they do not build under -Werror).
#[test]
fn header_compiles_as_cpp_and_runs() {
    ensure_mpi();
    for which in ["openmpi", "mpich"] {
        let prog = build_c(&format!("mpicxx.{which}"), &["-std=c++17", "-O1", "-DOMPI_SKIP_MPICXX=1"], "tests/c/mpi_header.cpp");
        let r = run_limited(mpirun(which, 2, &[], s(&prog), &[]), LIMIT);
        assert!(r.ok(), "{which}:\n{}", r.out);
        assert_eq!(count(&r.out, "mpi_header.cpp: rank"), 4, "{which}:\n{}", r.out);
    }
}
