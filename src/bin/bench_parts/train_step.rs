//! `flatshard-bench --ops train_step`: an FSDP training step of L flat
//! params, each layer's compute modelled as a sleep (a GPU kernel leaves the
//! host CPU free), blocking and asynchronous in the same run (API §7):
//!
//! - blocking: forward unshard → compute → reshard per layer; backward
//!   unshard → compute → reduce_grads → reshard per layer. The last layer
//!   stays unsharded from its forward to its backward (as FSDP keeps the
//!   layer backward starts with), so a step moves 2·L − 1 gathers and L
//!   reduce-scatters; the other forward unshards are
//!   `flatshard_flat_param_unshard_forward` (no gradient buffer, as FSDP's
//!   forward has none);
//! - async: the same operations, with up to D unshards in flight ahead of
//!   the layer computing (D = --prefetch, default 2 like FSDP's
//!   limit_all_gathers), across the turn from forward to backward too, and
//!   `reduce_grads_async` of layer l running while layer l−1's backward
//!   computes (its reshard lags one layer).
//!
//! Both end with the optimizer's `zero_grad(set_to_none=True)`
//! (`flatshard_flat_param_drop_grad`), as the PyTorch script's step does.
//! A layer's backward computes twice as long as its forward (the usual FLOP
//! ratio: gradients for inputs and weights). compute = the step's sleeps
//! alone, timed (a sleep overshoots what it asks for, in every variant
//! alike); comm-only = the blocking step without sleeps; unless
//! --compute-ms is given the forward sleep is comm-only / 3L, so compute ≈
//! comm (where the measured figures still differ by more than 10%, the
//! sleep is corrected and the run repeated, up to 3 rounds:
//! `calibration_rounds`). All variants run interleaved; each figure is the max over ranks of
//! the median. Rank 0 prints one JSON line (the torch_baseline.py format
//! plus the step figures); overlap efficiency = max(compute, comm) / async
//! step. It also prints the 4 KiB shm/tcp all_reduce latency before the
//! first asynchronous call and with an idle progress thread (same run).

use flatshard::ffi::comm::*;
use flatshard::ffi::flat_param::*;
use flatshard::ffi::types::*;
use flatshard::ffi::work::*;
use flatshard::ffi::{flatshard_last_error, flatshard_status};
use std::ffi::{c_void, CStr};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

pub struct Cfg {
    pub layers: usize,
    pub layer_bytes: usize,
    /// Forward compute per layer (backward: twice); None = match the
    /// measured comm-only time.
    pub compute_ms: Option<f64>,
    pub iters: usize,
    pub transport: i32,
    /// Prefetch depth (unshards in flight ahead of the layer computing).
    pub prefetch: usize,
}

fn check(s: flatshard_status, what: &str) -> Result<(), String> {
    if s == flatshard_status::FLATSHARD_OK {
        return Ok(());
    }
    // SAFETY: flatshard_last_error returns a valid NUL-terminated string.
    let msg = unsafe { CStr::from_ptr(flatshard_last_error()) }.to_string_lossy().into_owned();
    Err(format!("{what}: {s:?}: {msg}"))
}

struct Model {
    c: *mut flatshard_comm,
    fps: Vec<*mut flatshard_flat_param>,
    /// Gathers in flight ahead of compute (FSDP's limit_all_gathers keeps 2).
    depth: usize,
}

impl Model {
    fn view(&self, l: usize) -> Result<flatshard_tensor, String> {
        // SAFETY: a zeroed tensor is a valid out-param; fps are live handles.
        let mut t: flatshard_tensor = unsafe { std::mem::zeroed() };
        // SAFETY: a live flat param handle and a writable out-param.
        check(unsafe { flatshard_flat_param_view(self.fps[l], 0, &mut t) }, "view")?;
        Ok(t)
    }

    fn compute(d: Duration) {
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }

    /// Backward writes a gradient (touches the first element; the rest is the
    /// zero-filled buffer, as a kernel would fill it on a device).
    fn backward(&self, l: usize, d: Duration) -> Result<(), String> {
        let t = self.view(l)?;
        Self::compute(2 * d);
        // SAFETY: the view's grad holds numel f32 elements (training unshard).
        unsafe { *(t.grad as *mut f32) += 1.0 };
        Ok(())
    }

    /// A forward-only unshard (no gradient buffer) for the forward of every
    /// layer but the last, whose unshard serves its backward too; a training
    /// unshard otherwise.
    fn forward_only(&self, forward: bool, l: usize) -> bool {
        forward && l + 1 < self.fps.len()
    }

    fn unshard(&self, forward: bool, l: usize) -> Result<(), String> {
        let fp = self.fps[l];
        // SAFETY: a live handle; NULL options mean defaults.
        let s = unsafe {
            if self.forward_only(forward, l) {
                flatshard_flat_param_unshard_forward(fp)
            } else {
                flatshard_flat_param_unshard(fp, std::ptr::null())
            }
        };
        check(s, "unshard")
    }

    fn reshard(&self, l: usize) -> Result<(), String> {
        // SAFETY: a live handle.
        check(unsafe { flatshard_flat_param_reshard(self.fps[l]) }, "reshard")
    }

    /// Blocking: every layer's unshard, compute and reduction in turn. The
    /// last layer stays unsharded from its forward to its backward (as FSDP
    /// keeps the layer backward starts with), in both steps alike.
    fn blocking_step(&self, d: Duration) -> Result<(), String> {
        let n = self.fps.len();
        for l in 0..n {
            self.unshard(true, l)?;
            self.view(l)?;
            Self::compute(d);
            if l + 1 < n {
                self.reshard(l)?;
            }
        }
        for l in (0..n).rev() {
            if l + 1 < n {
                self.unshard(false, l)?;
            }
            self.backward(l, d)?;
            // SAFETY: a live handle.
            check(unsafe { flatshard_flat_param_reduce_grads(self.fps[l]) }, "reduce_grads")?;
            self.reshard(l)?;
        }
        self.zero_grad()
    }

    /// The optimizer's `zero_grad(set_to_none=True)` (as in the PyTorch
    /// script's step): the next reduction becomes the shard gradient.
    fn zero_grad(&self) -> Result<(), String> {
        for fp in &self.fps {
            // SAFETY: a live handle.
            check(unsafe { flatshard_flat_param_drop_grad(*fp) }, "drop_grad")?;
        }
        Ok(())
    }

    /// Asynchronous: the same operations, with up to `depth` unshards in
    /// flight ahead of the layer computing (across the turn from forward to
    /// backward too), and each layer's gradient reduction running while the
    /// next layer's backward computes (its reshard lags one layer).
    fn async_step(&self, d: Duration) -> Result<(), String> {
        let n = self.fps.len();
        // The layers in the order the step computes them; the last layer's
        // backward uses its forward's unshard.
        let order: Vec<usize> = (0..n).chain((0..n.saturating_sub(1)).rev()).collect();
        let mut works = Vec::with_capacity(4 * n);
        let mut sharded = vec![true; n];
        let mut next = 0; // the next entry of `order` to unshard
                          // Unshard ahead of position `pos`: entries up to pos + depth whose
                          // layer is sharded now (the one behind stays in flight until it is).
        let mut ahead = |pos: usize, sharded: &mut [bool], works: &mut Vec<*mut flatshard_work>| -> Result<(), String> {
            while next < order.len() && next <= pos + self.depth && sharded[order[next]] {
                let l = order[next];
                let (fp, mut w) = (self.fps[l], null_mut());
                // SAFETY: a live handle; NULL options mean defaults; w is writable.
                let s = unsafe {
                    if self.forward_only(next < n, l) {
                        flatshard_flat_param_unshard_forward_async(fp, &mut w)
                    } else {
                        flatshard_flat_param_unshard_async(fp, std::ptr::null(), &mut w)
                    }
                };
                check(s, "unshard_async")?;
                works.push(w);
                sharded[l] = false;
                next += 1;
            }
            Ok(())
        };
        for l in 0..n {
            ahead(l, &mut sharded, &mut works)?;
            self.view(l)?; // waits for its gather
            Self::compute(d);
            if l + 1 < n {
                self.reshard(l)?;
                sharded[l] = true;
            }
        }
        for l in (0..n).rev() {
            ahead(2 * n - 2 - l, &mut sharded, &mut works)?;
            self.backward(l, d)?;
            let mut w = null_mut();
            // SAFETY: a live handle; w is writable.
            check(unsafe { flatshard_flat_param_reduce_grads_async(self.fps[l], &mut w) }, "reduce_grads_async")?;
            works.push(w);
            if l + 1 < n {
                self.reshard(l + 1)?; // waits for its reduction, issued one layer ago
            }
        }
        self.reshard(0)?;
        for w in works {
            // SAFETY: each work waited for and freed once.
            unsafe {
                check(flatshard_work_wait(w), "work")?;
                flatshard_work_free(w);
            }
        }
        self.zero_grad()
    }

    /// For each of `fs`: max over ranks of the median of `iters` timed runs,
    /// after one warm-up each. The runs are interleaved (f0, f1, ..., f0, f1,
    /// ...), so every variant sees the same phases of a noisy machine.
    fn time(&self, iters: usize, fs: &[&dyn Fn() -> Result<(), String>]) -> Result<Vec<f64>, String> {
        for f in fs {
            f()?;
        }
        let mut ts = vec![Vec::with_capacity(iters); fs.len()];
        for _ in 0..iters {
            for (i, f) in fs.iter().enumerate() {
                // SAFETY: live comm.
                check(unsafe { flatshard_barrier(self.c) }, "barrier")?;
                let t = Instant::now();
                f()?;
                ts[i].push(t.elapsed().as_secs_f64());
            }
        }
        let mut m: Vec<f64> = ts
            .iter_mut()
            .map(|v| {
                v.sort_by(|a, b| a.total_cmp(b));
                v[v.len() / 2]
            })
            .collect();
        // SAFETY: m.len() f64 on a live comm.
        check(unsafe { flatshard_all_reduce(self.c, m.as_mut_ptr() as *mut c_void, m.len() as u64, DtypeArg(1), ReduceOpArg(3)) }, "max")?;
        Ok(m)
    }
}

/// Median latency of a blocking 4 KiB all_reduce.
fn latency_4k(c: *mut flatshard_comm, iters: usize) -> Result<f64, String> {
    let mut x = vec![1f32; 1024];
    let mut ts = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        // SAFETY: 1024 f32 on a live comm.
        check(unsafe { flatshard_all_reduce(c, x.as_mut_ptr() as *mut c_void, 1024, DtypeArg(0), ReduceOpArg(0)) }, "all_reduce 4K")?;
        ts.push(t.elapsed().as_secs_f64());
        x.iter_mut().for_each(|v| *v = 1.0);
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok(ts[ts.len() / 2])
}

pub fn run(cfg: &Cfg) -> Result<(), String> {
    // SAFETY: zeroed options, then init; out-pointers are valid.
    let c = unsafe {
        let mut o: flatshard_comm_options = std::mem::zeroed();
        flatshard_comm_options_init(&mut o);
        o.transport = TransportArg(cfg.transport);
        let mut c = null_mut();
        check(flatshard_comm_init_from_env(&o, &mut c), "comm init")?;
        c
    };
    // SAFETY: live comm.
    let (rank, world) = unsafe { (flatshard_comm_rank(c) as usize, flatshard_comm_size(c) as usize) };
    // 4 KiB latency before any asynchronous call (no progress thread yet)
    latency_4k(c, 200)?;
    let lat_before = latency_4k(c, 2000)?;

    let numel = cfg.layer_bytes / 4;
    let mut fps = Vec::with_capacity(cfg.layers);
    for l in 0..cfg.layers {
        let mut w: Vec<f32> = (0..numel).map(|i| ((i + l + rank) % 13) as f32).collect();
        let t = flatshard_tensor {
            data: w.as_mut_ptr() as *mut c_void,
            grad: null_mut(),
            numel: numel as u64,
            dtype: DtypeArg(0),
            device: flatshard_device { r#type: DeviceTypeArg(0), index: 0 },
        };
        let mut fp = null_mut();
        // SAFETY: one valid tensor; the flat param copies its shard out.
        check(unsafe { flatshard_flat_param_new(c, &t, 1, std::ptr::null(), &mut fp) }, "flat_param_new")?;
        fps.push(fp);
    }
    let m = Model { c, fps, depth: cfg.prefetch };
    // Calibration (unless --compute-ms): choose the forward sleep d so that
    // the timed sleeps of a step (compute) ≈ the comm-only step. Both steps
    // run once first (buffers, caches, the progress thread warm), the
    // comm-only step is the median of 5, and d is corrected once for what
    // the sleeps overshoot. Every rank uses rank 0's choice.
    let sleeps = |d: Duration| {
        (0..cfg.layers).for_each(|_| Model::compute(d));
        (0..cfg.layers).for_each(|_| Model::compute(2 * d));
        Ok(())
    };
    let per_layer_s = match cfg.compute_ms {
        Some(ms) => ms / 1e3,
        None => {
            m.async_step(Duration::ZERO)?;
            let comm = m.time(5, &[&|| m.blocking_step(Duration::ZERO)])?[0];
            let d0 = comm / (3 * cfg.layers) as f64;
            let got = m.time(3, &[&|| sleeps(Duration::from_secs_f64(d0))])?[0];
            (d0 + (comm - got) / (3 * cfg.layers) as f64).max(d0 / 2.0)
        }
    };
    // The machine's speed drifts (here comm-only moved between ~5 and ~10 ms
    // from one minute to the next): where the measured compute and comm-only
    // times differ by more than 10%, the sleep is corrected and the run
    // measured again, at most `ROUNDS` times in all (the figures of the last
    // round are printed, with how many it took).
    const ROUNDS: usize = 6;
    let mut per_layer = [per_layer_s];
    let mut rounds = 0;
    let (t, d) = loop {
        rounds += 1;
        // SAFETY: one f64 on a live comm.
        check(unsafe { flatshard_broadcast(c, per_layer.as_mut_ptr() as *mut c_void, 1, DtypeArg(1), 0) }, "broadcast sleep")?;
        let d = Duration::from_secs_f64(per_layer[0]);
        // compute = the step's sleeps alone, timed: a sleep overshoots what it
        // was asked for (by ~0.06 ms here), in every variant alike
        let compute_only = || sleeps(d);
        let t = m.time(cfg.iters, &[&compute_only, &|| m.blocking_step(Duration::ZERO), &|| m.blocking_step(d), &|| m.async_step(d)])?;
        // every rank has the same figures (max over ranks), so all decide alike
        if cfg.compute_ms.is_some() || rounds == ROUNDS || (t[0] / t[1] - 1.0).abs() <= 0.1 {
            break (t, d);
        }
        per_layer[0] = (per_layer[0] + (t[1] - t[0]) / (3 * cfg.layers) as f64).max(per_layer[0] / 4.0);
    };
    let nominal = 3.0 * cfg.layers as f64 * d.as_secs_f64();
    let (compute, comm_only, blocking, asynch) = (t[0], t[1], t[2], t[3]);
    // 4 KiB latency again, now with an idle progress thread
    latency_4k(c, 200)?;
    let lat_after = latency_4k(c, 2000)?;
    let mut lat = [lat_before, lat_after];
    // SAFETY: two f64 on a live comm (max over ranks).
    check(unsafe { flatshard_all_reduce(c, lat.as_mut_ptr() as *mut c_void, 2, DtypeArg(1), ReduceOpArg(3)) }, "max")?;
    if rank == 0 {
        let transport = match cfg.transport {
            1 => "tcp",
            2 => "shm",
            _ => "auto",
        };
        println!(
            r#"{{"impl": "flatshard-{transport}", "op": "train_step", "world": {world}, "bytes": {}, "dtype": "f32", "layers": {}, "layer_bytes": {}, "prefetch": {}, "calibration_rounds": {rounds}, "forward_compute_per_layer_s": {:.6}, "compute_nominal_s": {:.6}, "compute_s": {:.6}, "comm_s": {:.6}, "blocking_step_s": {:.6}, "async_step_s": {:.6}, "median_s": {:.6}, "overlap_efficiency": {:.3}, "async_over_blocking": {:.3}, "all_reduce_4K_s_before_async": {:.7}, "all_reduce_4K_s_with_progress_thread": {:.7}}}"#,
            cfg.layers * cfg.layer_bytes,
            cfg.layers,
            cfg.layer_bytes,
            cfg.prefetch,
            d.as_secs_f64(),
            nominal,
            compute,
            comm_only,
            blocking,
            asynch,
            asynch,
            compute.max(comm_only) / asynch,
            asynch / blocking,
            lat[0],
            lat[1],
        );
    }
    for fp in m.fps {
        // SAFETY: each handle freed once.
        unsafe { flatshard_flat_param_free(fp) };
    }
    // SAFETY: freed once, last.
    unsafe { flatshard_comm_free(c) };
    Ok(())
}
