//! Shared-memory transport specifics: automatic choice, dead peers, no
//! leftovers in /dev/shm, and two jobs on one host at once.
mod common;
use common::*;
use flatshard::{Comm, DType, ErrorKind, ReduceOp};
use std::time::{Duration, Instant};

/// Every worker prints its job id so the parent can look for leftovers.
fn announce(c: &Comm) {
    println!("JOBID={}", c.job_ctx().unwrap().job_id);
}

/// No /dev/shm entry of the jobs named in the outputs remains.
fn assert_no_leftovers(outs: &[(Option<i32>, String)]) {
    let jobs: Vec<String> =
        outs.iter().flat_map(|(_, o)| o.lines().filter_map(|l| l.split("JOBID=").nth(1)).map(|j| j.trim().to_string()).collect::<Vec<_>>()).collect();
    assert!(!jobs.is_empty(), "no worker announced its job id: {outs:?}");
    let left: Vec<String> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("flatshard-") && jobs.iter().any(|j| n.contains(j.as_str())))
        .collect();
    assert!(left.is_empty(), "left in /dev/shm: {left:?}");
}

#[test]
fn auto_picks_shm_on_one_host() {
    ranks("auto_picks_shm_on_one_host", 2, &[transport_env("auto")], |c| {
        assert_eq!(c.transport_name(), "shm");
        let sub = c.new_subgroups(1).unwrap();
        assert_eq!(sub.size(), 1);
        let mut b = f32_bytes(&[1.0, 2.0]);
        c.all_reduce(&mut b, DType::F32, ReduceOp::Sum).unwrap();
        assert_eq!(bytes_f32(&b), vec![2.0, 4.0]);
    });
}

#[test]
fn peer_killed_mid_collective_is_peer_lost() {
    let name = "peer_killed_mid_collective_is_peer_lost";
    if is_worker() {
        let c = Comm::init_from_env(worker_options()).unwrap();
        announce(&c);
        assert_eq!(c.transport_name(), "shm");
        let r = c.rank();
        let mut buf = f32_bytes(&vec![1.0; 1 << 20]);
        c.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap();
        if r == 2 {
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                // SAFETY: kills this test process on purpose.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            });
        }
        let start = Instant::now();
        let e = loop {
            if let Err(e) = c.all_reduce(&mut buf, DType::F32, ReduceOp::Sum) {
                break e;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "rank 2 never died?");
        };
        let took = start.elapsed();
        assert_eq!(e.kind, ErrorKind::PeerLost, "{e}");
        assert!(e.msg.contains("rank 2"), "error should name rank 2: {e}");
        assert!(took < Duration::from_secs(5), "PEER_LOST took {took:?}");
        // poisoned now
        assert_eq!(c.barrier().unwrap_err().kind, ErrorKind::Aborted);
        println!("rank {r}: got {e} after {took:?}");
        return;
    }
    let outs = wait_all(spawn(name, 3, &[transport_env("shm")]), Duration::from_secs(60));
    for (r, (code, out)) in outs.iter().enumerate().take(2) {
        assert_eq!(*code, Some(0), "rank {r} failed:\n{out}");
    }
    assert_ne!(outs[2].0, Some(0), "rank 2 should have been killed:\n{}", outs[2].1);
    assert_no_leftovers(&outs);
}

#[test]
fn abort_wakes_a_waiting_collective() {
    ranks("abort_wakes_a_waiting_collective", 2, &[transport_env("shm")], |c| {
        let c = std::sync::Arc::new(c);
        if c.rank() == 0 {
            let c2 = c.clone();
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                c2.abort();
            });
            let start = Instant::now();
            // rank 1 never joins this barrier
            let e = c.barrier().unwrap_err();
            assert_eq!(e.kind, ErrorKind::Aborted, "{e}");
            assert!(start.elapsed() < Duration::from_secs(5));
            t.join().unwrap();
        } else {
            // rank 0 aborts (its first barrier may still meet ours): a
            // later barrier sees it leave
            std::thread::sleep(Duration::from_millis(1000));
            let start = Instant::now();
            let e = loop {
                if let Err(e) = c.barrier() {
                    break e;
                }
                assert!(start.elapsed() < Duration::from_secs(5), "barriers keep succeeding without rank 0");
            };
            assert_eq!(e.kind, ErrorKind::PeerLost, "{e}");
            assert!(e.msg.contains("rank 0"), "{e}");
        }
    });
}

fn two_jobs_body(c: Comm) {
    announce(&c);
    assert_eq!(c.transport_name(), "shm");
    let r = c.rank();
    let salt: f32 = std::env::var("JOB_SALT").unwrap().parse().unwrap();
    for n in [100usize, 500_000] {
        for _ in 0..5 {
            let mut b = f32_bytes(&vec![salt + r as f32; n]);
            c.all_reduce(&mut b, DType::F32, ReduceOp::Sum).unwrap();
            assert!(bytes_f32(&b).iter().all(|x| *x == 2.0 * salt + 1.0), "job {salt} saw foreign data");
        }
    }
    c.barrier().unwrap();
}

#[test]
fn two_jobs_at_once_do_not_collide() {
    let name = "two_jobs_at_once_do_not_collide";
    if is_worker() {
        let c = Comm::init_from_env(worker_options()).unwrap();
        two_jobs_body(c);
        return;
    }
    let a = spawn(name, 2, &[transport_env("shm"), ("JOB_SALT", "10".into())]);
    let b = spawn(name, 2, &[transport_env("shm"), ("JOB_SALT", "1000".into())]);
    let (oa, ob) = (wait_all(a, Duration::from_secs(60)), wait_all(b, Duration::from_secs(60)));
    for (code, out) in oa.iter().chain(ob.iter()) {
        assert_eq!(*code, Some(0), "{out}");
    }
    assert_no_leftovers(&oa);
    assert_no_leftovers(&ob);
}

#[test]
fn no_leftovers_after_a_normal_run() {
    let name = "no_leftovers_after_a_normal_run";
    if is_worker() {
        let c = Comm::init_from_env(worker_options()).unwrap();
        announce(&c);
        let sub = c.new_subgroups(2).unwrap();
        let mut b = vec![0u8; 4096];
        sub.all_reduce(&mut b, DType::F32, ReduceOp::Sum).unwrap();
        c.barrier().unwrap();
        return;
    }
    let outs = wait_all(spawn(name, 4, &[transport_env("shm")]), Duration::from_secs(60));
    for (code, out) in &outs {
        assert_eq!(*code, Some(0), "{out}");
    }
    assert_no_leftovers(&outs);
}

#[test]
fn a_missing_peer_is_a_timeout() {
    let name = "a_missing_peer_is_a_timeout";
    if is_worker() {
        let opts = flatshard::CommOptions { timeout: Duration::from_millis(1000), ..worker_options() };
        let c = Comm::init_from_env(opts).unwrap();
        assert_eq!(c.transport_name(), "shm");
        if c.rank() == 0 {
            let start = Instant::now();
            let mut b = vec![0u8; 4 << 20];
            let e = c.all_reduce(&mut b, DType::F32, ReduceOp::Sum).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Timeout, "{e}");
            let took = start.elapsed();
            assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "timeout after {took:?}");
        } else {
            // alive but never joins the collective
            std::thread::sleep(Duration::from_millis(2500));
        }
        return;
    }
    let outs = wait_all(spawn(name, 2, &[transport_env("shm")]), Duration::from_secs(60));
    for (code, out) in &outs {
        assert_eq!(*code, Some(0), "{out}");
    }
}
