#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: creates the TPU VM if it does not exist, copies this checkout
# to every worker, sets up the pinned venv on each (idempotent), and runs `pdiff extract` (it
# skips finished shards, so a re-run resumes it) then `pdiff train` on all workers at once under
# nohup, one log per worker. Data, features and workdir go on a bucket (gs://...): every path
# takes a URI, checkpoints are written by orbax straight to gs://, and the workdir's lock and the
# compilation cache live there too (tests/test_gcs.py runs this sequence against a local GCS
# server). JAX finds the pod by itself (PDIFF_DISTRIBUTED=auto).
#   usage: launch/tpu_pod.sh [--dry_run] NAME ZONE ACCELERATOR CONFIG WORKDIR [overrides...]
# e.g.:   launch/tpu_pod.sh pdiff-v4 us-central2-b v4-32 configs/paper_coco.py gs://b/runs/paper \
#           --config.data.source=karpathy:gs://b/coco/dataset_coco.json \
#           --config.data.image_root=gs://b/coco/images --config.data.feature_dir=gs://b/features_vitl14
# Follow a worker: gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=0 --command 'tail -f pdiff/train.log'
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry_run" ]; then dry=1; shift; fi
usage="usage: tpu_pod.sh [--dry_run] NAME ZONE ACCELERATOR CONFIG WORKDIR [overrides...]"
name=${1:?$usage}; zone=${2:?$usage}; accel=${3:?$usage}; config=${4:?$usage}; workdir=${5:?$usage}
shift 5
version=${PDIFF_TPU_VERSION:-tpu-ubuntu2204-base}
jax_version=$(grep -E '^jax==' requirements.txt | cut -d= -f3)
run() { echo "+ $*"; [ $dry = 1 ] || "$@"; }
ssh_all() { run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"; }

if [ $dry = 1 ] || ! gcloud compute tpus tpu-vm describe "$name" --zone "$zone" >/dev/null 2>&1; then
  run gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" --version "$version"
fi
archive=$(mktemp -u /tmp/pdiff_jax.XXXXXX).tar.gz
run tar czf "$archive" --exclude=.venv --exclude=.git --exclude=demo_out .
run gcloud compute tpus tpu-vm scp "$archive" "$name:pdiff_jax.tar.gz" --zone "$zone" --worker=all
ssh_all "mkdir -p pdiff && tar xzf pdiff_jax.tar.gz -C pdiff && cd pdiff && \
  ( [ -x .venv/bin/python ] || python3 -m venv .venv ) && \
  .venv/bin/pip install --quiet -c requirements.txt -e . 'jax[tpu]==$jax_version'"
overrides=$(printf ' %q' "$@")
# The two commands run under one `nohup bash -c '...'` on each worker: its single quotes are
# escaped ('\'') so that any override survives both the remote shell and bash -c.
job=".venv/bin/pdiff extract --config=$(printf %q "$config")$overrides && .venv/bin/pdiff train \
--config=$(printf %q "$config") --workdir=$(printf %q "$workdir")$overrides"
job=${job//\'/\'\\\'\'}
ssh_all "cd pdiff && PDIFF_DISTRIBUTED=auto nohup bash -c '$job' > train.log 2>&1 < /dev/null &"
