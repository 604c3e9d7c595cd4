#!/usr/bin/env bash
# API §7 overlap benchmark, flatshard and PyTorch FSDP in the same run:
# `flatshard-bench --ops train_step` (blocking and async FSDP step, compute
# modelled as sleeps) and bench/torch_fsdp_train_step.py (FSDP on CPU/Gloo,
# forward_prefetch + BACKWARD_PRE, the same sleeps: flatshard's chosen
# per-layer compute is passed on), for each world size. Prints the JSON rows
# and a table.
#
# usage: scripts/bench-train-step.sh [--worlds 2,4] [--transport shm] [--layers 8]
#            [--layer-bytes 4M] [--iters 5]
set -euo pipefail
cd "$(dirname "$0")/.."
WORLDS=2,4 TRANSPORT=shm LAYERS=8 LBYTES=4M ITERS=5
while [ $# -gt 0 ]; do
  case "$1" in
    --worlds) WORLDS=$2 ;;
    --transport) TRANSPORT=$2 ;;
    --layers) LAYERS=$2 ;;
    --layer-bytes) LBYTES=$2 ;;
    --iters) ITERS=$2 ;;
    *) echo "bench-train-step: unknown argument $1" >&2; exit 2 ;;
  esac
  shift 2
done
cargo build --release --bin flatshard-bench >&2
PY=$(scripts/venv.sh)
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
for w in ${WORLDS//,/ }; do
  row=$(target/release/flatshard-bench --ops train_step --world "$w" --transport "$TRANSPORT" \
    --layers "$LAYERS" --layer-bytes "$LBYTES" --iters "$ITERS")
  echo "$row" | tee -a "$OUT"
  ms=$(echo "$row" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["forward_compute_per_layer_s"] * 1e3)')
  "$PY" bench/torch_fsdp_train_step.py --world "$w" --layers "$LAYERS" --layer-bytes "$LBYTES" \
    --iters "$ITERS" --compute-ms "$ms" | tee -a "$OUT"
done
"$PY" - "$OUT" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"\n{'impl':18} {'world':>5} {'compute s':>10} {'comm s':>8} {'blocking s':>11} {'async s':>8} {'efficiency':>10} {'async/blocking':>14}")
for r in rows:
    print(f"{r['impl']:18} {r['world']:>5} {r['compute_s']:>10.4f} {r['comm_s']:>8.4f} {r['blocking_step_s']:>11.4f} "
          f"{r['async_step_s']:>8.4f} {r['overlap_efficiency']:>10.3f} {r['async_over_blocking']:>14.3f}")
PYEOF
