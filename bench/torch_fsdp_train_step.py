#!/usr/bin/env python3
"""PyTorch FSDP (CPU, Gloo) on the training step that `flatshard-bench --ops
train_step` times: L layers of one flat parameter each (FULL_SHARD, one FSDP
unit per layer), each layer's compute modelled as a sleep in its forward and
twice that in its backward (an autograd function), blocking
(forward_prefetch off, no backward prefetch) and with forward_prefetch=True +
BackwardPrefetch.BACKWARD_PRE, in the same run. Prints one JSON line per world
in the format of ../shared/bench/torch_baseline.py plus the step figures:

  {"impl": "torch-gloo-fsdp", "op": "train_step", "world": 2, "bytes": 33554432,
   "dtype": "f32", "layers": 8, "layer_bytes": 4194304, "forward_compute_per_layer_s": ...,
   "compute_s": ..., "comm_s": ..., "blocking_step_s": ..., "async_step_s": ...,
   "median_s": ..., "overlap_efficiency": ..., "async_over_blocking": ...}

compute_s = the step's sleeps alone, timed; comm_s = the blocking step
without sleeps; overlap efficiency = max(compute, comm) / async step. Give --compute-ms the value flatshard chose
(scripts/bench-train-step.sh does) so both sides sleep the same.

Usage: python3 torch_fsdp_train_step.py --world 2 [--layers 8] [--layer-bytes 4M]
           [--compute-ms auto|X] [--iters 5]
"""
import argparse, json, math, os, socket, statistics, time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def parse_size(s):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1].upper()] if s[-1].upper() in mult else int(s)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sleep(torch.autograd.Function):
    """Forward sleeps `d` seconds, backward 2·d (a layer's compute)."""

    @staticmethod
    def forward(ctx, x, d):
        ctx.d = d
        if d > 0:
            time.sleep(d)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if ctx.d > 0:
            time.sleep(2 * ctx.d)
        return g, None


class Layer(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.lin = torch.nn.Linear(k, k, bias=False)
        self.d = 0.0

    def forward(self, x):
        return Sleep.apply(self.lin(x), self.d)


def worker(rank, world, port, a, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.fsdp import BackwardPrefetch, FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    k = int(math.isqrt(a.layer_bytes // 4))
    torch.manual_seed(0)

    def build(prefetch):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[Layer(k) for _ in range(a.layers)])
        return model, FSDP(model, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({Layer}),
                           forward_prefetch=prefetch,
                           backward_prefetch=BackwardPrefetch.BACKWARD_PRE if prefetch else None,
                           use_orig_params=False)

    x = torch.randn(1, k)
    dd = [0.0]  # the forward sleep, once chosen

    def sleeps_only(d):
        for _ in range(a.layers):
            time.sleep(d)
        for _ in range(a.layers):
            time.sleep(2 * d)

    def step(fsdp, model, d):
        if fsdp is None:
            return sleeps_only(dd[0])
        # FSDP wraps each Layer in place: set the sleep on the Layers themselves
        for m in fsdp.modules():
            if isinstance(m, Layer):
                m.d = d
        fsdp(x).sum().backward()
        fsdp.zero_grad(set_to_none=True)

    def timed(variants, iters):
        """Max over ranks of the median per variant; runs interleaved so every
        variant sees the same phases of a noisy machine (as flatshard-bench)."""
        for v in variants:
            step(*(v or (None, None, None)))
        ts = [[] for _ in variants]
        for _ in range(iters):
            for i, v in enumerate(variants):
                dist.barrier()
                t = time.perf_counter()
                step(*(v or (None, None, None)))
                ts[i].append(time.perf_counter() - t)
        m = torch.tensor([statistics.median(t) for t in ts], dtype=torch.float64)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        return m.tolist()

    blocking_model, blocking = build(False)
    async_model, asynch = build(True)
    comm = timed([(blocking, blocking_model, 0.0)], 3)[0]
    d = comm / (3 * a.layers) if a.compute_ms == "auto" else float(a.compute_ms) / 1e3
    b = torch.tensor([d], dtype=torch.float64)
    dist.broadcast(b, 0)
    d = b.item()
    dd[0] = d
    nominal = 3 * a.layers * d
    # compute = the step's sleeps alone, timed (a sleep overshoots what it
    # asks for, in every variant alike), as flatshard-bench measures it
    compute, comm, t_block, t_async = timed([None, (blocking, blocking_model, 0.0), (blocking, blocking_model, d),
                                             (asynch, async_model, d)], a.iters)
    if rank == 0:
        q.put({"impl": "torch-gloo-fsdp", "op": "train_step", "world": world,
               "bytes": a.layers * k * k * 4, "dtype": "f32", "layers": a.layers,
               "layer_bytes": k * k * 4, "forward_compute_per_layer_s": round(d, 6),
               "compute_nominal_s": round(nominal, 6), "compute_s": round(compute, 6), "comm_s": round(comm, 6),
               "blocking_step_s": round(t_block, 6), "async_step_s": round(t_async, 6),
               "median_s": round(t_async, 6),
               "overlap_efficiency": round(max(compute, comm) / t_async, 3),
               "async_over_blocking": round(t_async / t_block, 3)})
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--layer-bytes", type=parse_size, default=4 << 20)
    ap.add_argument("--compute-ms", default="auto")
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, a.world, port, a, q)) for r in range(a.world)]
    for p in procs:
        p.start()
    print(json.dumps(q.get()), flush=True)
    for p in procs:
        p.join()


if __name__ == "__main__":
    main()
