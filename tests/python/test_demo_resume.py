#!/usr/bin/env python3
"""The demo's checkpoints: examples-c/train_mlp.c on 4 ranks saves every 8
steps (--ckpt DIR --save-every 8); resuming from the last checkpoint
(--resume DIR) on 4 ranks ends with exactly the loss and the model of an
uninterrupted run; resuming on 2 ranks restores exactly the model of the
checkpoint (the exported files are equal) and trains on. The checkpoint loads
with PyTorch's HuggingFaceStorageReader.
Prints "N passed, M failed"; exits non-zero on failure."""
import os, re, subprocess, sys, tempfile

import torch
from safetensors.torch import load_file

ROOT = os.environ.get("FLATSHARD_REPO") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBDIR = os.path.dirname(os.environ.get("FLATSHARD_LIB", os.path.join(ROOT, "target", "debug", "libflatshard.so")))
RUN = os.path.join(LIBDIR, "flatshard-run")


def main():
    checks = []
    with tempfile.TemporaryDirectory() as d:
        exe = os.path.join(d, "train_mlp")
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2", "-I", os.path.join(ROOT, "include"),
                        os.path.join(ROOT, "examples-c", "train_mlp.c"), "-o", exe, "-L", LIBDIR, "-lflatshard", "-lm",
                        f"-Wl,-rpath,{LIBDIR}"], check=True)

        def train(n, *args):
            p = subprocess.run([RUN, "-n", str(n), "--", exe, *args], capture_output=True, text=True, timeout=300)
            text = p.stdout + p.stderr
            m = re.search(r"final loss ([0-9.e+-]+)", text)
            return p.returncode, text, (m.group(1) if m else None)

        ck = os.path.join(d, "ck")
        rc_u, out_u, loss_u = train(4, "--steps", "40", os.path.join(d, "u.safetensors"))
        rc_a, out_a, loss_a = train(4, "--steps", "40", "--ckpt", ck, "--save-every", "8", os.path.join(d, "a.safetensors"))
        checks.append(("uninterrupted and checkpointing runs succeed", rc_u == 0 and rc_a == 0))
        checks.append(("saved after steps 16, 24, 32", re.findall(r"checkpoint after step (\d+)", out_a) == ["16", "24", "32"]))
        checks.append(("saving does not change training", loss_a is not None and loss_a == loss_u))
        # a PyTorch reader sees the checkpoint
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader
        sd = {"layer1.weight": torch.zeros(64, 32), "head.bias": torch.zeros(4), "train.step": torch.zeros((), dtype=torch.int64)}
        dcp.load(sd, storage_reader=HuggingFaceStorageReader(ck))
        checks.append(("dcp.load reads the demo's checkpoint (train.step = 33)", int(sd["train.step"]) == 33 and sd["layer1.weight"].abs().sum() > 0))

        rc_b, out_b, loss_b = train(4, "--steps", "40", "--resume", ck, os.path.join(d, "b.safetensors"))
        checks.append(("resume on 4 ranks starts at step 33", rc_b == 0 and "resumed from" in out_b and "at step 33" in out_b))
        checks.append(("loss after a resume equals the uninterrupted run's (bit for bit)", loss_b is not None and loss_b == loss_u))
        a, b = load_file(os.path.join(d, "u.safetensors")), load_file(os.path.join(d, "b.safetensors"))
        checks.append(("model after a resume equals the uninterrupted run's", all(torch.equal(a[k], b[k]) for k in a)))

        # 2 ranks: the state right after loading is the checkpoint's, exactly
        rc_c, _, _ = train(4, "--steps", "33", os.path.join(d, "at33.safetensors"))
        rc_d, out_d, _ = train(2, "--steps", "33", "--resume", ck, os.path.join(d, "r2.safetensors"))
        ok = rc_c == 0 and rc_d == 0
        if ok:
            x, y = load_file(os.path.join(d, "at33.safetensors")), load_file(os.path.join(d, "r2.safetensors"))
            ok = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        checks.append(("resume on 2 ranks restores the 4-rank checkpoint exactly", ok))
        rc_e, out_e, loss_e = train(2, "--steps", "60", "--resume", ck, os.path.join(d, "e.safetensors"))
        checks.append(("resume on 2 ranks trains on", rc_e == 0 and loss_e is not None and float(loss_e) < 1.0))
        failed = [n for n, ok in checks if not ok]
        for name, ok in checks:
            print(("ok   " if ok else "FAIL ") + name)
        if failed:
            for t in (out_u, out_a, out_b, out_d, out_e):
                print(t[-1500:])
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
