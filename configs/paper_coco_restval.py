r"""The paper configuration trained on Karpathy train + restval (113,287 images instead of 82,783).

  pdiff extract --config=configs/paper_coco_restval.py
  pdiff train --config=configs/paper_coco_restval.py --workdir=runs/paper_coco_restval

The common practice of later COCO captioners (ClipCap, most of the field), not the original
Prefix-diffusion, which trains on train only (configs/paper_coco.py). Features go to their own
directory: the two stores differ in their train split and vocabulary. Not measured here.
"""

from pdiff_jax.config import base_config


def get_config():
  c = base_config()
  c.data.restval_in_train = True
  c.data.feature_dir = "data/coco/features_vitl14_restval"
  return c
