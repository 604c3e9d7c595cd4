//! Which launcher started this process, read from the environment:
//! torchrun / flatshard-run / torch.distributed (RANK, WORLD_SIZE), Slurm's
//! srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), Open MPI's mpirun
//! (OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK) or a PMI launcher such as MPICH's
//! Hydra (PMI_RANK, PMI_SIZE, MPI_LOCALRANKID), and whether torchrun's agent hosts the
//! rendezvous store (TORCHELASTIC_USE_AGENT_STORE=True).

use crate::error::{Error, Result};

/// Where rank and size came from, first match wins.
const SOURCES: [(&str, &str, &str, Option<&str>); 4] = [
    ("torchrun", "RANK", "WORLD_SIZE", Some("LOCAL_RANK")),
    ("Slurm", "SLURM_PROCID", "SLURM_NTASKS", Some("SLURM_LOCALID")),
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", Some("OMPI_COMM_WORLD_LOCAL_RANK")),
    ("PMI", "PMI_RANK", "PMI_SIZE", Some("MPI_LOCALRANKID")),
];

/// torchrun's agent store: flatshard's keys live under this job's scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStore {
    /// `flatshard/<TORCHELASTIC_RUN_ID>/<TORCHELASTIC_RESTART_COUNT>/`.
    pub prefix: String,
}

/// What the environment says about this process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// "torchrun", "Slurm", "Open MPI" or "PMI".
    pub source: &'static str,
    pub rank: i32,
    pub world: i32,
    pub local_rank: Option<i32>,
    /// None only for a world of one without MASTER_ADDR.
    pub master: Option<(String, u16)>,
    pub agent_store: Option<AgentStore>,
}

/// Read the launcher's variables through `get` (the process environment in
/// production; a map in unit tests).
pub fn detect(get: &dyn Fn(&str) -> Option<String>) -> Result<LaunchEnv> {
    let var = |name: &str| get(name).filter(|v| !v.trim().is_empty());
    let int = |name: &str, v: &str, lo: i64, hi: i64| -> Result<i64> {
        let n = v.trim().parse::<i64>().map_err(|_| Error::invalid_arg(format!("environment: {name}='{v}' is not an integer")))?;
        if !(lo..=hi).contains(&n) {
            return Err(Error::invalid_arg(format!("environment: {name}={n} is outside [{lo}, {hi}]")));
        }
        Ok(n)
    };
    let mut found = None;
    for (source, rank_var, size_var, local_var) in SOURCES {
        match (var(rank_var), var(size_var)) {
            (None, None) => continue,
            (Some(_), None) | (None, Some(_)) => {
                let (set, unset) = if var(rank_var).is_some() { (rank_var, size_var) } else { (size_var, rank_var) };
                return Err(Error::invalid_arg(format!("environment: {set} is set but {unset} is not ({source} sets both)")));
            }
            (Some(r), Some(s)) => {
                let world = int(size_var, &s, 1, i32::MAX as i64)?;
                let rank = int(rank_var, &r, 0, world - 1).map_err(|e| Error::invalid_arg(format!("{} (rank must be below {size_var}={world})", e.msg)))?;
                let local_rank = match local_var.and_then(|l| var(l).map(|v| (l, v))) {
                    Some((l, v)) => Some(int(l, &v, 0, world - 1)? as i32),
                    None => None,
                };
                found = Some((source, rank as i32, world as i32, local_rank));
                break;
            }
        }
    }
    let Some((source, rank, world, local_rank)) = found else {
        return Err(Error::invalid_arg(
            "environment: no rank and size found: set RANK and WORLD_SIZE (torchrun, flatshard-run), or start under srun \
             (SLURM_PROCID/SLURM_NTASKS), Open MPI's mpirun (OMPI_COMM_WORLD_RANK/SIZE) or a PMI launcher (PMI_RANK/PMI_SIZE)",
        ));
    };
    let master = match (var("MASTER_ADDR"), var("MASTER_PORT")) {
        (None, _) if world == 1 => None,
        (None, _) => {
            return Err(Error::invalid_arg(format!(
                "environment: MASTER_ADDR is not set ({source} gave rank {rank} of {world}; MASTER_ADDR and MASTER_PORT name the rendezvous host and port)"
            )))
        }
        (Some(_), None) => {
            return Err(Error::invalid_arg(format!("environment: MASTER_PORT is not set ({source} gave rank {rank} of {world}; MASTER_ADDR is set)")))
        }
        (Some(a), Some(p)) => (a.trim().to_string(), int("MASTER_PORT", &p, 1, 65535)? as u16).into(),
    };
    let agent_store = match var("TORCHELASTIC_USE_AGENT_STORE") {
        Some(v) if v.trim().eq_ignore_ascii_case("true") || v.trim() == "1" => {
            let run_id = var("TORCHELASTIC_RUN_ID").unwrap_or_else(|| "none".into());
            let restart = match var("TORCHELASTIC_RESTART_COUNT") {
                Some(c) => int("TORCHELASTIC_RESTART_COUNT", &c, 0, i64::MAX)?,
                None => 0,
            };
            if run_id.len() > 256 || run_id.contains('/') {
                return Err(Error::invalid_arg(format!("environment: TORCHELASTIC_RUN_ID='{run_id}' must be at most 256 bytes without '/'")));
            }
            Some(AgentStore { prefix: format!("flatshard/{}/{restart}/", run_id.trim()) })
        }
        _ => None,
    };
    if agent_store.is_some() && master.is_none() && world > 1 {
        return Err(Error::internal("agent store without MASTER_ADDR"));
    }
    Ok(LaunchEnv { source, rank, world, local_rank, master, agent_store })
}

/// `detect` on the process environment.
pub fn from_process_env() -> Result<LaunchEnv> {
    detect(&|name| std::env::var(name).ok())
}

/// A TCP port that is free on `addr` now, for a rendezvous store that a
/// process started later binds (flatshard-run's MASTER_PORT, the tests').
/// Chosen at random below Linux's ephemeral range (32768–60999): `bind(0)`
/// would hand out a port from that range, which any outgoing connection
/// made meanwhile (the TCP transport makes hundreds) may take before the
/// store binds it. Checked free by binding; `bind(0)` only if 2,000 tries
/// found none.
pub fn free_port(addr: &str) -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos() as u64);
    let mut x = ((std::process::id() as u64) << 32 ^ nanos ^ CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
    for _ in 0..2000 {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20000 + (x % 12000) as u16;
        if std::net::TcpListener::bind((addr, port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(std::net::TcpListener::bind((addr, 0))?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<LaunchEnv> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        detect(&move |k| m.get(k).cloned())
    }

    #[test]
    fn free_port_is_below_the_ephemeral_range_and_bindable() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let port = free_port("127.0.0.1").expect("a free port");
            assert!((20000..32000).contains(&port), "port {port} outside 20000..32000");
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
            seen.insert(port);
        }
        assert!(seen.len() > 10, "ports are not spread: {seen:?}");
    }

    #[test]
    fn torchrun_variables_win_over_the_others() {
        let e = env(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "0"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("MASTER_ADDR", "h0"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap();
        assert_eq!((e.source, e.rank, e.world, e.local_rank), ("torchrun", 2, 4, Some(0)));
        assert_eq!(e.master, Some(("h0".to_string(), 29500)));
        assert_eq!(e.agent_store, None);
    }

    #[test]
    fn slurm_then_open_mpi_then_pmi() {
        let m = [("MASTER_ADDR", "h"), ("MASTER_PORT", "1")];
        let s = env(&[&m[..], &[("SLURM_PROCID", "3"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1"), ("PMI_RANK", "3"), ("PMI_SIZE", "8")]].concat()).unwrap();
        assert_eq!((s.source, s.rank, s.world, s.local_rank), ("Slurm", 3, 8, Some(1)));
        let o = env(&[&m[..], &[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_LOCAL_RANK", "1")]].concat()).unwrap();
        assert_eq!((o.source, o.rank, o.world, o.local_rank), ("Open MPI", 1, 2, Some(1)));
        let p = env(&[&m[..], &[("PMI_RANK", "0"), ("PMI_SIZE", "3")]].concat()).unwrap();
        assert_eq!((p.source, p.rank, p.world, p.local_rank), ("PMI", 0, 3, None));
    }

    #[test]
    fn bad_values_name_the_variable_and_the_limit() {
        let m = [("MASTER_ADDR", "h"), ("MASTER_PORT", "1")];
        for (pairs, want) in [
            (vec![("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4")], "SLURM_PROCID=4 is outside [0, 3]"),
            (vec![("PMI_RANK", "x"), ("PMI_SIZE", "4")], "PMI_RANK='x' is not an integer"),
            (vec![("OMPI_COMM_WORLD_RANK", "0")], "OMPI_COMM_WORLD_RANK is set but OMPI_COMM_WORLD_SIZE is not"),
            (vec![("RANK", "0"), ("WORLD_SIZE", "0")], "WORLD_SIZE=0 is outside [1, 2147483647]"),
            (vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")], "MASTER_PORT=70000 is outside [1, 65535]"),
            (vec![], "no rank and size found"),
        ] {
            let all: Vec<(&str, &str)> = m.iter().copied().filter(|(k, _)| !pairs.iter().any(|(p, _)| p == k)).chain(pairs.iter().copied()).collect();
            let e = env(&all).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument);
            assert!(e.msg.contains(want), "{} / want {want}", e.msg);
        }
        let e = env(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")]).unwrap_err();
        assert!(e.msg.contains("MASTER_ADDR is not set (Slurm gave rank 1 of 2"), "{}", e.msg);
        let e = env(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("MASTER_ADDR", "h")]).unwrap_err();
        assert!(e.msg.contains("MASTER_PORT is not set"), "{}", e.msg);
        // A world of one needs no master.
        assert_eq!(env(&[("PMI_RANK", "0"), ("PMI_SIZE", "1")]).unwrap().master, None);
    }

    #[test]
    fn agent_store_scope_has_run_id_and_restart_count() {
        let base = [("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29400")];
        let e = env(&[&base[..], &[("TORCHELASTIC_USE_AGENT_STORE", "True"), ("TORCHELASTIC_RUN_ID", "abc"), ("TORCHELASTIC_RESTART_COUNT", "1")]].concat())
            .unwrap();
        assert_eq!(e.agent_store, Some(AgentStore { prefix: "flatshard/abc/1/".into() }));
        let e = env(&[&base[..], &[("TORCHELASTIC_USE_AGENT_STORE", "False"), ("TORCHELASTIC_RUN_ID", "abc")]].concat()).unwrap();
        assert_eq!(e.agent_store, None);
        let e = env(&[&base[..], &[("TORCHELASTIC_USE_AGENT_STORE", "True"), ("TORCHELASTIC_RESTART_COUNT", "-1")]].concat()).unwrap_err();
        assert!(e.msg.contains("TORCHELASTIC_RESTART_COUNT=-1"), "{}", e.msg);
    }
}
