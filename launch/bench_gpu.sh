#!/usr/bin/env bash
# The accelerator benchmark behind BENCHMARKS.md, for the paper configuration: the bf16 train
# step and sampler with a profiler trace and its per-op summary (OUT_DIR/profile_bf16; Perfetto or
# TensorBoard), the bf16 train step at larger batches (how MFU grows as the matmuls fill the
# device), 20 respaced sampling steps, float32 train/sampler/CLIP ViT-L/14 image encoding, and the
# demo configuration. A run that fails is reported and the others still run; the exit status is
# non-zero if any failed. Usage: bash launch/bench_gpu.sh OUT_DIR [extra pdiff flags]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench_gpu.sh OUT_DIR}
shift || true
mkdir -p "$out"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>/dev/null || true
paper=(--config=configs/paper_coco.py)
bf16=(--config.model.dtype=bfloat16)
failed=()
bench() {  # bench NAME [pdiff bench flags]: writes OUT_DIR/NAME.json
  local name=$1; shift
  echo "== $name ($(date +%T))"
  python3 -m pdiff_jax bench --out="$out/$name.json" "$@" || failed+=("$name")
}
bench paper_bf16 "${paper[@]}" "${bf16[@]}" --parts=train,sample --profile_dir="$out/profile_bf16" "$@"
bench paper_bf16_b512 "${paper[@]}" "${bf16[@]}" --config.train.batch_size=512 --parts=train "$@"
bench paper_bf16_b1024 "${paper[@]}" "${bf16[@]}" --config.train.batch_size=1024 --parts=train "$@"
bench paper_bf16_respace20 "${paper[@]}" "${bf16[@]}" --config.sampler.mode=respace \
  --config.sampler.steps=20 --parts=sample "$@"
bench paper_fp32 "${paper[@]}" "$@"
bench demo_fp32 --config=configs/demo.py --parts=train,sample "$@"
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
