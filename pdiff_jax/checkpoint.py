"""Checkpoints: an Orbax CheckpointManager under `workdir/checkpoints`, resume, and fallback.

The only module that talks to orbax. State is restored against an abstract target that carries
the shardings, so a checkpoint written on one mesh restores on another.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from pdiff_jax import storage

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  pass


# Why a whole, uncorrupted checkpoint may still not restore.
_SHAPES = ("a config whose shapes differ from the checkpoint's cannot restore it, nor can "
           "checkpoints from before the vocabulary was padded to a multiple of 128 rows")


def _all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process (a collective in multi-process runs)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def abstract_with_shardings(abstract_tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


# Other layouts a checkpoint may be in: (abstract target, convert to the wanted layout) pairs.
Layouts = Sequence[tuple[Any, Callable[[Any], Any]]]


def _error(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _restore_as(read: Callable[[Any], Any], abstract: Any, layouts) -> tuple[Any, str | None]:
  """(restored tree, None) from `read(abstract)`, or else from the first of `layouts` whose
  abstract reads, converted; (None, the error against `abstract`) when none does."""
  try:
    return read(abstract), None
  except Exception as e:  # orbax raises many types for unreadable or differently shaped data
    error = _error(e)
  for other, convert in layouts:
    try:
      restored = read(other)
    except Exception:  # noqa: BLE001 -- not this layout either; the target's error is reported
      continue
    log.info("converting a checkpoint of another parameter layout on restore")
    return convert(restored), None
  return None, error


class Checkpoints:
  """Saves every `checkpoint_every` steps (decided by the caller), keeps the latest `keep`."""

  def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = storage.uri(directory)  # orbax needs local paths absolute; gs:// as it is
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._unfinished: int | None = None  # the step of a save that may still be writing

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, extras: dict[str, Any] | None = None) -> None:
    """Saves asynchronously. `extras` are small JSON items stored inside the checkpoint (the
    vocabulary, feature statistics) so that a model always travels with what decodes it."""
    items = {"state": ocp.args.StandardSave(state)}
    for name, value in (extras or {}).items():
      if value is not None:
        items[name] = ocp.args.JsonSave(value)
    self.wait()  # a background save that failed is reported under its own step
    self._unfinished = step
    with self._failures(f"saving step {step}"):
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  @contextlib.contextmanager
  def _failures(self, what: str):
    """A failed write (a full disk, a lost mount) becomes one CheckpointError that says which
    complete checkpoint is still there; orbax only renames a step into place once it is whole."""
    try:
      yield
    except Exception as e:  # orbax re-raises a background write's error in many types
      cause = e
      while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
      reason = next((f"{type(c).__name__}: {str(c).splitlines()[0]}" for c in (cause, e) if str(c)),
                    type(e).__name__)
      try:
        self.manager.reload()
        kept = self.manager.latest_step()
      except Exception:  # the directory itself may be gone (a lost mount)
        kept = None
      raise CheckpointError(f"{what} to {self.directory} failed ({reason}); "
                            + (f"the checkpoint of step {kept} is intact" if kept is not None
                               else "no complete checkpoint found")) from e

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the same step once any process got SIGTERM (JAX's preemption
    sync point, through orbax); to be called at every step. False in single-process runs."""
    return self.manager.reached_preemption(step)

  def restore(self, abstract_state: Any, step: int | None = None, move_aside: bool = False,
              layouts: Layouts = ()) -> tuple[int, Any]:
    """Restores `step` (default: the newest readable one) into the shardings of `abstract_state`.

    `layouts`: other (abstract state, convert) pairs a checkpoint may have been written in (the
    same model with its parameters laid out otherwise): a step that does not restore as
    `abstract_state` is tried as each of them, and `convert` turns what restored into the
    target's layout.

    Newer checkpoints that fail to read (corrupt, half-written) are skipped in favour of an older
    one, each with a warning; with `move_aside` (training does this), once an older one has
    restored, process 0 renames the skipped ones to `<step>.corrupt-<time>` so that training can
    save those steps again. Nothing is renamed when no step restores (a config that no longer
    fits the checkpoints, say). An explicitly requested step is not skipped. With several
    processes a step counts as readable only if every process read it.
    """
    candidates = [step] if step is not None else list(reversed(self.steps()))
    if not candidates:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    errors, skipped = [], []
    for s in candidates:
      restored, error = _restore_as(
          lambda target: self.manager.restore(
              s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"],
          abstract_state, layouts)
      if _all_processes(error is None):
        if move_aside:
          for newer in skipped:
            self._move_aside(newer)
        return s, restored
      errors.append(f"step {s}: {error or 'unreadable on another process'}")
      skipped.append(s)
      if step is None:
        log.warning("checkpoint at step %d in %s is unreadable (%s); trying an older one", s,
                    self.directory, error or "on another process")
    raise CheckpointError(f"no readable checkpoint in {self.directory} (nothing was moved; {_SHAPES}): "
                          + "; ".join(errors))

  def _move_aside(self, step: int) -> None:
    """Renames an unreadable step out of orbax's sight (its name is no longer a step number)."""
    if jax.process_index() == 0:
      source = storage.path(self.directory) / str(step)
      target = source.parent / f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
      source.rename(target)
      log.warning("moved the unreadable checkpoint of step %d aside to %s", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"pdiff_checkpoint_moved_aside_{step}")
    self.manager.reload()

  def wait(self) -> None:
    with self._failures(f"saving step {self._unfinished}"):
      self.manager.wait_until_finished()
    self._unfinished = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


def restore_subtree(directory: str, abstract: dict, step: int | None = None,
                    extras: tuple[str, ...] = ("vocab", "feature_stats"),
                    layouts: Layouts = ()) -> tuple[int, Any, dict]:
  """Restores only the named top-level entries of the saved state (e.g. `ema_params`, without
  the optimizer state) and those of the JSON `extras` saved with it; `layouts` as in
  `Checkpoints.restore`."""
  if not storage.exists(directory):
    raise CheckpointError(f"{directory}: no checkpoints (train first, or check --workdir)")
  directory = storage.uri(directory)  # orbax needs local paths absolute
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise CheckpointError(f"{directory}: no checkpoint saved yet")
    if step is not None and step not in steps:
      raise CheckpointError(f"{directory}: no checkpoint at step {step} (have {steps})")
    step = steps[-1] if step is None else step
    present = [n for n in extras if storage.exists(storage.join(directory, str(step), n))]

    def read(target):
      args = {"state": ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)}
      for name in present:
        args[name] = ocp.args.JsonRestore()
      restored = manager.restore(step, args=ocp.args.Composite(**args))
      # A partial restore hands back the target's own placeholders where the checkpoint lacks
      # an entry (another layout, say), rather than failing.
      missing = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(
          restored["state"]) if isinstance(leaf, jax.ShapeDtypeStruct)]
      if missing:
        raise KeyError(f"not in the checkpoint: {', '.join(missing[:3])}"
                       + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
      return {"state": restored["state"], **{n: restored[n] for n in present}}

    restored, error = _restore_as(read, abstract, tuple(
        (other, lambda r, convert=convert: {**r, "state": convert(r["state"])})
        for other, convert in layouts))
    if error is not None:
      raise CheckpointError(f"{directory}/{step}: unreadable checkpoint ({error}; {_SHAPES})")
    return step, restored["state"], {n: restored[n] for n in present}
  finally:
    manager.close()
