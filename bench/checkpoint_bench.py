#!/usr/bin/env python3
"""Checkpoint throughput: flatshard against PyTorch DCP, same tensors, same disk,
same run. Each of W ranks (one process each) holds 1/W of a model of 4 f32
matrices (--gib total); flatshard saves its flat-param shard with
flatshard_checkpoint_save_* + commit and loads it back; PyTorch saves the same
model sharded by FSDP2 (fully_shard, CPU, gloo) with dcp.save / dcp.load, with
the default FileSystemWriter and with HuggingFaceStorageWriter(save_distributed=True).
Time = slowest rank, between barriers, best of --rounds (save includes fsync
and the commit; loads follow their save, so they read from the page cache
unless --drop-caches, which needs root).

Run:  scripts/venv.sh >/dev/null; cargo build --release --lib   (FLATSHARD_LIB picks another build)
      ~/.cache/flatshard/venv/bin/python bench/checkpoint_bench.py --world 4 --gib 1 [--dir /tmp] [--rounds 2]
"""
import argparse
import ctypes as C
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("FLATSHARD_LIB", os.path.join(ROOT, "target", "release", "libflatshard.so"))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
from test_checkpoint_interop import OK, F32, Tensor, infos, load_lib  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drop_caches(enabled):
    if enabled:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def worker(rank, world, tport, fport, gib, base, rounds, drop):
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter, HuggingFaceStorageReader, HuggingFaceStorageWriter
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(tport))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = int((gib * (1 << 30) / 4 / 4) ** 0.5)
    spec = [(f"w{i}", (n, n)) for i in range(4)]

    # flatshard: a flat param over the 4 matrices (inputs are untouched zero pages)
    lib = load_lib()
    comm = C.c_void_p()
    assert lib.flatshard_comm_init(b"127.0.0.1", fport, rank, world, None, C.byref(comm)) == OK
    full = torch.empty(n * n, dtype=torch.float32)
    ts = (Tensor * 4)()
    for i in range(4):
        ts[i].data, ts[i].numel, ts[i].dtype = full.data_ptr(), n * n, F32
    fp = C.c_void_p()
    assert lib.flatshard_flat_param_new(comm, ts, 4, None, C.byref(fp)) == OK, lib.flatshard_last_error()
    del full
    sh = Tensor()
    lib.flatshard_flat_param_shard(fp, C.byref(sh))
    arr = np.ctypeslib.as_array(C.cast(sh.data, C.POINTER(C.c_float)), shape=(sh.numel,))
    arr[:] = np.arange(sh.numel, dtype=np.float32)
    ci, keep = infos(spec)

    # PyTorch: the same matrices sharded by FSDP2
    model = torch.nn.Module()
    for name, shape in spec:
        setattr(model, name, torch.nn.Parameter(torch.empty(shape)))
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    with torch.no_grad():
        for p in model.parameters():
            loc = p.to_local()
            loc.copy_(torch.arange(loc.numel(), dtype=torch.float32).reshape(loc.shape))
    sd = model.state_dict()

    def timed(fn):
        dist.barrier()
        t = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t

    def fs_save(d):
        c = C.c_void_p()
        assert lib.flatshard_checkpoint_save_begin(comm, d.encode(), C.byref(c)) == OK, lib.flatshard_last_error()
        assert lib.flatshard_checkpoint_save_flat_param(c, fp, ci, 4, None, None) == OK, lib.flatshard_last_error()
        assert lib.flatshard_checkpoint_commit(c) == OK, lib.flatshard_last_error()
        lib.flatshard_checkpoint_free(c)

    def fs_load(d):
        c = C.c_void_p()
        assert lib.flatshard_checkpoint_load_begin(comm, d.encode(), C.byref(c)) == OK, lib.flatshard_last_error()
        assert lib.flatshard_checkpoint_load_flat_param(c, fp, ci, 4, None, None) == OK, lib.flatshard_last_error()
        lib.flatshard_checkpoint_free(c)

    cases = [
        ("flatshard", lambda d: fs_save(d), lambda d: fs_load(d)),
        ("torch dcp (FileSystemWriter)", lambda d: dcp.save(sd, storage_writer=FileSystemWriter(d)),
         lambda d: dcp.load(sd, storage_reader=FileSystemReader(d))),
        ("torch dcp (HuggingFaceStorageWriter, save_distributed)",
         lambda d: dcp.save(sd, storage_writer=HuggingFaceStorageWriter(d, save_distributed=True)),
         lambda d: dcp.load(sd, storage_reader=HuggingFaceStorageReader(d))),
    ]
    best = {}
    for r in range(rounds):
        for k, (name, save, load) in enumerate(cases):
            d = os.path.join(base, f"c{k}")
            if rank == 0:
                shutil.rmtree(d, ignore_errors=True)
            dist.barrier()
            ts_ = timed(lambda: save(d))
            if rank == 0:
                drop_caches(drop)
            tl = timed(lambda: load(d))
            b = best.setdefault(name, [ts_, tl])
            best[name] = [min(b[0], ts_), min(b[1], tl)]
    # the flatshard shard survived the round trips
    ok = bool(np.array_equal(arr, np.arange(sh.numel, dtype=np.float32)))
    lib.flatshard_flat_param_free(fp)
    lib.flatshard_comm_free(comm)
    dist.destroy_process_group()
    if rank == 0:
        print("RESULT " + json.dumps({"best": best, "ok": ok, "bytes": 4 * 4 * n * n}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--worker", nargs=8)
    a = ap.parse_args()
    if a.worker:
        r, w, tp, fpo, gib, base, rounds, drop = a.worker
        worker(int(r), int(w), int(tp), int(fpo), float(gib), base, int(rounds), drop == "1")
        sys.stdout.flush()
        os._exit(0)
    base = tempfile.mkdtemp(prefix="flatshard-ckbench-", dir=a.dir)
    tp, fpo = free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(a.world), str(tp), str(fpo), str(a.gib), base,
                               str(a.rounds), "1" if a.drop_caches else "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(a.world)]
    outs = [p.communicate()[0] for p in procs]
    shutil.rmtree(base, ignore_errors=True)
    res = [ln for ln in outs[0].splitlines() if ln.startswith("RESULT ")]
    if any(p.returncode for p in procs) or not res:
        print("\n".join(o[-3000:] for o in outs))
        return 1
    r = json.loads(res[0][len("RESULT "):])
    gb = r["bytes"] / 1e9
    print(f"checkpoint of {r['bytes'] / (1 << 30):.2f} GiB f32 on {a.world} ranks, best of {a.rounds}, "
          f"{'cold' if a.drop_caches else 'warm'} page cache for loads; round trip intact: {r['ok']}")
    print(f"{'':56s} {'save s':>8s} {'GB/s':>6s} {'load s':>8s} {'GB/s':>6s}")
    fs = r["best"]["flatshard"]
    for name, (s, l) in r["best"].items():
        print(f"{name:56s} {s:8.2f} {gb / s:6.2f} {l:8.2f} {gb / l:6.2f}")
    for name, (s, l) in r["best"].items():
        if name != "flatshard":
            print(f"flatshard vs {name}: save {s / fs[0]:.2f}x, load {l / fs[1]:.2f}x faster")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
