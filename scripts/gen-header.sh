#!/usr/bin/env bash
# Regenerate include/flatshard.h with the pinned cbindgen (installed on demand).
set -euo pipefail
cd "$(dirname "$0")/.."
CBINDGEN=$(scripts/cbindgen.sh)
"$CBINDGEN" --config cbindgen.toml --crate flatshard --output "${1:-include/flatshard.h}" --quiet
