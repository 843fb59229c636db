"""Eight fake CPU devices for every test, set before JAX starts, so that sharded runs can be
compared with single-device ones in one process; and one compilation cache for the session."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail at once instead of retrying
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the whole session, shared with the subprocesses the tests
# start: the same tiny train step is compiled by a dozen command-line runs, and a cache hit turns
# ~10 s of XLA compilation into a file read. Removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _cache = tempfile.mkdtemp(prefix="pdiff-tests-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

# The command-line runs the tests start need no PyTorch (only test_clip's from_pt check does, in
# this process): transformers imports torch when it can, ~4.5 s of every subprocess here. This
# process reads USE_TORCH first (at transformers' import), the subprocesses inherit USE_TORCH=0.
import transformers.utils.import_utils  # noqa: E402,F401
os.environ.setdefault("USE_TORCH", "0")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def load_config(name: str, **overrides):
  """A config file from configs/ by name, with dotted-key overrides (as --config.key=value)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


@pytest.fixture
def tiny_config():
  return load_config("tiny")


def run_pdiff(*args, timeout=600, env=None):
  """Runs the installed command line as a user would: `python -m pdiff_jax ARGS`."""
  import subprocess
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, "-m", "pdiff_jax", *args], capture_output=True, text=True,
                        timeout=timeout, env=full_env, cwd=ROOT)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
  """A tiny random CLIP saved like a hub model (Flax weights, tokenizer, image processor)."""
  from pdiff_jax import clip
  return clip.save_small_clip(tmp_path_factory.mktemp("clip"), words=["a", "red", "blue", "circle"])


def write_image(path, size=(37, 23), mode="RGB", fmt=None, seed=0):
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(seed)
  arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  image = Image.fromarray(arr, "RGB")
  if mode != "RGB":
    image = image.convert(mode)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, format=fmt)
  return path


def write_karpathy(root, splits=(("train", 6), ("val", 2), ("test", 2), ("restval", 2)),
                   bad=()):
  """A Karpathy-format data set: dataset_coco.json plus real PNG/JPEG files under root/images.
  `bad` names images (by running index) to replace with a truncated file."""
  import json
  words = ["a", "red", "blue", "circle", "square", "on", "the", "left", "right", "big"]
  images, n = [], 0
  for split, count in splits:
    for _ in range(count):
      folder = "train2014" if split == "train" else "val2014"
      ext = "jpg" if n % 2 else "png"
      filename = f"COCO_{n:06d}.{ext}"
      path = os.path.join(root, "images", folder, filename)
      write_image(path, size=(30 + 7 * n, 24 + 3 * n), seed=n)
      if n in bad:
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])
      sentences = []
      for j in range(5):
        toks = [words[(n + j + k) % len(words)] for k in range(3 + (n + j) % 4)]
        sentences.append({"tokens": toks, "raw": " ".join(toks).capitalize() + "."})
      images.append({"filepath": folder, "filename": filename, "imgid": n, "cocoid": 1000 + n,
                     "split": split, "sentences": sentences})
      n += 1
  path = os.path.join(root, "dataset_coco.json")
  with open(path, "w") as f:
    json.dump({"images": images, "dataset": "coco"}, f)
  return path


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, clip_dir):
  """configs/tiny.py trained for 100 steps on features of a small Karpathy-format set."""
  import jax
  from pdiff_jax import clip as clip_lib, train
  from pdiff_jax.data import features
  root = str(tmp_path_factory.mktemp("trained"))
  path = write_karpathy(os.path.join(root, "data"), splits=(("train", 12), ("val", 2), ("test", 3)))
  config = load_config("tiny", **{
      "data.source": f"karpathy:{path}", "data.image_root": os.path.join(root, "data", "images"),
      "data.feature_dir": os.path.join(root, "features"), "data.min_count": 1,
      "clip.model": clip_dir, "model.feature_dim": 32, "train.num_steps": 100,
      "train.checkpoint_every": 50, "train.eval_every": 1000, "optim.ema_decay": 0.9})
  features.extract(config, clip_lib.Clip.load(clip_dir), progress=False)
  workdir = os.path.join(root, "workdir")
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir, os.path.join(root, "data")
