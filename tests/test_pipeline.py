import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, load_config
from pdiff_jax.data import pipeline


def _split(n_images=10):
  return pipeline.synthetic_split(n_images, vocab_size=50, max_len=6, feature_dim=4, seed=0)


def test_order_is_a_pure_function_of_step_and_covers_each_epoch():
  n, batch = 23, 8
  steps = [pipeline.global_indices(n, s, batch, seed=1) for s in range(12)]
  stream = np.concatenate(steps)
  for epoch in range(4):
    assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))  # every sample once per epoch
  np.testing.assert_array_equal(pipeline.global_indices(n, 7, batch, seed=1), steps[7])
  assert not np.array_equal(pipeline.global_indices(n, 0, batch, seed=2), steps[0])
  assert not np.array_equal(stream[:n], stream[n:2 * n])  # a new permutation each epoch


def test_process_slices_are_disjoint_and_make_the_global_batch():
  split = _split()
  for step in range(5):
    whole = pipeline.local_batch(split, step, 12, seed=3)
    parts = [pipeline.local_batch(split, step, 12, 3, p, 4) for p in range(4)]
    for key in ("ids", "features"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  # Each sample is a (caption, its image's feature) pair.
  idx = pipeline.global_indices(split.num_samples, 0, 12, 3)
  first = pipeline.local_batch(split, 0, 12, 3)
  np.testing.assert_array_equal(first["ids"], split.ids[idx])
  np.testing.assert_array_equal(first["features"], split.features[split.image_index[idx]])
  with pytest.raises(ValueError, match="not divisible by 5 processes"):
    pipeline.local_batch(split, 0, 12, 3, 0, 5)


def test_epoch_permutation_is_drawn_once_and_read_only():
  pipeline.epoch_permutation.cache_clear()
  first = pipeline.epoch_permutation(1000, 5, 3)
  assert pipeline.epoch_permutation(1000, 5, 3) is first  # cached, not redrawn per step
  np.testing.assert_array_equal(first, np.random.default_rng([5, 3]).permutation(1000))
  with pytest.raises(ValueError):
    first[0] = 1  # callers cannot corrupt the cached order
  # The stream across an epoch boundary is the uncached stream, position by position.
  n, batch, seed = 37, 16, 2
  stream = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(3)])
  for step in range(6):
    np.testing.assert_array_equal(pipeline.global_indices(n, step, batch, seed),
                                  stream[step * batch:(step + 1) * batch])


def test_prefetcher_gives_the_inline_batches_in_order():
  split = _split(30)
  make = lambda step: pipeline.local_batch(split, step, 8, seed=4)
  with pipeline.Prefetcher(make, range(3, 40), depth=2) as batches:
    for step in range(3, 40):
      got, want = batches.get(step), make(step)
      for key in ("ids", "features"):
        np.testing.assert_array_equal(got[key], want[key])


def test_prefetcher_raises_the_error_of_make_and_stops_early():
  import threading
  calls = []

  def make(step):
    calls.append(step)
    if step == 4:
      raise OSError(f"feature file unreadable at step {step}")
    return step

  with pipeline.Prefetcher(make, range(10), depth=1) as batches:
    assert [batches.get(s) for s in range(4)] == [0, 1, 2, 3]
    with pytest.raises(OSError, match="unreadable at step 4"):
      batches.get(4)
  assert calls == [0, 1, 2, 3, 4]  # nothing after the error
  # Closed before the end (a preemption stop): the thread ends, having run at most depth ahead.
  started = []
  with pipeline.Prefetcher(lambda s: started.append(s) or s, range(10_000), depth=2) as batches:
    assert batches.get(0) == 0
  assert not any(t.name == "pdiff-prefetch" and t.is_alive() for t in threading.enumerate())
  assert len(started) <= 4
  with pytest.raises(ValueError, match="depth must be >= 1"):
    pipeline.Prefetcher(lambda s: s, range(1), depth=0)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_jax_processes_build_the_single_process_batch(tmp_path):
  port = _free_port()
  worker = os.path.join(ROOT, "tests", "multihost_worker.py")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, worker, "global_batches", str(port), "2", str(i),
                             str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
  results = [np.load(tmp_path / f"process_{i}.npz") for i in range(2)]

  config = load_config("tiny")
  from pdiff_jax import train
  split, _, _ = train.load_splits(config)
  for step in range(3):
    single = pipeline.local_batch(split, step, config.train.batch_size, config.seed)
    for key in ("ids", "features"):
      parts = [r[f"local_{key}_{step}"] for r in results]
      assert parts[0].shape[0] == parts[1].shape[0] == config.train.batch_size // 2
      np.testing.assert_array_equal(np.concatenate(parts), single[key])
      for r in results:
        np.testing.assert_array_equal(r[f"global_{key}_{step}"], single[key])
