r"""The original Prefix-diffusion configuration on COCO (Karpathy splits), CLIP ViT-L/14 features.

  pdiff extract --config=configs/paper_coco.py
  pdiff train --config=configs/paper_coco.py --workdir=runs/paper_coco

Expect quality near the CLIP-prefix captioners the paper compares with (ClipCap MLP+GPT-2:
BLEU-4 32.2, CIDEr 108.4 on Karpathy test) from 20 candidates reranked by CLIP after 200
sampling steps, with far more diverse candidates; not reproduced here (no COCO or pretrained
CLIP on the development machine). 94,948,257 trainable parameters (`pdiff info`), 200k steps
of batch 128: ~75 minutes on one H100 in float32 (BENCHMARKS.md). Every value is the original's (SPEC.md); change only by `--config.key=value`.
"""

from pdiff_jax.config import base_config


def get_config():
  return base_config()
