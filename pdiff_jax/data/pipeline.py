"""Training batches: (caption tokens, CLIP feature) pairs in a deterministic global order.

Every caption of every image is one sample (as the original). The order is a permutation per
epoch drawn from (seed, epoch), so the samples of global batch `step` are a pure function of
the step: resuming needs no iterator state. Each process materialises only its own rows of each
global batch; `sharding.global_batch` joins them into one array sharded on `data`.

The permutation of an epoch is drawn once and cached (drawing it is O(captions): 6-8 ms for
COCO's 566k on a 2-core CPU), so a step's host work is a gather of its rows, independent of the split size, and
`Prefetcher` runs that work (and the copy to the devices) in a background thread ahead of the
step. grain's MapDataset would do the same with a dependency and an iterator state to
checkpoint; here the batch is already a pure function of the step, so a thread and a queue do.
"""

from __future__ import annotations

import functools
import queue
import threading
from typing import Callable, Generic, Iterable, NamedTuple, TypeVar

import numpy as np

T = TypeVar("T")

PAD_ID = 0


class CaptionSplit(NamedTuple):
  """One split as the feature store holds it (arrays may be np.memmap)."""
  features: np.ndarray     # (num_images, F) float16/32, unnormalised CLIP embeddings
  ids: np.ndarray          # (num_captions, L) int32 token ids, PAD-padded
  image_index: np.ndarray  # (num_captions,) int, row of `features` each caption belongs to

  @property
  def num_samples(self) -> int:
    return int(self.ids.shape[0])


@functools.lru_cache(maxsize=2)  # the epoch in progress and, at a boundary, the next one
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of the samples in `epoch` (read-only: it is cached)."""
  perm = np.random.default_rng([seed, epoch]).permutation(num_samples)
  perm.flags.writeable = False
  return perm


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


class Prefetcher(Generic[T]):
  """`make(step)` for each step of `steps` (e.g. `range(start, stop)`; a training loop that
  dispatches several steps at once gives the first step of each), computed in a background
  thread up to `depth` ahead; `get(step)` returns them in order (an error in `make` is raised
  there).

  `make` must be a pure function of the step (as `local_batch` is), so the batches are exactly
  those an inline loop would build; use as a context manager so the thread stops with the loop.
  """

  def __init__(self, make: Callable[[int], T], steps: Iterable[int], depth: int = 2):
    if depth < 1:
      raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stopping = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(make, steps), daemon=True,
                                    name="pdiff-prefetch")
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stopping.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def _run(self, make, steps) -> None:
    try:
      for step in steps:
        if not self._put((step, make(step), None)):
          return
    except BaseException as e:  # noqa: BLE001 -- handed to the consumer, raised in get()
      self._put((None, None, e))

  def get(self, step: int) -> T:
    got, value, error = self._queue.get()
    if error is not None:
      raise error
    if got != step:
      raise RuntimeError(f"prefetcher out of order: asked for step {step}, has step {got}")
    return value

  def close(self) -> None:
    self._stopping.set()
    self._thread.join()

  def __enter__(self) -> "Prefetcher[T]":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


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
