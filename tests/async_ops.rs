//! API §7 (asynchronous operations) through the C ABI, with real processes
//! over shared memory and TCP: each rule of §7, prefetch training equal bit
//! for bit to blocking training, a peer killed with work queued, abort from
//! another thread, mismatched sequences, comm_free draining, a user-callback
//! communicator that never runs two callbacks at once, an idle progress
//! thread that uses no CPU, and a 1,000-step prefetch soak.
mod common;
use common::*;
use flatshard::ffi::comm::*;
use flatshard::ffi::flat_param::*;
use flatshard::ffi::types::*;
use flatshard::ffi::work::*;
use flatshard::ffi::{flatshard_last_error, flatshard_status};
use std::ffi::{c_void, CStr};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

use flatshard_status::*;

const F32: DtypeArg = DtypeArg(0);
const I32: DtypeArg = DtypeArg(4);
const SUM: ReduceOpArg = ReduceOpArg(0);

fn last_error() -> String {
    unsafe { CStr::from_ptr(flatshard_last_error()) }.to_string_lossy().into_owned()
}

fn ok(s: flatshard_status, what: &str) {
    assert_eq!(s, FLATSHARD_OK, "{what}: {}", last_error());
}

/// A communicator from the worker's environment through the C API.
fn comm(timeout_ms: u32) -> *mut flatshard_comm {
    let mut o: flatshard_comm_options = unsafe { std::mem::zeroed() };
    unsafe { flatshard_comm_options_init(&mut o) };
    o.timeout_ms = timeout_ms;
    o.transport = TransportArg(match std::env::var("FLATSHARD_TEST_TRANSPORT").as_deref() {
        Ok("tcp") => 1,
        Ok("shm") => 2,
        _ => 0,
    });
    let mut c = null_mut();
    ok(unsafe { flatshard_comm_init_from_env(&o, &mut c) }, "comm init");
    c
}

fn rank_of(c: *mut flatshard_comm) -> usize {
    unsafe { flatshard_comm_rank(c) as usize }
}
fn size_of(c: *mut flatshard_comm) -> usize {
    unsafe { flatshard_comm_size(c) as usize }
}

fn cpu(data: &mut [f32]) -> flatshard_tensor {
    flatshard_tensor {
        data: data.as_mut_ptr() as *mut c_void,
        grad: null_mut(),
        numel: data.len() as u64,
        dtype: F32,
        device: flatshard_device { r#type: DeviceTypeArg(0), index: 0 },
    }
}

fn all_reduce_async(c: *mut flatshard_comm, buf: &mut [f32]) -> *mut flatshard_work {
    let mut w = null_mut();
    ok(unsafe { flatshard_all_reduce_async(c, buf.as_mut_ptr() as *mut c_void, buf.len() as u64, F32, SUM, &mut w) }, "all_reduce_async");
    w
}

fn wait(w: *mut flatshard_work) -> flatshard_status {
    unsafe { flatshard_work_wait(w) }
}

fn test_done(w: *mut flatshard_work) -> (flatshard_status, i32) {
    let mut done = -1;
    let s = unsafe { flatshard_work_test(w, &mut done) };
    (s, done)
}

fn both(name: &str, world: usize, body: impl Fn()) {
    if is_worker() {
        return body();
    }
    for t in ["shm", "tcp"] {
        ranks(name, world, &[transport_env(t)], |_| {});
    }
}

/// CPU ticks (utime + stime) of this process's thread named `prefix*`.
fn thread_ticks(prefix: &str) -> Option<u64> {
    for e in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with(prefix) {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            return Some(f[11].parse::<u64>().ok()? + f[12].parse::<u64>().ok()?);
        }
    }
    None
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Collectives: results equal the blocking ones; call errors come from the
/// call with `*out` untouched; wait twice gives the same status; test never
/// blocks; a blocking call issued behind queued work runs after it; the idle
/// progress thread uses no CPU.
#[test]
fn async_collectives() {
    if !is_worker() {
        return both("async_collectives", 3, || {});
    }
    let c = comm(60_000);
    let (r, n) = (rank_of(c), size_of(c));
    unsafe {
        // argument errors from the call, *out not written
        let sentinel = 0x5a5a as *mut flatshard_work;
        let mut w = sentinel;
        assert_eq!(flatshard_all_reduce_async(c, null_mut(), 4, F32, SUM, &mut w), FLATSHARD_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("buf"), "{}", last_error());
        assert_eq!(w, sentinel);
        let mut b = [1f32; 4];
        assert_eq!(flatshard_broadcast_async(c, b.as_mut_ptr() as *mut c_void, 4, F32, n as i32, &mut w), FLATSHARD_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("root"), "{}", last_error());
        assert_eq!(flatshard_all_reduce_async(c, b.as_mut_ptr() as *mut c_void, 4, I32, ReduceOpArg(1), &mut w), FLATSHARD_ERR_INVALID_ARGUMENT);
        assert_eq!(flatshard_all_reduce_async(c, b.as_mut_ptr() as *mut c_void, 4, DtypeArg(99), SUM, &mut w), FLATSHARD_ERR_INVALID_ARGUMENT);
        assert_eq!(w, sentinel);
        assert_eq!(flatshard_all_reduce_async(c, b.as_mut_ptr() as *mut c_void, 4, F32, SUM, null_mut()), FLATSHARD_ERR_INVALID_ARGUMENT);
        assert_eq!(flatshard_work_wait(null_mut()), FLATSHARD_ERR_INVALID_ARGUMENT);
        flatshard_work_free(null_mut());

        // several kinds queued at once, then checked against the blocking calls
        let count = 1000usize;
        let mut ar: Vec<f32> = (0..count).map(|i| (i * (r + 1)) as f32).collect();
        let send: Vec<f32> = (0..count).map(|i| (i + 7 * r) as f32).collect();
        let mut ag = vec![0f32; count * n];
        let rs_send: Vec<f32> = (0..count * n).map(|i| (i % 13 + r) as f32).collect();
        let mut rs = vec![0f32; count];
        let mut bc: Vec<f32> = if r == 1 { (0..count).map(|i| i as f32 * 0.5).collect() } else { vec![0.0; count] };
        let w1 = all_reduce_async(c, &mut ar);
        let mut w2 = null_mut();
        ok(flatshard_all_gather_async(c, send.as_ptr() as *const c_void, ag.as_mut_ptr() as *mut c_void, count as u64, F32, &mut w2), "ag");
        let mut w3 = null_mut();
        ok(flatshard_reduce_scatter_async(c, rs_send.as_ptr() as *const c_void, rs.as_mut_ptr() as *mut c_void, count as u64, F32, SUM, &mut w3), "rs");
        let mut w4 = null_mut();
        ok(flatshard_broadcast_async(c, bc.as_mut_ptr() as *mut c_void, count as u64, F32, 1, &mut w4), "bc");
        // test never blocks and reports done 0 or 1
        let t = Instant::now();
        let (s, d) = test_done(w4);
        assert!(t.elapsed() < Duration::from_millis(50));
        assert_eq!(s, FLATSHARD_OK);
        assert!(d == 0 || d == 1);
        // a blocking call behind the queue runs after all of it
        let mut x = [r as f32];
        ok(flatshard_all_reduce(c, x.as_mut_ptr() as *mut c_void, 1, F32, SUM), "blocking all_reduce");
        for w in [w1, w2, w3, w4] {
            assert_eq!(test_done(w), (FLATSHARD_OK, 1), "work still in flight after a later blocking call returned");
        }
        for w in [w1, w2, w3, w4] {
            ok(wait(w), "wait");
            ok(wait(w), "second wait");
            flatshard_work_free(w);
        }
        assert_eq!(x[0], (0..n).sum::<usize>() as f32);
        let mut want_ar: Vec<f32> = (0..count).map(|i| (i * (r + 1)) as f32).collect();
        ok(flatshard_all_reduce(c, want_ar.as_mut_ptr() as *mut c_void, count as u64, F32, SUM), "ar");
        assert_eq!(ar, want_ar);
        for q in 0..n {
            for i in 0..count {
                assert_eq!(ag[q * count + i], (i + 7 * q) as f32);
            }
        }
        for (i, v) in rs.iter().enumerate() {
            let g = r * count + i;
            assert_eq!(*v, (0..n).map(|q| (g % 13 + q) as f32).sum::<f32>());
        }
        assert_eq!(bc, (0..count).map(|i| i as f32 * 0.5).collect::<Vec<_>>());
        // count 0 is legal and still synchronises
        let mut w0 = null_mut();
        ok(flatshard_all_reduce_async(c, null_mut(), 0, F32, SUM, &mut w0), "count 0");
        ok(wait(w0), "count 0 wait");
        flatshard_work_free(w0);

        // the idle progress thread uses no CPU (no spinning)
        std::thread::sleep(Duration::from_millis(100));
        let before = thread_ticks("flatshard-r").expect("a progress thread named flatshard-r<rank>");
        std::thread::sleep(Duration::from_millis(1500));
        let after = thread_ticks("flatshard-r").unwrap();
        assert!(after - before <= 1, "rank {r}: the idle progress thread used {} ticks in 1.5 s", after - before);
        println!("#: rank {r}: idle progress thread CPU over 1.5 s: {} ticks", after - before);
        flatshard_comm_free(c);
    }
}

/// Prefetch training (unshard_async of the next layer, reduce_grads_async
/// overlapped with the rest of backward) equals blocking training bit for bit.
#[test]
fn prefetch_training_matches_blocking() {
    if !is_worker() {
        return both("prefetch_training_matches_blocking", 3, || {});
    }
    let c = comm(60_000);
    let r = rank_of(c);
    let sizes = [1000usize, 37, 4096, 513];
    let run = |prefetch: bool| -> Vec<Vec<f32>> { unsafe { train(c, &sizes, r, prefetch, 5) } };
    let a = run(false);
    let b = run(true);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()), "rank {r}: layer {i} differs between blocking and prefetch training");
    }
    unsafe { flatshard_comm_free(c) };
}

/// A tiny model: y = Σ w·x per layer; the "backward" writes grad = f(step, w).
unsafe fn train(c: *mut flatshard_comm, sizes: &[usize], r: usize, prefetch: bool, steps: usize) -> Vec<Vec<f32>> {
    let mut fps: Vec<*mut flatshard_flat_param> = Vec::new();
    for (l, &n) in sizes.iter().enumerate() {
        let mut w: Vec<f32> = (0..n).map(|i| ((i * 31 + l * 7) % 101) as f32 / 101.0).collect();
        let mut fp = null_mut();
        ok(flatshard_flat_param_new(c, &cpu(&mut w), 1, std::ptr::null(), &mut fp), "fp new");
        fps.push(fp);
    }
    let fill = |fp: *mut flatshard_flat_param, step: usize, l: usize| {
        let mut t: flatshard_tensor = std::mem::zeroed();
        ok(flatshard_flat_param_view(fp, 0, &mut t), "view");
        let w = std::slice::from_raw_parts(t.data as *const f32, t.numel as usize);
        let g = std::slice::from_raw_parts_mut(t.grad as *mut f32, t.numel as usize);
        for (i, gi) in g.iter_mut().enumerate() {
            *gi = w[i] * 0.5 + ((i + step + l + r) % 7) as f32 * 0.01;
        }
    };
    let n = fps.len();
    let mut works: Vec<*mut flatshard_work> = Vec::new();
    for step in 0..steps {
        // forward
        if prefetch {
            let mut w = null_mut();
            ok(flatshard_flat_param_unshard_async(fps[0], std::ptr::null(), &mut w), "unshard_async");
            works.push(w);
        }
        for l in 0..n {
            if prefetch && l + 1 < n {
                let mut w = null_mut();
                ok(flatshard_flat_param_unshard_async(fps[l + 1], std::ptr::null(), &mut w), "prefetch");
                works.push(w);
            } else if !prefetch {
                ok(flatshard_flat_param_unshard(fps[l], std::ptr::null()), "unshard");
            }
            let mut t: flatshard_tensor = std::mem::zeroed();
            ok(flatshard_flat_param_view(fps[l], 0, &mut t), "view");
            if l + 1 < n {
                ok(flatshard_flat_param_reshard(fps[l]), "reshard");
            }
        }
        // backward: last layer still unsharded
        for l in (0..n).rev() {
            if prefetch && l > 0 {
                let mut w = null_mut();
                ok(flatshard_flat_param_unshard_async(fps[l - 1], std::ptr::null(), &mut w), "prefetch back");
                works.push(w);
            } else if !prefetch && l + 1 < n {
                ok(flatshard_flat_param_unshard(fps[l], std::ptr::null()), "unshard back");
            }
            fill(fps[l], step, l);
            if prefetch {
                let mut w = null_mut();
                ok(flatshard_flat_param_reduce_grads_async(fps[l], &mut w), "reduce_grads_async");
                works.push(w);
                if l + 1 < n {
                    ok(flatshard_flat_param_reshard(fps[l + 1]), "lagged reshard");
                    // waits for its reduce
                }
            } else {
                ok(flatshard_flat_param_reduce_grads(fps[l]), "reduce_grads");
                ok(flatshard_flat_param_reshard(fps[l]), "reshard");
            }
        }
        if prefetch {
            ok(flatshard_flat_param_reshard(fps[0]), "last reshard");
        }
        // optimizer
        for &fp in &fps {
            let mut s: flatshard_tensor = std::mem::zeroed();
            ok(flatshard_flat_param_shard(fp, &mut s), "shard");
            let d = std::slice::from_raw_parts_mut(s.data as *mut f32, s.numel as usize);
            let g = std::slice::from_raw_parts(s.grad as *const f32, s.numel as usize);
            for (x, y) in d.iter_mut().zip(g) {
                *x -= 0.1 * y;
            }
            ok(flatshard_flat_param_zero_grad(fp), "zero_grad");
        }
        for w in works.drain(..) {
            ok(wait(w), "work");
            flatshard_work_free(w);
        }
    }
    let mut out = Vec::new();
    for fp in fps {
        let mut s: flatshard_tensor = std::mem::zeroed();
        ok(flatshard_flat_param_shard(fp, &mut s), "shard");
        out.push(std::slice::from_raw_parts(s.data as *const f32, s.numel as usize).to_vec());
        flatshard_flat_param_free(fp);
    }
    out
}

/// Flat-param rules: state errors from the call; view/reshard/shard wait;
/// a failed unshard_async reports once and leaves the flat param sharded
/// with its shard intact; work handles outlive flat param and comm.
#[test]
fn flat_param_async_rules() {
    if !is_worker() {
        return both("flat_param_async_rules", 2, || {});
    }
    let c = comm(60_000);
    let r = rank_of(c);
    unsafe {
        let mut w0: Vec<f32> = (0..777).map(|i| i as f32).collect();
        let mut w1: Vec<f32> = (0..777).map(|i| -(i as f32)).collect();
        let (mut a, mut b) = (null_mut(), null_mut());
        ok(flatshard_flat_param_new(c, &cpu(&mut w0), 1, std::ptr::null(), &mut a), "a");
        ok(flatshard_flat_param_new(c, &cpu(&mut w1), 1, std::ptr::null(), &mut b), "b");
        let mut sa: flatshard_tensor = std::mem::zeroed();
        ok(flatshard_flat_param_shard(a, &mut sa), "shard");
        let shard_a = std::slice::from_raw_parts(sa.data as *const f32, sa.numel as usize).to_vec();

        // reduce_grads_async while sharded: INVALID_STATE from the call
        let sentinel = 0x77 as *mut flatshard_work;
        let mut w = sentinel;
        assert_eq!(flatshard_flat_param_reduce_grads_async(a, &mut w), FLATSHARD_ERR_INVALID_STATE);
        assert_eq!(w, sentinel);
        // unshard_async, then the flat param counts as unsharded
        ok(flatshard_flat_param_unshard_async(a, std::ptr::null(), &mut w), "unshard_async");
        let mut w2 = sentinel;
        assert_eq!(flatshard_flat_param_unshard_async(a, std::ptr::null(), &mut w2), FLATSHARD_ERR_INVALID_STATE);
        assert_eq!(flatshard_flat_param_unshard(a, std::ptr::null()), FLATSHARD_ERR_INVALID_STATE);
        assert_eq!(w2, sentinel);
        let mut t: flatshard_tensor = std::mem::zeroed();
        ok(flatshard_flat_param_view(a, 0, &mut t), "view waits"); // waits for the gather
        let full = std::slice::from_raw_parts(t.data as *const f32, 777);
        assert!(full.iter().enumerate().all(|(i, v)| *v == i as f32));
        ok(wait(w), "wait");
        flatshard_work_free(w);
        // reduce_grads_async; shard() waits for it; the grad is the mean
        std::slice::from_raw_parts_mut(t.grad as *mut f32, 777).iter_mut().for_each(|g| *g = (r + 1) as f32);
        ok(flatshard_flat_param_reduce_grads_async(a, &mut w), "reduce_grads_async");
        ok(flatshard_flat_param_shard(a, &mut sa), "shard waits");
        let g = std::slice::from_raw_parts(sa.grad as *const f32, sa.numel as usize);
        let real = (777usize.saturating_sub(r * sa.numel as usize)).min(sa.numel as usize);
        assert!(g[..real].iter().all(|v| *v == 1.5), "rank {r}: mean grad {:?}", &g[..4]);
        ok(flatshard_flat_param_reshard(a), "reshard");
        ok(wait(w), "wait reduce");
        flatshard_work_free(w);

        // mismatched sequences: rank 0 unshards a, rank 1 unshards b (same shape)
        let mine = if r == 0 { a } else { b };
        ok(flatshard_flat_param_unshard_async(mine, std::ptr::null(), &mut w), "mismatched unshard_async");
        assert_eq!(wait(w), FLATSHARD_ERR_MISMATCH, "different flat params must be MISMATCH");
        assert!(last_error().contains("flat param (creation order)"), "{}", last_error());
        assert_eq!(wait(w), FLATSHARD_ERR_MISMATCH, "waiting twice returns the same status");
        flatshard_work_free(w);
        // ...the flat param is sharded again with its shard intact
        assert_eq!(flatshard_flat_param_view(mine, 0, &mut t), FLATSHARD_ERR_INVALID_STATE);
        ok(flatshard_flat_param_shard(a, &mut sa), "shard");
        assert_eq!(std::slice::from_raw_parts(sa.data as *const f32, sa.numel as usize), &shard_a[..]);
        // mismatch that nobody waited for: the first call that waits returns it
        let other = if r == 0 { b } else { a };
        ok(flatshard_flat_param_unshard_async(other, std::ptr::null(), &mut w), "unshard_async 2");
        flatshard_work_free(w); // waits, does not report
        assert_eq!(flatshard_flat_param_view(other, 0, &mut t), FLATSHARD_ERR_MISMATCH);
        assert_eq!(flatshard_flat_param_view(other, 0, &mut t), FLATSHARD_ERR_INVALID_STATE);
        // a failed reduce_grads_async leaves the shard gradient (and the full
        // gradient) as they were: rank 0 reduces a, rank 1 reduces b
        let (mut wa, mut wb) = (null_mut(), null_mut());
        ok(flatshard_flat_param_unshard_async(a, std::ptr::null(), &mut wa), "unshard a");
        ok(flatshard_flat_param_unshard_async(b, std::ptr::null(), &mut wb), "unshard b");
        let mut ga: flatshard_tensor = std::mem::zeroed();
        ok(flatshard_flat_param_view(mine, 0, &mut ga), "view");
        std::slice::from_raw_parts_mut(ga.grad as *mut f32, 777).iter_mut().enumerate().for_each(|(i, g)| *g = i as f32);
        ok(flatshard_flat_param_shard(mine, &mut sa), "shard");
        // (b has no shard gradient yet: it must still have none afterwards)
        let read_grad = |t: &flatshard_tensor| (!t.grad.is_null()).then(|| std::slice::from_raw_parts(t.grad as *const f32, t.numel as usize).to_vec());
        let grad_before = read_grad(&sa);
        ok(flatshard_flat_param_reduce_grads_async(mine, &mut w), "mismatched reduce_grads_async");
        assert_eq!(wait(w), FLATSHARD_ERR_MISMATCH, "{}", last_error());
        flatshard_work_free(w);
        ok(flatshard_flat_param_shard(mine, &mut sa), "shard after failed reduce");
        assert_eq!(read_grad(&sa), grad_before, "rank {r}: a failed reduce changed the shard grad");
        ok(flatshard_flat_param_view(mine, 0, &mut ga), "view after failed reduce");
        assert!(std::slice::from_raw_parts(ga.grad as *const f32, 777).iter().enumerate().all(|(i, g)| *g == i as f32), "full grad changed");
        for (fp, wk) in [(a, wa), (b, wb)] {
            ok(wait(wk), "unshard work");
            flatshard_work_free(wk);
            ok(flatshard_flat_param_reshard(fp), "reshard");
        }
        // the communicator stays usable after MISMATCH
        let mut x = [1f32];
        ok(flatshard_all_reduce(c, x.as_mut_ptr() as *mut c_void, 1, F32, SUM), "usable after mismatch");
        assert_eq!(x[0], 2.0);

        // work handles outlive their flat param and communicator
        ok(flatshard_flat_param_unshard_async(a, std::ptr::null(), &mut w), "unshard_async 3");
        let mut buf = [r as f32; 64];
        let wc = all_reduce_async(c, &mut buf);
        flatshard_flat_param_free(a); // waits for its work
        flatshard_flat_param_free(b);
        flatshard_comm_free(c); // drains
        ok(wait(w), "work after its flat param was freed");
        ok(wait(wc), "work after its comm was freed");
        assert_eq!(buf[0], 1.0);
        flatshard_work_free(w);
        flatshard_work_free(wc);
    }
}

/// Different sequences of collectives across ranks: MISMATCH on the work,
/// never a hang or wrong data; the communicator stays usable.
#[test]
fn mismatched_sequences() {
    if !is_worker() {
        return both("mismatched_sequences", 2, || {});
    }
    let c = comm(20_000);
    let r = rank_of(c);
    unsafe {
        let mut a = [r as f32; 8];
        let mut g = [0f32; 16];
        let w = if r == 0 {
            all_reduce_async(c, &mut a)
        } else {
            let mut w = null_mut();
            ok(flatshard_all_gather_async(c, a.as_ptr() as *const c_void, g.as_mut_ptr() as *mut c_void, 8, F32, &mut w), "ag");
            w
        };
        assert_eq!(wait(w), FLATSHARD_ERR_MISMATCH, "{}", last_error());
        assert_eq!(a, [r as f32; 8], "a failed all_reduce must not change the buffer");
        flatshard_work_free(w);
        // different counts
        let mut b = vec![1f32; 10 + r];
        let w = all_reduce_async(c, &mut b);
        assert_eq!(wait(w), FLATSHARD_ERR_MISMATCH);
        flatshard_work_free(w);
        let mut x = [1f32; 3];
        let w = all_reduce_async(c, &mut x);
        ok(wait(w), "usable after MISMATCH");
        assert_eq!(x, [2.0; 3]);
        flatshard_work_free(w);
        flatshard_comm_free(c);
    }
}

/// The deadline of queued work counts from when it starts running.
#[test]
fn deadline_counts_from_start() {
    if !is_worker() {
        return both("deadline_counts_from_start", 2, || {});
    }
    let c = comm(3_000);
    let r = rank_of(c);
    unsafe {
        let mut bufs = [[1f32; 16]; 3];
        if r == 0 {
            // three queued ops; the peer calls each 1.5 s after the previous
            // (4.5 s in all, past one 3 s deadline counted from queueing)
            let t = Instant::now();
            let ws: Vec<_> = bufs.iter_mut().map(|b| all_reduce_async(c, b)).collect();
            for w in ws {
                ok(wait(w), "queued work timed out although each op ran within its deadline");
                flatshard_work_free(w);
            }
            assert!(t.elapsed() > Duration::from_millis(4000), "the peer's delays were not observed");
        } else {
            for b in bufs.iter_mut() {
                std::thread::sleep(Duration::from_millis(1500));
                ok(flatshard_all_reduce(c, b.as_mut_ptr() as *mut c_void, 16, F32, SUM), "blocking");
            }
        }
        assert!(bufs.iter().all(|b| *b == [2f32; 16]));
        flatshard_comm_free(c);
    }
}

/// A peer killed with work queued: the survivors' waits return PEER_LOST or
/// TIMEOUT within timeout + 2 s, and the work behind fails with ABORTED.
#[test]
fn peer_killed_with_work_queued() {
    if is_worker() {
        let timeout = 3_000;
        let c = comm(timeout);
        let r = rank_of(c);
        let mut x = [1f32; 1024];
        ok(unsafe { flatshard_all_reduce(c, x.as_mut_ptr() as *mut c_void, 1024, F32, SUM) }, "warm-up");
        if r == 2 {
            std::thread::sleep(Duration::from_millis(200));
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        let mut bufs = vec![vec![1f32; 256 * 1024]; 4];
        let t = Instant::now();
        let ws: Vec<_> = bufs.iter_mut().map(|b| all_reduce_async(c, b)).collect();
        let mut statuses = Vec::new();
        for w in ws {
            statuses.push(wait(w));
            unsafe { flatshard_work_free(w) };
        }
        let took = t.elapsed();
        assert!(matches!(statuses[0], FLATSHARD_ERR_PEER_LOST | FLATSHARD_ERR_TIMEOUT), "rank {r}: {statuses:?}");
        assert!(statuses[1..].iter().all(|s| matches!(s, FLATSHARD_ERR_ABORTED | FLATSHARD_ERR_PEER_LOST | FLATSHARD_ERR_TIMEOUT)), "{statuses:?}");
        assert!(took < Duration::from_millis(timeout as u64 + 2000), "rank {r}: waits took {took:?}");
        println!("#: rank {r}: peer killed, waits returned {statuses:?} after {took:?}");
        unsafe { flatshard_comm_free(c) };
        return;
    }
    for t in ["shm", "tcp"] {
        let res = wait_all(spawn("peer_killed_with_work_queued", 3, &[transport_env(t)]), Duration::from_secs(60));
        assert_eq!(res[2].0, None, "rank 2 should have been killed: {}", res[2].1);
        for (r, (code, out)) in res.iter().take(2).enumerate() {
            assert_eq!(*code, Some(0), "{t}: survivor {r} failed:\n{out}");
        }
    }
}

/// flatshard_comm_abort from another thread fails queued and running work
/// with ABORTED within 1 s.
#[test]
fn abort_from_another_thread() {
    if !is_worker() {
        return both("abort_from_another_thread", 2, || {});
    }
    let c = comm(60_000);
    let r = rank_of(c);
    if r == 1 {
        // never joins the queued work; waits until rank 0 has aborted
        std::thread::sleep(Duration::from_millis(2500));
        unsafe { flatshard_comm_free(c) };
        return;
    }
    let mut bufs = vec![[1f32; 64]; 3];
    let ws: Vec<_> = bufs.iter_mut().map(|b| all_reduce_async(c, b)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let cp = c as usize;
    let t = Instant::now();
    std::thread::spawn(move || ok(unsafe { flatshard_comm_abort(cp as *mut flatshard_comm) }, "abort")).join().unwrap();
    for w in ws {
        assert_eq!(wait(w), FLATSHARD_ERR_ABORTED, "{}", last_error());
        unsafe { flatshard_work_free(w) };
    }
    assert!(t.elapsed() < Duration::from_secs(1), "abort took {:?}", t.elapsed());
    // a poisoned comm refuses new work at the call
    let mut w = null_mut();
    let mut x = [0f32; 2];
    assert_eq!(unsafe { flatshard_all_reduce_async(c, x.as_mut_ptr() as *mut c_void, 2, F32, SUM, &mut w) }, FLATSHARD_ERR_ABORTED);
    assert!(w.is_null());
    unsafe { flatshard_comm_free(c) };
}

/// flatshard_comm_free waits at most the timeout for queued work, then aborts it.
#[test]
fn comm_free_drains_then_aborts() {
    if !is_worker() {
        return both("comm_free_drains_then_aborts", 2, || {});
    }
    let c = comm(1_500);
    let r = rank_of(c);
    let mut x = [1f32; 32];
    if r == 1 {
        std::thread::sleep(Duration::from_millis(4000));
        unsafe { flatshard_comm_free(c) };
        return;
    }
    // queued work whose peer never comes: the deadline (1.5 s from start)
    // fails it, comm_free returns within the timeout
    let w = all_reduce_async(c, &mut x);
    let t = Instant::now();
    unsafe { flatshard_comm_free(c) };
    assert!(t.elapsed() < Duration::from_millis(3500), "comm_free took {:?}", t.elapsed());
    let s = wait(w);
    assert!(matches!(s, FLATSHARD_ERR_TIMEOUT | FLATSHARD_ERR_ABORTED), "{s:?}");
    unsafe { flatshard_work_free(w) };
}

/// A user-callback communicator never runs two callbacks at once, whether
/// called from the caller's thread or the progress thread.
#[test]
fn callbacks_never_overlap() {
    use std::sync::atomic::{AtomicI32, Ordering};
    static INSIDE: AtomicI32 = AtomicI32::new(0);
    static OVERLAPS: AtomicI32 = AtomicI32::new(0);
    static CALLS: AtomicI32 = AtomicI32::new(0);
    fn enter() {
        if INSIDE.fetch_add(1, Ordering::SeqCst) != 0 {
            OVERLAPS.fetch_add(1, Ordering::SeqCst);
        }
        CALLS.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_micros(300));
        INSIDE.fetch_sub(1, Ordering::SeqCst);
    }
    extern "C" fn ar(_: *mut c_void, _: *mut c_void, _: u64, _: DtypeArg, _: ReduceOpArg) -> i32 {
        enter();
        0
    }
    extern "C" fn ag(_: *mut c_void, s: *const c_void, r: *mut c_void, n: u64, dt: DtypeArg) -> i32 {
        enter();
        let b = n as usize
            * if dt.0 == 6 {
                1
            } else if dt.0 == 1 || dt.0 == 5 {
                8
            } else {
                4
            };
        unsafe { std::ptr::copy(s as *const u8, r as *mut u8, b) };
        0
    }
    extern "C" fn rs(_: *mut c_void, s: *const c_void, r: *mut c_void, n: u64, _: DtypeArg, _: ReduceOpArg) -> i32 {
        enter();
        unsafe { std::ptr::copy(s as *const u8, r as *mut u8, n as usize * 4) };
        0
    }
    extern "C" fn bc(_: *mut c_void, _: *mut c_void, _: u64, _: DtypeArg, _: i32) -> i32 {
        enter();
        0
    }
    extern "C" fn bar(_: *mut c_void) -> i32 {
        enter();
        0
    }
    let ops = flatshard_collectives {
        struct_size: std::mem::size_of::<flatshard_collectives>() as u32,
        ctx: null_mut(),
        all_reduce: Some(ar),
        all_gather: Some(ag),
        reduce_scatter: Some(rs),
        broadcast: Some(bc),
        barrier: Some(bar),
        destroy: None,
    };
    let mut c = null_mut();
    ok(unsafe { flatshard_comm_from_collectives(0, 1, &ops, &mut c) }, "from_collectives");
    let mut bufs = vec![[1f32; 16]; 40];
    let mut ws = Vec::new();
    for (i, b) in bufs.iter_mut().enumerate() {
        ws.push(all_reduce_async(c, b));
        if i % 3 == 0 {
            let mut y = [0f32; 4];
            ok(unsafe { flatshard_all_reduce(c, y.as_mut_ptr() as *mut c_void, 4, F32, SUM) }, "blocking");
            ok(unsafe { flatshard_barrier(c) }, "barrier");
        }
    }
    for w in ws {
        ok(wait(w), "callback work");
        unsafe { flatshard_work_free(w) };
    }
    unsafe { flatshard_comm_free(c) };
    assert!(CALLS.load(Ordering::SeqCst) >= 40);
    assert_eq!(OVERLAPS.load(Ordering::SeqCst), 0, "two callbacks ran at once");
}

/// 1,000 prefetch steps: RSS, file descriptors and threads stay flat.
#[test]
fn prefetch_soak() {
    if !is_worker() {
        return ranks("prefetch_soak", 2, &[transport_env("shm")], |_| {});
    }
    let c = comm(60_000);
    let r = rank_of(c);
    unsafe {
        let mut fps = Vec::new();
        for l in 0..4 {
            let mut w: Vec<f32> = (0..20_000).map(|i| (i + l) as f32).collect();
            let mut fp = null_mut();
            ok(flatshard_flat_param_new(c, &cpu(&mut w), 1, std::ptr::null(), &mut fp), "fp");
            fps.push(fp);
        }
        let mut marks = Vec::new();
        for step in 0..1000 {
            let mut works = Vec::new();
            for &fp in &fps {
                let mut w = null_mut();
                ok(flatshard_flat_param_unshard_async(fp, std::ptr::null(), &mut w), "prefetch");
                works.push(w);
            }
            for &fp in &fps {
                let mut t: flatshard_tensor = std::mem::zeroed();
                ok(flatshard_flat_param_view(fp, 0, &mut t), "view");
                *(t.grad as *mut f32) = 1.0;
                let mut w = null_mut();
                ok(flatshard_flat_param_reduce_grads_async(fp, &mut w), "reduce");
                works.push(w);
            }
            for &fp in &fps {
                ok(flatshard_flat_param_reshard(fp), "reshard");
            }
            for w in works {
                ok(wait(w), "work");
                flatshard_work_free(w);
            }
            if step == 99 || step == 999 {
                marks.push((rss_kib(), fd_count(), thread_count()));
            }
        }
        let (a, b) = (marks[0], marks[1]);
        println!("#: rank {r}: soak step 100 (rss KiB, fds, threads) = {a:?}, step 1000 = {b:?}");
        assert!(b.0 <= a.0 + 2048, "rank {r}: RSS grew from {} to {} KiB", a.0, b.0);
        // (rank 0's rendezvous store may close a connection meanwhile: fewer is fine)
        assert!(b.1 <= a.1, "rank {r}: fds grew from {} to {}", a.1, b.1);
        assert!(b.2 <= a.2, "rank {r}: threads grew from {} to {}", a.2, b.2);
        for fp in fps {
            flatshard_flat_param_free(fp);
        }
        flatshard_comm_free(c);
    }
}

/// `flatshard_flat_param_unshard_forward` (an unshard for a forward pass):
/// views have grad NULL and reduce_grads is INVALID_STATE, blocking and
/// async alike; ranks that issue it where others issue unshard_async get
/// MISMATCH on the work. A training unshard_async has its zero-filled
/// gradient ready at the first view, also when the buffer is recycled from a
/// dirty one.
#[test]
fn forward_only_unshard() {
    if !is_worker() {
        return both("forward_only_unshard", 2, || {});
    }
    let c = comm(60_000);
    let r = rank_of(c);
    let n = (1 << 20) + 5; // ≥ 1 MiB: buffers cycle through the host cache
    unsafe {
        let mut w0: Vec<f32> = (0..n).map(|i| (i % 11) as f32).collect();
        let mut fp = null_mut();
        ok(flatshard_flat_param_new(c, &cpu(&mut w0), 1, std::ptr::null(), &mut fp), "new");
        let mut t: flatshard_tensor = std::mem::zeroed();
        let check_data = |t: &flatshard_tensor| {
            let d = std::slice::from_raw_parts(t.data as *const f32, n);
            assert!(d.iter().enumerate().all(|(i, v)| *v == (i % 11) as f32), "rank {r}: gathered data");
        };
        for round in 0..3 {
            // blocking forward-only
            ok(flatshard_flat_param_unshard_forward(fp), "unshard_forward");
            assert_eq!(flatshard_flat_param_unshard_forward(fp), FLATSHARD_ERR_INVALID_STATE, "does not nest");
            ok(flatshard_flat_param_view(fp, 0, &mut t), "view");
            check_data(&t);
            assert!(t.grad.is_null(), "forward-only views carry no gradient");
            assert_eq!(flatshard_flat_param_reduce_grads(fp), FLATSHARD_ERR_INVALID_STATE);
            assert!(last_error().contains("unshard_forward"), "{}", last_error());
            ok(flatshard_flat_param_reshard(fp), "reshard");
            // async forward-only
            let mut w = null_mut();
            ok(flatshard_flat_param_unshard_forward_async(fp, &mut w), "unshard_forward_async");
            ok(flatshard_flat_param_view(fp, 0, &mut t), "view");
            check_data(&t);
            assert!(t.grad.is_null());
            let mut wr = 0x77 as *mut flatshard_work;
            assert_eq!(flatshard_flat_param_reduce_grads_async(fp, &mut wr), FLATSHARD_ERR_INVALID_STATE);
            ok(wait(w), "wait");
            flatshard_work_free(w);
            ok(flatshard_flat_param_reshard(fp), "reshard");
            // async training unshard: a zero gradient at the first view
            // (dirty it afterwards, so a recycled buffer would show it)
            ok(flatshard_flat_param_unshard_async(fp, std::ptr::null(), &mut w), "unshard_async");
            ok(flatshard_flat_param_view(fp, 0, &mut t), "view");
            check_data(&t);
            let g = std::slice::from_raw_parts_mut(t.grad as *mut f32, n);
            assert!(g.iter().all(|v| *v == 0.0), "rank {r} round {round}: first view's gradient is zero");
            g.iter_mut().for_each(|v| *v = (r + 1) as f32);
            ok(flatshard_flat_param_reduce_grads_async(fp, &mut wr), "reduce_grads_async");
            ok(flatshard_flat_param_reshard(fp), "reshard waits for the reduction");
            ok(wait(w), "wait");
            ok(wait(wr), "wait");
            flatshard_work_free(w);
            flatshard_work_free(wr);
        }
        // the shard gradient: 3 rounds of the mean 1.5
        let mut s: flatshard_tensor = std::mem::zeroed();
        ok(flatshard_flat_param_shard(fp, &mut s), "shard");
        let sg = std::slice::from_raw_parts(s.grad as *const f32, s.numel as usize);
        let real = n.saturating_sub(r * s.numel as usize).min(s.numel as usize);
        assert!(sg[..real].iter().all(|v| *v == 4.5), "rank {r}: {:?}", &sg[..4]);
        // NULL arguments
        assert_eq!(flatshard_flat_param_unshard_forward(null_mut()), FLATSHARD_ERR_INVALID_ARGUMENT);
        assert_eq!(flatshard_flat_param_unshard_forward_async(fp, null_mut()), FLATSHARD_ERR_INVALID_ARGUMENT);

        // ranks that disagree (rank 0 forward-only, rank 1 training): MISMATCH on the work
        let mut w = null_mut();
        if r == 0 {
            ok(flatshard_flat_param_unshard_forward_async(fp, &mut w), "mixed");
        } else {
            ok(flatshard_flat_param_unshard_async(fp, std::ptr::null(), &mut w), "mixed");
        }
        assert_eq!(wait(w), FLATSHARD_ERR_MISMATCH, "{}", last_error());
        assert!(last_error().contains("unshard options"), "{}", last_error());
        flatshard_work_free(w);
        assert_eq!(flatshard_flat_param_view(fp, 0, &mut t), FLATSHARD_ERR_INVALID_STATE, "still sharded after the mismatch");
        flatshard_flat_param_free(fp);
        flatshard_comm_free(c);
    }
}

/// HYBRID_SHARD reduce_grads_async (4 ranks: shards over {0,1} / {2,3},
/// replicas over {0,2} / {1,3}) is queued, not run during the call: it
/// returns before the reduction (a peer of the replicate group joins late)
/// and equals the blocking reduction; a failure in one shard group fails
/// the replicate peers with MISMATCH naming the rank, well inside the
/// timeout, instead of leaving them waiting.
#[test]
fn hybrid_reduce_grads_async() {
    if !is_worker() {
        return both("hybrid_reduce_grads_async", 4, || {});
    }
    let c = comm(20_000);
    let r = rank_of(c);
    let n = 1000usize;
    unsafe {
        let (mut shard, mut rep) = (null_mut(), null_mut());
        ok(flatshard_comm_new_subgroups(c, 2, &mut shard), "subgroups");
        ok(flatshard_comm_split(c, (r % 2) as i32, r as i32, &mut rep), "split");
        let mut fo: flatshard_flat_param_options = std::mem::zeroed();
        flatshard_flat_param_options_init(&mut fo);
        fo.sharding = ShardingArg(3); // HYBRID_SHARD
        fo.replicate_comm = rep;
        let mut ws: Vec<Vec<f32>> = (0..3).map(|k| (0..n).map(|i| (i + k) as f32).collect()).collect();
        let fps: Vec<*mut flatshard_flat_param> = ws
            .iter_mut()
            .map(|w| {
                let mut fp = null_mut();
                ok(flatshard_flat_param_new(shard, &cpu(w), 1, &fo, &mut fp), "new hybrid");
                fp
            })
            .collect();
        let shard_grad = |fp| {
            let mut s: flatshard_tensor = std::mem::zeroed();
            ok(flatshard_flat_param_shard(fp, &mut s), "shard");
            std::slice::from_raw_parts(s.grad as *const f32, s.numel as usize).to_vec()
        };
        let write_grad = |fp| {
            let mut t: flatshard_tensor = std::mem::zeroed();
            ok(flatshard_flat_param_unshard(fp, std::ptr::null()), "unshard");
            ok(flatshard_flat_param_view(fp, 0, &mut t), "view");
            // mean over the 4 ranks of (i + 4 r) = i + 6
            std::slice::from_raw_parts_mut(t.grad as *mut f32, n).iter_mut().enumerate().for_each(|(i, g)| *g = (i + 4 * r) as f32);
        };
        // blocking reference on fps[0], async on fps[1]
        write_grad(fps[0]);
        ok(flatshard_flat_param_reduce_grads(fps[0]), "blocking hybrid reduce");
        ok(flatshard_flat_param_reshard(fps[0]), "reshard");
        write_grad(fps[1]);
        if r == 2 {
            std::thread::sleep(Duration::from_millis(300)); // rank 0's replicate peer is late
        }
        let t0 = Instant::now();
        let mut w = null_mut();
        ok(flatshard_flat_param_reduce_grads_async(fps[1], &mut w), "async hybrid reduce");
        let issued = t0.elapsed();
        if r == 0 {
            assert!(issued < Duration::from_millis(150), "rank 0: reduce_grads_async took {issued:?}: it ran during the call");
        }
        ok(flatshard_flat_param_reshard(fps[1]), "reshard waits for it");
        ok(wait(w), "wait");
        flatshard_work_free(w);
        let (a, b) = (shard_grad(fps[0]), shard_grad(fps[1]));
        assert_eq!(a, b, "rank {r}: async hybrid reduction differs from the blocking one");
        let base = (r % 2) * a.len();
        for (k, g) in a.iter().enumerate() {
            let i = base + k;
            assert_eq!(*g, if i < n { (i + 6) as f32 } else { 0.0 }, "rank {r} element {k}");
        }
        // rank 3 reduces fps[2] while everyone else reduces fps[1]: shard
        // group {2,3} fails with MISMATCH, and so do their replicate peers
        // {0,1} (told by the replicate agreement), long before the timeout
        for &fp in &fps[1..] {
            write_grad(fp);
        }
        let which = if r == 3 { fps[2] } else { fps[1] };
        let t0 = Instant::now();
        ok(flatshard_flat_param_reduce_grads_async(which, &mut w), "mismatched hybrid reduce");
        let st = wait(w);
        let msg = last_error();
        flatshard_work_free(w);
        assert!(t0.elapsed() < Duration::from_secs(10), "rank {r}: took {:?}", t0.elapsed());
        assert_eq!(st, FLATSHARD_ERR_MISMATCH, "rank {r}: {msg}");
        if r < 2 {
            assert!(msg.contains("replicate group") && msg.contains("refused"), "rank {r}: {msg}");
        }
        // the gradients are unchanged by the failed reduction
        assert_eq!(shard_grad(fps[1]), b, "rank {r}: a failed reduction changed the shard gradient");
        for fp in fps {
            flatshard_flat_param_free(fp);
        }
        flatshard_comm_free(rep);
        flatshard_comm_free(shard);
        flatshard_comm_free(c);
    }
}

/// A rank that refuses its own arguments before any data moves (NULL `out`
/// of flat_param_new, an unreadable tensor array for average_parameters)
/// tells its peers: they fail at once with MISMATCH naming it, well inside
/// the 20 s timeout, instead of waiting for it; the communicator stays usable.
#[test]
fn refused_arguments_fail_the_peers_fast() {
    if !is_worker() {
        return both("refused_arguments_fail_the_peers_fast", 2, || {});
    }
    let c = comm(20_000);
    let r = rank_of(c);
    unsafe {
        let mut w: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let t0 = Instant::now();
        let mut fp = null_mut();
        let out = if r == 1 { null_mut() } else { &mut fp as *mut _ };
        let st = flatshard_flat_param_new(c, &cpu(&mut w), 1, std::ptr::null(), out);
        let msg = last_error();
        assert!(t0.elapsed() < Duration::from_secs(5), "rank {r}: flat_param_new took {:?}", t0.elapsed());
        if r == 1 {
            assert_eq!(st, FLATSHARD_ERR_INVALID_ARGUMENT, "{msg}");
            assert!(msg.contains("out"), "{msg}");
        } else {
            assert_eq!(st, FLATSHARD_ERR_MISMATCH, "{msg}");
            assert!(msg.contains("rank 1 refused"), "{msg}");
        }
        let t0 = Instant::now();
        let mut ts = [cpu(&mut w)];
        let params = if r == 1 { null_mut() } else { ts.as_mut_ptr() };
        let st = flatshard::ffi::averaging::flatshard_average_parameters(c, params, 1, 0);
        let msg = last_error();
        assert!(t0.elapsed() < Duration::from_secs(5), "rank {r}: average_parameters took {:?}", t0.elapsed());
        if r == 1 {
            assert_eq!(st, FLATSHARD_ERR_INVALID_ARGUMENT, "{msg}");
        } else {
            assert_eq!(st, FLATSHARD_ERR_MISMATCH, "{msg}");
            assert!(msg.contains("rank 1 refused"), "{msg}");
        }
        assert!(w.iter().enumerate().all(|(i, v)| *v == i as f32), "rank {r}: a refused call changed the tensor");
        let mut x = [1f32];
        ok(flatshard_all_reduce(c, x.as_mut_ptr() as *mut c_void, 1, F32, SUM), "usable afterwards");
        assert_eq!(x[0], 2.0);
        flatshard_comm_free(c);
    }
}

/// drop_grad (PyTorch's zero_grad(set_to_none=True)): the shard gradient
/// reads NULL afterwards; the next reduction, blocking or async, becomes the
/// gradient (equal to zero_grad + reduce, not accumulated onto the old one);
/// drop_grad waits for in-flight work; a failed reduction after it leaves no
/// gradient; a NULL handle is INVALID_ARGUMENT naming the argument.
#[test]
fn drop_grad_sets_the_gradient_to_none() {
    if !is_worker() {
        return both("drop_grad_sets_the_gradient_to_none", 2, || {});
    }
    let c = comm(20_000);
    let r = rank_of(c);
    let n = 3000usize;
    unsafe {
        let mut ws: Vec<Vec<f32>> = (0..3).map(|k| (0..n).map(|i| (i * 7 + k) as f32).collect()).collect();
        let fps: Vec<*mut flatshard_flat_param> = ws
            .iter_mut()
            .map(|w| {
                let mut fp = null_mut();
                ok(flatshard_flat_param_new(c, &cpu(w), 1, std::ptr::null(), &mut fp), "new");
                fp
            })
            .collect();
        let shard_grad = |fp| {
            let mut s: flatshard_tensor = std::mem::zeroed();
            ok(flatshard_flat_param_shard(fp, &mut s), "shard");
            (!s.grad.is_null()).then(|| std::slice::from_raw_parts(s.grad as *const f32, s.numel as usize).to_vec())
        };
        // step k writes i·(k+1) + 10 r: the mean over 2 ranks is i·(k+1) + 5
        let write_grad = |fp, k: usize| {
            let mut t: flatshard_tensor = std::mem::zeroed();
            ok(flatshard_flat_param_unshard(fp, std::ptr::null()), "unshard");
            ok(flatshard_flat_param_view(fp, 0, &mut t), "view");
            std::slice::from_raw_parts_mut(t.grad as *mut f32, n).iter_mut().enumerate().for_each(|(i, g)| *g = (i * (k + 1) + 10 * r) as f32);
        };
        let want = |k: usize, g: &[f32]| {
            for (j, x) in g.iter().enumerate() {
                let i = r * g.len() + j;
                assert_eq!(*x, if i < n { (i * (k + 1) + 5) as f32 } else { 0.0 }, "rank {r} step {k} element {j}");
            }
        };
        // reference: zero_grad between steps, on fps[0]; drop_grad on fps[1]
        for k in 0..3 {
            for &fp in &fps[..2] {
                write_grad(fp, k);
            }
            ok(flatshard_flat_param_reduce_grads(fps[0]), "reduce (zero_grad)");
            ok(flatshard_flat_param_reshard(fps[0]), "reshard");
            let mut w = null_mut();
            ok(flatshard_flat_param_reduce_grads_async(fps[1], &mut w), "reduce_async (drop_grad)");
            ok(flatshard_flat_param_reshard(fps[1]), "reshard");
            ok(wait(w), "wait");
            flatshard_work_free(w);
            let (a, b) = (shard_grad(fps[0]).expect("zero_grad keeps a gradient"), shard_grad(fps[1]).expect("the reduction made one"));
            assert_eq!(a, b, "rank {r} step {k}: drop_grad + reduce differs from zero_grad + reduce");
            want(k, &b);
            ok(flatshard_flat_param_zero_grad(fps[0]), "zero_grad");
            ok(flatshard_flat_param_drop_grad(fps[1]), "drop_grad");
            assert!(shard_grad(fps[1]).is_none(), "rank {r}: a gradient after drop_grad");
            let mut v: flatshard_tensor = std::mem::zeroed();
            let mut off = 0u64;
            ok(flatshard_flat_param_shard_view(fps[1], 0, &mut v, &mut off), "shard_view");
            assert!(v.grad.is_null(), "rank {r}: shard_view grad after drop_grad");
        }
        // drop_grad waits for an in-flight reduction (then drops its result)
        write_grad(fps[1], 0);
        let mut w = null_mut();
        ok(flatshard_flat_param_reduce_grads_async(fps[1], &mut w), "reduce_async");
        ok(flatshard_flat_param_drop_grad(fps[1]), "drop_grad waits");
        assert!(test_done(w).1 == 1, "rank {r}: drop_grad returned before the reduction finished");
        ok(wait(w), "wait");
        flatshard_work_free(w);
        assert!(shard_grad(fps[1]).is_none());
        ok(flatshard_flat_param_reshard(fps[1]), "reshard");
        // a failed reduction after drop_grad leaves no gradient: rank 1
        // reduces fps[2] while rank 0 reduces fps[1]
        for &fp in &fps[1..] {
            write_grad(fp, 1);
        }
        let which = if r == 1 { fps[2] } else { fps[1] };
        ok(flatshard_flat_param_reduce_grads_async(which, &mut w), "mismatched reduce");
        assert_eq!(wait(w), FLATSHARD_ERR_MISMATCH, "rank {r}: {}", last_error());
        flatshard_work_free(w);
        assert!(shard_grad(fps[1]).is_none() && shard_grad(fps[2]).is_none(), "rank {r}: a failed reduction made a gradient");
        // the communicator and flat params still work
        ok(flatshard_flat_param_reduce_grads(fps[1]), "reduce after the mismatch");
        want(1, &shard_grad(fps[1]).expect("gradient"));
        assert_eq!(flatshard_flat_param_drop_grad(null_mut()), FLATSHARD_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("fp"), "{}", last_error());
        for fp in fps {
            flatshard_flat_param_free(fp);
        }
        flatshard_comm_free(c);
    }
}
