"""Device mesh from the config, logical-axis rules, and the shardings of state and batches."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import flax.linen as nn
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pdiff_jax.config import ConfigError

AXES = ("data", "model")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int]:
  """Fills the -1 entry so that the product is `num_devices`; raises ConfigError naming mesh.shape."""
  shape = tuple(int(s) for s in shape)
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ConfigError("mesh.shape", f"{shape} does not fit {num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if int(np.prod(shape)) != num_devices:
    raise ConfigError("mesh.shape", f"{shape} needs {int(np.prod(shape))} devices, "
                      f"{num_devices} are present")
  return shape  # type: ignore[return-value]


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, model) mesh over `devices` (default: all), with Auto axes so logical rules apply."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(config.mesh.shape, len(devices))
  if config.train.batch_size % shape[0]:
    raise ConfigError("train.batch_size", f"{config.train.batch_size} is not divisible by the "
                      f"data axis of the mesh ({shape[0]} devices)")
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  if len(devices) == jax.device_count():
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, str | None], ...]:
  return tuple((str(a), None if b is None else str(b)) for a, b in config.mesh.rules)


def logical_shardings(abstract_boxed, mesh: Mesh, axis_rules):
  """NamedShardings for a tree whose leaves may carry nn.Partitioned logical axis names.

  A dimension that its mesh axis does not divide (e.g. 12 heads on 8 model shards) is left
  replicated rather than padded; `replication_fallbacks` lists them. (The vocabulary is padded
  to a multiple of 128 by the model, so it always splits.)
  """
  shardings, _ = _fit(abstract_boxed, mesh, axis_rules)
  return shardings


def replication_fallbacks(abstract_boxed, mesh: Mesh, axis_rules) -> list[str]:
  """One line per parameter dimension that its rule maps to a mesh axis which does not divide
  it, so that it stays replicated: 'path: dim 0 (12) not divisible by model=8'."""
  return _fit(abstract_boxed, mesh, axis_rules)[1]


def _fit(abstract_boxed, mesh: Mesh, axis_rules):
  specs = nn.get_partition_spec(abstract_boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, axis_rules)
  shapes = nn.meta.unbox(abstract_boxed)
  fallbacks = []

  def fit(path, sharding: NamedSharding, leaf) -> NamedSharding:
    spec = list(sharding.spec) + [None] * (len(leaf.shape) - len(sharding.spec))
    for i, axis in enumerate(spec):
      if axis is not None and leaf.shape[i] % _axis_size(mesh, axis):
        fallbacks.append(f"{jax.tree_util.keystr(path)}: dim {i} ({leaf.shape[i]}) not divisible "
                         f"by {axis}={_axis_size(mesh, axis)}; replicated")
        spec[i] = None
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map_with_path(fit, shardings, shapes), fallbacks


def with_rules(fn, axis_rules):
  """`fn` traced under the logical-axis rules, so that `nn.with_logical_constraint` in the model
  becomes a real sharding constraint (without rules it returns its input unchanged)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with nn.logical_axis_rules(axis_rules):
      return fn(*args, **kwargs)

  return wrapped


def _axis_size(mesh: Mesh, axis) -> int:
  names = axis if isinstance(axis, tuple) else (axis,)
  return int(np.prod([mesh.shape[n] for n in names]))


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
  """Batches are split over `data` on their leading axis and replicated over `model`; the
  batches of several steps stacked on a new leading axis (`stacked`), on their second."""
  return NamedSharding(mesh, P(None, "data") if stacked else P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh,
                 stacked: bool = False) -> dict[str, jax.Array]:
  """Assembles each process's slice into one global array sharded on `data` (`stacked`: as
  `batch_sharding`)."""
  sharding = batch_sharding(mesh, stacked)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
