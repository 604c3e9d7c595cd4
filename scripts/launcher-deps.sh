#!/usr/bin/env bash
# Install the launchers the tests run when they are missing (Debian packages;
# idempotent; needs root then): Open MPI and MPICH for tests/mpi.rs and
# tests/readme_launch.rs, and Slurm (slurmctld, slurmd, srun/sbatch, munge) for
# the README's batch script, submitted to a private one-node cluster.
set -euo pipefail
need=()
command -v mpicc.openmpi >/dev/null 2>&1 && command -v mpirun.openmpi >/dev/null 2>&1 || need+=(libopenmpi-dev openmpi-bin)
command -v mpicc.mpich >/dev/null 2>&1 && command -v mpirun.mpich >/dev/null 2>&1 || need+=(libmpich-dev mpich)
command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v sbatch >/dev/null 2>&1 || need+=(slurmctld slurmd slurm-client)
command -v munged >/dev/null 2>&1 || need+=(munge)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
