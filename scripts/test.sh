#!/usr/bin/env bash
# THE test command: checks formatting (cargo fmt --check) and lints (cargo
# clippy --all-targets -D warnings), builds the library and binaries, runs every Rust test
# (unit tests, multi-process collectives, the C programs in tests/c/, the
# header check, the launcher), then the Python interop tests in
# tests/python/test_*.py with the project's PyTorch venv (skipped with a
# message if there are none). Ends with one summary line.
# Installs what it needs on first use: the pinned cbindgen (scripts/cbindgen.sh),
# the venv (scripts/venv.sh: its torchrun runs the launcher tests) and, as
# root, Open MPI, MPICH and Slurm (scripts/launcher-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT

step() { printf '\n== %s\n' "$*"; }

step "pinned cbindgen (for the header check)"
scripts/cbindgen.sh

step "system tools (cmake for the install test, valgrind)"
if ! command -v cmake >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake pkg-config) >/dev/null
  else
    echo "cmake is missing and this is not root: install cmake (the install test needs it)" >&2
  fi
fi
command -v cmake
if ! command -v valgrind >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi

step "launchers for the launch tests (the venv's torchrun; Open MPI, MPICH, Slurm)"
FLATSHARD_PYTHON=$(scripts/venv.sh)
export FLATSHARD_PYTHON
if [ "$(id -u)" -eq 0 ]; then scripts/launcher-deps.sh; fi

step "cargo fmt --check (rustfmt.toml: 160 columns)"
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt >/dev/null 2>&1 || true
cargo fmt --check

step "cargo build"
cargo build --all-targets

step "cargo clippy --all-targets -- -D warnings"
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy >/dev/null 2>&1 || true
cargo clippy --all-targets -- -D warnings

step "cargo test"
status=0
cargo test --no-fail-fast 2>&1 | tee "$LOG" || status=$?

step "multi-host test bed (scripts/netbed.sh): collectives, flat-param and averaging tests over simulated hosts"
# tests/netbed.rs, tests/hier.rs and tests/hier_faults.rs ran above (they skip
# with a reason without network namespaces); here the multi-process tests run
# again with their ranks spread over hosts (hierarchical transport)
if [ "$(id -u)" -eq 0 ] && ! command -v tc >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2) >/dev/null
fi
if bed=$(scripts/netbed.sh check); then
  for layout in 2,2 2,1,2; do
    echo "-- FLATSHARD_TEST_BED=$layout (ranks per host)"
    FLATSHARD_TEST_BED=$layout cargo test --no-fail-fast --test collectives --test flat_param --test averaging -- --skip shm_ 2>&1 | tee -a "$LOG" || status=$?
  done
else
  echo "$bed"
fi
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$LOG" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$LOG" | awk '{s+=$1} END {print s+0}')
skipped=$(grep -Eo '[0-9]+ ignored;' "$LOG" | awk '{s+=$1} END {print s+0}')

step "python interop tests"
py_summary="none found (skipped)"
shopt -s nullglob
py_tests=(tests/python/test_*.py)
if [ ${#py_tests[@]} -eq 0 ]; then
  echo "no tests/python/test_*.py: skipped"
else
  PY=$(scripts/venv.sh)
  py_ok=0 py_bad=0
  for t in "${py_tests[@]}"; do
    echo "-- $t"
    if FLATSHARD_LIB="$PWD/target/debug/libflatshard.so" FLATSHARD_REPO="$PWD" "$PY" "$t"; then
      py_ok=$((py_ok + 1))
    else
      py_bad=$((py_bad + 1)); status=1
      echo "FAILED: $t"
    fi
  done
  py_summary="$py_ok passed, $py_bad failed"
fi

echo
echo "rust: $passed passed, $failed failed, $skipped skipped (ignored: GPU-only tests); python files: $py_summary"
total_pass=$((passed + ${py_ok:-0}))
total_fail=$((failed + ${py_bad:-0}))
if [ "$status" -ne 0 ] && [ "$total_fail" -eq 0 ]; then total_fail=1; fi
echo "flatshard: $total_pass passed, $total_fail failed, $skipped skipped"
exit "$status"
