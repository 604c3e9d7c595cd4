#!/usr/bin/env bash
# The long reliability runs behind the README's "Reliability" figures:
# 50 random SIGKILLs per transport, hostile peers, a longer fuzz, the soak,
# and the C programs under AddressSanitizer+UBSan and valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet
echo "== fault injection: 50 random kill points (shm and tcp alternating)"
FLATSHARD_FAULT_RUNS=50 cargo test --quiet --test faults -- --nocapture 2>&1 | grep -E "fault injection|test result"
echo "== hostile peers + fuzz (5000 handshakes, 500k headers)"
FLATSHARD_FUZZ_ITERS=5000 cargo test --quiet --test hostile -- --nocapture 2>&1 | grep -E "hostile peers|fuzz:|test result"
echo "== soak"
FLATSHARD_SOAK_ITERS=10000 FLATSHARD_SOAK_CYCLES=1000 cargo test --quiet --test soak -- --nocapture 2>&1 | grep -E "soak|test result"
echo "== C programs (shared, static, ASan+UBSan builds)"
cargo test --quiet --test c_programs 2>&1 | grep -E "test result"
