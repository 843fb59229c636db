import json
import os

import numpy as np
import pytest

from conftest import write_image, write_karpathy
from pdiff_jax.data import sources
from pdiff_jax.data.images import BadImage


def test_karpathy(tmp_path):
  path = write_karpathy(str(tmp_path), bad={3})
  src = sources.karpathy(path, str(tmp_path / "images"), restval_in_train=True)
  recs = src.records()
  assert sorted(recs) == ["test", "train", "val"]
  assert len(recs["train"]) == 6 + 2  # restval joined train
  first = recs["train"][0]
  assert first.image_id == 1000  # cocoid preferred over imgid
  assert first.image == os.path.join(str(tmp_path), "images", "train2014", "COCO_000000.png")
  assert len(first.captions) == 5 and first.tokens[0] == tuple(first.captions[0].lower().rstrip(".").split())
  out = list(src.images("train", 0, 5))
  assert isinstance(out[3], BadImage) and "unreadable" in str(out[3])
  assert out[0].mode == "RGB" and out[0].size == (30, 24)
  apart = sources.karpathy(path, str(tmp_path / "images"), restval_in_train=False).records()
  assert len(apart["train"]) == 6 and len(apart["restval"]) == 2
  # With a transform the loader threads return its output, in order; bad images pass through.
  transform = lambda im: np.asarray(im, np.float32).mean(axis=(0, 1))
  for threads in (1, 3):
    src = sources.karpathy(path, str(tmp_path / "images"), True, threads=threads)
    got = list(src.images("train", 0, 5, transform=transform))
    assert isinstance(got[3], BadImage)
    for g, im in zip(got[:3] + got[4:], out[:3] + out[4:]):
      np.testing.assert_array_equal(g, transform(im))


def test_karpathy_flickr_style_and_errors(tmp_path):
  data = {"images": [{"filename": "1.jpg", "imgid": 7, "split": "test",
                      "sentences": [{"raw": "A Dog runs.", "tokens": ["a", "dog", "runs"]}]}]}
  (tmp_path / "dataset_flickr8k.json").write_text(json.dumps(data))
  rec = sources.karpathy(str(tmp_path / "dataset_flickr8k.json"), "root").records()["test"][0]
  assert rec.image_id == 7 and rec.image == os.path.join("root", "1.jpg")
  with pytest.raises(sources.SourceError, match="missing.json: Karpathy split file not found"):
    sources.karpathy(str(tmp_path / "missing.json"), "")
  (tmp_path / "bad.json").write_text(json.dumps({"images": [{"split": "train"}]}))
  with pytest.raises(sources.SourceError, match=r"bad.json: images\[0\] lacks"):
    sources.karpathy(str(tmp_path / "bad.json"), "")


def test_folder(tmp_path):
  write_image(str(tmp_path / "a" / "x.jpg"))
  write_image(str(tmp_path / "y.png"))
  lines = [{"image": "a/x.jpg", "captions": ["A red thing.", "red"], "split": "val"},
           {"image": "y.png", "captions": ["Blue!"], "id": 42}]
  (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
  src = sources.open_source(f"folder:{tmp_path}")
  recs = src.records()
  assert recs["val"][0].image_id == "a/x.jpg" and recs["val"][0].tokens == (("a", "red", "thing"), ("red",))
  assert recs["train"][0].image_id == 42
  assert list(src.images("train", 0, 1))[0].size == (37, 23)
  (tmp_path / "captions.jsonl").write_text('{"image": "y.png"}\n')
  with pytest.raises(sources.SourceError, match=r"captions.jsonl:1"):
    sources.open_source(f"folder:{tmp_path}").records()


def test_tfds_coco_captions_mock():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=4):
    src = sources.open_source("tfds:coco_captions", restval_in_train=True)
    recs = src.records()
    assert sorted(recs) == ["test", "train", "val"]
    assert len(recs["train"]) == 8  # train + restval
    rec = recs["test"][0]
    assert isinstance(rec.image_id, int) and rec.image.startswith("tfds:coco_captions/test/")
    assert len(rec.captions) >= 1 and all(isinstance(c, str) for c in rec.captions)
    # (mock_data ignores sub-split slicing, so ranges are checked on real files below)
    images = list(src.images("test", 0, 4))
    assert len(images) == 4 and all(im.mode == "RGB" for im in images)


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  """A real, prepared TFDS data set with coco_captions' features (tfrecords on disk)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  import tensorflow as tf

  class CocoCaptionsTiny(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="png"),
          "image/filename": tfds.features.Text(), "image/id": tf.int64,
          "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": tf.int64})}))

    def _split_generators(self, dl_manager):
      sizes = {"train": 5, "restval": 3, "val": 2, "test": 2}
      starts = dict(zip(sizes, np.cumsum([0] + list(sizes.values()))))
      return {k: self._generate_examples(starts[k], n) for k, n in sizes.items()}

    def _generate_examples(self, start, n):
      for i in range(start, start + n):
        pixels = np.full((8 + i, 9, 3), i * 10, np.uint8)
        yield i, {"image": pixels, "image/filename": f"img{i}.png", "image/id": 500 + i,
                  "captions": {"text": [f"picture number {i}", "a picture"], "id": [2 * i, 2 * i + 1]}}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  CocoCaptionsTiny(data_dir=data_dir).download_and_prepare()
  return data_dir


def test_tfds_ranges_on_real_files(tiny_tfds):
  src = sources.TfdsSource("coco_captions_tiny", tiny_tfds, restval_in_train=True,
                           max_pixels=10**6)
  recs = src.records()
  ids = [r.image_id for r in recs["train"]]
  assert sorted(ids[:5]) == list(range(500, 505)) and sorted(ids[5:]) == [505, 506, 507]
  assert recs["train"][6].image.startswith("tfds:coco_captions_tiny/restval/img")
  i = recs["test"][0].image_id - 500
  assert recs["test"][0].captions == (f"picture number {i}", "a picture")
  # Images of a range that crosses from train into restval arrive in the records' order.
  images = list(src.images("train", 3, 7))
  expected = [recs["train"][k].image_id - 500 for k in range(3, 7)]
  assert [int(np.asarray(im)[0, 0, 0]) for im in images] == [10 * e for e in expected]
  assert [im.size for im in images] == [(9, 8 + e) for e in expected]
  sized = list(src.images("train", 3, 7, transform=lambda im: im.size))
  assert sized == [(9, 8 + e) for e in expected]  # transformed in the loader threads, in order
  small = sources.TfdsSource("coco_captions_tiny", tiny_tfds, True, max_pixels=100)
  assert all(isinstance(x, BadImage) for x in small.images("test", 0, 2))


def test_unknown_source():
  with pytest.raises(sources.SourceError, match="expected karpathy:PATH"):
    sources.open_source("s3:bucket")
