//! Every `FLATSHARD_*` setting, read and validated in one place when a
//! communicator is created, before any traffic.
//!
//! Settings come in two kinds:
//! - **job-wide** ones change an algorithm or a buffer layout (which
//!   shared-memory protocol a collective takes, how averaging buckets the
//!   tensors). Every rank must use the same value, so they are exchanged at
//!   rendezvous and a difference fails creation on every rank, naming the
//!   variable and each rank's value ([`Config::job_wide`], compared by
//!   `comm::rendezvous`);
//! - **local** ones only tune this process (spin time, socket buffers, the
//!   buffer cache, logging) and may differ between ranks.
//!
//! A malformed or out-of-range value is INVALID_ARGUMENT naming the variable,
//! the value and the accepted range. The README's settings table lists the
//! same variables (a unit test checks it against [`SETTINGS`]).

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};

/// FLATSHARD_HOST_CACHE_BYTES of the last communicator created (every
/// communicator of a process reads the same environment): the host buffer
/// cache (`mem::host_cache`) is per process.
static HOST_CACHE_LIMIT: AtomicUsize = AtomicUsize::new(HOST_CACHE_BYTES_DEFAULT);

/// The host buffer cache's byte limit.
pub fn host_cache_limit() -> usize {
    HOST_CACHE_LIMIT.load(Ordering::Relaxed)
}

/// One documented setting: its variable, its kind, and its accepted values.
pub struct Setting {
    pub var: &'static str,
    pub job_wide: bool,
    pub accepted: &'static str,
}

pub const SHM_CHUNK: &str = "FLATSHARD_SHM_CHUNK";
pub const SHM_SMALL: &str = "FLATSHARD_SHM_SMALL";
pub const SHM_STREAM_MIN: &str = "FLATSHARD_SHM_STREAM_MIN";
pub const SHM_SPIN_US: &str = "FLATSHARD_SHM_SPIN_US";
pub const BUCKET_BYTES: &str = "FLATSHARD_BUCKET_BYTES";
pub const HOST_CACHE_BYTES: &str = "FLATSHARD_HOST_CACHE_BYTES";
pub const TCP_SOCKBUF: &str = "FLATSHARD_TCP_SOCKBUF";
pub const KERNEL: &str = "FLATSHARD_KERNEL";
pub const DEBUG: &str = "FLATSHARD_DEBUG";
pub const TOKEN: &str = "FLATSHARD_TOKEN";
pub const NCCL_LIBRARY: &str = "FLATSHARD_NCCL_LIBRARY";

/// Shared-memory chunk (slot) bounds, bytes.
pub const SHM_CHUNK_MIN: usize = 64 << 10;
pub const SHM_CHUNK_MAX: usize = 256 << 20;
pub const SHM_CHUNK_DEFAULT: usize = 1 << 20;
pub const SHM_SMALL_DEFAULT: usize = 64 << 10;
pub const SHM_STREAM_MIN_DEFAULT: usize = 48 << 20;
pub const SHM_SPIN_US_MAX: u64 = 1_000_000;
pub const BUCKET_BYTES_DEFAULT: usize = 16 << 20;
pub const HOST_CACHE_BYTES_DEFAULT: usize = 512 << 20;
pub const TCP_SOCKBUF_MIN: usize = 16 << 10;
pub const TCP_SOCKBUF_MAX: usize = 1 << 30;
/// Upper bound for byte counts that size allocations.
const BYTES_MAX: usize = isize::MAX as usize;

/// The settings table (also the README's).
pub const SETTINGS: &[Setting] = &[
    Setting { var: SHM_CHUNK, job_wide: true, accepted: "65536..=268435456 bytes, default 1048576" },
    Setting { var: SHM_SMALL, job_wide: true, accepted: "0..=268435456 bytes (capped at the chunk), default 65536" },
    Setting { var: SHM_STREAM_MIN, job_wide: true, accepted: "bytes, default 50331648" },
    Setting { var: BUCKET_BYTES, job_wide: true, accepted: "1.. bytes, default 16777216" },
    Setting { var: SHM_SPIN_US, job_wide: false, accepted: "0..=1000000 microseconds, default 50 (2 when ranks outnumber cores)" },
    Setting { var: HOST_CACHE_BYTES, job_wide: false, accepted: "bytes, 0 = off, default 536870912" },
    Setting {
        var: TCP_SOCKBUF,
        job_wide: false,
        accepted: "0 (kernel autotuning) or 16384..=1073741824 bytes; default 524288 to this host, autotuning to others",
    },
    Setting { var: KERNEL, job_wide: false, accepted: "avx512 | avx2 | portable (caps the reduction kernel), default: the best this CPU has" },
    Setting { var: DEBUG, job_wide: false, accepted: "WARN | INFO | TRACE (case-insensitive), default silent" },
    Setting { var: TOKEN, job_wide: false, accepted: "the job secret (any string; options.token wins), default none" },
    Setting { var: NCCL_LIBRARY, job_wide: false, accepted: "path of libnccl to load, default the loaded or installed libnccl.so.2" },
];

/// Every setting's value for one process, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub shm_chunk: usize,
    pub shm_small: usize,
    pub shm_stream_min: usize,
    pub bucket_bytes: usize,
    /// None = the transport's default (depends on ranks per core).
    pub shm_spin_us: Option<u64>,
    pub host_cache_bytes: usize,
    /// None = 512 KiB to peers on this host, autotuning to others.
    pub tcp_sockbuf: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            shm_chunk: SHM_CHUNK_DEFAULT,
            shm_small: SHM_SMALL_DEFAULT,
            shm_stream_min: SHM_STREAM_MIN_DEFAULT,
            bucket_bytes: BUCKET_BYTES_DEFAULT,
            shm_spin_us: None,
            host_cache_bytes: HOST_CACHE_BYTES_DEFAULT,
            tcp_sockbuf: None,
        }
    }
}

impl Config {
    /// Read every setting from the process environment.
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|v| std::env::var(v).ok())
    }

    /// Read every setting through `get` (the environment, or a table in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let get = |v: &str| get(v).filter(|s| !s.trim().is_empty());
        let d = Config::default();
        let bytes = |var: &str, lo: usize, hi: usize, dflt: usize| -> Result<usize> { get(var).map_or(Ok(dflt), |s| parse_bytes(var, &s, lo, hi)) };
        let tcp_sockbuf = match get(TCP_SOCKBUF) {
            None => None,
            Some(s) => {
                let b = parse_bytes(TCP_SOCKBUF, &s, 0, usize::MAX)?;
                if b != 0 && !(TCP_SOCKBUF_MIN..=TCP_SOCKBUF_MAX).contains(&b) {
                    return Err(out_of_range(TCP_SOCKBUF, &s, &format!("0 (kernel autotuning) or {TCP_SOCKBUF_MIN}..={TCP_SOCKBUF_MAX} bytes")));
                }
                Some(b)
            }
        };
        if let Some(s) = get(KERNEL) {
            parse_level(KERNEL, &s, &["avx512", "avx2", "portable"])?;
        }
        if let Some(s) = get(DEBUG) {
            parse_level(DEBUG, &s, &["warn", "info", "trace"])?;
        }
        let shm_chunk = bytes(SHM_CHUNK, SHM_CHUNK_MIN, SHM_CHUNK_MAX, d.shm_chunk)?;
        Ok(Config {
            shm_chunk,
            shm_small: bytes(SHM_SMALL, 0, SHM_CHUNK_MAX, d.shm_small)?,
            shm_stream_min: bytes(SHM_STREAM_MIN, 0, BYTES_MAX, d.shm_stream_min)?,
            bucket_bytes: bytes(BUCKET_BYTES, 1, BYTES_MAX, d.bucket_bytes)?,
            shm_spin_us: get(SHM_SPIN_US).map(|s| parse_micros(SHM_SPIN_US, &s, SHM_SPIN_US_MAX)).transpose()?,
            host_cache_bytes: bytes(HOST_CACHE_BYTES, 0, BYTES_MAX, d.host_cache_bytes)?,
            tcp_sockbuf,
        })
    }

    /// Make the process-wide settings (the host buffer cache's limit) take
    /// effect; called when a communicator is created.
    pub fn apply_process_wide(&self) {
        HOST_CACHE_LIMIT.store(self.host_cache_bytes, Ordering::Relaxed);
    }

    /// The job-wide settings as (variable, value) pairs, in a fixed order:
    /// what rendezvous compares across ranks.
    pub fn job_wide(&self) -> Vec<(&'static str, u64)> {
        vec![
            (SHM_CHUNK, self.shm_chunk as u64),
            (SHM_SMALL, self.shm_small as u64),
            (SHM_STREAM_MIN, self.shm_stream_min as u64),
            (BUCKET_BYTES, self.bucket_bytes as u64),
        ]
    }

    /// The job-wide settings as one line for the rendezvous store.
    pub fn encode_job_wide(&self) -> String {
        self.job_wide().iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";")
    }
}

/// Compare the job-wide settings of every rank (`lines[r]` from
/// [`Config::encode_job_wide`], or an error line from a rank that could not
/// read its own). The error names each differing variable with every rank's
/// value, so every rank reports the same thing.
pub fn compare_job_wide(rank: usize, lines: &[String]) -> Result<()> {
    if let Some((r, l)) = lines.iter().enumerate().find(|(_, l)| l.starts_with("error:")) {
        return Err(Error::invalid_arg(format!("rank {rank}: rank {r} refused its settings: {}", l.trim_start_matches("error:").trim())));
    }
    let parsed: Vec<Vec<(&str, &str)>> = lines.iter().map(|l| l.split(';').filter_map(|kv| kv.split_once('=')).collect()).collect();
    let mut diffs = Vec::new();
    for (i, (var, mine)) in parsed.first().map(|p| p.as_slice()).unwrap_or(&[]).iter().enumerate() {
        let values: Vec<&str> = parsed.iter().map(|p| p.get(i).filter(|kv| kv.0 == *var).map_or("?", |kv| kv.1)).collect();
        if values.iter().any(|v| v != mine) {
            let each: Vec<String> = values.iter().enumerate().map(|(r, v)| format!("rank {r}: {v}")).collect();
            diffs.push(format!("{var} differs ({})", each.join(", ")));
        }
    }
    if diffs.is_empty() && parsed.iter().any(|p| p.len() != parsed[0].len()) {
        diffs.push("the ranks run flatshard versions with different settings".into());
    }
    if diffs.is_empty() {
        return Ok(());
    }
    Err(Error::mismatch(format!(
        "rank {rank}: settings that change an algorithm must be equal on every rank: {}; set them alike (or unset them) everywhere",
        diffs.join("; ")
    )))
}

fn out_of_range(var: &str, value: &str, accepted: &str) -> Error {
    Error::invalid_arg(format!("environment: {var}='{value}' is outside the accepted range: {accepted}"))
}

/// A byte count: a decimal number, optionally with a K/M/G (×1024) suffix,
/// in `[lo, hi]`.
pub fn parse_bytes(var: &str, value: &str, lo: usize, hi: usize) -> Result<usize> {
    let t = value.trim();
    let (digits, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1usize << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n = digits.trim().parse::<usize>().ok().and_then(|n| n.checked_mul(mult)).ok_or_else(|| {
        Error::invalid_arg(format!("environment: {var}='{value}' is not a byte count (a decimal number, optionally with K, M or G; accepted {lo}..={hi})"))
    })?;
    if n < lo || n > hi {
        return Err(out_of_range(var, value, &format!("{lo}..={hi} bytes")));
    }
    Ok(n)
}

/// A duration in microseconds in `[0, hi]`.
pub fn parse_micros(var: &str, value: &str, hi: u64) -> Result<u64> {
    let n = value
        .trim()
        .parse::<u64>()
        .map_err(|_| Error::invalid_arg(format!("environment: {var}='{value}' is not a number of microseconds (accepted 0..={hi})")))?;
    if n > hi {
        return Err(out_of_range(var, value, &format!("0..={hi} microseconds")));
    }
    Ok(n)
}

/// One of `names` (case-insensitive); returns its index.
pub fn parse_level(var: &str, value: &str, names: &[&str]) -> Result<usize> {
    let v = value.trim().to_ascii_lowercase();
    names.iter().position(|n| *n == v).ok_or_else(|| Error::invalid_arg(format!("environment: {var}='{value}' is not one of {}", names.join(" | "))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config> {
        Config::from_lookup(|v| pairs.iter().find(|p| p.0 == v).map(|p| p.1.to_string()))
    }

    #[test]
    fn defaults_when_unset_or_empty() {
        assert_eq!(cfg(&[]).unwrap(), Config::default());
        assert_eq!(cfg(&[(SHM_CHUNK, " "), (BUCKET_BYTES, "")]).unwrap(), Config::default());
    }

    #[test]
    fn each_unit_parses() {
        let c = cfg(&[(SHM_CHUNK, "2M"), (SHM_SMALL, "0"), (BUCKET_BYTES, "1000"), (SHM_SPIN_US, "7"), (TCP_SOCKBUF, "0"), (KERNEL, "AVX2"), (DEBUG, "info")])
            .unwrap();
        assert_eq!((c.shm_chunk, c.shm_small, c.bucket_bytes, c.shm_spin_us, c.tcp_sockbuf), (2 << 20, 0, 1000, Some(7), Some(0)));
    }

    #[test]
    fn bad_values_name_variable_value_and_range() {
        for (var, val, want) in [
            (SHM_CHUNK, "lots", "65536..=268435456"),
            (SHM_CHUNK, "1024", "65536..=268435456 bytes"),
            (BUCKET_BYTES, "0", "1..="),
            (HOST_CACHE_BYTES, "-1", "byte count"),
            (SHM_SPIN_US, "5000000", "0..=1000000 microseconds"),
            (TCP_SOCKBUF, "100", "16384..=1073741824"),
            (KERNEL, "sse", "avx512 | avx2 | portable"),
            (DEBUG, "loud", "warn | info | trace"),
            (SHM_STREAM_MIN, "99999999999999999999G", "byte count"),
        ] {
            let e = cfg(&[(var, val)]).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument);
            assert!(e.msg.contains(var) && e.msg.contains(&format!("'{val}'")) && e.msg.contains(want), "{var}={val}: {}", e.msg);
        }
    }

    #[test]
    fn job_wide_comparison_names_each_rank() {
        let a = Config::default().encode_job_wide();
        let b = cfg(&[(SHM_SMALL, "1048576")]).unwrap().encode_job_wide();
        assert!(compare_job_wide(0, &[a.clone(), a.clone()]).is_ok());
        let e = compare_job_wide(1, &[a.clone(), b, a]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Mismatch);
        assert!(e.msg.contains("FLATSHARD_SHM_SMALL differs (rank 0: 65536, rank 1: 1048576, rank 2: 65536)"), "{}", e.msg);
        let e = compare_job_wide(0, &[Config::default().encode_job_wide(), "error: FLATSHARD_SHM_CHUNK='x' is bad".into()]).unwrap_err();
        assert!(e.kind == ErrorKind::InvalidArgument && e.msg.contains("rank 1 refused") && e.msg.contains("FLATSHARD_SHM_CHUNK='x'"), "{}", e.msg);
    }

    /// The README's settings table lists exactly these variables.
    #[test]
    fn readme_table_matches() {
        let readme = include_str!("../README.md");
        let table: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `FLATSHARD_")).collect();
        for s in SETTINGS {
            assert!(table.iter().any(|l| l.starts_with(&format!("| `{}`", s.var))), "README settings table lacks {}", s.var);
        }
        for l in &table {
            assert!(SETTINGS.iter().any(|s| l.starts_with(&format!("| `{}`", s.var))), "README lists a setting config.rs does not know: {l}");
        }
    }
}
