#!/usr/bin/env python3
"""One rank of the PyTorch+Gloo baseline, started by a launcher (scripts/bench-hier.sh
starts one per rank on the hosts of the test bed): the operations and the timing are
../shared/bench/torch_baseline.py's own (make_op, timed, FACTOR), imported from the
path in argv[1]; rank, world and the rendezvous come from RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT. Rank 0 prints the baseline's JSON rows.

usage: gloo_rank.py PATH/torch_baseline.py --sizes 4K,256M --ops all_reduce --iters 5
"""
import argparse, importlib.util, json, os, resource, sys

spec = importlib.util.spec_from_file_location("torch_baseline", sys.argv[1])
tb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tb)
torch, dist = tb.torch, tb.dist

ap = argparse.ArgumentParser()
ap.add_argument("--sizes", default="4K,256M")
ap.add_argument("--ops", default="all_reduce")
ap.add_argument("--iters", type=int, default=5)
a = ap.parse_args(sys.argv[2:])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.set_num_threads(1)
dist.init_process_group("gloo", rank=rank, world_size=world)
for op in a.ops.split(","):
    for nbytes in [tb.parse_size(s) for s in a.sizes.split(",")]:
        fn = tb.make_op(op, rank, world, nbytes)
        med = tb.timed(fn, a.iters)
        meds = [None] * world
        dist.all_gather_object(meds, med)
        if rank == 0:
            t = max(meds)
            algbw = nbytes / t / 1e9
            print(json.dumps({"impl": "torch-gloo", "op": op, "world": world, "bytes": nbytes, "dtype": "f32",
                              "median_s": round(t, 6), "algbw_GBps": round(algbw, 3),
                              "busbw_GBps": round(algbw * tb.FACTOR[op](world), 3),
                              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)
        del fn
dist.destroy_process_group()
