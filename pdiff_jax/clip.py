"""The frozen CLIP encoder (transformers' FlaxCLIPModel): the only module that imports transformers."""

from __future__ import annotations

import math
import os

import jax


def load_clip_config(name: str):
  """CLIPConfig of a local `save_pretrained` directory or a hub name already in the local cache."""
  from transformers import CLIPConfig
  return CLIPConfig.from_pretrained(name, local_files_only=not os.path.isdir(name))


def frozen_param_count(name: str) -> int | None:
  """Parameters of the CLIP model `name` (image and text towers), counted from its config
  without allocating them; None when the config cannot be read offline."""
  try:
    config = load_clip_config(name)
  except (OSError, ValueError):
    return None
  from transformers import FlaxCLIPModel
  model = FlaxCLIPModel(config, _do_init=False)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(model.params_shape_tree))
