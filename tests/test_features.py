"""`pdiff extract`: the feature store from real files and a CLIP loaded by path; resume; merge."""

import filecmp
import json
import os

import numpy as np
import pytest

from conftest import load_config, run_pdiff, write_karpathy, xla_flags
from pdiff_jax import clip as clip_lib
from pdiff_jax import train
from pdiff_jax.data import features
from pdiff_jax.data.images import load_image
from pdiff_jax.data.vocab import Vocab


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("coco"))
  return root, write_karpathy(root, bad={3})


@pytest.fixture(scope="module")
def clip(clip_dir):
  return clip_lib.Clip.load(clip_dir)


def _config(dataset, clip_dir, feature_dir, **overrides):
  root, path = dataset
  return load_config("tiny", **{
      "data.source": f"karpathy:{path}", "data.image_root": os.path.join(root, "images"),
      "data.feature_dir": str(feature_dir), "data.shard_size": 3, "data.min_count": 1,
      "clip.model": clip_dir, "clip.batch_size": 2, "model.feature_dim": 32,
      "data.restval_in_train": True, **overrides})


def _tree_equal(a, b):
  cmp = filecmp.dircmp(a, b)
  names = sorted(set(os.listdir(a)))
  assert names == sorted(os.listdir(b))
  for name in names:
    pa, pb = os.path.join(a, name), os.path.join(b, name)
    if os.path.isdir(pa):
      _tree_equal(pa, pb)
    else:
      assert filecmp.cmp(pa, pb, shallow=False), name
  return cmp


def test_extract_writes_the_store(dataset, clip, clip_dir, tmp_path):
  config = _config(dataset, clip_dir, tmp_path / "f")
  manifest = features.extract(config, clip, progress=False)
  assert manifest["splits"] == {"train": {"images": 7, "captions": 35, "skipped": 1},
                                "val": {"images": 2, "captions": 10, "skipped": 0},
                                "test": {"images": 2, "captions": 10, "skipped": 0}}
  assert manifest["feature_dim"] == 32 and manifest["clip_model"] == clip_dir
  skipped = json.load(open(tmp_path / "f" / "skipped.json"))
  assert len(skipped) == 1 and skipped[0]["image_id"] == 1003 and "unreadable" in skipped[0]["reason"]

  store = features.FeatureStore(str(tmp_path / "f"))
  train_split = store.split("train")
  assert isinstance(train_split.features, np.memmap)
  meta = store.images("train")
  assert [m["image_id"] for m in meta] == [1000, 1001, 1002, 1004, 1005, 1010, 1011]  # + restval
  # Features are CLIP's embedding of each (readable) image, in order.
  direct = clip.encode_images(clip.preprocess([load_image(m["image"]) for m in meta]))
  np.testing.assert_allclose(train_split.features, direct, rtol=1e-5, atol=1e-5)
  # Captions: Karpathy tokens through the train vocabulary, 5 per image, PAD-padded.
  vocab = store.vocab
  assert vocab.words[:2] == ["<pad>", "<unk>"]
  assert train_split.ids.shape == (35, config.data.max_len) and train_split.ids.dtype == np.int32
  np.testing.assert_array_equal(train_split.image_index, np.repeat(np.arange(7), 5))
  first = json.load(open(dataset[1]))["images"][0]["sentences"][0]["tokens"]
  assert vocab.decode(train_split.ids[0]) == " ".join(first[:config.data.max_len])


def test_crash_and_rerun_equals_clean_run(dataset, clip, clip_dir, tmp_path, monkeypatch):
  clean = _config(dataset, clip_dir, tmp_path / "clean")
  features.extract(clean, clip, progress=False)

  real, calls = features._extract_shard, []

  def crash_after_two(*args, **kwargs):
    if len(calls) == 2:
      raise KeyboardInterrupt("simulated kill")
    calls.append(args[1:3])
    return real(*args, **kwargs)

  monkeypatch.setattr(features, "_extract_shard", crash_after_two)
  crashed = _config(dataset, clip_dir, tmp_path / "crashed")
  with pytest.raises(KeyboardInterrupt):
    features.extract(crashed, clip, progress=False)
  assert len(os.listdir(tmp_path / "crashed" / "shards")) == 3  # plan.json + 2 shards
  assert not os.path.exists(tmp_path / "crashed" / "manifest.json")
  monkeypatch.setattr(features, "_extract_shard", real)
  done = []
  monkeypatch.setattr(features, "_extract_shard", lambda *a, **k: (done.append(a[1:3]), real(*a, **k)))
  features.extract(crashed, clip, progress=False)
  assert not set(done) & set(calls)  # finished shards were not redone
  _tree_equal(str(tmp_path / "clean"), str(tmp_path / "crashed"))
  # A re-run of a finished extraction (a relaunched pod job) does nothing: no shard, no merge.
  stamps = {f: os.stat(os.path.join(tmp_path / "crashed", f)).st_mtime_ns for f in os.listdir(tmp_path / "crashed")
            if f.endswith((".npy", ".json"))}
  monkeypatch.setattr(features, "_merge", lambda *a, **k: pytest.fail("merged again"))
  again = features.extract(crashed, clip, progress=False)
  assert again == json.load(open(tmp_path / "crashed" / "manifest.json"))
  assert stamps == {f: os.stat(os.path.join(tmp_path / "crashed", f)).st_mtime_ns for f in stamps}
  # The merge itself is idempotent: redone, it writes the same bytes.
  monkeypatch.undo()
  os.remove(tmp_path / "crashed" / "manifest.json")
  features.extract(crashed, clip, progress=False)
  _tree_equal(str(tmp_path / "clean"), str(tmp_path / "crashed"))


def test_two_processes_split_the_shards(dataset, clip, clip_dir, tmp_path):
  features.extract(_config(dataset, clip_dir, tmp_path / "one"), clip, progress=False)
  config = _config(dataset, clip_dir, tmp_path / "two")
  features.extract(config, clip, process_index=1, process_count=2, progress=False)
  mine = sorted(f for f in os.listdir(tmp_path / "two" / "shards") if f.endswith(".npz"))
  assert mine == ["train-00001.npz"]  # odd shards only (val and test have one shard each)
  features.extract(config, clip, process_index=0, process_count=2, progress=False)
  _tree_equal(str(tmp_path / "one"), str(tmp_path / "two"))


def test_a_different_extraction_is_refused(dataset, clip, clip_dir, tmp_path):
  features.extract(_config(dataset, clip_dir, tmp_path / "f"), clip, progress=False)
  with pytest.raises(features.FeatureStoreError, match="different extraction"):
    features.extract(_config(dataset, clip_dir, tmp_path / "f", **{"data.shard_size": 4}), clip,
                     progress=False)


def test_views_are_recorded_and_training_must_use_them(dataset, clip, clip_dir, tmp_path):
  """Features of 5 views are the view-averaged embeddings; the store says so, another view count
  is another extraction, and training with another `clip.views` stops with the key named."""
  config = _config(dataset, clip_dir, tmp_path / "f", **{"clip.views": 5})
  many = clip.with_views(5, 1)
  manifest = features.extract(config, many, progress=False)
  assert manifest["clip_encoding"] == manifest["plan"]["clip_encoding"] == {"views": 5, "view_shift": 1}
  store = features.FeatureStore(str(tmp_path / "f"))
  meta = store.images("train")
  np.testing.assert_allclose(store.split("train").features,
                             many.encode_images(many.preprocess([load_image(m["image"]) for m in meta])),
                             rtol=1e-5, atol=1e-5)
  train.load_splits(config)
  with pytest.raises(train.config_lib.ConfigError,
                     match=r"^config.clip.views: is 1 \(view_shift 1\), but .* of 5 view\(s\) \(view_shift 1\)"):
    train.load_splits(_config(dataset, clip_dir, tmp_path / "f"))
  with pytest.raises(train.config_lib.ConfigError, match="^config.clip.views: is 5 \\(view_shift 2\\)"):
    train.load_splits(_config(dataset, clip_dir, tmp_path / "f", **{"clip.views": 5, "clip.view_shift": 2}))
  with pytest.raises(features.FeatureStoreError, match="different extraction"):
    features.extract(_config(dataset, clip_dir, tmp_path / "f"), clip, progress=False)
  # A store of one view records nothing new: those extracted before views existed stay valid.
  one = features.extract(_config(dataset, clip_dir, tmp_path / "g"), clip, progress=False)
  assert "clip_encoding" not in one and "clip_encoding" not in one["plan"]


def test_training_reads_the_store(dataset, clip, clip_dir, tmp_path):
  config = _config(dataset, clip_dir, tmp_path / "f")
  features.extract(config, clip, progress=False)
  train_split, val_split, vocab = train.load_splits(config)
  assert config.model.vocab_size == len(vocab) == len(Vocab.load(tmp_path / "f" / "vocab.json"))
  assert train_split.num_samples == 35 and val_split.num_samples == 10
  with pytest.raises(train.config_lib.ConfigError, match="^config.model.feature_dim: is 16.*32-d"):
    train.load_splits(_config(dataset, clip_dir, tmp_path / "f", **{"model.feature_dim": 16}))
  with pytest.raises(train.config_lib.ConfigError, match="^config.data.feature_dir:.*pdiff extract"):
    train.load_splits(_config(dataset, clip_dir, tmp_path / "missing"))
  # The store records whether restval is in its train split; a config that says otherwise stops.
  assert json.load(open(tmp_path / "f" / "manifest.json"))["plan"]["restval_in_train"] is True
  with pytest.raises(train.config_lib.ConfigError, match="^config.data.restval_in_train: is False.*with True"):
    train.load_splits(_config(dataset, clip_dir, tmp_path / "f", **{"data.restval_in_train": False}))
  # The default feature size (the base config's 768) follows the store, as the vocabulary does;
  # named by a flag it must match.
  default = _config(dataset, clip_dir, tmp_path / "f", **{"model.feature_dim": 768})
  train.load_splits(default)
  assert default.model.feature_dim == 32
  with pytest.raises(train.config_lib.ConfigError, match="^config.model.feature_dim: is 768.*32-d"):
    train.load_splits(_config(dataset, clip_dir, tmp_path / "f", **{"model.feature_dim": 768}),
                      overrides=("model.feature_dim",))


def test_extract_then_train_from_the_command_line(dataset, clip_dir, tmp_path):
  root, path = dataset
  overrides = [f"--config.data.source=karpathy:{path}", f"--config.data.image_root={root}/images",
               f"--config.data.feature_dir={tmp_path}/f", "--config.data.shard_size=4",
               f"--config.clip.model={clip_dir}", "--config.model.feature_dim=32"]
  env = {"XLA_FLAGS": xla_flags()}
  r = run_pdiff("extract", "--config=configs/tiny.py", *overrides, env=env)
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout)["splits"]["train"]["skipped"] == 1
  assert "1 image(s) skipped" in r.stderr
  r = run_pdiff("train", "--config=configs/tiny.py", f"--workdir={tmp_path}/w",
                "--config.train.num_steps=20", "--config.train.checkpoint_every=10", *overrides, env=env)
  assert r.returncode == 0, r.stderr
  saved = json.load(open(tmp_path / "w" / "config.json"))
  vocab = Vocab.load(tmp_path / "f" / "vocab.json")
  assert saved["model"]["vocab_size"] == len(vocab)
  for step in ("10", "20"):  # every checkpoint carries the vocabulary it was trained with
    words = json.load(open(tmp_path / "w" / "checkpoints" / step / "vocab" / "metadata"))["words"]
    assert words == vocab.words
  assert [json.loads(l)["step"] for l in open(tmp_path / "w" / "metrics.jsonl")
          if "loss" in json.loads(l)] == [10, 20]
  # A wrong feature size is a configuration error: exit 2, naming the key.
  r = run_pdiff("train", "--config=configs/tiny.py", f"--workdir={tmp_path}/w2", *overrides,
                "--config.model.feature_dim=16", env=env)
  assert r.returncode == 2 and "config.model.feature_dim" in r.stderr
  # `pdiff info` on the paper config with this store: its vocabulary and feature sizes.
  r = run_pdiff("info", "--config=configs/paper_coco.py", f"--config.data.feature_dir={tmp_path}/f", env=env)
  assert r.returncode == 0, r.stderr
  info = json.loads(r.stdout)
  assert (info["vocab_size"], info["feature_dim"], info["feature_store"]) == (len(vocab), 32, f"{tmp_path}/f")
  assert info["trainable_params"] == 94_948_257 - (768 - 32) * 1536 - (14145 - len(vocab)) * 49
