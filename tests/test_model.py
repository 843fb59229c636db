import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from pdiff_jax import config as config_lib
from pdiff_jax import model as model_lib
from pdiff_jax.model import ModelConfig, PrefixDenoiser


def _init(cfg: ModelConfig, batch=2, key=0):
  m = PrefixDenoiser(cfg)
  x = jnp.zeros((batch, cfg.max_len, cfg.word_dim))
  params = jax.jit(m.init)(jax.random.key(key), x, jnp.zeros((batch,)), jnp.zeros((batch, cfg.feature_dim)))
  return m, nn.meta.unbox(params)


@pytest.fixture(scope="module")
def tiny():
  cfg = config_lib.model_config(load_config("tiny"))
  return (cfg,) + _init(cfg)


def test_paper_config_parameter_count():
  cfg = config_lib.model_config(load_config("paper_coco"))
  m = PrefixDenoiser(cfg)
  shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 24, 48)), jnp.zeros((1,)),
                          jnp.zeros((1, 768)))
  p = nn.meta.unbox(shapes)["params"]
  assert model_lib.count_params(p, cfg) == 94_948_257  # SPEC.md, exactly the original's
  # The table and head bias carry 63 padding rows (14,145 -> 14,208 = 111 x 128), not counted.
  assert p["word_embedding"].shape == (14_208, 48) and p["head_bias"].shape == (14_208,)
  assert model_lib.count_params(p) == 94_948_257 + 63 * 49
  encoder = sum(model_lib.count_params(p[f"layer_{i}"]) for i in range(12))
  assert encoder == 85_054_464
  assert model_lib.count_params(p["mapper"]) == 7_083_264


def test_shapes(tiny):
  cfg, m, params = tiny
  B = 3
  x = jax.random.normal(jax.random.key(1), (B, cfg.max_len, cfg.word_dim))
  out = m.apply(params, x, jnp.arange(B, dtype=jnp.float32), jnp.ones((B, cfg.feature_dim)))
  assert out.shape == (B, cfg.max_len, cfg.word_dim) and out.dtype == jnp.float32
  ids = jnp.zeros((B, cfg.max_len), jnp.int32)
  assert m.apply(params, ids, method="embed").shape == (B, cfg.max_len, cfg.word_dim)
  assert m.apply(params, x, method="logits").shape == (B, cfg.max_len, model_lib.padded_vocab(cfg.vocab_size))
  # Shorter captions work too (the position table is sliced).
  assert m.apply(params, x[:, :3], jnp.zeros((B,)), jnp.ones((B, cfg.feature_dim))).shape == (B, 3, cfg.word_dim)


def test_tied_head_is_embedding_transpose_plus_bias(tiny):
  cfg, m, params = tiny
  x = jax.random.normal(jax.random.key(2), (2, cfg.max_len, cfg.word_dim))
  V = cfg.vocab_size
  E = params["params"]["word_embedding"]
  b = params["params"]["head_bias"]
  logits = m.apply(params, x, method="logits")
  np.testing.assert_allclose(logits[..., :V], x @ E[:V].T + b[:V], rtol=1e-5, atol=1e-5)
  # The padding rows: zero at init, and never chosen (-inf logits).
  assert E.shape[0] == b.shape[0] == model_lib.padded_vocab(V) > V
  assert np.all(np.asarray(E[V:]) == 0) and np.all(np.asarray(b[V:]) == 0)
  assert np.all(np.isneginf(np.asarray(logits[..., V:])))


def test_padding_rows_leave_the_real_rows_and_the_loss_unchanged(tiny):
  """The padded table's real rows are exactly an unpadded N(0, 1) table's (same key), and the
  rounding loss gives the padding rows no gradient, so they stay zero through training."""
  cfg, m, params = tiny
  key = jax.random.key(0)
  padded = model_lib.zero_padded(model_lib.normal_init, cfg.vocab_size)(key, (128, cfg.word_dim))
  np.testing.assert_array_equal(padded[:cfg.vocab_size], model_lib.normal_init(key, (cfg.vocab_size, cfg.word_dim)))
  import optax
  ids = jax.random.randint(jax.random.key(1), (2, cfg.max_len), 0, cfg.vocab_size)
  x = jax.random.normal(jax.random.key(2), (2, cfg.max_len, cfg.word_dim))

  def rounding(p):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(m.apply(p, x, method="logits"), ids))

  g = jax.grad(rounding)(params)["params"]
  assert np.all(np.asarray(g["word_embedding"][cfg.vocab_size:]) == 0)
  assert np.all(np.asarray(g["head_bias"][cfg.vocab_size:]) == 0)
  assert np.any(np.asarray(g["word_embedding"][:cfg.vocab_size]) != 0)
  E, b = params["params"]["word_embedding"][:cfg.vocab_size], params["params"]["head_bias"][:cfg.vocab_size]
  unpadded = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ E.T + b, ids))
  np.testing.assert_allclose(rounding(params), unpadded, rtol=1e-6)


def test_initialisation_follows_pytorch_defaults():
  cfg = ModelConfig(vocab_size=4000, feature_dim=64, prefix_len=2, mapper_hidden=96,
                    hidden_size=128, num_layers=1, num_heads=4, mlp_dim=256, word_dim=48,
                    max_len=8, max_position=512)
  _, params = _init(cfg)
  p = params["params"]
  for table in ("word_embedding", "position_embedding"):  # N(0, 1)
    v = np.asarray(p[table])
    assert abs(v.mean()) < 0.02 and abs(v.std() - 1) < 0.02, table
  for path, fan_in in ((("up_fc1", "kernel"), 48), (("layer_0", "intermediate", "kernel"), 128),
                       (("layer_0", "intermediate", "bias"), 128), (("layer_0", "output", "kernel"), 256),
                       (("layer_0", "attention", "query", "kernel"), 128),
                       (("layer_0", "attention", "out", "kernel"), 128), (("head_bias",), 48)):
    v = np.asarray(p[path[0]] if len(path) == 1 else _get(p, path))
    bound = 1 / math.sqrt(fan_in)
    assert np.abs(v).max() <= bound, path  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert np.abs(v).max() > 0.9 * bound and abs(v.std() - bound / math.sqrt(3)) < 0.1 * bound, path
  ln = p["layer_0"]["attention_ln"]
  assert np.all(ln["scale"] == 1) and np.all(ln["bias"] == 0)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def test_layer_norm_eps_and_exact_gelu(tiny):
  cfg, m, params = tiny
  # With eps 1e-12 a row of tiny variance still normalises to +-1 (Flax's 1e-6 would not).
  ln = model_lib.layer_norm("ln", ModelConfig(hidden_size=2))
  x = jnp.array([[0.0, 2e-4]])
  y = ln.apply(ln.init(jax.random.key(0), x), x)
  np.testing.assert_allclose(y, [[-1.0, 1.0]], atol=1e-3)
  # The FFN's GELU is the exact erf form.
  x = jnp.ones((1, cfg.max_len, cfg.word_dim))
  jaxpr = str(jax.make_jaxpr(lambda p: m.apply(p, x, jnp.zeros((1,)), jnp.ones((1, cfg.feature_dim))))(params))
  assert "erfc" in jaxpr or " erf " in jaxpr


def test_attention_is_bidirectional_and_prefix_matters(tiny):
  cfg, m, params = tiny
  B = 2
  x = jax.random.normal(jax.random.key(3), (B, cfg.max_len, cfg.word_dim))
  t = jnp.full((B,), 10.0)
  c = jax.random.normal(jax.random.key(4), (B, cfg.feature_dim))
  base = m.apply(params, x, t, c)
  # Changing the last caption position changes the first output: no causal mask.
  changed = m.apply(params, x.at[:, -1].add(1.0), t, c)
  assert not np.allclose(base[:, 0], changed[:, 0])
  # The image prefix and the timestep both reach every position.
  assert not np.allclose(base, m.apply(params, x, t, c + 1.0))
  assert not np.allclose(base, m.apply(params, x, t + 100.0, c))
  # Examples do not leak into each other.
  np.testing.assert_allclose(base[:1], m.apply(params, x[:1], t[:1], c[:1]), rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training(tiny):
  cfg, m, params = tiny
  x = jnp.ones((2, cfg.max_len, cfg.word_dim))
  args = (x, jnp.zeros((2,)), jnp.ones((2, cfg.feature_dim)))
  a = m.apply(params, *args, deterministic=False, rngs={"dropout": jax.random.key(0)})
  b = m.apply(params, *args, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(m.apply(params, *args), m.apply(params, *args))


def test_bfloat16_compute_close_to_float32(tiny):
  cfg, m, params = tiny
  m16 = PrefixDenoiser(ModelConfig(**{**cfg.__dict__, "dtype": jnp.bfloat16}))
  x = jax.random.normal(jax.random.key(5), (2, cfg.max_len, cfg.word_dim))
  args = (x, jnp.full((2,), 3.0), jnp.ones((2, cfg.feature_dim)))
  a, b = m.apply(params, *args), m16.apply(params, *args)
  assert b.dtype == jnp.float32
  assert np.abs(np.asarray(a) - np.asarray(b)).max() < 0.1 * np.abs(np.asarray(a)).max()


def test_timestep_embedding_matches_improved_diffusion():
  t = jnp.array([0.0, 5.0, 999.0])
  emb = np.asarray(model_lib.timestep_embedding(t, 128))
  half = 64
  freqs = np.exp(-math.log(10000) * np.arange(half) / half)
  args = np.array([0.0, 5.0, 999.0])[:, None] * freqs[None]
  np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], -1), atol=2e-4)


def test_flop_count_matches_xla_for_the_matmuls():
  """The documented formula against XLA's own count of one paper-sized forward pass."""
  cfg = config_lib.model_config(load_config("paper_coco"))
  m = PrefixDenoiser(cfg)
  x, t, c = jnp.zeros((1, 24, 48)), jnp.zeros((1,)), jnp.zeros((1, 768))
  params = jax.eval_shape(m.init, jax.random.key(0), x, t, c)

  def fwd(p, x, t, c):
    out = m.apply(p, x, t, c)
    return m.apply(p, out, method="logits")

  cost = jax.jit(fwd).lower(params, x, t, c).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ours = model_lib.forward_flops(cfg)
  assert abs(cost["flops"] - ours) / ours < 0.03, (cost["flops"], ours)
  # SPEC/issue orientation figures: ~1.95 TFLOP per batch-128 train step, ~0.10 TFLOP per
  # denoising step of 20 candidates.
  assert model_lib.train_flops_per_example(cfg) * 128 == pytest.approx(1.95e12, rel=0.01)
  assert model_lib.denoise_step_flops(cfg) * 20 == pytest.approx(0.10e12, rel=0.02)


def _stack_layers(params, num_layers):
  """Loop-layout parameters (layer_0 ... layer_{n-1}) -> the scanned layout (one stacked "layers")."""
  p = dict(params["params"])
  layers = [p.pop(f"layer_{i}") for i in range(num_layers)]
  p["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return {"params": p}


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_equal_the_loop(tiny, remat):
  """nn.scan over the layers (optionally under nn.remat) computes the same function and the same
  gradients as the Python loop, given the same weights stacked on a leading axis."""
  cfg, m, params = tiny
  scan_cfg = ModelConfig(**{**cfg.__dict__, "scan_layers": True, "remat": remat})
  ms = PrefixDenoiser(scan_cfg)
  stacked = _stack_layers(params, cfg.num_layers)
  # The scanned model's own init has exactly this structure and the same parameter count.
  own = nn.meta.unbox(_init(scan_cfg)[1])
  assert jax.tree.structure(own) == jax.tree.structure(stacked)
  assert model_lib.count_params(own) == model_lib.count_params(params)
  assert own["params"]["layers"]["attention"]["query"]["kernel"].shape[0] == cfg.num_layers

  _assert_same_function(ms, stacked, m, params, lambda g: g, lambda g: _stack_layers(g, cfg.num_layers),
                        out_tol=1e-5, grad_rtol=1e-4)


def _assert_same_function(model_a, params_a, model_b, params_b, grads_a, grads_b, out_tol, grad_rtol):
  """model_a(params_a) and model_b(params_b) give the same outputs and gradients on one batch;
  `grads_a`/`grads_b` bring each side's gradients to a common layout. Jitted: one compile each,
  rather than op-by-op dispatch of every primitive."""
  cfg = model_a.cfg
  x = jax.random.normal(jax.random.key(1), (3, cfg.max_len, cfg.word_dim))
  t = jnp.array([0.0, 10.0, 99.0])
  f = jax.random.normal(jax.random.key(2), (3, cfg.feature_dim))
  np.testing.assert_allclose(jax.jit(model_a.apply)(params_a, x, t, f),
                             jax.jit(model_b.apply)(params_b, x, t, f), rtol=out_tol, atol=out_tol)
  loss = lambda model: lambda p: jnp.sum(model.apply(p, x, t, f) ** 2)
  ga = grads_a(jax.jit(jax.grad(loss(model_a)))(params_a))
  gb = grads_b(jax.jit(jax.grad(loss(model_b)))(params_b))
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(a, b, rtol=grad_rtol, atol=1e-6)



@pytest.mark.parametrize("scan", [False, True])
def test_fused_qkv_is_the_same_function_through_the_layout_mapping(tiny, scan):
  """`model.fused_qkv`: one (D, 3, H, K) projection. Its own init has the layout `fuse_qkv`
  maps the three-projection parameters to (and the paper's parameter count), the mapped weights
  give the same outputs and gradients (mapped back, the original layout's exactly), and the
  mapping is lossless both ways."""
  cfg, m, params = tiny
  if scan:
    cfg = ModelConfig(**{**cfg.__dict__, "scan_layers": True})
    m, params = PrefixDenoiser(cfg), _stack_layers(params, cfg.num_layers)
  fused_cfg = ModelConfig(**{**cfg.__dict__, "fused_qkv": True})
  mf = PrefixDenoiser(fused_cfg)
  fused = model_lib.fuse_qkv(params, True)
  own = nn.meta.unbox(_init(fused_cfg)[1])
  assert jax.tree.structure(own) == jax.tree.structure(fused)
  assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, fused)
  attention = fused["params"]["layers" if scan else "layer_0"]["attention"]
  assert set(attention) == {"qkv", "out"}
  np.testing.assert_array_equal(attention["qkv"]["kernel"][..., 1, :, :],
                                params["params"]["layers" if scan else "layer_0"]["attention"]["key"]["kernel"])
  jax.tree.map(np.testing.assert_array_equal, model_lib.fuse_qkv(fused, False), params)
  jax.tree.map(np.testing.assert_array_equal, model_lib.fuse_qkv(params, False), params)
  full = config_lib.model_config(load_config("paper_coco", **{"model.fused_qkv": True}))
  shapes = jax.eval_shape(PrefixDenoiser(full).init, jax.random.key(0), jnp.zeros((1, 24, 48)),
                          jnp.zeros((1,)), jnp.zeros((1, 768)))
  assert model_lib.count_params(nn.meta.unbox(shapes)["params"], full) == 94_948_257

  _assert_same_function(mf, fused, m, params, lambda g: model_lib.fuse_qkv(g, False), lambda g: g,
                        out_tol=1e-6, grad_rtol=1e-5)


def test_tanh_gelu_option(tiny):
  """`model.gelu=tanh` swaps the FFN's exact erf GELU for the tanh approximation, nothing else:
  the outputs move by about the approximation's error, and an unknown name is a config error."""
  cfg, m, params = tiny
  mt = PrefixDenoiser(ModelConfig(**{**cfg.__dict__, "gelu": "tanh"}))
  x = jax.random.normal(jax.random.key(1), (2, cfg.max_len, cfg.word_dim))
  args = (x, jnp.array([3.0, 50.0]), jax.random.normal(jax.random.key(2), (2, cfg.feature_dim)))
  exact, approx = jax.jit(m.apply)(params, *args), jax.jit(mt.apply)(params, *args)
  assert 0 < float(jnp.max(jnp.abs(exact - approx))) < 1e-2
  jaxpr = str(jax.make_jaxpr(lambda p: mt.apply(p, *args))(params))
  assert "erf" not in jaxpr  # (tanh is in the model anyway, in its up and down projections)
  with pytest.raises(config_lib.ConfigError, match="model.gelu"):
    config_lib.validate(load_config("tiny", **{"model.gelu": "relu"}))


def test_the_additions_at_paper_size_cost_what_they_should():
  """configs/paper_coco.py with every addition on by override: the parameters they add, counted
  in closed form, and XLA's FLOP count of one sampling step (the real widths, 2 of the 12 layers):
  guidance runs the network on twice the rows, self-conditioning adds one (W, D) projection."""
  from pdiff_jax import sampler as S
  on = {"model.cond_drop": 0.1, "model.self_cond": 0.5, "model.length_head": True}
  D, W, L, P, F = 768, 48, 24, 5, 768
  x, t, c = jnp.zeros((1, L, W)), jnp.zeros((1,)), jnp.zeros((1, F))
  count = lambda cfg: model_lib.count_params(nn.meta.unbox(jax.eval_shape(
      PrefixDenoiser(cfg).init, jax.random.key(0), x, t, c))["params"], cfg)
  cfg = config_lib.model_config(load_config("paper_coco", **on))
  assert count(cfg) == 94_948_257 + P * D + (W * D + D) + (F * D + D) + (D * (L + 1) + L + 1)

  def step_flops(**options):
    cfg = config_lib.model_config(load_config("paper_coco", **{"model.num_layers": 2, **options}))
    model, guidance = PrefixDenoiser(cfg), 2.0 if options.get("model.cond_drop") else 1.0
    params = jax.eval_shape(model.init, jax.random.key(0), x, t, c)
    step = lambda p, x_LW, clip_F: S.model_denoiser(model, nn.meta.unbox(p), clip_F, guidance)(
        x_LW, jnp.float32(10.0), x_LW)
    cost = jax.jit(step).lower(params, x[0], c[0]).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

  plain = step_flops()
  assert step_flops(**{"model.cond_drop": 0.1}) / plain == pytest.approx(2.0, rel=0.01)
  # one (L, W) x (W, D) matmul and a few element-wise passes over (L, D) (bias, the add)
  assert 2 * L * W * D <= step_flops(**{"model.self_cond": 0.5}) - plain <= 2 * L * W * D + 8 * L * D
