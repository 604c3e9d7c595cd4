//! Slurm and PMI variables without RANK/WORLD_SIZE: real processes started
//! with the environment `srun` gives its tasks (SLURM_PROCID, SLURM_NTASKS,
//! SLURM_LOCALID and friends) or a PMI launcher gives (PMI_RANK, PMI_SIZE),
//! plus MASTER_ADDR/MASTER_PORT as the README's batch script exports them.
//! Each runs tests/c/launch_job.c; results must equal flatshard-run's. Bad or
//! partial variables fail every rank at once with a message naming them.

mod launchkit;

use launchkit::*;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(240);

/// Start `world` processes of `prog`, rank r with `vars(r)`; wait for all.
fn job(world: usize, vars: impl Fn(usize) -> Vec<(String, String)>) -> Vec<Ran> {
    let children: Vec<_> = (0..world)
        .map(|r| {
            let mut c = Command::new(launch_job());
            for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "FLATSHARD_TOKEN", "TORCHELASTIC_USE_AGENT_STORE"] {
                c.env_remove(v);
            }
            c.env("FLATSHARD_DEBUG", "INFO");
            for (k, v) in vars(r) {
                c.env(k, v);
            }
            c
        })
        .collect();
    let handles: Vec<_> = children.into_iter().map(|c| std::thread::spawn(move || run_limited(c, LIMIT))).collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn all_out(rs: &[Ran]) -> String {
    rs.iter().enumerate().map(|(r, x)| format!("--- rank {r} (exit {:?}, {:.1}s)\n{}", x.code, x.secs, x.out)).collect()
}

/// What srun exports to task `r` of a `world`-task step on one node.
fn srun_vars(r: usize, world: usize, port: u16) -> Vec<(String, String)> {
    [
        ("SLURM_JOB_ID", "4242".to_string()),
        ("SLURM_STEP_ID", "0".into()),
        ("SLURM_PROCID", r.to_string()),
        ("SLURM_LOCALID", r.to_string()),
        ("SLURM_NODEID", "0".into()),
        ("SLURM_NTASKS", world.to_string()),
        ("SLURM_NPROCS", world.to_string()),
        ("SLURM_STEP_NUM_TASKS", world.to_string()),
        ("SLURM_NNODES", "1".into()),
        ("SLURM_TASKS_PER_NODE", world.to_string()),
        ("SLURMD_NODENAME", "localhost".into()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[test]
fn slurm_task_variables() {
    let port = free_port();
    let rs = job(4, |r| srun_vars(r, 4, port));
    let out = all_out(&rs);
    assert!(rs.iter().all(Ran::ok), "{out}");
    assert_eq!(count(&out, "Slurm launch: rank"), 4, "{out}");
    assert_eq!(hashes(&out, 4), native_hashes(4), "{out}");
}

#[test]
fn pmi_variables() {
    let port = free_port();
    let rs = job(3, |r| {
        vec![
            ("PMI_RANK".into(), r.to_string()),
            ("PMI_SIZE".into(), "3".into()),
            ("MPI_LOCALRANKID".into(), r.to_string()),
            ("MASTER_ADDR".into(), "127.0.0.1".into()),
            ("MASTER_PORT".into(), port.to_string()),
        ]
    });
    let out = all_out(&rs);
    assert!(rs.iter().all(Ran::ok), "{out}");
    assert_eq!(count(&out, "PMI launch: rank"), 3, "{out}");
    assert_eq!(hashes(&out, 3), native_hashes(3), "{out}");
}

/// Bad variables: every rank fails at once (no rank waits for the deadline)
/// with INVALID_ARGUMENT naming the variable.
#[test]
fn bad_launcher_variables_fail_fast() {
    let port = free_port();
    type Vars = Box<dyn Fn(usize) -> Vec<(String, String)>>;
    let cases: Vec<(&str, Vars)> = vec![
        (
            "SLURM_PROCID=2 is outside [0, 1]",
            Box::new(move |r| {
                let mut v = srun_vars(r, 2, port);
                v.retain(|(k, _)| k != "SLURM_PROCID");
                v.push(("SLURM_PROCID".into(), "2".into()));
                v
            }),
        ),
        ("MASTER_ADDR is not set (Slurm gave rank", Box::new(move |r| srun_vars(r, 2, port).into_iter().filter(|(k, _)| k != "MASTER_ADDR").collect())),
        (
            "PMI_RANK is set but PMI_SIZE is not",
            Box::new(move |r| vec![("PMI_RANK".into(), r.to_string()), ("MASTER_ADDR".into(), "127.0.0.1".into()), ("MASTER_PORT".into(), port.to_string())]),
        ),
    ];
    for (want, vars) in cases {
        let rs = job(2, vars);
        let out = all_out(&rs);
        for x in &rs {
            assert_eq!(x.code, Some(1), "{out}");
            assert!(x.out.contains(want) && x.out.contains("FLATSHARD_ERR_INVALID_ARGUMENT") && x.secs < 60.0, "want '{want}':\n{out}");
        }
    }
}
