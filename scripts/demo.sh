#!/usr/bin/env bash
# The demo: build the library and the launcher, compile the C collectives demo
# against include/flatshard.h, and run it on 4 ranks with flatshard-run.
# usage: scripts/demo.sh [-n RANKS] [demo args, e.g. --quick]
set -euo pipefail
cd "$(dirname "$0")/.."
N=4
if [ "${1:-}" = "-n" ]; then N=$2; shift 2; fi
# Quiet build; show the compiler's output only if it fails.
if ! log=$(cargo build --lib --bin flatshard-run 2>&1); then echo "$log" >&2; exit 1; fi
mkdir -p target/demo
${CC:-cc} -std=c11 -Wall -Wextra -Werror -pedantic -O2 -Iinclude \
  examples-c/collectives_demo.c -o target/demo/collectives_demo \
  -Ltarget/debug -lflatshard -Wl,-rpath,"$PWD/target/debug"
exec target/debug/flatshard-run -n "$N" -- target/demo/collectives_demo "$@"
