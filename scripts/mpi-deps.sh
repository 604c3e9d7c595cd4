#!/usr/bin/env bash
# Install Open MPI and MPICH (Debian packages) when their compilers/launchers
# are missing; idempotent. Used by scripts/test.sh for tests/mpi.rs.
set -euo pipefail
need=()
command -v mpicc.openmpi >/dev/null 2>&1 && command -v mpirun.openmpi >/dev/null 2>&1 || need+=(libopenmpi-dev openmpi-bin)
command -v mpicc.mpich >/dev/null 2>&1 && command -v mpirun.mpich >/dev/null 2>&1 || need+=(libmpich-dev mpich)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
