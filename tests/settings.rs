//! Settings are read and checked when a communicator is created (config.rs),
//! with real processes: ranks that disagree on a setting that changes an
//! algorithm or a buffer layout fail creation on every rank, naming the
//! variable and each rank's value (never a wrong result, never a hang); a
//! malformed value on one rank fails every rank within timeout + 2 s.

mod common;
use common::*;
use flatshard::{Comm, CommOptions, ErrorKind};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(20);
const VAR: &str = "FS_TEST_SETTING_VAR";
const VALUES: &str = "FS_TEST_SETTING_VALUES";

/// In a worker: set the variable under test to this rank's value (empty =
/// unset), create the communicator, and return the result and how long it took.
fn join_with_my_setting() -> (usize, flatshard::Result<Comm>, Duration) {
    let rank = env_rank();
    let var = std::env::var(VAR).unwrap();
    let values: Vec<String> = std::env::var(VALUES).unwrap().split(',').map(str::to_string).collect();
    match values[rank].as_str() {
        "" => std::env::remove_var(&var),
        v => std::env::set_var(&var, v),
    }
    let t = Instant::now();
    let r = Comm::init_from_env(CommOptions { timeout: TIMEOUT, ..worker_options() });
    (rank, r, t.elapsed())
}

/// Run test `name` on one process per entry of `values`, `var` set per rank.
fn job(name: &str, var: &str, values: &[&str], transport: &str) {
    let extra = [(VAR, var.to_string()), (VALUES, values.join(",")), transport_env(transport)];
    let res = wait_all(spawn(name, values.len(), &extra), Duration::from_secs(120));
    for (r, (code, out)) in res.iter().enumerate() {
        assert_eq!(*code, Some(0), "{name} {var}={values:?}: rank {r} failed:\n{out}");
        assert!(out.contains("running 1 test"), "rank {r} ran no test:\n{out}");
    }
}

/// Each job-wide setting, one rank different: MISMATCH on every rank, the
/// message naming the variable and every rank's value.
#[test]
fn ranks_with_different_algorithm_settings_fail_creation_together() {
    if is_worker() {
        let (rank, r, took) = join_with_my_setting();
        let var = std::env::var(VAR).unwrap();
        let e = match r {
            Ok(c) => {
                // Were creation to succeed, show what the old library did: a
                // 1,000-float all_reduce with wrong elements.
                let mut b = vec![0u8; 4000];
                let st = c.all_reduce(&mut b, flatshard::DType::F32, flatshard::ReduceOp::Sum);
                panic!("rank {rank}: creation succeeded with different {var} (all_reduce then returned {st:?})");
            }
            Err(e) => e,
        };
        assert_eq!(e.kind, ErrorKind::Mismatch, "rank {rank}: {e}");
        let values: Vec<String> = std::env::var(VALUES).unwrap().split(',').map(str::to_string).collect();
        assert!(e.msg.contains(&format!("{var} differs")), "rank {rank}: {}", e.msg);
        for (r, v) in values.iter().enumerate() {
            assert!(e.msg.contains(&format!("rank {r}: {}", if v.is_empty() { "" } else { v })), "rank {rank}: value of rank {r} missing: {}", e.msg);
        }
        assert!(took < TIMEOUT + Duration::from_secs(2), "rank {rank}: took {took:?}");
        eprintln!("#: rank {rank} ({var}): {} after {took:?}", e.msg);
        return;
    }
    let name = "ranks_with_different_algorithm_settings_fail_creation_together";
    // The case from the issue: one-shot limit 0 on one rank, 1 MiB on the other.
    job(name, "FLATSHARD_SHM_SMALL", &["0", "1048576"], "shm");
    job(name, "FLATSHARD_SHM_CHUNK", &["65536", "1048576", "65536"], "shm");
    job(name, "FLATSHARD_SHM_STREAM_MIN", &["1048576", "1048576", "4096"], "auto");
    job(name, "FLATSHARD_BUCKET_BYTES", &["1000", "2000"], "tcp");
}

/// Explicit defaults equal unset: a rank that spells the default out agrees
/// with one that leaves it unset, and the job works.
#[test]
fn default_spelled_out_agrees_with_unset() {
    if is_worker() {
        let (rank, r, _) = join_with_my_setting();
        let c = r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        let mut b: Vec<u8> = (0..1000).flat_map(|i| (i as f32).to_ne_bytes()).collect();
        c.all_reduce(&mut b, flatshard::DType::F32, flatshard::ReduceOp::Sum).unwrap();
        let got = bytes_f32(&b);
        for (i, x) in got.iter().enumerate() {
            assert_eq!(*x, i as f32 * c.size() as f32, "rank {rank} elem {i}");
        }
        return;
    }
    job("default_spelled_out_agrees_with_unset", "FLATSHARD_SHM_SMALL", &["65536", "", "64K"], "shm");
}

/// A malformed or out-of-range value on one rank (also on rank 0, which
/// serves the store): that rank gets INVALID_ARGUMENT naming the variable and
/// the value, every other rank INVALID_ARGUMENT naming that rank, all well
/// within timeout + 2 s.
#[test]
fn malformed_setting_on_one_rank_fails_every_rank() {
    if is_worker() {
        let (rank, r, took) = join_with_my_setting();
        let var = std::env::var(VAR).unwrap();
        let values: Vec<String> = std::env::var(VALUES).unwrap().split(',').map(str::to_string).collect();
        let bad = values.iter().position(|v| !v.is_empty()).unwrap();
        let e = r.err().unwrap_or_else(|| panic!("rank {rank}: creation succeeded with {var}='{}' on rank {bad}", values[bad]));
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "rank {rank}: {e}");
        assert!(e.msg.contains(&var) && e.msg.contains(&format!("'{}'", values[bad])), "rank {rank}: {}", e.msg);
        if rank != bad {
            assert!(e.msg.contains(&format!("rank {bad} refused its settings")), "rank {rank}: {}", e.msg);
        }
        assert!(took < TIMEOUT + Duration::from_secs(2), "rank {rank}: took {took:?}");
        eprintln!("#: rank {rank}: failed after {took:?}: {}", e.msg);
        return;
    }
    let name = "malformed_setting_on_one_rank_fails_every_rank";
    job(name, "FLATSHARD_SHM_SPIN_US", &["", "lots", ""], "shm");
    job(name, "FLATSHARD_HOST_CACHE_BYTES", &["lots", ""], "tcp");
    job(name, "FLATSHARD_SHM_CHUNK", &["", "", "1024"], "auto");
    job(name, "FLATSHARD_TCP_SOCKBUF", &["", "100"], "tcp");
    job(name, "FLATSHARD_DEBUG", &["", "loud"], "auto");
}

/// A communicator on the caller's own collectives whose creation is refused
/// (a malformed setting) never calls the caller's destroy: the context stays
/// the caller's to release (flatshard_mpi.h frees it then; a destroy call
/// as well would free it twice).
#[test]
fn refused_callback_comm_does_not_destroy_the_callers_context() {
    use flatshard::ffi::comm::flatshard_comm_from_collectives;
    use flatshard::ffi::*;
    use std::ffi::c_void;
    use std::sync::atomic::{AtomicUsize, Ordering};
    if is_worker() {
        static DESTROYED: AtomicUsize = AtomicUsize::new(0);
        unsafe extern "C" fn ar(_: *mut c_void, _: *mut c_void, _: u64, _: DtypeArg, _: ReduceOpArg) -> i32 {
            0
        }
        unsafe extern "C" fn ag(_: *mut c_void, _: *const c_void, _: *mut c_void, _: u64, _: DtypeArg) -> i32 {
            0
        }
        unsafe extern "C" fn rs(_: *mut c_void, _: *const c_void, _: *mut c_void, _: u64, _: DtypeArg, _: ReduceOpArg) -> i32 {
            0
        }
        unsafe extern "C" fn bc(_: *mut c_void, _: *mut c_void, _: u64, _: DtypeArg, _: i32) -> i32 {
            0
        }
        unsafe extern "C" fn bar(_: *mut c_void) -> i32 {
            0
        }
        unsafe extern "C" fn destroy(_: *mut c_void) {
            DESTROYED.fetch_add(1, Ordering::SeqCst);
        }
        let ops = flatshard_collectives {
            struct_size: std::mem::size_of::<flatshard_collectives>() as u32,
            ctx: std::ptr::null_mut(),
            all_reduce: Some(ar),
            all_gather: Some(ag),
            reduce_scatter: Some(rs),
            broadcast: Some(bc),
            barrier: Some(bar),
            destroy: Some(destroy),
        };
        let mut c = std::ptr::null_mut();
        // SAFETY: a valid table and out-param.
        let st = unsafe { flatshard_comm_from_collectives(0, 1, &ops, &mut c) };
        assert_eq!(st, flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT);
        assert!(c.is_null());
        assert_eq!(DESTROYED.load(Ordering::SeqCst), 0, "destroy was called for a refused communicator");
        return;
    }
    let name = "refused_callback_comm_does_not_destroy_the_callers_context";
    let res = wait_all(spawn(name, 1, &[("FLATSHARD_SHM_CHUNK", "lots".into())]), Duration::from_secs(60));
    assert_eq!(res[0].0, Some(0), "{}", res[0].1);
    assert!(res[0].1.contains("running 1 test"), "{}", res[0].1);
}
