#!/usr/bin/env python3
"""LibTorch extension interop: build examples-c/libtorch/flatshard_torch.cpp with
torch.utils.cpp_extension, run 2 ranks over PyTorch's own gloo process group,
and route flatshard through it (flatshard_comm_from_collectives on the
c10d::ProcessGroup). Checks against PyTorch's own results:
  - all_reduce through the adapter,
  - average_parameters vs torch's model_averaging.utils.average_parameters,
  - PeriodicModelAverager vs flatshard's periodic averager (step by step),
  - FSDP summon_full_params(writeback=True) edit vs flatshard unshard/writeback:
    same padded numel, same local shard after the edit, zero-copy views.
Exit status non-zero on failure; prints "N passed, M failed".
"""
import os, socket, sys, traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def lib_dir():
    lib = os.environ.get("FLATSHARD_LIB", os.path.join(ROOT, "target", "debug", "libflatshard.so"))
    return os.path.dirname(os.path.abspath(lib))


def build():
    from torch.utils.cpp_extension import load
    # ninja lives beside this interpreter in the project's venv
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    libdir = lib_dir()
    return load(
        name="flatshard_torch",
        sources=[os.path.join(ROOT, "examples-c", "libtorch", "flatshard_torch.cpp")],
        extra_include_paths=[os.path.join(ROOT, "include")],
        extra_ldflags=[f"-L{libdir}", "-lflatshard", f"-Wl,-rpath,{libdir}"],
        verbose=False,
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checks(ext, rank, world):
    results = []

    def case(name, fn):
        if os.environ.get("FLATSHARD_TEST_VERBOSE"):
            print(f"rank {rank}: {name}", file=sys.stderr, flush=True)
        try:
            fn()
            results.append((name, None))
        except Exception:
            results.append((name, traceback.format_exc()))

    pg = dist.distributed_c10d._get_default_group()
    comm = ext.Comm.from_process_group(pg)
    assert comm.rank() == rank and comm.size() == world

    def all_reduce():
        t = torch.full((1000,), float(rank + 1))
        comm.all_reduce(t, 0)
        assert torch.equal(t, torch.full((1000,), float(sum(range(1, world + 1)))))
    case("all_reduce through c10d", all_reduce)

    def avg():
        from torch.distributed.algorithms.model_averaging.utils import average_parameters
        g = torch.Generator().manual_seed(100 + rank)
        mine = [torch.randn(n, generator=g) for n in (5, 1000, 33)]
        ref = [torch.nn.Parameter(t.clone()) for t in mine]
        average_parameters(iter(ref), pg)
        ptrs = [t.data_ptr() for t in mine]
        ext.average_parameters(comm, mine)
        assert [t.data_ptr() for t in mine] == ptrs, "average_parameters moved the tensors"
        for a, b in zip(mine, ref):
            assert torch.allclose(a, b.data, atol=1e-6, rtol=0), (a - b.data).abs().max()
    case("average_parameters vs torch", avg)

    def periodic():
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        ref_avg = PeriodicModelAverager(period=3, warmup_steps=2, process_group=pg)
        ours = ext.Averager.periodic(comm, 3, 2)
        g = torch.Generator().manual_seed(7 + rank)
        a = torch.randn(64, generator=g)
        ref = torch.nn.Parameter(a.clone())
        ref.grad = torch.zeros_like(ref)  # torch averages only params that have a grad
        for step in range(12):
            noise = torch.randn(64, generator=g)
            a += noise
            ref.data += noise
            if os.environ.get("FLATSHARD_TEST_VERBOSE"):
                print(f"rank {rank} step {step}", file=sys.stderr, flush=True)
            ref_avg.average_parameters(iter([ref]))
            if os.environ.get("FLATSHARD_TEST_VERBOSE"):
                print(f"rank {rank} step {step} torch done", file=sys.stderr, flush=True)
            ours.step([a])
            bad = None if torch.allclose(a, ref.data, atol=1e-6, rtol=0) else f"step {step}: max diff {(a - ref.data).abs().max()}"
            bad = bad or (None if ours.get_step() == ref_avg.step else f"step counters {ours.get_step()} vs {ref_avg.step}")
            # decide together so both ranks leave the loop at the same step
            flag = torch.tensor([1.0 if bad else 0.0])
            dist.all_reduce(flag)
            assert flag.item() == 0, bad or "the other rank saw a difference"
    case("periodic averager vs torch", periodic)

    def fsdp():
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        torch.manual_seed(0)
        lin = torch.nn.Linear(10, 11)
        w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
        model = FSDP(lin, device_id=torch.device("cpu"), use_orig_params=False)
        with FSDP.summon_full_params(model, writeback=True):
            model.weight.data[0, 0] = 100.0 + rank * 0  # same edit on every rank
            model.bias.data[-1] = -5.0
        handle = model._handle
        fp_torch = handle.flat_param
        ours = ext.FlatParam(comm, [w0.clone().reshape(-1), b0.clone()], False, 0)
        assert ours.padded_numel() == fp_torch._padded_unsharded_size.numel(), (ours.padded_numel(), fp_torch._padded_unsharded_size)
        ours.unshard(writeback=True)
        v = ours.view(0)
        assert torch.equal(v, w0.reshape(-1)), "unsharded view differs from the initial weight"
        v[0] = 100.0
        ours.view(1)[-1] = -5.0
        ours.reshard()
        shard_t = fp_torch.data[: ours.shard().numel()]
        mine = ours.shard()
        n_real = min(mine.numel(), fp_torch._unpadded_unsharded_size.numel() - rank * mine.numel())
        assert torch.equal(mine[:n_real], shard_t[:n_real]), "shards differ after writeback"
    case("FSDP summon_full_params writeback vs flatshard", fsdp)
    return results


def worker(rank, world, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ext = build()  # already compiled by the parent: loads from the cache
        q.put((rank, checks(ext, rank, world)))
    except Exception:
        q.put((rank, [("setup", traceback.format_exc())]))
    dist.barrier()
    dist.destroy_process_group()


def main():
    build()  # compile once, in the parent
    world = 2
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    import queue
    got = []
    try:
        for _ in range(world):
            got.append(q.get(timeout=240))
    except queue.Empty:
        for p in procs:
            p.kill()
        print("0 passed, 1 failed (timed out: a rank hung)")
        sys.exit(1)
    for p in procs:
        p.join(60)
    passed = failed = 0
    for rank, results in sorted(got):
        for name, err in results:
            if err:
                failed += 1
                print(f"FAIL rank {rank}: {name}\n{err}")
            else:
                passed += 1
                print(f"ok   rank {rank}: {name}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
