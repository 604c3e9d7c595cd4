#!/usr/bin/env bash
# Print the path of a Python with PyTorch (CPU use only), safetensors and numpy,
# creating a cached venv outside the repo on first use (~5 GB download: PyPI's
# torch wheel brings its CUDA libraries even though the tests use the CPU;
# ninja builds the LibTorch extension example).
set -euo pipefail
VENV="${FLATSHARD_VENV:-$HOME/.cache/flatshard/venv}"
PY="$VENV/bin/python"
if ! [ -x "$PY" ] || ! "$PY" -c "import torch, safetensors, numpy, ninja" >/dev/null 2>&1; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet --disable-pip-version-check torch safetensors numpy ninja >&2
fi
echo "$PY"
