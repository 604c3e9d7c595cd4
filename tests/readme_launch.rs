//! Every command of the README's "Launching" section, run as written: the
//! launch lines through `sh -c` in a directory where `./prog` is
//! tests/c/launch_job.c (its per-rank result hashes must equal
//! flatshard-run's), `prog_mpi.c` is the same job built for
//! include/flatshard_mpi.h, `include/` and `target/debug/` are this build's,
//! and `mpirun`/`mpicc` are Open MPI's or MPICH's. Multi-node lines run on
//! two hosts of the network test bed; the Slurm batch script is submitted
//! with `sbatch` to a real one-node Slurm (slurmctld + slurmd + munged,
//! started by the test in a private directory on free ports).
//!
//! The only substitution: port 29500 becomes a free port (tests run in
//! parallel on a shared machine). `every_launch_command_is_tested` fails if
//! the README gains a command this file does not run.

mod common;
mod launchkit;

use common::netbed;
use launchkit::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);

const FLATSHARD_RUN: &str = "flatshard-run -n 4 -- ./prog";
const TORCHRUN: &str = "torchrun --standalone --nproc-per-node 4 --no-python ./prog";
const TORCHRUN_TOKEN: &str = "FLATSHARD_TOKEN=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \\n') torchrun --standalone --nproc-per-node 4 --no-python ./prog";
const TORCHRUN_C10D: &str = "torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint $HOST0:29400 --rdzv-id myjob --no-python ./prog";
const TORCHRUN_STATIC: &str =
    "torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 2 --rdzv-backend static --master-addr $HOST0 --master-port 29500 --no-python ./prog";
const MPIRUN_OPEN_MPI: &str = "mpirun -np 4 -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=29500 ./prog";
const MPIRUN_MPICH: &str = "mpirun -np 4 -env MASTER_ADDR 127.0.0.1 -env MASTER_PORT 29500 ./prog";
const MPICC: &str = "mpicc -Iinclude prog_mpi.c -Ltarget/debug -lflatshard -Wl,-rpath,$PWD/target/debug -o prog_mpi";
const MPIRUN_HEADER: &str = "mpirun -np 4 ./prog_mpi";
const SLURM_SCRIPT_START: &str = "#!/bin/sh\n#SBATCH";

const ALL: [&str; 9] = [FLATSHARD_RUN, TORCHRUN, TORCHRUN_TOKEN, TORCHRUN_C10D, TORCHRUN_STATIC, MPIRUN_OPEN_MPI, MPIRUN_MPICH, MPICC, MPIRUN_HEADER];

/// The sh blocks of the README's Launching section: a block that starts with
/// "#!" is one script, any other block one command per line.
fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme.find("\n## Launching\n").expect("README has a Launching section");
    let rest = &readme[start + 1..];
    let section = &rest[..rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3)];
    let mut cmds = Vec::new();
    let mut parts = section.split("```");
    parts.next();
    while let (Some(block), _) = (parts.next(), parts.next()) {
        let Some(body) = block.strip_prefix("sh\n") else { continue };
        if body.starts_with("#!") {
            cmds.push(body.to_string());
        } else {
            cmds.extend(body.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string));
        }
    }
    cmds
}

fn readme_has(cmd: &str) {
    assert!(readme_commands().iter().any(|c| c == cmd), "README's Launching section no longer has:\n{cmd}");
}

#[test]
fn every_launch_command_is_tested() {
    let cmds = readme_commands();
    assert!(cmds.len() > ALL.len(), "{cmds:#?}");
    for c in &cmds {
        assert!(ALL.contains(&c.as_str()) || c.starts_with(SLURM_SCRIPT_START), "README command not run by tests/readme_launch.rs:\n{c}");
    }
    for c in ALL {
        readme_has(c);
    }
    assert_eq!(cmds.iter().filter(|c| c.starts_with(SLURM_SCRIPT_START)).count(), 1, "{cmds:#?}");
}

/// A directory where the README's commands find what they name.
struct Workdir {
    dir: PathBuf,
}

impl Workdir {
    fn new(tag: &str) -> Workdir {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("readme-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("target")).unwrap();
        let link = |from: &Path, to: &Path| std::os::unix::fs::symlink(from, to).unwrap();
        link(&launch_job(), &dir.join("prog"));
        link(&repo().join("include"), &dir.join("include"));
        link(&lib_dir(), &dir.join("target/debug"));
        std::fs::write(dir.join("prog_mpi.c"), format!("#define LAUNCH_JOB_MPI 1\n#include \"{}\"\n", repo().join("tests/c/launch_job.c").display())).unwrap();
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        link(Path::new(env!("CARGO_BIN_EXE_flatshard-run")), &bin.join("flatshard-run"));
        link(&torchrun(), &bin.join("torchrun"));
        for mpi in ["openmpi", "mpich"] {
            let b = dir.join(format!("bin-{mpi}"));
            std::fs::create_dir_all(&b).unwrap();
            // A wrapper, not a link: Hydra finds its proxy beside argv[0].
            let w = b.join("mpirun");
            std::fs::write(&w, format!("#!/bin/sh\nexec /usr/bin/mpirun.{mpi} \"$@\"\n")).unwrap();
            std::fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
            link(&PathBuf::from(format!("/usr/bin/mpicc.{mpi}")), &b.join("mpicc"));
        }
        Workdir { dir }
    }

    /// `sh -c line` here, with this build's tools first on PATH (and `mpi`'s
    /// mpirun/mpicc when given).
    fn sh(&self, line: &str, mpi: Option<&str>) -> Command {
        let mut path = self.dir.join("bin").display().to_string();
        if let Some(m) = mpi {
            path = format!("{}:{path}", self.dir.join(format!("bin-{m}")).display());
        }
        let mut c = Command::new("sh");
        c.args(["-c", &line.replace("29500", &free_port().to_string())]).current_dir(&self.dir);
        c.env("PATH", format!("{path}:{}", std::env::var("PATH").unwrap_or_default())).env("OMP_NUM_THREADS", "1");
        for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "FLATSHARD_TOKEN", "TORCHELASTIC_USE_AGENT_STORE"] {
            c.env_remove(v);
        }
        if mpi == Some("openmpi") {
            // CI runs as root on 2 cores: what --allow-run-as-root --oversubscribe say.
            c.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").env("OMPI_MCA_rmaps_base_oversubscribe", "1");
        }
        c
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run_job(wd: &Workdir, line: &str, mpi: Option<&str>) {
    readme_has(line);
    let r = run_limited(wd.sh(line, mpi), LIMIT);
    assert!(r.ok(), "{line}:\n{}", r.out);
    assert_eq!(hashes(&r.out, 4), native_hashes(4), "{line}:\n{}", r.out);
}

#[test]
fn flatshard_run_line() {
    run_job(&Workdir::new("frun"), FLATSHARD_RUN, None);
}

#[test]
fn torchrun_lines() {
    let wd = Workdir::new("torchrun");
    run_job(&wd, TORCHRUN, None);
    run_job(&wd, TORCHRUN_TOKEN, None);
}

fn ensure_launchers() {
    let o = Command::new("bash").arg(repo().join("scripts/launcher-deps.sh")).output().expect("run scripts/launcher-deps.sh");
    assert!(o.status.success(), "scripts/launcher-deps.sh:\n{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

#[test]
fn mpirun_lines_open_mpi_and_mpich() {
    ensure_launchers();
    let wd = Workdir::new("mpirun");
    run_job(&wd, MPIRUN_OPEN_MPI, Some("openmpi"));
    run_job(&wd, MPIRUN_MPICH, Some("mpich"));
    for mpi in ["openmpi", "mpich"] {
        readme_has(MPICC);
        let r = run_limited(wd.sh(MPICC, Some(mpi)), LIMIT);
        assert!(r.ok(), "{mpi}: {MPICC}:\n{}", r.out);
        run_job(&wd, MPIRUN_HEADER, Some(mpi));
    }
}

#[test]
fn torchrun_multinode_lines() {
    for (i, line) in [TORCHRUN_C10D, TORCHRUN_STATIC].into_iter().enumerate() {
        readme_has(line);
        let Some(bed) = netbed::bed_or_skip("torchrun_multinode_lines", 2, None) else { return };
        let wd = Workdir::new(&format!("multinode{i}"));
        // torch's c10d rendezvous resolves each node's hostname: a private
        // /etc/hosts per host (mount namespace), the real one untouched.
        let hosts = wd.dir.join("hosts");
        std::fs::write(&hosts, format!("127.0.0.1 localhost\n{} {}\n{} {}\n", bed.addr(0), bed.hostname(0), bed.addr(1), bed.hostname(1))).unwrap();
        // One port for both agents (wd.sh would pick one per call).
        let line_here = line.replace("29500", &free_port().to_string());
        let handles: Vec<_> = (0..2)
            .map(|h| {
                let local = wd.sh(&line_here, None);
                let mut c = bed.command(h, "unshare");
                c.args(["--mount", "sh", "-c", r#"mount --bind "$0" /etc/hosts && exec "$@""#]).arg(&hosts);
                c.arg(local.get_program()).args(local.get_args()).current_dir(&wd.dir);
                for (k, v) in local.get_envs() {
                    match v {
                        Some(v) => c.env(k, v),
                        None => c.env_remove(k),
                    };
                }
                c.env("HOST0", bed.addr(0)).env("NODE_RANK", h.to_string()).env("FLATSHARD_TOKEN", "readme-two-nodes");
                std::thread::spawn(move || run_limited(c, LIMIT))
            })
            .collect();
        let runs: Vec<Ran> = handles.into_iter().map(|t| t.join().unwrap()).collect();
        let out: String = runs.iter().enumerate().map(|(h, r)| format!("--- host {h} (exit {:?})\n{}\n", r.code, r.out)).collect();
        assert!(runs.iter().all(Ran::ok), "{line}:\n{out}");
        assert_eq!(hashes(&out, 4), native_hashes(4), "{line}:\n{out}");
    }
}

/// A one-node Slurm cluster in a private directory: munged, slurmctld and
/// slurmd on free ports; every daemon is stopped (by its pid file) on drop.
struct Slurm {
    dir: PathBuf,
}

impl Slurm {
    fn start(dir: &Path) -> Slurm {
        let d = dir.join("slurm");
        std::fs::create_dir_all(d.join("state")).unwrap();
        std::fs::create_dir_all(d.join("spool")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut key = vec![0u8; 1024];
        flatshard::comm::net::random_bytes(&mut key).unwrap();
        std::fs::write(d.join("munge.key"), key).unwrap();
        std::fs::set_permissions(d.join("munge.key"), std::fs::Permissions::from_mode(0o400)).unwrap();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
        let p = |f: &str| d.join(f).display().to_string();
        let conf = format!(
            "ClusterName=flatshard\nSlurmctldHost={host}\nSlurmctldPort={}\nSlurmdPort={}\nSlurmUser=root\nSlurmdUser=root\n\
             AuthType=auth/munge\nAuthInfo=socket={}\nCredType=cred/munge\nStateSaveLocation={}\nSlurmdSpoolDir={}\n\
             SlurmctldPidFile={}\nSlurmdPidFile={}\nSlurmctldLogFile={}\nSlurmdLogFile={}\nProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\nMpiDefault=none\nReturnToService=2\nJobCompType=jobcomp/none\n\
             AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none\nSlurmdParameters=config_overrides\n\
             NodeName={host} CPUs=4 State=UNKNOWN\nPartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE\n",
            free_port(),
            free_port(),
            p("munge.sock"),
            p("state"),
            p("spool"),
            p("ctld.pid"),
            p("d.pid"),
            p("ctld.log"),
            p("d.log"),
        );
        std::fs::write(d.join("slurm.conf"), conf).unwrap();
        let slurm = Slurm { dir: d.clone() };
        let run = |c: &mut Command| {
            let o = c.env("SLURM_CONF", d.join("slurm.conf")).output().unwrap();
            assert!(o.status.success(), "{c:?}:\n{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        };
        run(Command::new("munged").args(["--force", "--key-file", &p("munge.key"), "--socket", &p("munge.sock"), "--pid-file", &p("munged.pid")]).args([
            "--log-file",
            &p("munged.log"),
            "--seed-file",
            &p("munge.seed"),
        ]));
        run(Command::new("slurmctld").arg("-i"));
        run(&mut Command::new("slurmd"));
        slurm
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("slurm.conf")
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        for f in ["d.pid", "ctld.pid", "munged.pid"] {
            if let Some(pid) = std::fs::read_to_string(self.dir.join(f)).ok().and_then(|s| s.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) on a daemon this test started (its own pid file).
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
    }
}

#[test]
fn slurm_batch_script() {
    let script = readme_commands().into_iter().find(|c| c.starts_with(SLURM_SCRIPT_START)).expect("README has the Slurm batch script");
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        println!("slurm_batch_script: skipped: a private Slurm cluster needs root (slurmd runs jobs as their users)");
        return;
    }
    ensure_launchers();
    let wd = Workdir::new("slurm");
    std::fs::write(wd.dir.join("job.sh"), script.replace("29500", &free_port().to_string())).unwrap();
    let slurm = Slurm::start(&wd.dir);
    let mut c = Command::new("sbatch");
    c.args(["--wait", "-o", "out.txt", "job.sh"]).current_dir(&wd.dir).env("SLURM_CONF", slurm.conf());
    let r = run_limited(c, LIMIT);
    let out = std::fs::read_to_string(wd.dir.join("out.txt")).unwrap_or_default();
    let logs = ["ctld.log", "d.log"].iter().map(|f| std::fs::read_to_string(slurm.dir.join(f)).unwrap_or_default()).collect::<Vec<_>>().join("\n");
    assert!(r.ok(), "sbatch: {}\njob output:\n{out}\nslurm logs:\n{logs}", r.out);
    assert_eq!(hashes(&out, 4), native_hashes(4), "{out}");
    drop(slurm);
}
