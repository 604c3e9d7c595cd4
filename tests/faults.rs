//! Fault injection with real processes: SIGKILL a rank at random points of a
//! collective loop, abort a stuck collective from another thread, and a rank
//! that never calls. Survivors must return promptly with PEER_LOST / TIMEOUT,
//! never hang, and keep their own data unchanged by the failed call.
//! FLATSHARD_FAULT_RUNS sets the number of random kill points (default 6;
//! scripts/reliability.sh runs 50).
mod common;
use common::*;
use flatshard::flat_param::{FlatParam, FlatParamOptions, ParamInput, UnshardOptions};
use flatshard::{Comm, CommOptions, DType, ErrorKind, ReduceOp};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
}

fn worker_comm(timeout: Duration) -> Comm {
    Comm::init_from_env(CommOptions { timeout, ..worker_options() }).unwrap()
}

/// Worker: loop on collectives until one fails; report how and when.
fn collective_loop() {
    let c = worker_comm(Duration::from_secs(30));
    let r = c.rank();
    println!("READY {r}");
    let n = 256 * 1024; // 1 MiB of f32: the ring path
    let mut buf = vec![0u8; n * 4];
    let init = f32_bytes(&(0..300_000).map(|i| (i % 97) as f32).collect::<Vec<_>>());
    let mut fp = FlatParam::new(&c, None, &[ParamInput::host(&init, DType::F32)], &FlatParamOptions::default()).unwrap();
    let mut avg = [vec![1u8; 400_000], vec![2u8; 4000]];
    let mut i = 0u64;
    loop {
        let op = i % 5;
        let shard_before = fp.shard_bytes().to_vec();
        let res = match op {
            0 => c.all_reduce(&mut buf, DType::F32, ReduceOp::Sum),
            1 => {
                let send = vec![1u8; 4096];
                let mut recv = vec![0u8; 4096 * c.size()];
                c.all_gather(&send, &mut recv, DType::U8)
            }
            2 => c.barrier(),
            3 => fp.unshard(&c, UnshardOptions { writeback: true, ..Default::default() }).and_then(|_| fp.reshard(&c)),
            _ => {
                let ts: Vec<flatshard::tensor::TensorRef> = avg.iter_mut().map(|b| flatshard::tensor::TensorRef::host(b, DType::F32)).collect();
                unsafe { flatshard::averaging::average_parameters(&c, &ts, 0) }
            }
        };
        if let Err(e) = res {
            assert!(matches!(e.kind, ErrorKind::PeerLost | ErrorKind::Timeout | ErrorKind::Aborted), "rank {r}: unexpected error kind in op {op}: {e}");
            // a failed unshard/reshard leaves this rank's shard as it was
            assert!(fp.shard_bytes() == &shard_before[..], "rank {r}: op {op} changed the shard although it failed");
            println!("FAILED_AT {} op {op} kind {:?} msg {}", now_ms(), e.kind, e.msg);
            // poisoned: later calls fail at once
            let t = Instant::now();
            let e2 = c.barrier().unwrap_err();
            assert_eq!(e2.kind, ErrorKind::Aborted, "{e2}");
            assert!(t.elapsed() < Duration::from_millis(100));
            return;
        }
        i += 1;
    }
}

#[test]
fn kill_a_rank_at_random_points() {
    if is_worker() {
        return collective_loop();
    }
    let runs: usize = std::env::var("FLATSHARD_FAULT_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(6);
    let mut seed = now_ms() as u64 | 1;
    let mut worst = 0u128;
    for run in 0..runs {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let world = 2 + (seed % 3) as usize; // 2..=4
        let victim = (seed / 7) as usize % world;
        let delay = Duration::from_millis(100 + (seed / 11) % 600);
        let transport = if run % 2 == 0 { "shm" } else { "tcp" };
        let mut kids = spawn("kill_a_rank_at_random_points", world, &[transport_env(transport)]);
        std::thread::sleep(Duration::from_millis(300) + delay);
        kids[victim].kill().unwrap(); // SIGKILL
        let killed_at = now_ms();
        let res = wait_all(kids, Duration::from_secs(20));
        for (r, (code, out)) in res.iter().enumerate() {
            if r == victim {
                continue;
            }
            assert_eq!(*code, Some(0), "run {run} ({transport}): survivor rank {r} (world {world}, victim {victim}) failed:\n{out}");
            let at: u128 = out
                .lines()
                .find_map(|l| l.strip_prefix("FAILED_AT ").and_then(|s| s.split_whitespace().next()).and_then(|v| v.parse().ok()))
                .unwrap_or_else(|| panic!("run {run}: rank {r} never reported the failure:\n{out}"));
            let lag = at.saturating_sub(killed_at);
            worst = worst.max(lag);
            assert!(lag < 2000, "run {run} ({transport}): rank {r} noticed the death of rank {victim} after {lag} ms:\n{out}");
        }
    }
    println!("fault injection: {runs} SIGKILLs (shm and tcp alternating, worlds 2-4, mid collective / unshard / averaging): every survivor returned an error, shards intact; worst detection {worst} ms");
}

#[test]
fn abort_from_another_thread_unblocks_a_stuck_collective() {
    if is_worker() {
        let c = worker_comm(Duration::from_secs(30));
        if c.rank() == 1 {
            // never joins the collective; waits to be told the test is over
            std::thread::sleep(Duration::from_secs(3));
            return;
        }
        let c = std::sync::Arc::new(c);
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let at = Instant::now();
            c2.abort();
            at
        });
        let mut buf = vec![0u8; 1 << 20];
        let e = c.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap_err();
        let aborted_at = t.join().unwrap();
        let lag = aborted_at.elapsed();
        assert_eq!(e.kind, ErrorKind::Aborted, "{e}");
        assert!(lag < Duration::from_secs(1), "abort took {lag:?} to unblock");
        assert_eq!(buf, vec![0u8; 1 << 20], "the failed call changed the buffer");
        assert_eq!(c.barrier().unwrap_err().kind, ErrorKind::Aborted);
        return;
    }
    let res = wait_all(spawn("abort_from_another_thread_unblocks_a_stuck_collective", 2, &[]), Duration::from_secs(30));
    assert_eq!(res[0].0, Some(0), "{}", res[0].1);
}

#[test]
fn a_rank_that_never_calls_times_out() {
    if is_worker() {
        let c = worker_comm(Duration::from_millis(2000));
        if c.rank() == 2 {
            std::thread::sleep(Duration::from_secs(3));
            return;
        }
        let t = Instant::now();
        let mut buf = vec![7u8; 64];
        let e = c.all_reduce(&mut buf, DType::U8, ReduceOp::Sum).unwrap_err();
        let took = t.elapsed();
        assert!(matches!(e.kind, ErrorKind::Timeout | ErrorKind::PeerLost), "{e}");
        assert!(took < Duration::from_millis(2000 + 2000), "took {took:?}");
        return;
    }
    let res = wait_all(spawn("a_rank_that_never_calls_times_out", 3, &[]), Duration::from_secs(30));
    for (r, (code, out)) in res.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {r}:\n{out}");
    }
}

#[test]
fn kill_during_rendezvous() {
    if is_worker() {
        // the victim never gets here: it is killed while the others wait for it
        let r = env_rank();
        let res = Comm::init_from_env(CommOptions { timeout: Duration::from_secs(3), ..worker_options() });
        if r != 1 {
            let e = res.err().expect("a job with a dead rank formed");
            assert!(matches!(e.kind, ErrorKind::Timeout | ErrorKind::PeerLost), "{e}");
            println!("REND_FAILED {:?}", e.kind);
        }
        return;
    }
    for delay_ms in [0u64, 30, 120] {
        let port = free_port();
        // rank 1 is started and killed at once, before or during its handshake
        let mut victim = spawn_on_port_ranks("kill_during_rendezvous", 3, port, &[], &[1]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        victim[0].kill().unwrap();
        let _ = victim[0].wait();
        let t = Instant::now();
        let res = wait_all(spawn_on_port_ranks("kill_during_rendezvous", 3, port, &[], &[0, 2]), Duration::from_secs(30));
        for (code, out) in &res {
            assert_eq!(*code, Some(0), "delay {delay_ms} ms:\n{out}");
            assert!(out.contains("REND_FAILED"), "{out}");
        }
        assert!(t.elapsed() < Duration::from_secs(3 + 2 + 3), "survivors took {:?}", t.elapsed());
    }
}

/// Handles carry a tag checked on every call and cleared on free: a freed
/// flat param or a communicator passed where the other is expected is
/// INVALID_ARGUMENT, and a double free is ignored. (Reading a freed block is
/// still undefined behaviour in C terms; with glibc's allocator the tag is gone.)
#[test]
fn stale_and_foreign_handles_are_refused() {
    use flatshard::ffi::comm::*;
    use flatshard::ffi::flat_param::*;
    use flatshard::ffi::*;
    unsafe {
        let mut c = std::ptr::null_mut();
        assert_eq!(flatshard_comm_init(std::ptr::null(), 0, 0, 1, std::ptr::null(), &mut c), flatshard_status::FLATSHARD_OK);
        // a comm handle where a flat param is expected
        let st = flatshard_flat_param_reshard(c as *mut flatshard_flat_param);
        assert_eq!(st, flatshard_status::FLATSHARD_ERR_INVALID_ARGUMENT);
        let msg = std::ffi::CStr::from_ptr(flatshard_last_error()).to_string_lossy().into_owned();
        assert!(msg.contains("not a live flatshard_flat_param"), "{msg}");
        flatshard_comm_free(c);
        flatshard_comm_free(c); // double free: ignored, no crash
    }
}
