#!/usr/bin/env bash
# Train on one GPU host with all its GPUs (data parallel over a (-1, 1) mesh by default):
# creates .venv if missing, installs the pinned set with JAX's CUDA build, then runs
# `pdiff train`. Everything after the config goes to pdiff as overrides.
#   usage: launch/gpu.sh [--dry_run] CONFIG WORKDIR [--config.key=value ...]
# e.g.:   launch/gpu.sh configs/paper_coco.py runs/paper_coco --config.train.batch_size=256
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry_run" ]; then dry=1; shift; fi
config=${1:?usage: gpu.sh [--dry_run] CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: gpu.sh [--dry_run] CONFIG WORKDIR [overrides...]}
shift 2
jax_version=$(grep -E '^jax==' requirements.txt | cut -d= -f3)
cuda=${PDIFF_CUDA:-cuda12}
run() { echo "+ $*"; [ $dry = 1 ] || "$@"; }
if [ ! -x .venv/bin/python ]; then run python3 -m venv .venv; fi
# Runtime dependencies only, at the tested versions (-c), plus JAX's CUDA build.
run .venv/bin/python -m pip install --quiet -c requirements.txt -e . "jax[$cuda]==$jax_version"
run .venv/bin/pdiff train --config="$config" --workdir="$workdir" "$@"
