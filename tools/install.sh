#!/usr/bin/env bash
# Install megatron-ext on a fresh Debian 12 machine (Python 3.11, CPU).
#   bash tools/install.sh          # runtime only
#   bash tools/install.sh --test   # plus test tools: Open MPI, the Finnish corpus, test extras
# torch is pinned to 2.13.0 (the CPU wheel here); an unpinned torch pulls GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
if [ "${1:-}" = "--test" ]; then
  extras="[test]"
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    # openmpi: mpi4py and multi-rank preprocessing; gimp-help-fi: real Finnish test corpus.
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      openmpi-bin libopenmpi-dev gimp-help-fi hipcc slurmctld slurmd slurm-client munge libpmix2 >/dev/null
  fi
fi
pip install -q -c constraints.txt torch==2.13.0 pybind11 setuptools wheel
# DeepSpeed builds its wheel against the torch above; its C++ ops are built on demand, not now.
DS_BUILD_OPS=0 pip install -q -c constraints.txt deepspeed
pip install -q -c constraints.txt --no-build-isolation -e ".${extras}"
