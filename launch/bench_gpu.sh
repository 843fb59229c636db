#!/usr/bin/env bash
# The accelerator benchmark behind BENCHMARKS.md: the paper configuration's train step (fp32 and
# bf16 compute), its sampler (20 candidates x 200 rediscretised steps, and 20 respaced steps) and
# CLIP ViT-L/14 image encoding; the bf16 run also writes a profiler trace and its per-op summary
# (OUT_DIR/profile_bf16; Perfetto or TensorBoard). Usage: bash launch/bench_gpu.sh OUT_DIR [extra pdiff flags]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench_gpu.sh OUT_DIR}
shift || true
mkdir -p "$out"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
pdiff() { python3 -m pdiff_jax "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>/dev/null || true
pdiff bench --config=configs/paper_coco.py --out="$out/paper_fp32.json" "$@"
pdiff bench --config=configs/paper_coco.py --config.model.dtype=bfloat16 --parts=train,sample \
  --profile_dir="$out/profile_bf16" --out="$out/paper_bf16.json" "$@"
pdiff bench --config=configs/paper_coco.py --config.model.dtype=bfloat16 --config.sampler.mode=respace \
  --config.sampler.steps=20 --parts=sample --out="$out/paper_bf16_respace20.json" "$@"
pdiff bench --config=configs/demo.py --parts=train,sample --out="$out/demo_fp32.json" "$@"
