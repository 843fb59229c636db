"""Put on PYTHONPATH to run a program as if some installed packages were not: `import torch`
raises ImportError and `importlib.util.find_spec("torch")` is None (so transformers, which asks
find_spec, sees no torch). PDIFF_TESTS_HIDE names them (comma-separated); by default tensorflow,
torch, tensorflow_datasets and diffusers, the demo's light install (tests/test_demo.py). The
suite's other subprocesses hide torch and diffusers (tests/conftest.py): only the in-process
reference checks use them, and tensorboardX imports torch whenever it can (~2 s a run)."""
import os
import sys

for _name in os.environ.get("PDIFF_TESTS_HIDE", "tensorflow,torch,tensorflow_datasets,diffusers").split(","):
  if _name:
    sys.modules[_name] = None
