r"""The original Prefix-diffusion configuration on COCO (Karpathy splits), CLIP ViT-L/14 features.

  pdiff extract --config=configs/paper_coco.py
  pdiff train --config=configs/paper_coco.py --workdir=runs/paper_coco

Expect (paper, Table 1): BLEU-4 ~ 30, CIDEr ~ 100 on Karpathy test with 20 candidates reranked
by CLIP and 200 sampling steps. 94,948,257 trainable parameters (`pdiff info`), 200k steps of
batch 128. Every value is the original's (SPEC.md); change only by `--config.key=value`.
"""

from pdiff_jax.config import base_config


def get_config():
  return base_config()
