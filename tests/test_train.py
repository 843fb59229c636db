import functools
import json
import os

import jax
import numpy as np
import pytest

from conftest import load_config
from pdiff_jax import checkpoint as ckpt_lib
from pdiff_jax import config as config_lib
from pdiff_jax import diffusion
from pdiff_jax import sharding as sharding_lib
from pdiff_jax import train
from pdiff_jax.data import pipeline


def _run_steps(config, devices, num_steps, batch_fn=None):
  """Creates a state on a mesh over `devices` and runs `num_steps` train steps."""
  mesh = sharding_lib.make_mesh(config, devices)
  model, tx = train.make_model(config), train.make_optimizer(config)
  state, _, shardings = train.create_state(model, tx, config, mesh, jax.random.key(config.seed))
  step_fn = train.jit_train_step(model, tx, config, mesh, shardings)
  split, _, _ = train.load_splits(config)
  history = []
  with jax.set_mesh(mesh):
    for step in range(num_steps):
      local = batch_fn(step) if batch_fn else pipeline.local_batch(
          split, step, config.train.batch_size, config.seed)
      state, metrics = step_fn(state, sharding_lib.global_batch(local, mesh), jax.random.key(7))
      history.append(jax.device_get(metrics))
  return state, history, shardings


def test_loss_drops_on_a_fixed_batch():
  config = load_config("tiny", **{"optim.lr_schedule": "constant", "model.dropout": 0.0,
                                  "model.attention_dropout": 0.0})
  split, _, _ = train.load_splits(config)
  fixed = pipeline.local_batch(split, 0, config.train.batch_size, config.seed)
  _, history, _ = _run_steps(config, jax.devices()[:1], 200, batch_fn=lambda step: fixed)
  first = np.mean([h["loss"] for h in history[:5]])
  last = np.mean([h["loss"] for h in history[-5:]])
  assert last < 0.5 * first, (first, last)


def test_bfloat16_training_reaches_the_float32_loss():
  """bf16 compute (fp32 params, fp32 loss and softmax) on the tiny config: after 200 steps the
  loss is within 2% of the fp32 run that saw the same batches and noise."""
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = load_config("tiny", **{"model.dtype": dtype})
    state, history, _ = _run_steps(config, jax.devices()[:1], 200)
    assert state.params["layer_0"]["attention"]["query"]["kernel"].dtype == np.float32
    losses[dtype] = np.array([h["loss"] for h in history])
  assert np.all(np.isfinite(losses["bfloat16"]))
  # Per-step losses differ by the noise of bf16 rounding; the last 20 steps' mean is the figure.
  f32, b16 = losses["float32"][-20:].mean(), losses["bfloat16"][-20:].mean()
  assert abs(b16 - f32) <= 0.02 * f32, (f32, b16)
  assert f32 < 0.75 * losses["float32"][:5].mean()  # it did learn


_SINGLE: dict = {}


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2), (1, 8)])
def test_sharded_equals_single_device(mesh_shape):
  """8 devices as (data, model) = (8,1), (4,2), (1,8) train like 1 device (losses to 1e-5), with
  the embedding, head bias, attention heads and FFN split on `model` in the compiled step, and
  the model's activation constraints present in the program XLA gets."""
  assert jax.device_count() == 8
  over = {"model.num_heads": 8}  # 8 heads of 4: every layer can split 8 ways
  if not _SINGLE:
    _SINGLE["run"] = _run_steps(load_config("tiny", **over, **{"mesh.shape": (1, 1)}), jax.devices()[:1], 3)
  single, h1, _ = _SINGLE["run"]
  config = load_config("tiny", **over, **{"mesh.shape": mesh_shape})
  sharded, h8, shardings = _run_steps(config, jax.devices(), 3)
  for a, b in zip(h1, h8):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
  flat8 = dict(jax.tree_util.tree_flatten_with_path(sharded.params)[0])
  for path, a in jax.tree_util.tree_flatten_with_path(single.params)[0]:
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name:
      # The key bias adds the same logit to every key of a query, which softmax ignores: its
      # gradient is zero in exact arithmetic, so Adam turns summation-order noise into
      # lr-sized steps. Nothing to compare there.
      continue
    a, b = np.asarray(a), np.asarray(flat8[path])
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max(), err_msg=name)
  V = config.model.vocab_size
  assert np.all(np.asarray(sharded.params["word_embedding"])[V:] == 0)  # padding rows untouched

  # What the compiled step really takes: parameters split on `model` where the mesh has one.
  mesh = sharding_lib.make_mesh(config, jax.devices())
  model, tx = train.make_model(config), train.make_optimizer(config)
  step_fn = train.jit_train_step(model, tx, config, mesh, shardings)
  split, _, _ = train.load_splits(config)
  batch = sharding_lib.global_batch(pipeline.local_batch(split, 0, config.train.batch_size, config.seed), mesh)
  with jax.set_mesh(mesh):
    lowered = step_fn.lower(sharded, batch, jax.random.key(7))
  params_in = lowered.compile().input_shardings[0][0].params
  P = jax.sharding.PartitionSpec
  model_axis = "model" if mesh_shape[1] > 1 else None
  expect = {("word_embedding",): P(model_axis), ("head_bias",): P(model_axis),
            ("layer_0", "attention", "query", "kernel"): P(None, model_axis),
            ("layer_0", "attention", "out", "kernel"): P(model_axis),
            ("layer_0", "intermediate", "kernel"): P(None, model_axis),
            ("layer_0", "output", "kernel"): P(model_axis)}
  for path, spec in expect.items():
    got = params_in
    for k in path:
      got = got[k]
    shape = np.shape(_get(sharded.params, path))
    assert got.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), len(shape)), (path, got.spec)
  # The activation constraints reach XLA (under the rules; without them they would vanish).
  constraints = [l for l in lowered.as_text().splitlines() if "sdy.sharding_constraint" in l]
  assert len(constraints) >= 2 * config.model.num_layers, len(constraints)
  if model_axis:  # the FFN activations (one per layer, forward) and the logits split on model
    assert sum('{"model"}' in l for l in constraints) >= config.model.num_layers + 1, constraints
    unconstrained = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                              schedule=diffusion.make_schedule("trunc_cos", 100),
                                              lr_schedule=train.make_lr_schedule(config), ema_decay=0.99))
    with jax.set_mesh(mesh):
      assert "sdy.sharding_constraint" not in unconstrained.lower(sharded, batch, jax.random.key(7)).as_text()


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def test_scanned_and_rematerialised_layers_train_sharded_like_on_one_device():
  """model.scan_layers + model.remat through the real train step (dropout on): the stacked axis
  is replicated, heads and FFN split on the model axis, and 8 devices train like 1."""
  over = {"model.scan_layers": True, "model.remat": True}
  single, h1, _ = _run_steps(load_config("tiny", **over, **{"mesh.shape": (1, 1)}), jax.devices()[:1], 2)
  sharded, h8, shardings = _run_steps(load_config("tiny", **over, **{"mesh.shape": (4, 2)}), jax.devices(), 2)
  P = jax.sharding.PartitionSpec
  assert shardings.params["layers"]["attention"]["query"]["kernel"].spec == P(None, None, "model", None)
  assert shardings.params["layers"]["intermediate"]["kernel"].spec == P(None, None, "model")
  assert single.params["layers"]["intermediate"]["kernel"].shape[0] == load_config("tiny").model.num_layers
  for a, b in zip(h1, h8):
    assert np.isfinite(a["loss"])
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)


def _params(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def _crash_at(monkeypatch, crash_step, config, workdir, devices):
  """Trains `config` in `workdir` until building the batch of `crash_step` raises; then restores
  the real pipeline."""
  real = pipeline.local_batch

  def crashing(split, step, *args, **kwargs):
    if step == crash_step:
      raise RuntimeError("simulated crash")
    return real(split, step, *args, **kwargs)

  monkeypatch.setattr(pipeline, "local_batch", crashing)
  with pytest.raises(RuntimeError, match="simulated crash"):
    train.train_and_evaluate(config, workdir, devices=devices)
  monkeypatch.setattr(pipeline, "local_batch", real)


def test_resume_is_bit_identical(tmp_path, monkeypatch):
  """10 steps, a crash, a resumed run to 20 == 20 uninterrupted steps, bit for bit."""
  config = load_config("tiny", **{"train.checkpoint_every": 5, "train.log_every": 1,
                                  "train.eval_every": 1000, "train.num_steps": 20})
  devices = jax.devices()[:1]
  full = train.train_and_evaluate(config, str(tmp_path / "full"), devices=devices)

  part = str(tmp_path / "part")
  _crash_at(monkeypatch, 12, config, part, devices)
  assert ckpt_lib.Checkpoints(os.path.join(part, "checkpoints")).latest_step() == 10
  resumed = train.train_and_evaluate(config, part, devices=devices)

  jax.tree.map(np.testing.assert_array_equal, _params(full), _params(resumed))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full.ema_params),
               jax.device_get(resumed.ema_params))
  # metrics.jsonl: the steps redone after the crash replace the lost ones, no duplicates.
  records = [json.loads(l) for l in open(os.path.join(part, "metrics.jsonl"))]
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == list(range(1, 21))
  full_records = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
  for a, b in zip([r for r in records if "loss" in r], [r for r in full_records if "loss" in r]):
    assert a["loss"] == b["loss"]


def test_checkpoint_from_8_devices_restores_on_1(tmp_path):
  config8 = load_config("tiny", **{"mesh.shape": (4, 2)})
  state8, _, _ = _run_steps(config8, jax.devices(), 2)
  ckpts = ckpt_lib.Checkpoints(tmp_path / "ck", async_save=False)
  ckpts.save(2, state8)
  ckpts.close()

  config1 = load_config("tiny", **{"mesh.shape": (1, 1)})
  step, restored = train.restore_state(config1, str(tmp_path / "ck"), jax.devices()[:1])
  assert step == 2 and int(restored.step) == 2
  leaf = restored.params["layer_0"]["attention"]["query"]["kernel"]
  assert leaf.sharding.device_set == {jax.devices()[0]}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state8), jax.device_get(restored))


def corrupt_checkpoint(step_dir) -> None:
  """Overwrites a checkpoint's manifests, OCDBT files and data files with garbage."""
  for root, _, files in os.walk(step_dir):
    for f in files:
      if "manifest" in f or f.endswith(".ocdbt") or "d" == os.path.basename(root):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
  config = load_config("tiny")
  state, _, _ = _run_steps(config, jax.devices()[:1], 1)
  ckpts = ckpt_lib.Checkpoints(tmp_path / "ck", async_save=False)
  ckpts.save(1, state)
  ckpts.save(2, state.replace(step=state.step + 1))
  ckpts.close()
  corrupt_checkpoint(tmp_path / "ck" / "2")
  step, restored = train.restore_state(config, str(tmp_path / "ck"), jax.devices()[:1])
  assert step == 1 and int(restored.step) == 1
  assert "unreadable" in caplog.text
  assert sorted(os.listdir(tmp_path / "ck")) == ["1", "2"]  # a read-only restore moves nothing
  # When no step is readable, nothing is moved aside either (say, a config that no longer fits).
  corrupt_checkpoint(tmp_path / "ck" / "1")
  abstract, shardings = train.state_shardings(train.make_model(config), train.make_optimizer(config), config,
                                              sharding_lib.make_mesh(config, jax.devices()[:1]))
  ckpts = ckpt_lib.Checkpoints(tmp_path / "ck")
  with pytest.raises(ckpt_lib.CheckpointError, match="no readable checkpoint.*nothing was moved"):
    ckpts.restore(ckpt_lib.abstract_with_shardings(abstract, shardings), move_aside=True)
  ckpts.close()
  assert sorted(os.listdir(tmp_path / "ck")) == ["1", "2"]


def test_training_past_a_corrupt_checkpoint_moves_it_aside(tmp_path, monkeypatch, caplog):
  """Checkpoints at 2 and 4, step 4 corrupted: the restart resumes from 2, moves 4 aside (a
  warning names it), saves 4 and 6 again, and ends bit-identical to an uninterrupted run."""
  config = load_config("tiny", **{"train.checkpoint_every": 2, "train.num_steps": 6,
                                  "train.eval_every": 1000})
  devices = jax.devices()[:1]
  full = train.train_and_evaluate(config, str(tmp_path / "full"), devices=devices)
  work = tmp_path / "work"
  _crash_at(monkeypatch, 5, config, str(work), devices)
  corrupt_checkpoint(work / "checkpoints" / "4")
  resumed = train.train_and_evaluate(config, str(work), devices=devices)
  aside = [n for n in os.listdir(work / "checkpoints") if n.startswith("4.corrupt-")]
  assert len(aside) == 1 and f"moved the unreadable checkpoint of step 4 aside to {work / 'checkpoints' / aside[0]}" in caplog.text
  assert ckpt_lib.Checkpoints(work / "checkpoints", read_only=True).steps() == [2, 4, 6]
  jax.tree.map(np.testing.assert_array_equal, _params(full), _params(resumed))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  config = load_config("tiny", **{"train.checkpoint_every": 3, "train.num_steps": 40})
  real = train.load_splits

  def poisoned(cfg, **kwargs):
    tr, va, vocab = real(cfg, **kwargs)
    features = tr.features.copy()
    features[:] = np.nan
    # NaN features from batch 7 on: the 8th update is the first non-finite one.
    return _SwitchingSplit(tr, features, from_step=7, batch_size=cfg.train.batch_size), va, vocab

  monkeypatch.setattr(train, "load_splits", poisoned)
  with pytest.raises(train.TrainingDiverged, match="non-finite loss at step 8.*last good checkpoint is step 6"):
    train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  step, restored = train.restore_state(config, str(tmp_path / "checkpoints"), jax.devices()[:1])
  assert step == 6
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(restored.params)))


class _SwitchingSplit(pipeline.CaptionSplit):
  """A split whose features turn to NaN once batches past `from_step` are read."""

  def __new__(cls, split, nan_features, from_step, batch_size):
    self = super().__new__(cls, _Features(split.features, nan_features, from_step * batch_size),
                           split.ids, split.image_index)
    return self


class _Features:
  def __init__(self, good, bad, after_reads):
    self.good, self.bad, self.rows_read, self.after = good, bad, 0, after_reads

  def __getitem__(self, idx):
    source = self.bad if self.rows_read >= self.after else self.good
    self.rows_read += len(idx)
    return source[idx]


def test_validation_names_the_key():
  cases = {
      "diffusion.schedule": "cosinus",
      "train.num_steps": -1,
      "train.batch_size": 0,
      "model.num_heads": 5,
      "model.dtype": "float8",
      "optim.lr_schedule": "exp",
      "mesh.shape": (-1, -1),
      "data.source": "s3://bucket",
      "model.param_dtype": "bfloat16",
      "clip.views": 3,
      "clip.view_shift": 0,
  }
  for key, value in cases.items():
    with pytest.raises(config_lib.ConfigError, match=f"^config.{key}:"):
      config_lib.validate(load_config("tiny", **{key: value}))


def test_batch_must_divide_data_axis():
  config = load_config("tiny", **{"train.batch_size": 6, "mesh.shape": (4, 2)})
  with pytest.raises(config_lib.ConfigError, match="^config.train.batch_size:.*data axis"):
    sharding_lib.make_mesh(config)
  with pytest.raises(config_lib.ConfigError, match="^config.mesh.shape:"):
    sharding_lib.make_mesh(load_config("tiny", **{"mesh.shape": (3, 1)}))


def test_config_json_round_trip():
  config = load_config("paper_coco")
  assert config_lib.from_json(config_lib.to_json(config)) == config


def test_paper_config_trains_on_karpathy_train_only():
  assert load_config("paper_coco").data.restval_in_train is False  # as the original
  restval = load_config("paper_coco_restval")
  assert restval.data.restval_in_train is True
  assert restval.data.feature_dir != load_config("paper_coco").data.feature_dir


def test_parameters_that_cannot_split_are_named():
  """4 heads on an 8-way model axis: the attention kernels stay replicated, and each is listed
  (train logs these lines at start-up); the padded vocabulary and the FFN still split."""
  config = load_config("tiny", **{"mesh.shape": (1, 8)})
  mesh = sharding_lib.make_mesh(config, jax.devices())
  model, tx = train.make_model(config), train.make_optimizer(config)
  boxed = jax.eval_shape(functools.partial(train.init_state, model, tx, config), jax.random.key(0)).params
  lines = sharding_lib.replication_fallbacks(boxed, mesh, sharding_lib.rules(config))
  assert any("['layer_0']['attention']['query']['kernel']: dim 1 (4) not divisible by model=8" in l
             for l in lines), lines
  assert not any("word_embedding" in l or "intermediate" in l or "head_bias" in l for l in lines)
  assert all("attention" in l for l in lines)


def test_a_checkpoint_converts_between_qkv_layouts(tmp_path, monkeypatch):
  """A workdir trained with q, k, v apart resumes with `model.fused_qkv=True`: the whole state
  (parameters, AdamW's moments, EMA) restores converted, exactly, into an 8-device mesh whose
  model axis splits the heads, and training goes on to the same numbers as without the switch
  (to float rounding: one GEMM instead of three). `pdiff caption`'s loader
  (`inference.restore_ema`) reads either layout as the other: the old checkpoint as fused, the
  new fused one as apart."""
  from pdiff_jax import inference
  from pdiff_jax import model as model_lib
  base = {"train.checkpoint_every": 3, "train.log_every": 1, "train.eval_every": 1000,
          "train.num_steps": 5}
  config = load_config("tiny", **base)  # q, k, v apart, the default
  devices = jax.devices()[:1]
  workdir = str(tmp_path / "w")
  _crash_at(monkeypatch, 4, config, workdir, devices)  # a checkpoint at step 3
  same = train.train_and_evaluate(config, str(tmp_path / "same"), devices=devices)
  first = train.restore_state(config, os.path.join(workdir, "checkpoints"), devices)[1]

  switched = load_config("tiny", **{**base, "mesh.shape": (4, 2)},
                         **{"model.fused_qkv": True})
  step, restored = train.restore_state(switched, os.path.join(workdir, "checkpoints"))
  assert step == 3
  expected = model_lib.fuse_qkv(jax.device_get(first), True)
  jax.tree.map(np.testing.assert_array_equal, expected, jax.device_get(restored))
  qkv = restored.params["layer_0"]["attention"]["qkv"]["kernel"]  # (D, 3, H, K)
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, None, "model", None)

  # `pdiff caption`'s loader (config.json still says the old layout; asked for the new one):
  _, ema, _ = inference.restore_ema(workdir, switched, devices=devices)
  jax.tree.map(np.testing.assert_array_equal, ema, expected.ema_params)

  resumed = train.train_and_evaluate(switched, workdir)  # 8 devices, the other layout
  assert int(resumed.step) == 5
  step, ema, _ = inference.restore_ema(workdir, config, devices=devices)  # the step-5 ckpt, back
  assert step == 5
  jax.tree.map(np.testing.assert_array_equal, ema,
               model_lib.fuse_qkv(jax.device_get(resumed.ema_params), False))
  apart = lambda state: jax.tree_util.tree_flatten_with_path(
      model_lib.fuse_qkv(jax.device_get(state.params), False))[0]
  for (path, a), (_, b) in zip(apart(same), apart(resumed)):
    if "['key']['bias']" not in jax.tree_util.keystr(path):  # zero gradient: see the test above
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max(),
                                 err_msg=jax.tree_util.keystr(path))
  losses = lambda w: [r["loss"] for r in map(json.loads, open(os.path.join(w, "metrics.jsonl")))
                      if "loss" in r]
  np.testing.assert_allclose(losses(workdir), losses(tmp_path / "same"), rtol=1e-5)


def test_k_steps_per_dispatch_equal_k_single_steps(tmp_path, monkeypatch):
  """`train.steps_per_dispatch=K`: K steps in one `lax.scan` give the numbers of K single steps
  (state and every step's metrics), on one device and sharded; a run dispatching K at a time
  (resumed from a checkpoint at a step that is not a multiple of K, so single steps realign it)
  writes the same metrics and state as the run stepping one at a time; K must divide the log,
  eval and checkpoint intervals."""
  assert train.dispatches(0, 10, 4) == [(0, 4), (4, 4), (8, 1), (9, 1)]
  assert train.dispatches(3, 10, 4) == [(3, 1), (4, 4), (8, 1), (9, 1)]
  assert train.dispatches(0, 5, 1) == [(i, 1) for i in range(5)]
  with pytest.raises(config_lib.ConfigError, match="train.steps_per_dispatch.*train.log_every=10"):
    config_lib.validate(load_config("tiny", **{"train.steps_per_dispatch": 4}))

  for mesh_shape, devices in (((4, 2), jax.devices()),):  # (the loop below runs on one device)
    config = load_config("tiny", **{"mesh.shape": mesh_shape})
    mesh = sharding_lib.make_mesh(config, devices)
    model, tx = train.make_model(config), train.make_optimizer(config)
    split, _, _ = train.load_splits(config)
    local = [pipeline.local_batch(split, s, config.train.batch_size, config.seed) for s in range(4)]
    one = train.jit_train_step(model, tx, config, mesh, train.state_shardings(model, tx, config, mesh)[1])
    four = train.jit_train_step(model, tx, config, mesh, train.state_shardings(model, tx, config, mesh)[1], 4)
    with jax.set_mesh(mesh):
      state = train.create_state(model, tx, config, mesh, jax.random.key(0))[0]
      singles = []
      for b in local:
        state, m = one(state, sharding_lib.global_batch(b, mesh), jax.random.key(7))
        singles.append(jax.device_get(m))
      stacked = sharding_lib.global_batch({k: np.stack([b[k] for b in local]) for k in local[0]}, mesh,
                                          stacked=True)
      state4, m4 = four(train.create_state(model, tx, config, mesh, jax.random.key(0))[0], stacked,
                        jax.random.key(7))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(state4))
    for i, m in enumerate(singles):
      for name, v in m.items():
        np.testing.assert_array_equal(np.asarray(m4[name])[i], v, err_msg=name)

  over = {"train.num_steps": 12, "train.log_every": 4, "train.checkpoint_every": 4,
          "train.eval_every": 4}
  devices = jax.devices()[:1]
  plain = train.train_and_evaluate(load_config("tiny", **over), str(tmp_path / "plain"), devices=devices)
  w = str(tmp_path / "k4")
  _crash_at(monkeypatch, 3, load_config("tiny", **{**over, "train.checkpoint_every": 1}), w, devices)
  assert ckpt_lib.Checkpoints(os.path.join(w, "checkpoints")).latest_step() == 3  # not a multiple of 4
  resumed = train.train_and_evaluate(load_config("tiny", **over, **{"train.steps_per_dispatch": 4}), w,
                                     devices=devices)  # dispatches (3, 1), (4, 4), (8, 4)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(plain), jax.device_get(resumed))
  read = lambda d: [{k: v for k, v in r.items() if k != "steps_per_sec"}
                    for r in map(json.loads, open(os.path.join(d, "metrics.jsonl")))]
  assert read(w) == read(tmp_path / "plain")


class _Recording:
  """The model, recording every denoiser call's keyword arguments and output."""

  def __init__(self, model):
    self.model, self.cfg, self.calls = model, model.cfg, []

  def apply(self, variables, *args, **kwargs):
    out = self.model.apply(variables, *args, **kwargs)
    if "method" not in kwargs:
      self.calls.append(({k: kwargs[k] for k in ("cond_B", "x0_self_BLW")}, out))
    return out


def test_the_training_options_drop_the_condition_self_condition_and_learn_the_length():
  import flax.linen as nn
  import jax.numpy as jnp
  import optax
  config = load_config("tiny", **{"model.cond_drop": 0.25, "model.self_cond": 0.5,
                                  "model.length_head": True, "model.dropout": 0.0,
                                  "model.attention_dropout": 0.0})
  model = train.make_model(config)
  params = nn.meta.unbox(model.init(jax.random.key(0), *train.dummy_inputs(config)))["params"]
  B, L = 256, config.data.max_len
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, L + 1, B)
  ids = np.where(np.arange(L) < lengths[:, None], rng.integers(2, 64, (B, L)), 0).astype(np.int32)
  batch = {"ids": jnp.asarray(ids), "features": jnp.asarray(rng.normal(size=(B, 16)), jnp.float32)}
  schedule = diffusion.make_schedule("trunc_cos", 100)

  def recorded(p):  # the loss and what the two denoiser passes were given (returned from jit)
    rec = _Recording(model)
    loss, terms = train.loss_fn(p, batch, jax.random.key(1), model=rec, schedule=schedule, train=True)
    (first, est), (second, _) = rec.calls
    return loss, terms, first, second, est

  loss, terms, first, second, est = jax.jit(recorded)(params)
  # the condition: the same draw in both passes, about a quarter of it the null prefix
  np.testing.assert_array_equal(first["cond_B"], second["cond_B"])
  assert 0.16 < 1 - float(jnp.mean(first["cond_B"])) < 0.34
  # self-conditioning: no estimate in the first pass; about half the examples get it in the second
  assert not np.any(first["x0_self_BLW"])
  fed = np.asarray(jnp.any(second["x0_self_BLW"] != 0, axis=(1, 2)))
  np.testing.assert_array_equal(np.asarray(second["x0_self_BLW"])[fed], np.asarray(est)[fed])
  assert 0.38 < fed.mean() < 0.62
  # the length term: cross-entropy of the head against the caption's word count, added to the loss
  head = jax.jit(lambda p, f: model.apply({"params": p}, f, method="length_logits"))(params, batch["features"])
  expected = optax.softmax_cross_entropy_with_integer_labels(head, jnp.asarray(lengths)).mean()
  np.testing.assert_allclose(terms["length"], expected, rtol=1e-6)
  np.testing.assert_allclose(loss, terms["mse"] + terms["round"] + terms["prior"] + terms["length"], rtol=1e-6)
  # no gradient flows through the first estimate: the gradient is that of a loss fed it as a constant
  grad_of = lambda m: jax.jit(jax.grad(lambda p: train.loss_fn(p, batch, jax.random.key(1), model=m,
                                                             schedule=schedule, train=True)[0]))
  grads = grad_of(model)(params)
  constant = jnp.where(fed[:, None, None], est, 0.0)  # what the second pass was fed, as a constant

  class Fixed:  # the model, with the constant in place of the second pass's input (traced once)
    cfg, calls = model.cfg, 0

    def apply(self, v, *a, **k):
      if "method" not in k:
        self.calls += 1
        if self.calls == 2:
          k = {**k, "x0_self_BLW": constant}
      return model.apply(v, *a, **k)

  const = grad_of(Fixed())(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, const)
