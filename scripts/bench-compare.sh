#!/usr/bin/env bash
# Run ../shared/bench/torch_baseline.py (PyTorch over Gloo) and flatshard-bench
# in the same run with the same arguments, and print both raw JSON lines and a
# comparison table: per (op, world, bytes) the median times, busbw, and
# time ratio = torch / flatshard (> 1: flatshard faster),
# busbw ratio = flatshard / torch (> 1: flatshard faster).
#
# usage: scripts/bench-compare.sh [--world 2] [--sizes 4K,16M,256M]
#            [--ops all_reduce,all_gather,reduce_scatter] [--transport tcp] [--iters 5]
#            [--rounds 1]
# --rounds R runs the pair R times, alternating (torch, flatshard, torch, ...),
# and keeps for each row and each side its fastest median: this machine's
# speed changes in phases of minutes, and alternating rounds give both sides
# the same chance at a fast phase.
# env:   FLATSHARD_SHARED  where shared/ is (default: <repo>/../shared)
#                    (or beside the main checkout of a git worktree)
#        BENCH_OUT         directory for the .jsonl files (default: a temp dir)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SHARED="${FLATSHARD_SHARED:-$REPO/../shared}"
if [ -z "${FLATSHARD_SHARED:-}" ] && ! [ -d "$SHARED" ]; then
  # A git worktree: shared/ sits beside the main checkout.
  COMMON=$(git -C "$REPO" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
  [ -n "$COMMON" ] && SHARED="$(dirname "$COMMON")/../shared"
fi
BASELINE="$SHARED/bench/torch_baseline.py"
[ -f "$BASELINE" ] || { echo "bench-compare: $BASELINE not found (set FLATSHARD_SHARED)" >&2; exit 2; }

WORLD=2 SIZES=4K,16M,256M OPS=all_reduce,all_gather,reduce_scatter TRANSPORT=tcp ITERS=5 ROUNDS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --world) WORLD=$2 ;;
    --sizes) SIZES=$2 ;;
    --ops) OPS=$2 ;;
    --transport) TRANSPORT=$2 ;;
    --iters) ITERS=$2 ;;
    --rounds) ROUNDS=$2 ;;
    *) echo "bench-compare: unknown argument $1" >&2; exit 2 ;;
  esac
  shift 2
done

OUT="${BENCH_OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PY=$("$REPO/scripts/venv.sh")
(cd "$REPO" && cargo build --release --quiet --bin flatshard-bench 2>&1 | grep -E "^error" -A20 >&2 || true)
[ -x "$REPO/target/release/flatshard-bench" ] || { echo "bench-compare: build failed" >&2; exit 1; }

: > "$OUT/torch.jsonl"
: > "$OUT/flatshard.jsonl"
for ((round = 1; round <= ROUNDS; round++)); do
  echo "== round $round/$ROUNDS: torch-gloo: world $WORLD, sizes $SIZES, ops $OPS" >&2
  "$PY" "$BASELINE" --world "$WORLD" --sizes "$SIZES" --ops "$OPS" --iters "$ITERS" | tee -a "$OUT/torch.jsonl"
  echo "== round $round/$ROUNDS: flatshard ($TRANSPORT): world $WORLD, sizes $SIZES, ops $OPS" >&2
  "$REPO/target/release/flatshard-bench" --world "$WORLD" --sizes "$SIZES" --ops "$OPS" \
    --transport "$TRANSPORT" --iters "$ITERS" | tee -a "$OUT/flatshard.jsonl"
done

"$PY" - "$OUT/torch.jsonl" "$OUT/flatshard.jsonl" <<'PYEOF'
import json, sys
def load(p):
    rows = {}
    for line in open(p):
        line = line.strip()
        if line.startswith("{"):
            r = json.loads(line)
            k = (r["op"], r["world"], r["bytes"])
            old = rows.get(k)
            # several rounds: keep the fastest median (an error row only if all failed)
            if old is None or "error" in old or ("error" not in r and r["median_s"] < old["median_s"]):
                rows[k] = r
    return rows
t, f = load(sys.argv[1]), load(sys.argv[2])
def size(b):
    for u, m in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if b >= m and b % m == 0:
            return f"{b // m}{u}"
    return str(b)
impl = next((r["impl"] for r in f.values()), "flatshard")
print()
print(f"{'op':<15} {'world':>5} {'bytes':>6} {'torch_ms':>10} {impl + '_ms':>17} {'time_x':>7} "
      f"{'torch_busbw':>11} {'fs_busbw':>9} {'busbw_x':>8}")
for key in sorted(f, key=lambda k: (k[0], k[1], k[2])):
    a, b = t.get(key), f[key]
    if a is None or "error" in a or "error" in b:
        why = (a or {}).get("error") or b.get("error") or "no torch row"
        print(f"{key[0]:<15} {key[1]:>5} {size(key[2]):>6}  n/a: {why}")
        continue
    # busbw from the medians (the rows' busbw are rounded to 3 decimals, too
    # coarse for 4K); for one (op, world, bytes) busbw_x equals time_x.
    n = key[1]
    fac = {"all_reduce": 2 * (n - 1) / n, "average_parameters": 2 * (n - 1) / n,
           "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n, "fsdp_unshard": (n - 1) / n}.get(key[0], 1.0)
    # medians are printed to the microsecond: a 0 means under 0.5 us
    for r in (a, b):
        r["median_s"] = max(r["median_s"], 5e-7)
    bus = lambda r: r["bytes"] / r["median_s"] / 1e9 * fac
    print(f"{key[0]:<15} {key[1]:>5} {size(key[2]):>6} {a['median_s']*1e3:>10.3f} {b['median_s']*1e3:>17.3f} "
          f"{a['median_s']/b['median_s']:>6.2f}x {bus(a):>11.3f} {bus(b):>9.3f} {bus(b)/bus(a):>7.2f}x")
PYEOF
