"""Training: TrainState, the pure sharded `train_step`, and the `train_and_evaluate` loop.

The loop owns logging (metrics.jsonl, TensorBoard, console), the held-out loss, checkpoints
and resume; everything random inside a step derives from `fold_in(seed_key, step)`, so a
resumed run is identical to an uninterrupted one.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import signal
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pdiff_jax import checkpoint as ckpt_lib
from pdiff_jax import config as config_lib
from pdiff_jax import diffusion
from pdiff_jax import sharding as sharding_lib
from pdiff_jax import storage
from pdiff_jax.data import features as features_lib
from pdiff_jax.data import pipeline
from pdiff_jax.data.vocab import PAD_ID
from pdiff_jax import model as model_lib
from pdiff_jax.model import PrefixDenoiser, count_params

log = logging.getLogger(__name__)

METRIC_KEYS = ("loss", "loss_mse", "loss_round", "loss_prior", "grad_norm", "lr")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any


class TrainingDiverged(RuntimeError):
  pass


WorkdirLocked = storage.LockedError  # a second trainer on a workdir (local or gs://)


def make_model(config: ml_collections.ConfigDict) -> PrefixDenoiser:
  return PrefixDenoiser(config_lib.model_config(config))


def make_lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  o, total = config.optim, max(int(config.train.num_steps), 1)
  warmup = min(int(o.warmup_steps), total)
  if o.lr_schedule == "linear":
    decay = optax.linear_schedule(o.lr, 0.0, max(total - warmup, 1))
  elif o.lr_schedule == "cosine":
    decay = optax.cosine_decay_schedule(o.lr, max(total - warmup, 1))
  else:
    decay = optax.constant_schedule(o.lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), decay], [warmup])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with decoupled weight decay on every parameter (as torch.optim.AdamW in the original)."""
  o = config.optim
  adamw = optax.adamw(make_lr_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=o.weight_decay)
  if o.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw)
  return adamw


def dummy_inputs(config: ml_collections.ConfigDict, batch: int = 1):
  m = config.model
  return (jnp.zeros((batch, config.data.max_len, m.word_dim), jnp.float32),
          jnp.zeros((batch,), jnp.float32),
          jnp.zeros((batch, m.feature_dim), jnp.float32))


def init_state(model: PrefixDenoiser, tx: optax.GradientTransformation, config, key) -> TrainState:
  """A fresh state whose leaves still carry logical axis names (nn.Partitioned boxes)."""
  params = model.init({"params": key}, *dummy_inputs(config))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params)


def state_shardings(model, tx, config, mesh):
  """(abstract unboxed state, its NamedShardings) without allocating anything."""
  boxed = jax.eval_shape(functools.partial(init_state, model, tx, config), jax.random.key(0))
  shardings = sharding_lib.logical_shardings(boxed, mesh, sharding_lib.rules(config))
  return nn.meta.unbox(boxed), shardings


def create_state(model, tx, config, mesh, key):
  """Initialises the state directly into its shardings (no full copy on one device first)."""
  abstract, shardings = state_shardings(model, tx, config, mesh)
  init = jax.jit(lambda k: nn.meta.unbox(init_state(model, tx, config, k)), out_shardings=shardings)
  with jax.set_mesh(mesh):
    return init(key), abstract, shardings


def other_layouts(config: ml_collections.ConfigDict, mesh, shardings) -> list:
  """`checkpoint.Layouts` of the state: the same model with q, k, v fused if `config` has them
  apart, or apart if fused (`model.fused_qkv`), each converted into `shardings` on restore."""
  fused = bool(config.model.get("fused_qkv", False))
  other = copy.deepcopy(config)
  with other.unlocked():
    other.model.fused_qkv = not fused
  abstract, other_shardings = state_shardings(make_model(other), make_optimizer(other), other, mesh)
  convert = jax.jit(lambda state: model_lib.fuse_qkv(state, fused), out_shardings=shardings)
  return [(ckpt_lib.abstract_with_shardings(abstract, other_shardings), convert)]


def restore_state(config, checkpoint_dir: str, devices=None, step: int | None = None):
  """(step, TrainState) from `checkpoint_dir`, laid out on a mesh over `devices` (default: all),
  whatever mesh or q/k/v layout wrote it."""
  mesh = sharding_lib.make_mesh(config, devices)
  model, tx = make_model(config), make_optimizer(config)
  abstract, shardings = state_shardings(model, tx, config, mesh)
  ckpts = ckpt_lib.Checkpoints(checkpoint_dir)
  try:
    return ckpts.restore(ckpt_lib.abstract_with_shardings(abstract, shardings), step,
                         layouts=other_layouts(config, mesh, shardings))
  finally:
    ckpts.close()


def loss_fn(params, batch, key, *, model: PrefixDenoiser, schedule: diffusion.Schedule,
            train: bool):
  """Mean three-term loss over the batch, and the per-term means; with the options of
  `ModelConfig` on, also the condition dropped (`cond_drop`), the model fed its own stop-gradient
  estimate (`self_cond`, ~25% more compute: one more forward pass) and the length head's
  cross-entropy added with weight 1 (`length_head`, term "length")."""
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  k_cond, k_self, k_drop_self = jax.random.split(jax.random.fold_in(key, 1), 3)  # options only
  ids_BL, clip_BF = batch["ids"], batch["features"]
  B, cfg = ids_BL.shape[0], model.cfg
  t_B = jax.random.randint(k_t, (B,), 0, schedule.num_steps)
  variables = {"params": params}
  rngs = {"dropout": k_drop} if train else {}
  # Training drops the condition with probability cond_drop; evaluation keeps every image.
  cond_B = None
  if cfg.cond_drop > 0:
    cond_B = (jax.random.uniform(k_cond, (B,)) >= cfg.cond_drop) if train else jnp.ones((B,), bool)

  def denoise(x_t, model_t):
    apply = lambda x0_self, rngs: model.apply(variables, x_t, model_t, clip_BF,
                                              deterministic=not train, rngs=rngs, cond_B=cond_B,
                                              x0_self_BLW=x0_self)
    if cfg.self_cond <= 0:
      return apply(None, rngs)
    # Self-conditioning (Chen et al., Analog Bits): for a self_cond fraction of the examples, a
    # first estimate without it (no gradient) is the extra input of the second; zeros otherwise.
    first = jax.lax.stop_gradient(apply(jnp.zeros_like(x_t), {"dropout": k_drop_self} if train else {}))
    use_B = jax.random.uniform(k_self, (B,)) < cfg.self_cond if train else jnp.ones((B,), bool)
    return apply(jnp.where(use_B[:, None, None], first, 0.0), rngs)

  losses = diffusion.training_losses(
      schedule, model.apply(variables, ids_BL, method="embed"), ids_BL, t_B, k_noise, denoise,
      lambda x: model.apply(variables, x, method="logits"))
  means = {k: jnp.mean(v) for k, v in losses._asdict().items()}
  if cfg.length_head:
    lengths_B = jnp.sum(ids_BL != PAD_ID, axis=-1)
    length_logits = model.apply(variables, clip_BF, method="length_logits")
    means["length"] = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(length_logits, lengths_B))
    means["loss"] = means["loss"] + means["length"]
  return means["loss"], means


def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array, *,
               model: PrefixDenoiser, tx: optax.GradientTransformation,
               schedule: diffusion.Schedule, lr_schedule: optax.Schedule,
               ema_decay: float) -> tuple[TrainState, dict[str, jax.Array]]:
  step_key = jax.random.fold_in(key, state.step)
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model=model, schedule=schedule,
                                                 train=True), has_aux=True)
  (_, terms), grads = grad_fn(state.params, batch, step_key)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
  metrics = {"loss": terms["loss"], "loss_mse": terms["mse"], "loss_round": terms["round"],
             "loss_prior": terms["prior"], "grad_norm": optax.tree.norm(grads),
             "lr": lr_schedule(state.step)}
  if "length" in terms:
    metrics["loss_length"] = terms["length"]
  return TrainState(state.step + 1, params, opt_state, ema), metrics


def train_steps(state: TrainState, batches: dict[str, jax.Array], key: jax.Array,
                **kwargs) -> tuple[TrainState, dict[str, jax.Array]]:
  """K train steps in one dispatch: `train_step` under `lax.scan` over the leading (K,) axis of
  `batches`; the same steps as K calls (each step's randomness is a function of its number),
  with each metric stacked to (K,)."""
  return jax.lax.scan(lambda s, batch: train_step(s, batch, key, **kwargs), state, batches)


def dispatches(start: int, total: int, k: int) -> list[tuple[int, int]]:
  """(first step, number of steps) of each dispatch from `start` to `total`: K steps at a time
  from multiples of K (so with log, eval and checkpoint intervals multiples of K a dispatch
  never runs past one), single steps to reach the first multiple and after the last."""
  out, step = [], start
  while step < total:
    n = k if k > 1 and step % k == 0 and step + k <= total else 1
    out.append((step, n))
    step += n
  return out


def _guard(guard: dict, metrics: dict, step: jax.Array) -> dict:
  """{"step", "metrics"} of the first step whose metrics were not all finite (step -1 while
  none): updated on the device each step, read by the host only at log and checkpoint steps."""
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))
  first = (guard["step"] < 0) & ~finite
  return {"step": jnp.where(first, step.astype(jnp.int32), guard["step"]),
          "metrics": jax.tree.map(lambda new, old: jnp.where(first, new, old), metrics,
                                  guard["metrics"])}


def _guard_steps(guard: dict, metrics_K: dict, step: jax.Array) -> dict:
  """`_guard` over the stacked metrics of the K steps that ended at `step`."""
  k = jax.tree.leaves(metrics_K)[0].shape[0]
  for i in range(k):
    guard = _guard(guard, jax.tree.map(lambda x: x[i], metrics_K), step - (k - 1 - i))
  return guard


def eval_step(params, batch, key, *, model, schedule):
  return loss_fn(params, batch, key, model=model, schedule=schedule, train=False)[1]


def jit_train_step(model, tx, config, mesh, shardings, k: int = 1) -> Callable:
  """The jitted, sharded `train_step` (state donated); with `k` > 1, `train_steps` over
  batches stacked on a leading (k,) axis."""
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_steps)
  step = functools.partial(train_step if k == 1 else train_steps, model=model, tx=tx,
                           schedule=schedule, lr_schedule=make_lr_schedule(config),
                           ema_decay=config.optim.ema_decay)
  step = sharding_lib.with_rules(step, sharding_lib.rules(config))
  return jax.jit(step, in_shardings=(shardings, sharding_lib.batch_sharding(mesh, stacked=k > 1),
                                     sharding_lib.replicated(mesh)),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=0)


def load_splits(config, overrides=()):
  """(train split, validation split or None, vocabulary or None) for the configured data.

  Features come from the store `pdiff extract` wrote to `data.feature_dir`; the vocabulary
  size and the feature size are taken from it (`config` is updated), unless the config file or
  a flag (`overrides`: the dotted keys set by --config.KEY=) named another feature size, which
  is then an error. `data.source=synthetic` gives in-memory random features instead (smoke
  runs and benchmarks that need no data set).
  """
  d, m = config.data, config.model
  if d.source == "synthetic":
    make = functools.partial(pipeline.synthetic_split, vocab_size=m.vocab_size,
                             max_len=d.max_len, feature_dim=m.feature_dim)
    return (make(d.synthetic_num_images, seed=config.seed),
            make(max(d.synthetic_num_images // 8, 1), seed=config.seed + 1), None)
  try:
    store = features_lib.FeatureStore(d.feature_dir)
  except (features_lib.FeatureStoreError, ValueError) as e:
    raise config_lib.ConfigError("data.feature_dir", str(e)) from None
  manifest = store.manifest
  if manifest["feature_dim"] != m.feature_dim:
    if config_lib.explicit(config, "model.feature_dim", overrides):
      raise config_lib.ConfigError(
          "model.feature_dim", f"is {m.feature_dim}, but the features in {d.feature_dir} are "
          f"{manifest['feature_dim']}-d ({manifest['clip_model']})")
    log.info("model.feature_dim: %d from the feature store %s (%s)", manifest["feature_dim"],
             d.feature_dir, manifest["clip_model"])
    m.feature_dim = int(manifest["feature_dim"])
  # Only Karpathy-split sources have a restval split whose place the flag decides.
  has_restval = manifest["source"].startswith(("karpathy:", "tfds:"))
  stored = manifest.get("plan", {}).get("restval_in_train")
  if has_restval and stored is None:
    log.warning("%s does not record whether Karpathy restval is in its train split (extracted "
                "before that was recorded); extract again to be sure data.restval_in_train=%s "
                "holds", d.feature_dir, bool(d.restval_in_train))
  elif has_restval and bool(stored) != bool(d.restval_in_train):
    raise config_lib.ConfigError(
        "data.restval_in_train", f"is {bool(d.restval_in_train)}, but the train split of "
        f"{d.feature_dir} was extracted with {bool(stored)}; extract into another data.feature_dir")
  if manifest["max_len"] != d.max_len:
    raise config_lib.ConfigError(
        "data.max_len", f"is {d.max_len}, but {d.feature_dir} holds captions of length "
        f"{manifest['max_len']}; extract again or set data.max_len={manifest['max_len']}")
  views = config_lib.clip_views(config)
  stored = manifest.get("clip_encoding", {})
  if stored != config_lib.clip_encoding(config):
    raise config_lib.ConfigError(
        "clip.views", f"is {views['views']} (view_shift {views['view_shift']}), but the features in "
        f"{d.feature_dir} are of {stored.get('views', 1)} view(s)"
        f"{' (view_shift %d)' % stored['view_shift'] if stored else ''}; extract again into another "
        "data.feature_dir, or set clip.views (and clip.view_shift) as they were")
  m.vocab_size = len(store.vocab)
  val = store.split("val") if manifest["splits"].get("val", {}).get("captions") else None
  train_split = store.split("train")
  if d.standardize_features:
    mean, std = store.feature_stats()
    standardize = lambda s: s._replace(features=((np.asarray(s.features, np.float32) - mean) / std))
    train_split, val = standardize(train_split), None if val is None else standardize(val)
  return train_split, val, store.vocab


class _Stop:
  """Set by SIGTERM (preemption) in a single-process run: the loop saves a checkpoint at the next
  step and exits. Multi-process runs leave SIGTERM to JAX's preemption service instead (see
  `Checkpoints.reached_preemption`), so that every process saves at the same step."""

  def __init__(self):
    self.requested = False

  def __call__(self, signum, frame):
    log.warning("received signal %d: saving a checkpoint and stopping", signum)
    self.requested = True


class _MetricsLog:
  """metrics.jsonl (lines past the resume step dropped; on gs:// uploaded at most every 10 s and
  at every checkpoint), TensorBoard and the console."""

  def __init__(self, workdir: str, start_step: int, total_steps: int, enabled: bool):
    self.enabled, self.total = enabled, total_steps
    self.last_step, self.last_time = start_step, time.perf_counter()
    self.writer = self.lines = None
    if not enabled:
      return
    # A resumed run redoes the steps after its checkpoint: their old lines go.
    self.lines = storage.LineLog(storage.join(workdir, "metrics.jsonl"),
                                 keep=lambda l: json.loads(l).get("step", 0) <= start_step)
    from tensorboardX import SummaryWriter
    self.writer = SummaryWriter(storage.join(workdir, "tensorboard"))

  def write(self, step: int, values: dict[str, float], prefix: str = "") -> None:
    now = time.perf_counter()
    record = {"step": step, **{prefix + k: float(v) for k, v in values.items()}}
    if not prefix:
      rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
      record["steps_per_sec"] = rate
      eta = (self.total - step) / rate if rate > 0 else float("inf")
      log.info("step %d/%d  loss %.4f (mse %.4f round %.4f)  %.2f steps/s  ETA %s", step,
               self.total, record["loss"], record["loss_mse"], record["loss_round"], rate,
               _duration(eta))
      self.last_step, self.last_time = step, now
    else:
      log.info("step %d  %s", step, "  ".join(f"{k} {v:.4f}" for k, v in record.items()
                                             if k != "step"))
    if not self.enabled:
      return
    self.lines.append(json.dumps(record))
    for k, v in record.items():
      if k != "step":
        self.writer.add_scalar(k, v, step)

  def flush(self) -> None:
    if self.lines is not None:
      self.lines.flush()

  def close(self):
    try:
      self.flush()
    finally:
      if self.writer is not None:
        try:
          self.writer.close()
        except OSError as e:  # e.g. a full disk: never hide the error that stopped the run
          log.warning("closing the TensorBoard writer failed: %s", e)


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices=None, overrides=()) -> TrainState:
  """Trains to `config.train.num_steps`, resuming from the newest checkpoint in `workdir`.
  `overrides`: the config keys a user set by flag (they are never replaced by the feature
  store's sizes).

  Process 0 holds a lock on the workdir for the whole run (`storage.WorkdirLock`, local or
  gs://), so a second trainer started on the same workdir refuses instead of interleaving
  checkpoints; a dead process's lock does not block a restart.
  """
  config_lib.validate(config)
  storage.makedirs(workdir)
  lock, refused = None, ""
  if jax.process_index() == 0:
    try:
      lock = storage.WorkdirLock(workdir).acquire()
    except WorkdirLocked as e:
      refused = str(e)
  if not _from_process_0(lock is not None):  # every process stops, not process 0 alone
    raise WorkdirLocked(refused or f"{workdir}: process 0 could not take the workdir lock")
  try:
    return _train_and_evaluate(config, workdir, devices, overrides, _Keeper(lock))
  finally:
    if lock is not None:
      lock.release()


def _from_process_0(flag: bool) -> bool:
  """Process 0's `flag`, on every process (a collective in multi-process runs)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


class _Keeper:
  """Keeps process 0's workdir lock alive (`beat`, cheap enough for every step) and makes a lost
  lock (another trainer took it over) stop every process together, at the next `check`."""

  def __init__(self, lock: storage.WorkdirLock | None):
    self.lock, self.lost = lock, None

  def beat(self) -> None:
    if self.lock is None or self.lost is not None:
      return
    try:
      self.lock.heartbeat()
    except WorkdirLocked as e:
      self.lost = e
      self.lock = None
      if jax.process_count() == 1:
        raise

  def check(self) -> None:
    """A collective: call it on every process at the same step (before each checkpoint)."""
    if jax.process_count() > 1 and _from_process_0(self.lost is not None):
      raise WorkdirLocked(str(self.lost) if self.lost else "process 0 lost the workdir lock; stopping")


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices,
                        overrides, keeper: "_Keeper") -> TrainState:
  train_split, val_split, vocab = load_splits(config, overrides=overrides)
  judge = config_lib.judge_config(config)
  if judge.steps > 0 and judge.batch_size > len(train_split.features):
    raise config_lib.ConfigError(  # checked now, not after the denoiser has trained
        "judge.batch_size", f"is {judge.batch_size}, more than the {len(train_split.features)} "
        "images of the train split")
  extras = {"vocab": None if vocab is None else {"words": vocab.words, "min_count": vocab.min_count}}
  if config.data.source != "synthetic" and config.data.standardize_features:
    mean, std = features_lib.FeatureStore(config.data.feature_dir).feature_stats()
    extras["feature_stats"] = {"mean": mean.tolist(), "std": std.tolist()}
  mesh = sharding_lib.make_mesh(config, devices)
  is_main = jax.process_index() == 0
  if is_main:
    storage.write_text(storage.join(workdir, "config.json"), config_lib.to_json(config))
  log.info("jax %s, flax %s, optax %s; %d process(es), %d device(s): %s; mesh %s",
           jax.__version__, flax.__version__, optax.__version__, jax.process_count(),
           mesh.devices.size, mesh.devices.flat[0].device_kind, dict(mesh.shape))

  model, tx = make_model(config), make_optimizer(config)
  root_key = jax.random.key(config.seed)
  init_key, step_key, eval_key = jax.random.split(root_key, 3)
  ckpts = ckpt_lib.Checkpoints(storage.join(workdir, "checkpoints"), config.train.keep_checkpoints,
                               config.train.async_checkpointing)
  abstract, shardings = state_shardings(model, tx, config, mesh)
  log.info("trainable parameters: %s", f"{count_params(abstract.params, model.cfg):,}")
  boxed_params = jax.eval_shape(functools.partial(init_state, model, tx, config),
                                jax.random.key(0)).params
  for line in sharding_lib.replication_fallbacks(boxed_params, mesh, sharding_lib.rules(config)):
    log.warning("parameter %s (its mesh axis does not divide it)", line)
  if ckpts.latest_step() is not None:
    start, state = ckpts.restore(ckpt_lib.abstract_with_shardings(abstract, shardings),
                                 move_aside=True, layouts=other_layouts(config, mesh, shardings))
    log.info("resumed from step %d in %s", start, ckpts.directory)
  else:
    state, _, _ = create_state(model, tx, config, mesh, init_key)
    start = 0

  keeper.beat()  # start-up (downloading features, restoring) may take minutes
  k = int(config.train.get("steps_per_dispatch", 1))
  p_train_step = jit_train_step(model, tx, config, mesh, shardings)
  p_train_steps = jit_train_step(model, tx, config, mesh, shardings, k) if k > 1 else None
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_steps)
  p_eval_step = jax.jit(sharding_lib.with_rules(functools.partial(eval_step, model=model,
                                                                  schedule=schedule),
                                                sharding_lib.rules(config)),
                        in_shardings=(shardings.ema_params, sharding_lib.batch_sharding(mesh),
                                      sharding_lib.replicated(mesh)),
                        out_shardings=sharding_lib.replicated(mesh))

  t = config.train
  total = int(t.num_steps)
  metrics_log = _MetricsLog(workdir, start, total, is_main)
  stop = _Stop()
  multi_process = jax.process_count() > 1
  previous_handler = None if multi_process else signal.signal(signal.SIGTERM, stop)

  def batch_at(split, step):
    local = pipeline.local_batch(split, step, t.batch_size, config.seed, jax.process_index(),
                                 jax.process_count())
    return sharding_lib.global_batch(local, mesh)

  def batches_at(step: int, n: int):
    if n == 1:
      return batch_at(train_split, step)
    local = [pipeline.local_batch(train_split, step + i, t.batch_size, config.seed,
                                  jax.process_index(), jax.process_count()) for i in range(n)]
    return sharding_lib.global_batch({key: np.stack([b[key] for b in local]) for key in local[0]},
                                     mesh, stacked=True)

  p_guard = jax.jit(_guard, out_shardings=sharding_lib.replicated(mesh))
  p_guard_steps = jax.jit(_guard_steps, out_shardings=sharding_lib.replicated(mesh))

  def read_guard(guard) -> None:
    """Raises TrainingDiverged if a step so far had a non-finite metric (a device read)."""
    g = jax.device_get(guard)
    if int(g["step"]) >= 0:
      raise TrainingDiverged(
          f"non-finite loss at step {int(g['step'])} "
          f"({', '.join(f'{k}={float(v)}' for k, v in g['metrics'].items())});"
          f" the last good checkpoint is step {ckpts.latest_step()} in {ckpts.directory}")

  def write_log(step: int, metrics, guard) -> None:
    """`metrics`: of the one step that ended at `step`, or stacked (K,) for the K that did."""
    read_guard(guard)
    values = jax.device_get(metrics)
    metrics_log.write(step, {k: np.asarray(v).reshape(-1)[-1] for k, v in values.items()})

  def evaluate(step: int) -> None:
    if val_split is None or t.eval_batches == 0:
      return
    sums: dict[str, float] = {}
    for i in range(t.eval_batches):
      terms = jax.device_get(p_eval_step(state.ema_params, batch_at(val_split, i),
                                         jax.random.fold_in(eval_key, i)))
      for k, v in terms.items():
        sums[k] = sums.get(k, 0.0) + float(v) / t.eval_batches
    metrics_log.write(step, sums, prefix="eval_")

  # The host never waits on the device between log steps: batches are built and copied ahead
  # (pipeline.Prefetcher), the finiteness check stays on the device (`_guard`), and the metrics
  # of a log step are read one step later, while the next step runs.
  # With train.steps_per_dispatch = K > 1, K steps run per dispatch (`train_steps`).
  logged, guard, t_start = None, None, time.perf_counter()
  plan = dispatches(start, total, k)
  sizes = dict(plan)
  batches = pipeline.Prefetcher(lambda step: batches_at(step, sizes[step]), [s for s, _ in plan],
                                depth=int(t.get("prefetch", 2)))
  stopped = False
  try:
    with jax.set_mesh(mesh):
      for step, n in plan:
        # metrics: this step's, or with n > 1 each metric stacked (n,) over the dispatch's steps.
        state, metrics = (p_train_step if n == 1 else p_train_steps)(state, batches.get(step),
                                                                     step_key)
        if guard is None:
          guard = {"step": jnp.int32(-1), "metrics": jax.tree.map(
              lambda x: jnp.zeros(x.shape[1:] if n > 1 else x.shape, x.dtype), metrics)}
        guard = (p_guard if n == 1 else p_guard_steps)(guard, metrics, state.step)
        if step == start:  # keep compilation out of the steps/s figures
          jax.block_until_ready(metrics)
          log.info("first step (with compilation) took %.1f s", time.perf_counter() - t_start)
          metrics_log.last_time = time.perf_counter()
        if logged is not None:
          write_log(*logged)
          logged = None
        done = step + n
        if done % t.log_every == 0 or done == total:
          logged = (done, metrics, guard)
        # Read once: a signal arriving later is handled next step. With several processes a
        # SIGTERM on any of them makes all agree on one step to save at (a collective).
        stopping = ckpts.reached_preemption(done) if multi_process else stop.requested
        keeper.beat()  # renews a gs:// lock at most once a minute
        if done % t.checkpoint_every == 0 or done == total or stopping:
          keeper.check()
          if logged is not None:
            write_log(*logged)
            logged = None
          read_guard(guard)  # never a checkpoint after a non-finite step
          ckpts.save(done, state, extras)
          metrics_log.flush()
        if stopping:
          log.warning("stopped at step %d on request; checkpoint saved", done)
          stopped = True
          break
        if done % t.eval_every == 0 or done == total:
          evaluate(done)
      if logged is not None:
        write_log(*logged)
      if guard is not None:
        read_guard(guard)
  finally:
    batches.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
    try:
      ckpts.close()
    finally:
      metrics_log.close()
  if not stopped and judge.steps > 0:
    # The judge of captions (judge.py) learns from the feature store, not the denoiser. Every
    # process trains the same one on one of its devices (none waits on another at exit), process
    # 0 saves it, and a finished run trains it once.
    from pdiff_jax import judge as judge_lib

    def tick() -> None:  # process 0's lock stays alive, and a lost one stops it before saving
      keeper.beat()
      if keeper.lost is not None:
        raise WorkdirLocked(str(keeper.lost))
    judge_lib.train_for_model(config, workdir, tick=tick)
  return state
