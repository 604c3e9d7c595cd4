#!/usr/bin/env bash
# GPU checks (needs an NVIDIA driver, a GPU and NCCL >= 2.10): the #[ignore]d
# CUDA tests of tests/cuda.rs. The two-GPU NCCL test is skipped (and said so)
# on a machine with fewer than two GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
skip=()
n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${n:-0}" -lt 2 ]; then
  echo "gpu-test: $n GPU(s): skipping nccl_two_gpus_flat_param_matches_host (needs 2)"
  skip=(--skip nccl_two_gpus)
fi
cargo test --release --test cuda -- --include-ignored --nocapture "${skip[@]}"
