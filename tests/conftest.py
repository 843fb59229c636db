"""Eight fake CPU devices for every test, set before JAX starts, so that sharded runs can be
compared with single-device ones in one process."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
