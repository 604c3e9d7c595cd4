#!/usr/bin/env bash
# Cross-host benchmark in the multi-host test bed (scripts/netbed.sh, root):
# H simulated hosts × L ranks, each host's link optionally rate-limited, and in
# the same run, alternating: flatshard's hierarchical transport (AUTO), its
# flat TCP ring (FLATSHARD_TRANSPORT_TCP) and PyTorch+Gloo (the operations and
# timing of ../shared/bench/torch_baseline.py, one process per rank:
# bench/gloo_rank.py). Prints the JSON rows and a table: median time per
# implementation (fastest over rounds), and with a rate limit the time the link
# allows for all_reduce (SPEC §5: each host sends 2·(H−1)/H · n bytes) and each
# time over it; ratios = other / hier (> 1: hier faster).
#
# usage: scripts/bench-hier.sh [--hosts 2] [--local 2] [--rate 4gbit|none]
#            [--sizes 4K,256M] [--ops all_reduce] [--iters 5] [--rounds 1]
#            [--impls hier,tcp,gloo]
# env:   FLATSHARD_SHARED  where shared/ is (as scripts/bench-compare.sh)
#        BENCH_OUT         directory for the outputs (default: a temp dir)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SHARED="${FLATSHARD_SHARED:-$REPO/../shared}"
if [ -z "${FLATSHARD_SHARED:-}" ] && ! [ -d "$SHARED" ]; then
  COMMON=$(git -C "$REPO" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
  [ -n "$COMMON" ] && SHARED="$(dirname "$COMMON")/../shared"
fi
BASELINE="$SHARED/bench/torch_baseline.py"

HOSTS=2 LOCAL=2 RATE=4gbit SIZES=4K,256M OPS=all_reduce ITERS=5 ROUNDS=1 IMPLS=hier,tcp,gloo
while [ $# -gt 0 ]; do
  case "$1" in
    --hosts) HOSTS=$2 ;;
    --local) LOCAL=$2 ;;
    --rate) RATE=$2 ;;
    --sizes) SIZES=$2 ;;
    --ops) OPS=$2 ;;
    --iters) ITERS=$2 ;;
    --rounds) ROUNDS=$2 ;;
    --impls) IMPLS=$2 ;;
    *) echo "bench-hier: unknown argument $1" >&2; exit 2 ;;
  esac
  shift 2
done
[ "$RATE" = none ] && RATE=""
case ",$IMPLS," in *,gloo,*) [ -f "$BASELINE" ] || { echo "bench-hier: $BASELINE not found (set FLATSHARD_SHARED)" >&2; exit 2; } ;; esac
if ! why=$("$REPO/scripts/netbed.sh" check); then echo "bench-hier: $why" >&2; exit 2; fi

OUT="${BENCH_OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PY=$("$REPO/scripts/venv.sh")
(cd "$REPO" && cargo build --release --quiet --bin flatshard-bench 2>&1 | grep -E "^error" -A20 >&2 || true)
BIN="$REPO/target/release/flatshard-bench"
[ -x "$BIN" ] || { echo "bench-hier: build failed" >&2; exit 1; }

NAME="hb$$"
trap '"$REPO/scripts/netbed.sh" down "$NAME"' EXIT
trap 'exit 130' INT TERM HUP
NETBED_OWNER=$$ "$REPO/scripts/netbed.sh" up "$NAME" "$HOSTS" $RATE
WORLD=$((HOSTS * LOCAL))
TOKEN=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
PORT=29500

# run_job IMPL: all ranks on their hosts; rank 0's rows go to $OUT/IMPL.jsonl
run_job() {
  local impl=$1 h l r pids=() cmd
  PORT=$((PORT + 1))
  case $impl in
    hier) cmd=("$BIN" --world "$WORLD" --sizes "$SIZES" --ops "$OPS" --iters "$ITERS" --transport auto) ;;
    tcp) cmd=("$BIN" --world "$WORLD" --sizes "$SIZES" --ops "$OPS" --iters "$ITERS" --transport tcp) ;;
    gloo) cmd=("$PY" "$REPO/bench/gloo_rank.py" "$BASELINE" --sizes "$SIZES" --ops "$OPS" --iters "$ITERS") ;;
    *) echo "bench-hier: unknown implementation $impl" >&2; exit 2 ;;
  esac
  for ((h = 0; h < HOSTS; h++)); do
    for ((l = 0; l < LOCAL; l++)); do
      r=$((h * LOCAL + l))
      env RANK=$r WORLD_SIZE=$WORLD LOCAL_RANK=$l LOCAL_WORLD_SIZE=$LOCAL MASTER_ADDR=198.18.0.1 \
        MASTER_PORT=$PORT FLATSHARD_BENCH_WORKER=1 FLATSHARD_TOKEN="$TOKEN" GLOO_SOCKET_IFNAME=eth0 \
        "$REPO/scripts/netbed.sh" exec "$NAME" "$h" "${cmd[@]}" >"$OUT/$impl.$r.out" 2>"$OUT/$impl.$r.err" &
      pids+=($!)
    done
  done
  local bad=0
  for p in "${pids[@]}"; do wait "$p" || bad=1; done
  if [ $bad -ne 0 ]; then
    echo "bench-hier: $impl failed:" >&2
    tail -n 5 "$OUT/$impl".*.err >&2
    return 1
  fi
  grep '^{' "$OUT/$impl.0.out" | tee -a "$OUT/$impl.jsonl"
}

IFS=, read -r -a impls <<<"$IMPLS"
for i in "${impls[@]}"; do : >"$OUT/$i.jsonl"; done
for ((round = 1; round <= ROUNDS; round++)); do
  for i in "${impls[@]}"; do
    echo "== round $round/$ROUNDS: $i: $HOSTS hosts x $LOCAL ranks, link ${RATE:-unlimited}, sizes $SIZES, ops $OPS" >&2
    run_job "$i"
  done
done

"$PY" - "$HOSTS" "$LOCAL" "${RATE:-none}" "$OUT" "${impls[@]}" <<'PYEOF'
import json, re, sys
hosts, local, rate, out, impls = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
rows = {}
for i in impls:
    for line in open(f"{out}/{i}.jsonl"):
        r = json.loads(line)
        k = (r["op"], r["bytes"])
        old = rows.setdefault(i, {}).get(k)
        if "error" not in r and (old is None or r["median_s"] < old["median_s"]):
            rows[i][k] = r
bps = None
m = re.fullmatch(r"(\d+)(kbit|mbit|gbit)", rate)
if m:
    bps = int(m[1]) * {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[m[2]] / 8
def size(b):
    for u, mm in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if b >= mm and b % mm == 0:
            return f"{b // mm}{u}"
    return str(b)
print(f"\n{hosts} hosts x {local} ranks, link {rate} per host and direction")
keys = sorted({k for i in impls for k in rows.get(i, {})})
head = "op              size   " + "".join(f"{i + ' s':>12}" for i in impls)
if bps:
    head += f"{'link s':>10}{'hier/link':>11}"
head += "".join(f"{i + '/hier':>12}" for i in impls if i != "hier")
print(head)
for k in keys:
    t = {i: rows.get(i, {}).get(k, {}).get("median_s") for i in impls}
    line = f"{k[0]:<15} {size(k[1]):>5}  " + "".join(f"{t[i]:>12.6f}" if t[i] else f"{'-':>12}" for i in impls)
    if bps:
        if k[0] == "all_reduce":
            bound = 2 * (hosts - 1) / hosts * k[1] / bps
            line += f"{bound:>10.6f}" + (f"{t['hier'] / bound:>11.2f}" if t.get("hier") else f"{'-':>11}")
        else:
            line += f"{'-':>10}{'-':>11}"
    for i in impls:
        if i != "hier":
            line += f"{t[i] / t['hier']:>12.2f}" if t.get(i) and t.get("hier") else f"{'-':>12}"
    print(line)
PYEOF
