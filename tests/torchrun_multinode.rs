//! Multi-node torchrun: two torchrun agents on two simulated hosts of the
//! network test bed (scripts/netbed.sh: network namespaces with their own
//! hostnames and 198.18.0.x addresses), `--nnodes 2 --nproc-per-node 2`,
//! rendezvous on host 0 (c10d: --rdzv-endpoint; static: --master-addr).
//! flatshard joins the agent's store across the "network" and its 4 ranks
//! run tests/c/launch_job.c; results must equal flatshard-run's on one host.
//! Skipped (with the reason printed) where namespaces are unavailable.

mod common;
mod launchkit;

use common::netbed::{self, NetBed};
use launchkit::*;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);

/// torchrun on host `h` with `args`. torch's c10d rendezvous resolves the
/// machine's own hostname, so each host gets a private /etc/hosts (a mount
/// namespace; the real file is untouched) naming the bed's hosts.
fn agent(bed: &NetBed, h: usize, hosts_file: &std::path::Path, args: &[String]) -> Command {
    let mut c = bed.command(h, "unshare");
    c.args(["--mount", "sh", "-c", r#"mount --bind "$0" /etc/hosts && exec "$@""#]).arg(hosts_file).arg(torchrun()).args(args);
    for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"] {
        c.env_remove(v);
    }
    c.env("OMP_NUM_THREADS", "1").env("FLATSHARD_DEBUG", "INFO").env("FLATSHARD_TOKEN", "two-node-job-token");
    c
}

fn two_nodes(name: &str, args_for: impl Fn(&NetBed, usize) -> Vec<String>) {
    let Some(bed) = netbed::bed_or_skip(name, 2, None) else { return };
    let hosts_file = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("hosts-{}-{name}", std::process::id()));
    let text: String = std::iter::once("127.0.0.1 localhost\n".to_string()).chain((0..2).map(|h| format!("{} {}\n", bed.addr(h), bed.hostname(h)))).collect();
    std::fs::write(&hosts_file, text).unwrap();
    let prog = launch_job();
    let handles: Vec<_> = (0..2)
        .map(|h| {
            let mut a = args_for(&bed, h);
            a.extend(["--no-python".to_string(), s(&prog).to_string()]);
            let c = agent(&bed, h, &hosts_file, &a);
            std::thread::spawn(move || run_limited(c, LIMIT))
        })
        .collect();
    let runs: Vec<Ran> = handles.into_iter().map(|t| t.join().unwrap()).collect();
    let _ = std::fs::remove_file(&hosts_file);
    let out: String = runs.iter().enumerate().map(|(h, r)| format!("--- host {h} (exit {:?}, {:.1}s)\n{}\n", r.code, r.secs, r.out)).collect();
    assert!(runs.iter().all(Ran::ok), "{out}");
    // Ranks 0,1 on host 0 and 2,3 on host 1 (or the other way round for c10d).
    for r in &runs {
        assert_eq!(count(&r.out, "ok, mode env, restart 0,"), 2, "{out}");
        assert_eq!(count(&r.out, "joined job"), 2, "{out}");
    }
    // Two ranks per host on two hosts: the hierarchical transport (shared
    // memory inside each host, TCP between them).
    assert_eq!(count(&out, "(4 ranks, hier transport)"), 4, "ranks on two hosts meet over the hierarchical transport:\n{out}");
    assert_eq!(hashes(&out, 4), native_hashes(4), "{out}");
    drop(bed);
}

#[test]
fn torchrun_two_nodes_c10d() {
    let port = free_port();
    two_nodes("torchrun_two_nodes_c10d", |bed, _h| {
        ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-id", "flatshard-two-nodes"]
            .iter()
            .map(|x| x.to_string())
            .chain(["--rdzv-endpoint".to_string(), format!("{}:{port}", bed.addr(0))])
            .collect()
    });
}

#[test]
fn torchrun_two_nodes_static() {
    let port = free_port();
    two_nodes("torchrun_two_nodes_static", |bed, h| {
        ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "static"]
            .iter()
            .map(|x| x.to_string())
            .chain(["--node-rank".to_string(), h.to_string(), "--master-addr".to_string(), bed.addr(0), "--master-port".to_string(), port.to_string()])
            .collect()
    });
}
