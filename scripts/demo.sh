#!/usr/bin/env bash
# The demo: a 4-rank data-parallel training job written in C
# (examples-c/train_mlp.c): two FSDP flat-parameter layers (FULL_SHARD) and a
# local-SGD head with hierarchical averaging, on this machine, no GPU. Prints a
# progress table, saves a sharded checkpoint every 100 steps (target/demo/ckpt)
# and exports the model from rank 0 as a .safetensors file.
# usage: scripts/demo.sh [-n RANKS] [OUT.safetensors]
#        scripts/demo.sh --collectives   (the collectives tour instead)
set -euo pipefail
cd "$(dirname "$0")/.."
N=4
if [ "${1:-}" = "-n" ]; then N=$2; shift 2; fi
# Quiet build; show the compiler's output only if it fails.
if ! log=$(cargo build --lib --bin flatshard-run 2>&1); then echo "$log" >&2; exit 1; fi
mkdir -p target/demo
if [ "${1:-}" = "--collectives" ]; then
  shift
  ${CC:-cc} -std=c11 -Wall -Wextra -Werror -pedantic -O2 -Iinclude \
    examples-c/collectives_demo.c -o target/demo/collectives_demo \
    -Ltarget/debug -lflatshard -Wl,-rpath,"$PWD/target/debug"
  exec target/debug/flatshard-run -n "$N" -- target/demo/collectives_demo "$@"
fi
${CC:-cc} -std=c11 -Wall -Wextra -Werror -pedantic -O2 -Iinclude \
  examples-c/train_mlp.c -o target/demo/train_mlp \
  -Ltarget/debug -lflatshard -lm -Wl,-rpath,"$PWD/target/debug"
OUT=${1:-$PWD/target/demo/mlp.safetensors}
# A sharded checkpoint every 100 steps (resume: add --resume target/demo/ckpt).
exec target/debug/flatshard-run -n "$N" -- target/demo/train_mlp --ckpt "$PWD/target/demo/ckpt" --save-every 100 "$OUT"
