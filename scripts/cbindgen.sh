#!/usr/bin/env bash
# Print the path of the pinned cbindgen, installing it into a cache on first use.
set -euo pipefail
VERSION=0.29.4
ROOT="${FLATSHARD_TOOLS:-$HOME/.cache/flatshard/tools}"
BIN="$ROOT/bin/cbindgen"
if ! [ -x "$BIN" ] || ! "$BIN" --version 2>/dev/null | grep -q "$VERSION"; then
  cargo install cbindgen --version "=$VERSION" --locked --root "$ROOT" --quiet >&2
fi
echo "$BIN"
