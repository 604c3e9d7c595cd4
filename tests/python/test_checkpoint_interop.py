#!/usr/bin/env python3
"""Checkpoint interop (API §8, SPEC §4) against real PyTorch and safetensors:

1. flatshard saves at 4 ranks (ctypes; FULL_SHARD; 1-D, 2-D and 3-D params whose
   shard boundaries fall inside rows; an optimizer moment; replicated tensors).
2. torch.distributed.checkpoint.load with HuggingFaceStorageReader, one process:
   every tensor exact.
3. PyTorch FSDP2 (fully_shard, CPU, gloo) at 2 ranks loads it into its DTensor
   state dict exactly, then saves with HuggingFaceStorageWriter(save_distributed=True).
4. dcp.save with HuggingFaceStorageWriter (one process, rank-0 style) of the
   full state dict.
5. flatshard at 3 ranks loads both PyTorch-written checkpoints (plain and
   align_params) exactly.
6. flatshard consolidates at 2 ranks; safetensors.torch.load_file on each file
   plus model.safetensors.index.json reproduce every tensor.
7. Header parsing against the reference implementation: hostile files are
   refused by both, and on random mutations flatshard never accepts a file
   that safetensors refuses (bounded fuzz).

Run:   $(scripts/venv.sh) tests/python/test_checkpoint_interop.py
Lib:   env FLATSHARD_LIB, else target/debug/libflatshard.so.
Prints "N passed, M failed"; exits non-zero on any failure.
"""
import ctypes as C
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile

from flatshard_ctypes import Device, Tensor, FpOptions, ParamInfo, free_port  # the C structs, shared by the interop tests

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIB = os.environ.get("FLATSHARD_LIB", os.path.join(ROOT, "target", "debug", "libflatshard.so"))
OK, INVALID_ARGUMENT = 0, 1
F32, F64, BF16, I64 = 0, 1, 3, 5

A = [("emb.weight", (7, 5)), ("attn.qkv", (3, 4, 5)), ("norm.bias", (13,))]   # 108 elements: c = 27 at 4 ranks
B = [("head.weight", (4, 9)), ("head.bias", (4,))]
MOMENT = "optim.exp_avg."


def load_lib():
    lib = C.CDLL(LIB)
    vp, st, cp = C.c_void_p, C.c_int, C.c_char_p
    PI, T = C.POINTER(ParamInfo), C.POINTER(Tensor)
    sig = {
        "flatshard_comm_init": (st, [cp, C.c_uint16, C.c_int32, C.c_int32, vp, C.POINTER(vp)]),
        "flatshard_comm_free": (None, [vp]),
        "flatshard_last_error": (cp, []),
        "flatshard_flat_param_options_init": (None, [C.POINTER(FpOptions)]),
        "flatshard_flat_param_new": (st, [vp, T, C.c_uint64, C.POINTER(FpOptions), C.POINTER(vp)]),
        "flatshard_flat_param_shard_numel": (C.c_uint64, [vp]),
        "flatshard_flat_param_shard": (st, [vp, T]),
        "flatshard_flat_param_shard_view": (st, [vp, C.c_uint64, T, C.POINTER(C.c_uint64)]),
        "flatshard_flat_param_free": (None, [vp]),
        "flatshard_checkpoint_save_begin": (st, [vp, cp, C.POINTER(vp)]),
        "flatshard_checkpoint_save_flat_param": (st, [vp, vp, PI, C.c_uint64, cp, vp]),
        "flatshard_checkpoint_save_tensor": (st, [vp, PI, T]),
        "flatshard_checkpoint_commit": (st, [vp]),
        "flatshard_checkpoint_load_begin": (st, [vp, cp, C.POINTER(vp)]),
        "flatshard_checkpoint_load_flat_param": (st, [vp, vp, PI, C.c_uint64, cp, vp]),
        "flatshard_checkpoint_load_tensor": (st, [vp, PI, T]),
        "flatshard_checkpoint_free": (None, [vp]),
        "flatshard_checkpoint_consolidate": (st, [vp, cp, cp, C.c_uint64]),
    }
    for name, (res, args) in sig.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    return lib




def reference():
    """name -> float32/int64 numpy array: params, moments and replicated tensors."""
    import numpy as np
    ref = {}
    for k, (name, shape) in enumerate(A + B):
        ref[name] = np.random.default_rng(100 + k).standard_normal(shape).astype(np.float32)
    for k, (name, shape) in enumerate(A):
        ref[MOMENT + name] = np.random.default_rng(200 + k).standard_normal(shape).astype(np.float32)
    ref["step"] = np.array(42, dtype=np.int64)
    ref["rope.freqs"] = np.arange(6, dtype=np.float32) * np.float32(0.125)
    return ref


def infos(spec):
    arr = (ParamInfo * len(spec))()
    keep = []
    for i, (name, shape) in enumerate(spec):
        s = (C.c_uint64 * max(1, len(shape)))(*shape)
        keep.append(s)
        arr[i].name, arr[i].ndim, arr[i].shape = name.encode(), len(shape), s
    return arr, keep


def cpu(a, dtype):
    t = Tensor()
    t.data, t.numel, t.dtype = a.ctypes.data, a.size, dtype
    return t


class Checks:
    def __init__(self, tag):
        self.tag, self.results = tag, []

    def check(self, name, cond, detail=""):
        self.results.append({"name": name, "ok": bool(cond), "detail": "" if cond else f"{self.tag}: {detail}"})
        return cond


# ---------------------------------------------------------------- workers

def w_save4(rank, world, port, d):
    """flatshard saves the reference at `world` ranks."""
    import numpy as np
    lib, ck = load_lib(), Checks(f"save rank {rank}")
    ref = reference()
    comm = C.c_void_p()
    assert lib.flatshard_comm_init(b"127.0.0.1", port, rank, world, None, C.byref(comm)) == OK, lib.flatshard_last_error()

    def flat(spec, prefix=""):
        ts = (Tensor * len(spec))(*[cpu(ref[prefix + n], F32) for n, _ in spec])
        fp = C.c_void_p()
        assert lib.flatshard_flat_param_new(comm, ts, len(spec), None, C.byref(fp)) == OK, lib.flatshard_last_error()
        return fp

    fa, fb = flat(A), flat(B)
    fm = flat(A, MOMENT)      # the moment, sharded like A: its shard is the shard-shaped buffer
    ms = Tensor()
    lib.flatshard_flat_param_shard(fm, C.byref(ms))
    c = C.c_void_p()
    sts = [lib.flatshard_checkpoint_save_begin(comm, d.encode(), C.byref(c))]
    ia, ka = infos(A)
    ib, kb = infos(B)
    sts.append(lib.flatshard_checkpoint_save_flat_param(c, fa, ia, len(A), None, None))
    sts.append(lib.flatshard_checkpoint_save_flat_param(c, fa, ia, len(A), MOMENT.encode(), ms.data))
    sts.append(lib.flatshard_checkpoint_save_flat_param(c, fb, ib, len(B), None, None))
    for name, dt in (("step", I64), ("rope.freqs", F32)):
        i, k = infos([(name, ref[name].shape)])
        t = cpu(ref[name], dt)
        sts.append(lib.flatshard_checkpoint_save_tensor(c, i, C.byref(t)))
    sts.append(lib.flatshard_checkpoint_commit(c))
    ck.check("flatshard save at 4 ranks + commit", all(s == OK for s in sts), f"{sts}: {lib.flatshard_last_error()}")
    lib.flatshard_checkpoint_free(c)
    for fp in (fa, fb, fm):
        lib.flatshard_flat_param_free(fp)
    lib.flatshard_comm_free(comm)
    return ck.results


def w_fsload(rank, world, port, d, what):
    """flatshard loads checkpoint `d` at `world` ranks and checks every value."""
    import numpy as np
    lib, ck = load_lib(), Checks(f"load {what} rank {rank}/{world}")
    ref = reference()
    comm = C.c_void_p()
    assert lib.flatshard_comm_init(b"127.0.0.1", port, rank, world, None, C.byref(comm)) == OK, lib.flatshard_last_error()
    full = what == "dcp.save"   # the rank-0 style save holds moments and replicated tensors too
    for align in (0, 1):
        opts = FpOptions()
        lib.flatshard_flat_param_options_init(C.byref(opts))
        opts.align_params = align
        c = C.c_void_p()
        st = lib.flatshard_checkpoint_load_begin(comm, d.encode(), C.byref(c))
        ok = ck.check(f"flatshard loads {what} at {world} ranks (align {align}): load_begin", st == OK, lib.flatshard_last_error())
        for spec, prefix in ([(A, ""), (B, "")] + ([(A, MOMENT)] if full else [])):
            zeros = [np.zeros(s, dtype=np.float32) for _, s in spec]
            ts = (Tensor * len(spec))(*[cpu(z, F32) for z in zeros])
            fp = C.c_void_p()
            assert lib.flatshard_flat_param_new(comm, ts, len(spec), C.byref(opts), C.byref(fp)) == OK
            i, k = infos(spec)
            st = lib.flatshard_checkpoint_load_flat_param(c, fp, i, len(spec), prefix.encode() if prefix else None, None)
            bad = [] if st == OK else [f"status {st}: {lib.flatshard_last_error()}"]
            for j, (name, shape) in enumerate(spec):
                t, off = Tensor(), C.c_uint64()
                lib.flatshard_flat_param_shard_view(fp, j, C.byref(t), C.byref(off))
                if t.numel:
                    got = np.ctypeslib.as_array(C.cast(t.data, C.POINTER(C.c_float)), shape=(t.numel,))
                    want = ref[prefix + name].reshape(-1)[off.value:off.value + t.numel]
                    if not np.array_equal(got, want):
                        bad.append(f"{prefix}{name} differs")
            ck.check(f"flatshard loads {what} at {world} ranks (align {align}): {spec[0][0]}.. {prefix or 'params'}", not bad, "; ".join(bad))
            lib.flatshard_flat_param_free(fp)
        if full:
            for name, dt, npdt in (("step", I64, np.int64), ("rope.freqs", F32, np.float32)):
                out = np.zeros(ref[name].shape, dtype=npdt)
                i, k = infos([(name, ref[name].shape)])
                t = cpu(out, dt)
                st = lib.flatshard_checkpoint_load_tensor(c, i, C.byref(t))
                ck.check(f"flatshard loads {what} at {world} ranks (align {align}): {name}", st == OK and np.array_equal(out, ref[name]),
                         f"{st} {lib.flatshard_last_error()} {out}")
        lib.flatshard_checkpoint_free(c)
    lib.flatshard_comm_free(comm)
    return ck.results


def w_consolidate(rank, world, port, src, dst):
    lib, ck = load_lib(), Checks(f"consolidate rank {rank}")
    comm = C.c_void_p()
    assert lib.flatshard_comm_init(b"127.0.0.1", port, rank, world, None, C.byref(comm)) == OK
    st = lib.flatshard_checkpoint_consolidate(comm, src.encode(), dst.encode(), 300)
    ck.check("flatshard consolidates at 2 ranks", st == OK, lib.flatshard_last_error())
    lib.flatshard_comm_free(comm)
    return ck.results


class Net:
    """An nn.Module with the reference's parameter names (built lazily: torch imports)."""

    @staticmethod
    def build():
        import torch
        from torch import nn
        m = nn.Module()
        for name, shape in A + B:
            mod, attr = name.split(".")
            if not hasattr(m, mod):
                setattr(m, mod, nn.Module())
            setattr(getattr(m, mod), attr, nn.Parameter(torch.zeros(shape)))
        return m


def w_fsdp2(rank, world, port, d, out):
    """FSDP2 at `world` ranks: load flatshard's checkpoint into DTensors, then
    save it again with save_distributed=True into `out`."""
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)
    ck = Checks(f"fsdp2 rank {rank}")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = Net.build()
    fully_shard(model, mesh=mesh)
    sd = model.state_dict()
    dcp.load(sd, storage_reader=HuggingFaceStorageReader(d))
    ref = reference()
    for name, _ in A + B:
        full = sd[name].full_tensor().numpy()
        local = sd[name].to_local()
        ck.check(f"FSDP2 (fully_shard, {world} ranks) loads {name} exactly", np.array_equal(full, ref[name]),
                 f"max diff {np.abs(full - ref[name]).max()}")
        ck.check(f"FSDP2 local shard of {name} is a real shard", local.numel() < ref[name].size, str(local.shape))
    dcp.save(model.state_dict(), storage_writer=HuggingFaceStorageWriter(out, save_distributed=True))
    dist.barrier()
    dist.destroy_process_group()
    return ck.results


def run(role, world, *args):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", role, str(r), str(world), str(port), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    results, failures = {}, []
    for r, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULTS ")]
        if p.returncode != 0 or not lines:
            failures.append(f"{role} rank {r}/{world} crashed (exit {p.returncode}):\n{out[-3000:]}")
            continue
        for res in json.loads(lines[-1][len("RESULTS "):]):
            prev = results.setdefault(res["name"], (True, []))
            results[res["name"]] = (prev[0] and res["ok"], prev[1] + ([res["detail"]] if not res["ok"] else []))
    return results, failures


# ---------------------------------------------------------------- in-process checks

def dcp_load_one_process(d, ck):
    import numpy as np
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    ref = reference()
    sd = {k: torch.zeros(v.shape, dtype=torch.int64 if v.dtype == np.int64 else torch.float32) for k, v in ref.items()}
    dcp.load(sd, storage_reader=HuggingFaceStorageReader(d))
    for k, v in ref.items():
        ck.check(f"dcp.load (HuggingFaceStorageReader, one process) returns {k} exactly", np.array_equal(sd[k].numpy(), v),
                 f"{sd[k]} vs {v}")


def dcp_save_one_process(out):
    import numpy as np
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    sd = {k: torch.from_numpy(np.array(v)) for k, v in reference().items()}
    dcp.save(sd, storage_writer=HuggingFaceStorageWriter(out))


def check_consolidated(dst, ck):
    import numpy as np
    from safetensors.torch import load_file
    ref = reference()
    with open(os.path.join(dst, "model.safetensors.index.json")) as f:
        index = json.load(f)
    wm = index["weight_map"]
    files = sorted(x for x in os.listdir(dst) if x.endswith(".safetensors"))
    n = len(files)
    ck.check("consolidated files are named model-0000k-of-0000N.safetensors",
             files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)] and n >= 3, str(files))
    ck.check("index weight_map names every tensor once", sorted(wm) == sorted(ref), str(sorted(wm)))
    seen, total = {}, 0
    for fn in files:
        t = load_file(os.path.join(dst, fn))
        for k, v in t.items():
            seen[k] = (fn, v)
            total += v.numel() * v.element_size()
    ck.check("index total_size = sum of tensor bytes", index["metadata"]["total_size"] == total, f"{index['metadata']} vs {total}")
    for k, v in ref.items():
        fn, t = seen.get(k, (None, None))
        ck.check(f"safetensors.torch.load_file reproduces {k} (file per index)",
                 t is not None and wm.get(k) == fn and np.array_equal(t.numpy(), v), f"{fn} {wm.get(k)}")
    # HuggingFaceStorageReader reads the consolidated directory too (whole tensors, no DCP_SHARDING_INFO)
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    sd = {k: torch.zeros(v.shape, dtype=torch.int64 if v.dtype == np.int64 else torch.float32) for k, v in ref.items()}
    dcp.load(sd, storage_reader=HuggingFaceStorageReader(dst))
    ck.check("dcp.load (HuggingFaceStorageReader) reads the consolidated files exactly",
             all(np.array_equal(sd[k].numpy(), v) for k, v in ref.items()))
    # save order, greedy packing at 300 bytes of data per file
    order = [n for n, _ in A] + [MOMENT + n for n, _ in A] + [n for n, _ in B] + ["step", "rope.freqs"]
    files_in_order = [wm[k] for k in order]
    ck.check("tensors go to files in save order", files_in_order == sorted(files_in_order), str(files_in_order))


def hostile(ck, tmp):
    """The header parser against the reference implementation."""
    import numpy as np
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    lib = load_lib()
    comm = C.c_void_p()
    assert lib.flatshard_comm_init(b"127.0.0.1", free_port(), 0, 1, None, C.byref(comm)) == OK

    def ours(blob):
        d = tempfile.mkdtemp(dir=tmp)
        with open(os.path.join(d, "x.safetensors"), "wb") as f:
            f.write(blob)
        c = C.c_void_p()
        st = lib.flatshard_checkpoint_load_begin(comm, d.encode(), C.byref(c))
        msg = lib.flatshard_last_error().decode()
        if st == OK:
            lib.flatshard_checkpoint_free(c)
        shutil.rmtree(d)
        return st, msg

    def reference_ok(blob):
        p = os.path.join(tmp, "ref.safetensors")
        with open(p, "wb") as f:
            f.write(blob)
        try:
            with safe_open(p, framework="pt") as f:
                for k in f.keys():
                    f.get_slice(k).get_shape()
                    f.get_tensor(k)
            return True
        except Exception:
            return False

    good_path = os.path.join(tmp, "good.safetensors")
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.float16),
               "s": torch.tensor(3, dtype=torch.int64)}, good_path, metadata={"format": "pt"})
    good = open(good_path, "rb").read()
    n = struct.unpack("<Q", good[:8])[0]
    hdr, data = good[8:8 + n].decode(), good[8 + n:]

    def with_header(h):
        return struct.pack("<Q", len(h)) + h.encode() + data

    st, _ = ours(good)
    ck.check("a file written by safetensors.torch.save_file loads", st == OK, lib.flatshard_last_error().decode())
    cases = [
        ("truncated", good[:-2], "data section"),
        ("huge header length", struct.pack("<Q", 1 << 62) + good[8:], "header length"),
        ("unknown dtype", with_header(hdr.replace('"F32"', '"F7"', 1)), "dtype"),
        ("offsets out of range", with_header(hdr.replace('"data_offsets":[0,', '"data_offsets":[0,9', 1)), "data_offsets"),
        ("path separator", with_header(hdr.replace('"w"', '"a/w"', 1)), "name"),
    ]
    for what, blob, field in cases:
        st, msg = ours(blob)
        ck.check(f"hostile file ({what}): INVALID_ARGUMENT naming the file and {field}",
                 st == INVALID_ARGUMENT and "x.safetensors" in msg and field in msg, f"{st}: {msg}")
        if what != "path separator":   # the reference allows '/' in names; flatshard refuses them
            ck.check(f"hostile file ({what}): the reference refuses it too", not reference_ok(blob))
    # bounded differential fuzz: flatshard never accepts what safetensors refuses
    rnd = random.Random(1234)
    alphabet = b'{}[]":,0123456789-. \\FIU'
    laxer, accepted, refused = [], 0, 0
    for _ in range(300):
        h = bytearray(good[8:8 + n])
        for _ in range(rnd.randint(1, 3)):
            pos = rnd.randrange(len(h))
            op = rnd.randrange(3)
            if op == 0:
                h[pos] = alphabet[rnd.randrange(len(alphabet))]
            elif op == 1:
                del h[pos]
            else:
                h.insert(pos, alphabet[rnd.randrange(len(alphabet))])
        blob = struct.pack("<Q", len(h)) + bytes(h) + data
        st, msg = ours(blob)
        if st == OK:
            accepted += 1
            if not reference_ok(blob):
                laxer.append(bytes(h)[:200])
        else:
            refused += 1
            if st != INVALID_ARGUMENT or "x.safetensors" not in msg:
                laxer.append(f"status {st} {msg}".encode())
    ck.check(f"fuzz: 300 mutated headers ({accepted} accepted, {refused} refused), never laxer than safetensors, "
             "every refusal INVALID_ARGUMENT naming the file", not laxer and accepted > 0, str(laxer[:3]))
    lib.flatshard_comm_free(comm)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        role, rank, world, port = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        fn = {"save4": w_save4, "fsload": w_fsload, "consolidate": w_consolidate, "fsdp2": w_fsdp2}[role]
        res = fn(rank, world, port, *sys.argv[6:])
        print("RESULTS " + json.dumps(res), flush=True)
        os._exit(0)
    if not os.path.exists(LIB):
        print(f"missing {LIB}: run `cargo build` first or set FLATSHARD_LIB")
        print("0 passed, 1 failed")
        return 1
    import warnings
    warnings.filterwarnings("ignore")
    tmp = tempfile.mkdtemp(prefix="flatshard-ckpt-py-")
    results, failures = {}, []

    def merge(res_fail):
        r, f = res_fail
        results.update(r)
        failures.extend(f)

    ck = Checks("main")
    try:
        ours, fsdp_out, torch_out, hf = (os.path.join(tmp, x) for x in ("flatshard", "fsdp2", "torch", "hf"))
        merge(run("save4", 4, ours))
        dcp_load_one_process(ours, ck)
        merge(run("fsdp2", 2, ours, fsdp_out))
        dcp_save_one_process(torch_out)
        merge(run("fsload", 3, torch_out, "dcp.save"))
        merge(run("fsload", 3, fsdp_out, "FSDP2 dcp.save(save_distributed=True)"))
        merge(run("consolidate", 2, ours, hf))
        check_consolidated(hf, ck)
        hostile(ck, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in ck.results:
        prev = results.setdefault(r["name"], (True, []))
        results[r["name"]] = (prev[0] and r["ok"], prev[1] + ([r["detail"]] if not r["ok"] else []))
    passed = failed = 0
    for c in failures:
        print("FAIL", c)
        failed += 1
    for name, (ok, details) in results.items():
        print(("ok   " if ok else "FAIL ") + name + ("" if ok else ": " + "; ".join(details)[:2000]))
        passed += ok
        failed += not ok
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
