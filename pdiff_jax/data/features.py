"""The feature store: `pdiff extract` writes it, training and evaluation read it.

Layout of `data.feature_dir` (no pickle anywhere):
  manifest.json               written last: its presence marks a complete store
  vocab.json                  the word vocabulary (built from the train split)
  skipped.json                images that could not be read, with the reason
  {split}_features.npy        (num_images, F) unnormalised CLIP image embeddings (with
                              clip.views > 1, the mean over the views; manifest "clip_encoding")
  {split}_ids.npy             (num_captions, max_len) int32 token ids, PAD-padded
  {split}_image_index.npy     (num_captions,) row of {split}_features for each caption
  {split}_images.json         per image: image_id, image, reference captions
  shards/                     per-shard CLIP features; each written atomically, reused by re-runs

Extraction is split into shards of `data.shard_size` images; JAX process p does the shards
with index = p (mod process count), skips shards already written, and process 0 merges.
`data.feature_dir` may be local or gs:// (`storage`): every file is written whole or not at all,
so a crash leaves finished files intact; splits are memory-mapped where local, read whole where
remote.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np

from pdiff_jax import storage
from pdiff_jax.data import images as images_lib
from pdiff_jax.data import sources as sources_lib
from pdiff_jax.data.pipeline import CaptionSplit
from pdiff_jax.data.vocab import Vocab

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16}


class FeatureStoreError(RuntimeError):
  pass


def _write_json(path: str, obj) -> None:
  storage.write_json(path, obj, indent=1, sort_keys=True)


def _shard_path(feature_dir: str, split: str, index: int) -> str:
  return storage.join(feature_dir, "shards", f"{split}-{index:05d}.npz")


def extract(config, clip, *, process_index: int = 0, process_count: int = 1,
            barrier: Callable[[str], None] = lambda name: None, progress: bool = True) -> dict | None:
  """Runs (or finishes) the extraction that `config` describes.

  Every process must call it (shared storage for `data.feature_dir`); process 0 merges and
  returns the manifest, the others return None once the merge is done.
  """
  from tqdm import tqdm

  d = config.data
  out = d.feature_dir
  source = sources_lib.open_source(d.source, d.image_root, d.restval_in_train, d.max_image_pixels,
                                   d.get("tfds_data_dir", "") or None,
                                   threads=int(d.get("loader_threads", 8)))
  records = source.records()
  if not records.get("train"):
    raise sources_lib.SourceError(f"data.source={d.source!r} has no 'train' images")
  storage.makedirs(storage.join(out, "shards"))

  # Shards depend on the CLIP, the source and the sharding; refuse to mix extractions.
  plan = {"clip_model": clip.name, "source": d.source, "shard_size": int(d.shard_size),
          "image_root": d.image_root, "restval_in_train": bool(d.restval_in_train),
          "splits": {s: len(r) for s, r in sorted(records.items())},
          # views only when there are several, so that stores of one view stay valid
          **({"clip_encoding": clip.encoding} if clip.encoding else {})}
  plan_path = storage.join(out, "shards", "plan.json")
  if storage.exists(plan_path):
    if storage.read_json(plan_path) != plan:
      raise FeatureStoreError(
          f"{out}: holds shards of a different extraction (see {plan_path}); remove the "
          "directory or set data.feature_dir elsewhere")
    done = _complete_manifest(out, plan, d)
    if done is not None:  # a re-run of a finished extraction (a relaunched pod job): nothing to do
      log.info("feature store %s is complete; nothing to extract", out)
      return done if process_index == 0 else None
  elif process_index == 0:
    _write_json(plan_path, plan)

  todo = []
  for split, recs in sorted(records.items()):
    for i in range(math.ceil(len(recs) / d.shard_size)):
      if i % process_count == process_index and not storage.exists(_shard_path(out, split, i)):
        todo.append((split, i))
  total = sum(min(d.shard_size, len(records[s]) - i * d.shard_size) for s, i in todo)
  bar = tqdm(total=total, unit="img", desc=f"extract (process {process_index})",
             disable=not progress, dynamic_ncols=True)
  for split, i in todo:
    start, stop = i * d.shard_size, min((i + 1) * d.shard_size, len(records[split]))
    _extract_shard(out, split, i, source.images(split, start, stop, transform=clip.transform),
                   stop - start, clip,
                   int(config.clip.batch_size), bar)
  bar.close()
  barrier("pdiff_extract_shards_done")
  manifest = _merge(config, records, clip, plan) if process_index == 0 else None
  barrier("pdiff_extract_merged")
  return manifest


def _complete_manifest(out: str, plan: dict, d) -> dict | None:
  """The manifest of a finished extraction of exactly `plan` with these merge settings, or None."""
  try:
    manifest = load_manifest(out)
  except FeatureStoreError:
    return None
  same = (manifest.get("plan") == plan and manifest["max_len"] == int(d.max_len)
          and manifest["min_count"] == int(d.min_count) and manifest["feature_dtype"] == d.feature_dtype)
  return manifest if same else None


def _extract_shard(out, split, index, images, count, clip, batch_size, bar) -> None:
  """CLIP features of one shard; `images` yields transformed pixels (decoded and transformed in
  the loader threads) or BadImage. Batch i + 1 is dispatched before batch i is read back, so the
  device does not wait on the host's readback and the host does not wait on the device."""
  features, ok, reasons = [], np.zeros(count, bool), {}
  batch, in_flight = [], []

  def flush(keep: int) -> None:
    if batch:
      in_flight.append(clip.encode_images_async(np.stack(batch)))
      batch.clear()
    while len(in_flight) > keep:
      features.append(in_flight.pop(0)())

  for pos, pixels in enumerate(images):
    if isinstance(pixels, images_lib.BadImage):
      reasons[pos] = str(pixels)
    else:
      batch.append(pixels)
      ok[pos] = True
      if len(batch) == batch_size:
        flush(keep=1)
    bar.update(1)
  flush(keep=0)
  feats = (np.concatenate(features) if features
           else np.zeros((0, clip.embed_dim), np.float32)).astype(np.float32)
  skipped = np.array([f"{p}\t{r}" for p, r in sorted(reasons.items())], dtype=np.str_)
  storage.save_npz(_shard_path(out, split, index), features=feats, ok=ok, skipped=skipped)


def _merge(config, records, clip, plan: dict) -> dict:
  """Joins the shards into the per-split arrays; idempotent (same inputs, same bytes)."""
  d = config.data
  out = d.feature_dir
  vocab = Vocab.build((t for r in records["train"] for t in r.tokens), int(d.min_count))
  vocab.save(storage.join(out, "vocab.json"))
  dtype = FEATURE_DTYPES[d.feature_dtype]
  skipped_all, splits = [], {}
  for split, recs in sorted(records.items()):
    feats, ok = [], []
    for i in range(math.ceil(len(recs) / d.shard_size)):
      path = _shard_path(out, split, i)
      try:
        shard = storage.load_npz(path)
        feats.append(shard["features"])
        ok.append(shard["ok"])
        for line in shard["skipped"]:
          pos, reason = str(line).split("\t", 1)
          rec = recs[i * d.shard_size + int(pos)]
          skipped_all.append({"split": split, "image": rec.image, "image_id": rec.image_id,
                              "reason": reason})
      except (OSError, ValueError, KeyError) as e:
        raise FeatureStoreError(f"{path}: unreadable shard ({e}); delete it and run extract again") from None
    ok_mask = np.concatenate(ok)
    kept = [r for r, good in zip(recs, ok_mask) if good]
    features = np.concatenate(feats).astype(dtype)
    ids = np.stack([vocab.encode(t, d.max_len) for r in kept for t in r.tokens]) if kept else \
        np.zeros((0, d.max_len), np.int32)
    image_index = np.repeat(np.arange(len(kept), dtype=np.int32),
                            [len(r.tokens) for r in kept]).astype(np.int32)
    storage.save_npy(storage.join(out, f"{split}_features.npy"), features)
    storage.save_npy(storage.join(out, f"{split}_ids.npy"), ids.astype(np.int32))
    storage.save_npy(storage.join(out, f"{split}_image_index.npy"), image_index)
    _write_json(storage.join(out, f"{split}_images.json"),
                [{"image_id": r.image_id, "image": r.image, "captions": list(r.captions)} for r in kept])
    splits[split] = {"images": len(kept), "captions": int(ids.shape[0]),
                     "skipped": int(len(recs) - len(kept))}
  _write_json(storage.join(out, "skipped.json"), skipped_all)
  manifest = {
      "format_version": FORMAT_VERSION, "clip_model": clip.name, "feature_dim": int(clip.embed_dim),
      **({"clip_encoding": clip.encoding} if clip.encoding else {}),
      "feature_dtype": d.feature_dtype, "max_len": int(d.max_len), "min_count": int(d.min_count),
      "vocab_size": len(vocab), "vocab_hash": vocab.hash, "source": d.source, "splits": splits,
      "plan": plan,  # what was extracted: the CLIP, source, image root, restval in train, counts
  }
  _write_json(storage.join(out, "manifest.json"), manifest)
  n_skipped = len(skipped_all)
  log.info("feature store %s: %s; %d image(s) skipped%s", out,
           ", ".join(f"{s} {v['images']} images / {v['captions']} captions" for s, v in splits.items()),
           n_skipped, f" (listed in {storage.join(out, 'skipped.json')})" if n_skipped else "")
  return manifest


def load_manifest(feature_dir: str) -> dict:
  path = storage.join(feature_dir, "manifest.json")
  try:
    return storage.read_json(path)
  except FileNotFoundError:
    raise FeatureStoreError(f"{feature_dir}: no manifest.json; run `pdiff extract` with this "
                            "config first (or it did not finish)") from None
  except (OSError, ValueError) as e:
    raise FeatureStoreError(f"{path}: unreadable ({e})") from None


class FeatureStore:
  """Read side: the manifest, the vocabulary and memory-mapped splits."""

  def __init__(self, feature_dir: str):
    self.dir = feature_dir
    self.manifest = load_manifest(feature_dir)
    self.vocab = Vocab.load(storage.join(feature_dir, "vocab.json"))
    if self.vocab.hash != self.manifest["vocab_hash"]:
      raise FeatureStoreError(f"{feature_dir}: vocab.json does not match manifest.json")

  @property
  def splits(self) -> list[str]:
    return sorted(self.manifest["splits"])

  def split(self, name: str) -> CaptionSplit:
    if name not in self.manifest["splits"]:
      raise FeatureStoreError(f"{self.dir}: no split {name!r} (has {', '.join(self.splits)})")
    path = lambda kind: storage.join(self.dir, f"{name}_{kind}.npy")
    try:
      return CaptionSplit(storage.load_npy(path("features")), storage.load_npy(path("ids")),
                          storage.load_npy(path("image_index")))
    except (OSError, ValueError) as e:
      raise FeatureStoreError(f"{self.dir}: split {name!r} is unreadable ({e})") from None

  def feature_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation of the train split's features (float32)."""
    feats = np.asarray(self.split("train").features, np.float64)
    return feats.mean(0).astype(np.float32), np.maximum(feats.std(0), 1e-6).astype(np.float32)

  def images(self, name: str) -> list[dict]:
    return storage.read_json(storage.join(self.dir, f"{name}_images.json"))

