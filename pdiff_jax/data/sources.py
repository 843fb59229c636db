"""Captioned-image sources: Karpathy JSON, TFDS `coco_captions`, a plain folder, the shapes set.

Each source gives, per split, a deterministic list of `ImageRecord`s (metadata only) and can
decode the images of a contiguous range of one split, so that extraction can run in shards
on many processes. Knows nothing of the model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from pdiff_jax import storage
from pdiff_jax.data import images as images_lib
from pdiff_jax.data import vocab as vocab_lib

SPLITS = ("train", "val", "test")


class SourceError(ValueError):
  """The data source cannot be read (missing file, bad format); names the file or setting."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  image_id: int | str       # the data set's own id (Karpathy cocoid, else imgid; TFDS image/id)
  image: str                # file path, or a name that identifies the image inside the source
  captions: tuple[str, ...]  # raw reference captions
  tokens: tuple[tuple[str, ...], ...]  # tokenised captions (the data set's own tokens if it has them)


def _tokens(raw: Sequence[str], given: Sequence[Sequence[str]] | None = None):
  if given is not None and len(given) == len(raw):
    return tuple(tuple(w.lower() for w in t) for t in given)
  return tuple(tuple(vocab_lib.tokenize(c)) for c in raw)


class FileSource:
  """Records whose images are files on disk, decoded (and transformed) by a small thread pool."""

  def __init__(self, splits: dict[str, list[ImageRecord]], max_pixels: int, threads: int = 8):
    self._splits, self.max_pixels, self.threads = splits, max_pixels, threads

  def records(self) -> dict[str, list[ImageRecord]]:
    return self._splits

  def _load(self, record: ImageRecord, transform=None):
    try:
      image = images_lib.load_image(record.image, self.max_pixels)
    except images_lib.BadImage as e:
      return e
    return image if transform is None else transform(image)

  def images(self, split: str, start: int, stop: int, transform=None) -> Iterator:
    """Decoded RGB images (or the BadImage explaining why not) of records [start, stop), in order;
    with `transform`, `transform(image)` computed in the same loader thread."""
    load = functools.partial(self._load, transform=transform)
    yield from images_lib.ordered_map(load, self._splits[split][start:stop], self.threads)


def _read_json(path: str, what: str):
  try:
    return storage.read_json(path)
  except FileNotFoundError:
    raise SourceError(f"{path}: {what} not found") from None
  except (OSError, ValueError) as e:
    raise SourceError(f"{path}: not a readable {what} ({e})") from None


def karpathy(path: str, image_root: str, restval_in_train: bool = True,
             max_pixels: int = images_lib.DEFAULT_MAX_PIXELS, threads: int = 8) -> FileSource:
  """Karpathy's `dataset_{coco,flickr30k,flickr8k}.json`; images under `image_root/filepath/filename`."""
  data = _read_json(path, "Karpathy split file")
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise SourceError(f"{path}: expected a Karpathy split file with an 'images' list")
  splits: dict[str, list[ImageRecord]] = {}
  for i, entry in enumerate(data["images"]):
    try:
      split = entry["split"]
      if split == "restval":
        split = "train" if restval_in_train else "restval"
      sentences = entry["sentences"]
      raw = [s["raw"] for s in sentences]
      toks = [s["tokens"] for s in sentences] if all("tokens" in s for s in sentences) else None
      image_id = entry["cocoid"] if "cocoid" in entry else entry["imgid"]
      rel = (entry.get("filepath", ""), entry["filename"])
    except (KeyError, TypeError) as e:
      raise SourceError(f"{path}: images[{i}] lacks {e}") from None
    splits.setdefault(split, []).append(
        ImageRecord(image_id, storage.join(image_root, *rel), tuple(raw), _tokens(raw, toks)))
  return FileSource(splits, max_pixels, threads)


def folder(root: str, max_pixels: int = images_lib.DEFAULT_MAX_PIXELS, threads: int = 8) -> FileSource:
  """`root/captions.jsonl`: one `{"image": "rel/path.jpg", "captions": [...], "split": "train"}`
  per line (`split` defaults to train; an optional `id` is the image id, else the path)."""
  path = storage.join(root, "captions.jsonl")
  if not storage.exists(path):
    raise SourceError(f"{path}: not found (a folder source needs captions.jsonl)")
  splits: dict[str, list[ImageRecord]] = {}
  for n, line in enumerate(storage.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      entry = json.loads(line)
      raw = [str(c) for c in entry["captions"]]
      rel = entry["image"]
    except (ValueError, KeyError, TypeError) as e:
      raise SourceError(f"{path}:{n}: expected {{\"image\": ..., \"captions\": [...]}} ({e})") from None
    record = ImageRecord(entry.get("id", rel), storage.join(root, rel), tuple(raw), _tokens(raw))
    splits.setdefault(entry.get("split", "train"), []).append(record)
  return FileSource(splits, max_pixels, threads)


class TfdsSource:
  """TFDS `coco_captions` (Karpathy splits built in: train, restval, val, test)."""

  def __init__(self, name: str, data_dir: str | None, restval_in_train: bool, max_pixels: int,
               threads: int = 8):
    try:
      import tensorflow_datasets as tfds
    except ImportError:
      raise SourceError("data.source=tfds:... needs tensorflow-datasets: pip install 'pdiff_jax[tfds]'") from None
    self.tfds, self.name, self.data_dir = tfds, name, data_dir
    self.restval_in_train, self.max_pixels, self.threads = restval_in_train, max_pixels, threads
    self._splits: dict[str, list[ImageRecord]] | None = None
    self._ranges: dict[str, list[tuple[str, int]]] = {}

  def _load(self, split: str, images: bool):
    # PartialDecoding reads only what is needed: metadata in the first pass, pixels (decoded by
    # TFDS, which validated them when the data set was prepared) when extracting.
    wanted = {"image": True} if images else {"image/id": True, "image/filename": True,
                                             "captions": {"text": True}}
    ds = self.tfds.load(self.name, split=split, data_dir=self.data_dir, shuffle_files=False,
                        decoders=self.tfds.decode.PartialDecoding(wanted))
    return self.tfds.as_numpy(ds)

  def records(self) -> dict[str, list[ImageRecord]]:
    if self._splits is not None:
      return self._splits
    wanted = {"train": ["train"] + (["restval"] if self.restval_in_train else []), "val": ["val"],
              "test": ["test"]}
    if not self.restval_in_train:
      wanted["restval"] = ["restval"]
    splits = {}
    try:
      for ours, theirs in wanted.items():
        records, ranges = [], []
        for split in theirs:
          n = 0
          for ex in self._load(split, images=False):
            raw = [c.decode() for c in ex["captions"]["text"]]
            name = ex.get("image/filename", b"")
            name = name.decode() if isinstance(name, bytes) else str(ex["image/id"])
            records.append(ImageRecord(int(ex["image/id"]), f"tfds:{self.name}/{split}/{name}",
                                       tuple(raw), _tokens(raw)))
            n += 1
          ranges.append((split, n))
        splits[ours], self._ranges[ours] = records, ranges
    except Exception as e:  # tfds raises many types for a missing or unprepared data set
      raise SourceError(f"tfds:{self.name} (data_dir={self.data_dir}): cannot read it "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    self._splits = splits
    return splits

  def images(self, split: str, start: int, stop: int, transform=None):
    """As FileSource.images; TFDS decodes, the loader threads convert and transform."""
    self.records()
    decode = functools.partial(self._decode, transform=transform)
    yield from images_lib.ordered_map(decode, self._pixels(split, start, stop), self.threads)

  def _pixels(self, split: str, start: int, stop: int):
    offset = 0
    for theirs, n in self._ranges[split]:
      a, b = max(start - offset, 0), min(stop - offset, n)
      if a < b:
        for ex in self._load(f"{theirs}[{a}:{b}]", images=True):
          yield ex["image"]
      offset += n

  def _decode(self, pixels: np.ndarray, transform=None):
    h, w = pixels.shape[:2]
    if h * w > self.max_pixels:
      return images_lib.BadImage(f"{w}x{h} pixels exceed the limit of {self.max_pixels}")
    image = images_lib.to_rgb(Image.fromarray(np.squeeze(pixels, -1) if pixels.shape[-1] == 1 else pixels))
    return image if transform is None else transform(image)


def open_source(spec: str, image_root: str = "", restval_in_train: bool = True,
                max_pixels: int = images_lib.DEFAULT_MAX_PIXELS, tfds_data_dir: str | None = None,
                threads: int = 8):
  """`karpathy:PATH`, `tfds:NAME`, `folder:PATH` (see CONTRACT.md's data.source); `threads`
  loader threads decode and transform the images."""
  kind, _, arg = spec.partition(":")
  if kind == "karpathy" and arg:
    return karpathy(arg, image_root, restval_in_train, max_pixels, threads)
  if kind == "folder" and arg:
    return folder(arg, max_pixels, threads)
  if kind == "tfds" and arg:
    return TfdsSource(arg, tfds_data_dir or None, restval_in_train, max_pixels, threads)
  raise SourceError(f"data.source={spec!r}: expected karpathy:PATH, tfds:NAME or folder:PATH")
