//! The multi-host test bed (scripts/netbed.sh) for Rust tests: `NetBed::new`
//! builds H simulated hosts (network namespaces with their own hostnames,
//! 198.18.0.<i+1> on a bridge) under a name unique to this process and call;
//! Drop tears them down. Where namespaces are unavailable (not root, no
//! CAP_NET_ADMIN) `NetBed::new` returns Err("skipped: <why>").
//!
//! ```ignore
//! let Some(bed) = netbed::bed_or_skip("my_test", 2, None) else { return };
//! let mut c = bed.command(1, "sh");        // runs on host 1
//! ```
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/netbed.sh")
}

fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(script()).args(args).stdin(Stdio::null()).output().map_err(|e| format!("netbed.sh: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// None when the bed can be built here, Some("skipped: <why>") otherwise.
pub fn unavailable() -> Option<String> {
    match sh(&["check"]) {
        Ok(_) => None,
        Err(why) if why.starts_with("skipped:") => Some(why),
        Err(why) => Some(format!("skipped: netbed.sh check failed: {why}")),
    }
}

/// H simulated hosts; torn down on drop.
pub struct NetBed {
    name: String,
    hosts: usize,
}

static BEDS: AtomicUsize = AtomicUsize::new(0);

impl NetBed {
    /// `rate`: per-host limit in each direction, e.g. "2gbit" (tc tbf).
    pub fn new(hosts: usize, rate: Option<&str>) -> Result<NetBed, String> {
        if let Some(why) = unavailable() {
            return Err(why);
        }
        // beds of killed test processes
        let _ = sh(&["gc"]);
        let name = format!("fs{}x{}", std::process::id(), BEDS.fetch_add(1, Ordering::SeqCst));
        let h = hosts.to_string();
        let mut args = vec!["up", &name, &h];
        if let Some(r) = rate {
            args.push(r);
        }
        // NETBED_OWNER: our pid, so `gc` removes the bed if we are killed
        let out = Command::new(script())
            .args(&args)
            .env("NETBED_OWNER", std::process::id().to_string())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("netbed.sh up: {e}"))?;
        if !out.status.success() {
            return Err(format!("netbed.sh up {name} {hosts} failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(NetBed { name, hosts })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn hosts(&self) -> usize {
        self.hosts
    }
    /// Host i's address (198.18.0.<i+1>).
    pub fn addr(&self, host: usize) -> String {
        assert!(host < self.hosts, "host {host} of a {}-host bed", self.hosts);
        format!("198.18.0.{}", host + 1)
    }
    /// Host i's hostname.
    pub fn hostname(&self, host: usize) -> String {
        format!("{}-h{host}", self.name)
    }
    /// A command that runs `program` on host i (its network namespace, its
    /// own hostname). The spawned child's pid is the program's own.
    pub fn command(&self, host: usize, program: impl AsRef<OsStr>) -> Command {
        assert!(host < self.hosts, "host {host} of a {}-host bed", self.hosts);
        let ns = self.hostname(host);
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns, "unshare", "--uts", "sh", "-c", "hostname \"$0\" && exec \"$@\"", &ns]).arg(program);
        c
    }
    /// Cut (false) or restore (true) host i's link: a silent partition.
    pub fn link(&self, host: usize, up: bool) {
        sh(&["link", &self.name, &host.to_string(), if up { "up" } else { "down" }]).unwrap();
    }
    /// Change host i's rate limit ("off" removes it).
    pub fn rate(&self, host: usize, rate: &str) {
        sh(&["rate", &self.name, &host.to_string(), rate]).unwrap();
    }

    /// Spawn ranks of test `name` (this test binary) with `per_host[h]` ranks
    /// on host h (ranks numbered host-major), rendezvous on host 0. Sets
    /// torchrun's variables (LOCAL_RANK/LOCAL_WORLD_SIZE per host).
    pub fn spawn_ranks(&self, name: &str, per_host: &[usize], port: u16, extra: &[(&str, String)]) -> Vec<Child> {
        assert!(per_host.len() <= self.hosts, "{} hosts asked of a {}-host bed", per_host.len(), self.hosts);
        let world: usize = per_host.iter().sum();
        let exe = std::env::current_exe().unwrap();
        let mut children = Vec::new();
        let mut rank = 0;
        for (h, &n) in per_host.iter().enumerate() {
            for l in 0..n {
                let mut c = self.command(h, &exe);
                c.args([name, "--exact", "--nocapture", "--test-threads=1", "--include-ignored"])
                    .env(super::RANK_ENV, "1")
                    .env("RANK", rank.to_string())
                    .env("WORLD_SIZE", world.to_string())
                    .env("LOCAL_RANK", l.to_string())
                    .env("LOCAL_WORLD_SIZE", n.to_string())
                    .env("MASTER_ADDR", self.addr(0))
                    .env("MASTER_PORT", port.to_string())
                    .env("FLATSHARD_TEST_HOST", h.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                for (k, v) in extra {
                    c.env(k, v);
                }
                children.push(c.spawn().unwrap());
                rank += 1;
            }
        }
        children
    }
}

impl Drop for NetBed {
    fn drop(&mut self) {
        if let Err(e) = sh(&["down", &self.name]) {
            eprintln!("netbed: teardown of {} failed: {e}", self.name);
        }
    }
}

/// The bed, or None after printing "skipped: <why>" (test `name`).
pub fn bed_or_skip(name: &str, hosts: usize, rate: Option<&str>) -> Option<NetBed> {
    match NetBed::new(hosts, rate) {
        Ok(b) => Some(b),
        Err(why) if why.starts_with("skipped:") => {
            println!("{name}: {why}");
            None
        }
        Err(why) => panic!("{name}: {why}"),
    }
}

/// Run `body` on ranks spread over the bed's hosts (`per_host[h]` on host h)
/// and require every rank to succeed; skips (printing why) without a bed.
/// In a worker process it runs `body` with the communicator.
pub fn ranks_on_hosts(name: &str, per_host: &[usize], rate: Option<&str>, extra: &[(&str, String)], body: impl FnOnce(flatshard::Comm)) {
    if super::is_worker() {
        let comm = flatshard::Comm::init_from_env(super::worker_options()).unwrap_or_else(|e| panic!("rank {}: init failed: {e}", super::env_rank()));
        body(comm);
        return;
    }
    let Some(bed) = bed_or_skip(name, per_host.len(), rate) else { return };
    let world: usize = per_host.iter().sum();
    let res = super::wait_all(bed.spawn_ranks(name, per_host, 29500, extra), std::time::Duration::from_secs(180));
    let failed: Vec<String> =
        res.iter().enumerate().filter(|(_, (c, _))| *c != Some(0)).map(|(r, (c, out))| format!("--- rank {r} (exit {c:?}):\n{out}")).collect();
    assert!(failed.is_empty(), "{name}: {} of {world} ranks failed:\n{}", failed.len(), failed.join("\n"));
    for (r, (_, out)) in res.iter().enumerate() {
        assert!(out.contains("running 1 test"), "rank {r} of {name} ran no test:\n{out}");
        for l in out.lines().filter_map(|l| l.find("#: ").map(|i| &l[i..])) {
            println!("{l}");
        }
    }
}

/// Beds of ranks spawned by `spawn_from_env`, by child pid (a bed lives until
/// `release` has seen all its ranks finish).
static LIVE: Mutex<Vec<(u32, Arc<NetBed>)>> = Mutex::new(Vec::new());

/// FLATSHARD_TEST_BED="2,2" (ranks per host): how `world` ranks spread over
/// hosts. The pattern itself when it sums to `world`, otherwise `world`
/// split into contiguous blocks over as many of its hosts as there are ranks
/// (first hosts get the extra rank).
pub fn layout_from_env(world: usize) -> Option<Vec<usize>> {
    let v = std::env::var("FLATSHARD_TEST_BED").ok().filter(|v| !v.trim().is_empty())?;
    let pattern: Vec<usize> = v.split(',').map(|x| x.trim().parse().expect("FLATSHARD_TEST_BED: ranks per host, e.g. 2,1,2")).collect();
    if world < 2 {
        return None;
    }
    if pattern.iter().sum::<usize>() == world {
        return Some(pattern);
    }
    let h = pattern.len().min(world);
    Some((0..h).map(|i| world / h + usize::from(i < world % h)).collect())
}

/// With FLATSHARD_TEST_BED set (and namespaces available), spawn all ranks
/// of a job on simulated hosts instead of this host: the multi-process tests
/// then run over the hierarchical transport. None: spawn locally.
pub fn spawn_from_env(name: &str, world: usize, port: u16, extra: &[(&str, String)], which: &[usize]) -> Option<Vec<Child>> {
    let layout = layout_from_env(world)?;
    if which.len() != world {
        return None;
    }
    let bed = match NetBed::new(layout.len(), None) {
        Ok(b) => Arc::new(b),
        Err(why) => {
            println!("{name}: FLATSHARD_TEST_BED: {why}; ranks run on this host");
            return None;
        }
    };
    println!("{name}: ranks {layout:?} per host on bed {}", bed.name());
    let kids = bed.spawn_ranks(name, &layout, port, extra);
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    live.extend(kids.iter().map(|k| (k.id(), bed.clone())));
    Some(kids)
}

/// The ranks `pids` finished: drop their beds' references.
pub fn release(pids: &[u32]) {
    LIVE.lock().unwrap_or_else(|p| p.into_inner()).retain(|(p, _)| !pids.contains(p));
}
