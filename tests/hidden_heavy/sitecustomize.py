"""Put on PYTHONPATH to run a program as if tensorflow and torch were not installed: `import torch`
raises ImportError and `importlib.util.find_spec("torch")` is None (so transformers, which asks
find_spec, sees no torch). tests/test_demo.py runs the demo under it."""
import sys

for _name in ("tensorflow", "torch", "tensorflow_datasets", "diffusers"):
  sys.modules[_name] = None
