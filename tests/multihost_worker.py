"""Runs inside one of several JAX processes started by a test (CPU, gloo collectives).

usage: python multihost_worker.py SCENARIO PORT NUM_PROCESSES PROCESS_ID OUT_DIR
"""

import os
import sys

scenario, port, num_processes, process_id, out = sys.argv[1:6]
os.environ["XLA_FLAGS"] = " ".join(["--xla_force_host_platform_device_count=2", os.environ.get("PDIFF_TESTS_XLA_OPT", "")])
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=int(num_processes),
                           process_id=int(process_id))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import load_config  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from pdiff_jax import sharding, train  # noqa: E402
from pdiff_jax.data import pipeline  # noqa: E402


def global_batches():
  """Each process builds its slice of 3 global batches; the global arrays are gathered back."""
  config = load_config("tiny")
  mesh = sharding.make_mesh(config)
  split, _, _ = train.load_splits(config)
  result = {}
  for step in range(3):
    local = pipeline.local_batch(split, step, config.train.batch_size, config.seed,
                                 jax.process_index(), jax.process_count())
    batch = sharding.global_batch(local, mesh)
    for key, array in batch.items():
      assert array.shape[0] == config.train.batch_size
      result[f"local_{key}_{step}"] = local[key]
      result[f"global_{key}_{step}"] = np.asarray(multihost_utils.process_allgather(array, tiled=True))
      # What this process holds of the global array is exactly the rows it built.
      mine = np.concatenate([np.asarray(s.data) for s in sorted(
          array.addressable_shards, key=lambda s: s.index[0].start)])
      np.testing.assert_array_equal(mine, local[key])
  np.savez(os.path.join(out, f"process_{jax.process_index()}.npz"), **result)


{"global_batches": global_batches}[scenario]()
jax.distributed.shutdown()
