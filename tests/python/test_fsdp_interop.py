#!/usr/bin/env python3
"""Interop test: flatshard's flat parameters (C ABI via ctypes) against real
PyTorch FSDP (CPU, gloo) on the same Linear layers with the same initial values,
for use_orig_params False/True on 2 and 4 ranks. Checks equal padded numel,
equal shard contents (real elements; PyTorch writes 42 into alignment padding),
equal shard views, equal unsharded values, the writeback outcome, and the C
statuses of the INVALID_STATE paths.

Run:   $(scripts/venv.sh) tests/python/test_fsdp_interop.py
Lib:   env FLATSHARD_LIB, else target/debug/libflatshard.so (cargo build first).
Prints "N passed, M failed" and exits non-zero on any failure.
"""
import ctypes as C
import json
import os
import socket
import subprocess
import sys

from flatshard_ctypes import Device, Tensor, FpOptions, UnshardOptions, free_port  # the C structs, shared by the interop tests

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIB = os.environ.get("FLATSHARD_LIB", os.path.join(ROOT, "target", "debug", "libflatshard.so"))

OK, INVALID_ARGUMENT, INVALID_STATE = 0, 1, 2
F32 = 0


def load():
    lib = C.CDLL(LIB)
    vp, st = C.c_void_p, C.c_int
    sig = {
        "flatshard_comm_init": (st, [C.c_char_p, C.c_uint16, C.c_int32, C.c_int32, vp, C.POINTER(vp)]),
        "flatshard_comm_free": (None, [vp]),
        "flatshard_last_error": (C.c_char_p, []),
        "flatshard_flat_param_options_init": (None, [C.POINTER(FpOptions)]),
        "flatshard_unshard_options_init": (None, [C.POINTER(UnshardOptions)]),
        "flatshard_flat_param_new": (st, [vp, C.POINTER(Tensor), C.c_uint64, C.POINTER(FpOptions), C.POINTER(vp)]),
        "flatshard_flat_param_numel": (C.c_uint64, [vp]),
        "flatshard_flat_param_padded_numel": (C.c_uint64, [vp]),
        "flatshard_flat_param_shard_numel": (C.c_uint64, [vp]),
        "flatshard_flat_param_shard": (st, [vp, C.POINTER(Tensor)]),
        "flatshard_flat_param_shard_view": (st, [vp, C.c_uint64, C.POINTER(Tensor), C.POINTER(C.c_uint64)]),
        "flatshard_flat_param_unshard": (st, [vp, C.POINTER(UnshardOptions)]),
        "flatshard_flat_param_view": (st, [vp, C.c_uint64, C.POINTER(Tensor)]),
        "flatshard_flat_param_reshard": (st, [vp]),
        "flatshard_flat_param_reduce_grads": (st, [vp]),
        "flatshard_flat_param_zero_grad": (st, [vp]),
        "flatshard_flat_param_drop_grad": (st, [vp]),
        "flatshard_flat_param_free": (None, [vp]),
    }
    for name, (res, args) in sig.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    return lib




# ---------------------------------------------------------------- worker side

class Checks:
    def __init__(self, rank, world):
        self.rank, self.world, self.results = rank, world, []

    def check(self, name, cond, detail=""):
        self.results.append({"name": f"w{self.world} {name}", "ok": bool(cond),
                             "detail": "" if cond else f"rank {self.rank}: {detail}"})
        return cond


def models(torch):
    """(name, builder): Linear layers of SPEC §2's worked examples."""
    nn = torch.nn
    return [
        ("linear3-7-5-5", lambda: nn.Sequential(nn.Linear(3, 7, bias=False), nn.Linear(7, 5, bias=False), nn.Linear(5, 5, bias=False))),
        ("linear10-11-bias", lambda: nn.Sequential(nn.Linear(10, 11))),
        ("mlp-odd", lambda: nn.Sequential(nn.Linear(9, 13), nn.ReLU(), nn.Linear(13, 3))),
    ]


def worker(rank, world, torch_port, fs_port):
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(torch_port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    lib = load()
    comm = C.c_void_p()
    st = lib.flatshard_comm_init(b"127.0.0.1", fs_port, rank, world, None, C.byref(comm))
    assert st == OK, lib.flatshard_last_error()
    ck = Checks(rank, world)

    def err():
        return lib.flatshard_last_error().decode()

    def arr(t):
        if t.numel == 0:
            return np.zeros(0, np.float32)
        return np.ctypeslib.as_array(C.cast(t.data, C.POINTER(C.c_float)), shape=(t.numel,))

    for mname, build in models(torch):
        for use_orig in (False, True):
            tag = f"{mname} use_orig_params={use_orig}"
            torch.manual_seed(1234)
            model = build()
            init = [p.detach().clone().reshape(-1).numpy().astype(np.float32) for p in model.parameters()]
            fsdp = FSDP(model, device_id=torch.device("cpu"), use_orig_params=use_orig)
            handle = fsdp._handle
            tflat = handle.flat_param

            # flatshard on the same initial values
            keep = [np.ascontiguousarray(a) for a in init]
            ts = (Tensor * len(keep))()
            for i, a in enumerate(keep):
                ts[i] = Tensor(a.ctypes.data, None, a.size, F32, Device(0, 0))
            o = FpOptions()
            lib.flatshard_flat_param_options_init(C.byref(o))
            o.align_params = 1 if use_orig else 0
            fp = C.c_void_p()
            st = lib.flatshard_flat_param_new(comm, ts, len(keep), C.byref(o), C.byref(fp))
            if not ck.check(f"{tag}: new", st == OK, err()):
                continue

            padded = lib.flatshard_flat_param_padded_numel(fp)
            # torch sets _padded_unsharded_size lazily; the sharded numel x world is the same number
            tpad = tflat.numel() * world
            tunpad = tflat._unpadded_unsharded_size.numel()
            ck.check(f"{tag}: padded numel", padded == tpad and tpad - world < tunpad <= tpad,
                     f"flatshard {padded}, torch {tpad} (unpadded {tunpad})")
            ck.check(f"{tag}: numel", lib.flatshard_flat_param_numel(fp) == sum(a.size for a in init))
            ck.check(f"{tag}: shard numel", lib.flatshard_flat_param_shard_numel(fp) == tflat.numel(),
                     f"flatshard {lib.flatshard_flat_param_shard_numel(fp)}, torch {tflat.numel()}")

            def real_mask():
                c = lib.flatshard_flat_param_shard_numel(fp)
                m = np.zeros(c, bool)
                for i in range(len(init)):
                    t, off = Tensor(), C.c_uint64()
                    assert lib.flatshard_flat_param_shard_view(fp, i, C.byref(t), C.byref(off)) == OK, err()
                    m[(t.data - shard_base()) // 4 if t.numel else 0:][:t.numel] = True
                return m

            def shard_base():
                t = Tensor()
                assert lib.flatshard_flat_param_shard(fp, C.byref(t)) == OK, err()
                return t.data

            def shard():
                t = Tensor()
                assert lib.flatshard_flat_param_shard(fp, C.byref(t)) == OK, err()
                return arr(t).copy()

            def compare_shards(when):
                mask = real_mask()
                ours = shard()
                theirs = tflat.detach().clone().numpy()
                ck.check(f"{tag}: shard contents {when}", np.array_equal(ours[mask], theirs[mask]),
                         f"max diff {np.abs(ours[mask] - theirs[mask]).max() if mask.any() else 0}")
                ck.check(f"{tag}: padding is zero {when}", np.all(ours[~mask] == 0))

            compare_shards("after init")

            # shard views vs torch's shard metadata
            infos = getattr(tflat, "_shard_param_infos", None)
            ok, detail = True, ""
            for i in range(len(init)):
                t, off = Tensor(), C.c_uint64()
                lib.flatshard_flat_param_shard_view(fp, i, C.byref(t), C.byref(off))
                if infos is not None:
                    info = infos[i]
                    n = info.numel_in_shard if info.in_shard else 0
                    if t.numel != n or (n and (off.value != info.intra_param_start_idx
                                               or (t.data - shard_base()) // 4 != info.offset_in_shard)):
                        ok, detail = False, f"param {i}: flatshard numel {t.numel} off {off.value}, torch {info}"
                if t.numel and not np.array_equal(arr(t), init[i][off.value:off.value + t.numel]):
                    ok, detail = False, f"param {i}: shard view values differ from the param slice"
            ck.check(f"{tag}: shard views", ok, detail)

            # one training step: torch FSDP backward vs flatshard reduce_grads of
            # the same per-rank gradients (computed on a plain copy of the model)
            def training_step(seed, label):
                torch.manual_seed(seed + rank)
                first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
                x = torch.randn(4, first.in_features)
                fsdp(x).pow(2).sum().backward()
                tgrad = tflat.grad
                plain = build()
                with torch.no_grad():
                    for p, a in zip(plain.parameters(), init):
                        p.copy_(torch.from_numpy(a).reshape(p.shape))
                plain(x).pow(2).sum().backward()
                local = [p.grad.reshape(-1).numpy().astype(np.float32) for p in plain.parameters()]
                u = UnshardOptions()
                lib.flatshard_unshard_options_init(C.byref(u))
                ok = lib.flatshard_flat_param_unshard(fp, C.byref(u)) == OK
                for i in range(len(init)):
                    t = Tensor()
                    ok = ok and lib.flatshard_flat_param_view(fp, i, C.byref(t)) == OK and t.grad is not None
                    if ok:
                        np.ctypeslib.as_array(C.cast(t.grad, C.POINTER(C.c_float)), shape=(t.numel,))[:] = local[i]
                ok = ok and lib.flatshard_flat_param_reduce_grads(fp) == OK and lib.flatshard_flat_param_reshard(fp) == OK
                t = Tensor()
                lib.flatshard_flat_param_shard(fp, C.byref(t))
                if ck.check(f"{tag}: {label} runs", ok and t.grad and tgrad is not None, err()):
                    ours = np.ctypeslib.as_array(C.cast(t.grad, C.POINTER(C.c_float)), shape=(t.numel,)).copy()
                    theirs = tgrad.detach().clone().numpy()
                    mask = real_mask()
                    ck.check(f"{tag}: {label}: reduced shard grad equals torch's", np.allclose(ours[mask], theirs[mask], rtol=1e-5, atol=1e-6),
                             f"max diff {np.abs(ours[mask] - theirs[mask]).max() if mask.any() else 0}")
                return t

            t = training_step(100, "training step")
            ck.check(f"{tag}: zero_grad", lib.flatshard_flat_param_zero_grad(fp) == OK and not np.any(
                np.ctypeslib.as_array(C.cast(t.grad, C.POINTER(C.c_float)), shape=(t.numel,))))
            fsdp.zero_grad(set_to_none=True)
            compare_shards("after the training step (no optimizer)")
            # zero_grad(set_to_none=True) on both sides: no gradient, then the
            # next step's reduction is the gradient, as torch's
            t = Tensor()
            ck.check(f"{tag}: drop_grad", lib.flatshard_flat_param_drop_grad(fp) == OK
                     and lib.flatshard_flat_param_shard(fp, C.byref(t)) == OK and not t.grad and all(p.grad is None for p in fsdp.parameters()), err())
            training_step(200, "step after set_to_none")
            fsdp.zero_grad(set_to_none=True)
            compare_shards("after the set_to_none step")

            # unsharded values
            u = UnshardOptions()
            lib.flatshard_unshard_options_init(C.byref(u))
            ck.check(f"{tag}: unshard", lib.flatshard_flat_param_unshard(fp, C.byref(u)) == OK, err())
            with FSDP.summon_full_params(fsdp, writeback=False):
                tp = [p.detach().reshape(-1).clone().numpy() for p in fsdp.parameters()]
            ok = len(tp) == len(init)
            for i in range(len(init)):
                t = Tensor()
                ok = ok and lib.flatshard_flat_param_view(fp, i, C.byref(t)) == OK and np.array_equal(arr(t), tp[i])
            ck.check(f"{tag}: unsharded values", ok, err())
            ck.check(f"{tag}: nested unshard is INVALID_STATE",
                     lib.flatshard_flat_param_unshard(fp, C.byref(u)) == INVALID_STATE and "reshard" in err(), err())
            ck.check(f"{tag}: reshard", lib.flatshard_flat_param_reshard(fp) == OK, err())
            ck.check(f"{tag}: reshard while sharded is INVALID_STATE",
                     lib.flatshard_flat_param_reshard(fp) == INVALID_STATE and "unshard first" in err(), err())
            t = Tensor()
            ck.check(f"{tag}: view while sharded is INVALID_STATE",
                     lib.flatshard_flat_param_view(fp, 0, C.byref(t)) == INVALID_STATE, err())

            # writeback: the same edit on both sides (p = 2p + 1 + index)
            with FSDP.summon_full_params(fsdp, writeback=True):
                with torch.no_grad():
                    for p in fsdp.parameters():
                        p.mul_(2).add_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) + 1)
            u.writeback = 1
            lib.flatshard_flat_param_unshard(fp, C.byref(u))
            for i in range(len(init)):
                t = Tensor()
                lib.flatshard_flat_param_view(fp, i, C.byref(t))
                a = arr(t)
                a *= 2
                a += np.arange(t.numel, dtype=np.float32) + 1
            ck.check(f"{tag}: reshard with writeback", lib.flatshard_flat_param_reshard(fp) == OK, err())
            compare_shards("after writeback")
            with FSDP.summon_full_params(fsdp, writeback=False):
                tp = [p.detach().reshape(-1).clone().numpy() for p in fsdp.parameters()]
            u.writeback = 0
            lib.flatshard_flat_param_unshard(fp, C.byref(u))
            ok, detail = True, ""
            for i in range(len(init)):
                t = Tensor()
                lib.flatshard_flat_param_view(fp, i, C.byref(t))
                want = init[i] * np.float32(2) + (np.arange(init[i].size, dtype=np.float32) + np.float32(1))
                if not np.array_equal(arr(t), tp[i]):
                    ok, detail = False, f"param {i}: flatshard and torch differ"
                elif not np.array_equal(tp[i], want):
                    ok, detail = False, f"param {i}: torch's writeback result is not 2p + k + 1"
            ck.check(f"{tag}: unsharded values after writeback", ok, detail)
            lib.flatshard_flat_param_reshard(fp)

            # rank0_only: a view of the full param on rank != 0 is INVALID_STATE
            u.rank0_only = 1
            lib.flatshard_flat_param_unshard(fp, C.byref(u))
            st = lib.flatshard_flat_param_view(fp, 0, C.byref(t))
            if rank == 0:
                ck.check(f"{tag}: rank0_only view on rank 0", st == OK and np.array_equal(arr(t), tp[0]), err())
            else:
                ck.check(f"{tag}: rank0_only view on rank != 0 is INVALID_STATE",
                         st == INVALID_STATE and "shard_view" in err(), err())
            # free while unsharded
            lib.flatshard_flat_param_free(fp)
            dist.barrier()
            del fsdp, model
    lib.flatshard_comm_free(comm)
    dist.destroy_process_group()
    print("RESULTS " + json.dumps(ck.results), flush=True)


# ---------------------------------------------------------------- driver side

def run_world(world):
    tport, fport = free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(r), str(world), str(tport), str(fport)],
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
            failures.append(f"w{world} rank {r} crashed (exit {p.returncode}):\n{out[-3000:]}")
            continue
        for res in json.loads(lines[-1][len("RESULTS "):]):
            prev = results.setdefault(res["name"], (True, []))
            results[res["name"]] = (prev[0] and res["ok"], prev[1] + ([res["detail"]] if not res["ok"] else []))
    return results, failures


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*map(int, sys.argv[2:6]))
        # The results are printed and flushed; skip interpreter teardown, where
        # torch's gloo threads occasionally abort the process ("terminate called
        # without an active exception", seen once in CI after every check passed).
        sys.stdout.flush()
        os._exit(0)
    if not os.path.exists(LIB):
        print(f"missing {LIB}: run `cargo build` first or set FLATSHARD_LIB")
        print("0 passed, 1 failed")
        return 1
    passed = failed = 0
    for world in (2, 4):
        results, crashes = run_world(world)
        for c in crashes:
            print("FAIL", c)
            failed += 1
        for name, (ok, details) in results.items():
            print(("ok   " if ok else "FAIL ") + name + ("" if ok else ": " + "; ".join(details)))
            passed += ok
            failed += not ok
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
