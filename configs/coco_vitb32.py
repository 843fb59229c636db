r"""Prefix-diffusion on COCO with the smaller CLIP ViT-B/32 (512-d features); otherwise the paper's.

  pdiff extract --config=configs/coco_vitb32.py
  pdiff train --config=configs/coco_vitb32.py --workdir=runs/coco_vitb32

Expect somewhat lower quality than with ViT-L/14 features (not measured here); 94,555,041 trainable parameters (only the mapper input shrinks); CLIP
itself is 151M parameters instead of 428M.
"""

from pdiff_jax.config import base_config


def get_config():
  c = base_config()
  c.clip.model = "openai/clip-vit-base-patch32"
  c.model.feature_dim = 512
  c.data.feature_dir = "data/coco/features_vitb32"
  return c
