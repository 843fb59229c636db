"""Eight fake CPU devices for every test, set before JAX starts, so that sharded runs can be
compared with single-device ones in one process; and one compilation cache for the session."""

import os
import sys

# The suite compiles at XLA's backend optimisation level 0 (LLVM's -O0 for the CPU code): the same
# programs, less optimised machine code. These tiny models spend most of their time compiling, and
# this halves it (tests/test_train.py's k-steps test: 91 -> 47 CPU seconds). The demo's test runs
# at the default level, as users do. PDIFF_TESTS_XLA_OPT="" runs the whole suite at the default.
XLA_OPT = os.environ.setdefault("PDIFF_TESTS_XLA_OPT", "--xla_backend_optimization_level=0")


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a process the tests start: the suite's optimisation level, and `devices` fake
  CPU devices (None: one, the real one)."""
  count = f"--xla_force_host_platform_device_count={devices}" if devices else ""
  return " ".join(f for f in (XLA_OPT, count) if f)


os.environ["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), xla_flags(8)) if f)
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

# The subprocesses the tests start run as on an install without PyTorch (the `test` extra has it
# only for the in-process reference checks): tests/hidden_heavy hides torch and diffusers from
# them, ~2 s of every command-line run here (tensorboardX imports torch whenever it can). A pytest
# process started under it (a pytest-xdist worker) takes them back before anything imports them.
HIDDEN_HEAVY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hidden_heavy")
for _name in ("torch", "diffusers"):
  if _name in sys.modules and sys.modules[_name] is None:
    del sys.modules[_name]
if os.environ.get("PDIFF_TESTS_HIDE") is None:
  os.environ["PDIFF_TESTS_HIDE"] = "torch,diffusers"
  os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HIDDEN_HEAVY, os.environ.get("PYTHONPATH")) if p)

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
