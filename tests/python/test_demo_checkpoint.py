#!/usr/bin/env python3
"""The demo end to end: scripts/demo.sh trains on 4 ranks (loss must fall;
the demo exits non-zero otherwise) and exports the model from rank 0 with
rank0_only + offload_to_cpu. The .safetensors file must load with
safetensors.torch.load_file, have the layer names and shapes, and match the
unsharded parameters rank 0 held (checksum printed by the demo).
Prints "N passed, M failed"; exits non-zero on failure."""
import os, re, subprocess, sys, tempfile

import torch
from safetensors.torch import load_file

ROOT = os.environ.get("FLATSHARD_REPO") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ORDER = ["layer1.weight", "layer1.bias", "layer2.weight", "layer2.bias", "head.weight", "head.bias"]
SHAPES = {"layer1.weight": (64, 32), "layer1.bias": (64,), "layer2.weight": (64, 64),
          "layer2.bias": (64,), "head.weight": (4, 64), "head.bias": (4,)}


def main():
    passed = failed = 0
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "mlp.safetensors")
        p = subprocess.run([os.path.join(ROOT, "scripts", "demo.sh"), out], capture_output=True, text=True, timeout=300)
        text = p.stdout + p.stderr
        checks = []
        checks.append(("demo exits 0 (loss fell)", p.returncode == 0))
        m = re.search(r"loss ([0-9.]+) -> ([0-9.]+).*checksum (-?[0-9.]+)", text)
        checks.append(("demo prints loss and checksum", m is not None))
        if m and os.path.exists(out):
            t = load_file(out)
            checks.append(("names and shapes", {k: tuple(v.shape) for k, v in t.items()} == SHAPES))
            s = sum(float((t[k].flatten().double() * ((torch.arange(t[k].numel()) % 7) + 1).double()).sum()) for k in ORDER)
            checks.append(("file matches the unsharded parameters", abs(s - float(m.group(3))) < 1e-3 * max(1.0, abs(s))))
            checks.append(("loss fell", float(m.group(2)) < float(m.group(1))))
        for name, ok in checks:
            print(("ok   " if ok else "FAIL ") + name)
            passed += ok
            failed += not ok
        if failed:
            print(text[-3000:])
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
