#!/usr/bin/env bash
# GPU checks (needs an NVIDIA driver, a GPU and NCCL): the #[ignore]d CUDA tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --test cuda -- --ignored --nocapture
