"""Training batches: (caption tokens, CLIP feature) pairs in a deterministic global order.

Every caption of every image is one sample (as the original). The order is a permutation per
epoch drawn from (seed, epoch), so the samples of global batch `step` are a pure function of
the step: resuming needs no iterator state. Each process materialises only its own rows of each
global batch; `sharding.global_batch` joins them into one array sharded on `data`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

PAD_ID = 0


class CaptionSplit(NamedTuple):
  """One split as the feature store holds it (arrays may be np.memmap)."""
  features: np.ndarray     # (num_images, F) float16/32, unnormalised CLIP embeddings
  ids: np.ndarray          # (num_captions, L) int32 token ids, PAD-padded
  image_index: np.ndarray  # (num_captions,) int, row of `features` each caption belongs to

  @property
  def num_samples(self) -> int:
    return int(self.ids.shape[0])


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_samples)


def global_indices(num_samples: int, step: int, batch_size: int, seed: int) -> np.ndarray:
  """Sample indices of global batch `step`: positions step*B .. step*B+B-1 of the epoch stream."""
  pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
  epochs, offsets = np.divmod(pos, num_samples)
  out = np.empty(batch_size, dtype=np.int64)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = epoch_permutation(num_samples, seed, int(epoch))[offsets[sel]]
  return out


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """The contiguous rows of a global batch that process `process_index` builds."""
  if batch_size % process_count:
    raise ValueError(f"global batch {batch_size} is not divisible by {process_count} processes")
  per_process = batch_size // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)


def local_batch(split: CaptionSplit, step: int, batch_size: int, seed: int,
                process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's contiguous share of global batch `step` (rows in global-batch order)."""
  rows = process_rows(batch_size, process_index, process_count)
  idx = global_indices(split.num_samples, step, batch_size, seed)[rows]
  return {
      "ids": np.asarray(split.ids[idx], dtype=np.int32),
      "features": np.asarray(split.features[split.image_index[idx]], dtype=np.float32),
  }


def synthetic_split(num_images: int, vocab_size: int, max_len: int, feature_dim: int, seed: int,
                    captions_per_image: int = 5) -> CaptionSplit:
  """In-memory random features with captions that depend on them, for tests and smoke runs.

  Each image has a random feature vector and a random "true" word sequence; its captions are
  that sequence with one word replaced, so a model can learn features -> words.
  """
  rng = np.random.default_rng(seed)
  features = rng.standard_normal((num_images, feature_dim)).astype(np.float32)
  ids = np.full((num_images * captions_per_image, max_len), PAD_ID, dtype=np.int32)
  for i in range(num_images):
    length = int(rng.integers(2, max_len + 1))
    words = rng.integers(2, vocab_size, size=length)
    for j in range(captions_per_image):
      caption = words.copy()
      caption[rng.integers(length)] = rng.integers(2, vocab_size)
      ids[i * captions_per_image + j, :length] = caption
  image_index = np.repeat(np.arange(num_images), captions_per_image)
  return CaptionSplit(features, ids, image_index)
