import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from pdiff_jax import config as config_lib
from pdiff_jax import diffusion
from pdiff_jax import sampler as S
from pdiff_jax.model import PrefixDenoiser


@pytest.fixture(scope="module")
def tiny():
  config = load_config("tiny")
  model = PrefixDenoiser(config_lib.model_config(config))
  cfg = model.cfg
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, cfg.max_len, cfg.word_dim)),
                                    jnp.zeros((1,)), jnp.zeros((1, cfg.feature_dim))))
  clip = jax.random.normal(jax.random.key(1), (3, cfg.feature_dim))
  return config, model, params, clip


def test_vmapped_equals_a_loop_over_seeds(tiny):
  config, model, params, clip = tiny
  sched = S.make_sampling_schedule("trunc_cos", 100, 10)
  keys = S.candidate_keys(0, jnp.arange(3), 4)
  fast = jax.jit(lambda p, c, k: S.sample_tokens(model, p, c, k, sched))(params, clip, keys)
  assert fast.shape == (3, 4, model.cfg.max_len) and fast.dtype == jnp.int32
  one = jax.jit(lambda p, c, k: S.sample_tokens(model, p, c[None], k[None, None], sched)[0, 0])
  for b in range(3):
    for n in range(4):
      np.testing.assert_array_equal(one(params, clip[b], keys[b, n]), fast[b, n])


def test_sharded_over_8_devices_equals_1(tiny):
  config, model, params, clip = tiny
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  sched = S.make_sampling_schedule("trunc_cos", 100, 8)
  clip8 = jnp.tile(clip, (3, 1))[:8]
  keys = S.candidate_keys(3, jnp.arange(8), 2)
  f = lambda p, c, k: S.sample_tokens(model, p, c, k, sched)
  single = jax.jit(f)(params, clip8, keys)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  batch, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  sharded = jax.jit(f, in_shardings=(rep, batch, batch), out_shardings=batch)(params, clip8, keys)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(single, sharded)


def test_clamping_lands_on_embedding_rows(tiny):
  config, model, params, clip = tiny
  table = params["params"]["word_embedding"]
  sched = S.make_sampling_schedule("trunc_cos", 100, 6)
  denoise = S.model_denoiser(model, params, clip[0])
  x0 = S.sample_chain(denoise, table, sched, jax.random.key(5), (model.cfg.max_len, model.cfg.word_dim))
  # Last step: abar_prev = 1, so x_0 is the clamped prediction: exactly a row of the table.
  matches = np.all(np.asarray(x0)[:, None, :] == np.asarray(table)[None], axis=-1)
  assert np.all(matches.sum(-1) >= 1)
  free = S.sample_chain(denoise, table, sched, jax.random.key(5), (model.cfg.max_len, model.cfg.word_dim),
                        clamp=False)
  assert not np.any(np.all(np.asarray(free)[:, None, :] == np.asarray(table)[None], axis=-1))


def test_nearest_embedding_matches_brute_force():
  x = jax.random.normal(jax.random.key(0), (7, 5))
  table = jax.random.normal(jax.random.key(1), (30, 5))
  rows, ids = S.nearest_embedding(x, table)
  brute = np.argmin(((np.asarray(x)[:, None] - np.asarray(table)[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(ids, brute)
  np.testing.assert_array_equal(rows, np.asarray(table)[brute])


def test_respace_with_all_steps_is_the_full_chain():
  full = S.make_sampling_schedule("trunc_cos", 100, 100, "respace")
  abar = np.cumprod(1 - diffusion.betas("trunc_cos", 100))
  np.testing.assert_allclose(full.alphas_cumprod, abar, rtol=1e-6)
  np.testing.assert_allclose(full.model_t, np.arange(100) * 10.0)
  redisc = S.make_sampling_schedule("trunc_cos", 100, 100, "rediscretise")
  for a, b in zip(full, redisc):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert list(S.respaced_timesteps(1000, 5)) == [0, 250, 500, 749, 999]
  short = S.make_sampling_schedule("trunc_cos", 1000, 5, "respace")
  np.testing.assert_allclose(short.alphas_cumprod, np.cumprod(1 - diffusion.betas("trunc_cos", 1000))[[0, 250, 500, 749, 999]], rtol=1e-6)
  # The original's rediscretised schedule feeds the network t * 1000 / T_sample.
  np.testing.assert_allclose(S.make_sampling_schedule("trunc_cos", 1000, 200).model_t[:3], [0, 5, 10])


def test_eta_0_is_deterministic_given_x_T(tiny):
  config, model, params, clip = tiny
  table = params["params"]["word_embedding"]
  sched = S.make_sampling_schedule("trunc_cos", 100, 8)
  denoise = S.model_denoiser(model, params, clip[0])
  shape = (model.cfg.max_len, model.cfg.word_dim)
  x_T = jax.random.normal(jax.random.key(9), shape)
  runs = [S.sample_chain(denoise, table, sched, jax.random.key(k), shape, eta=0.0, x_T=x_T) for k in (1, 2)]
  np.testing.assert_array_equal(runs[0], runs[1])
  noisy = [S.sample_chain(denoise, table, sched, jax.random.key(k), shape, eta=1.0, x_T=x_T, clamp=False)
           for k in (1, 2)]
  assert not np.allclose(noisy[0], noisy[1])


def test_ddim_step_matches_diffusers():
  torch = pytest.importorskip("torch")
  from diffusers import DDIMScheduler
  betas = diffusion.betas("trunc_cos", 50)
  sched = DDIMScheduler(num_train_timesteps=50, trained_betas=betas, prediction_type="sample",
                        clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
  sched.set_timesteps(50)
  rng = np.random.default_rng(0)
  abar = np.cumprod(1 - betas)
  for t in (49, 20, 1):
    x_t, x0, noise = (rng.standard_normal((3, 4)).astype(np.float32) for _ in range(3))
    for eta in (0.0, 0.5, 1.0):
      ref = sched.step(torch.from_numpy(x0), t, torch.from_numpy(x_t), eta=eta,
                       variance_noise=torch.from_numpy(noise)).prev_sample.numpy()
      ours = S.ddim_step(jnp.asarray(x_t), jnp.asarray(x0), jnp.float32(abar[t]), jnp.float32(abar[t - 1]),
                         eta, jnp.asarray(noise), jnp.bool_(False))
      np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_candidate_keys_do_not_depend_on_batching():
  a = S.candidate_keys(7, jnp.arange(6), 3)
  b = S.candidate_keys(7, jnp.arange(4, 6), 3)
  np.testing.assert_array_equal(jax.random.key_data(a[4:]), jax.random.key_data(b))
  assert not np.array_equal(jax.random.key_data(a[0, 0]), jax.random.key_data(a[0, 1]))


def _weight_casts_in_loop(fn, *args) -> list[tuple[int, ...]]:
  """Shapes of the loop-invariant inputs of the step loop in fn's jaxpr (fori_loop with static
  bounds lowers to a scan) that are converted to bf16 at every step: weights cast in the body."""

  def loops(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name in ("scan", "while"):
        yield e
      for v in e.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
          if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
            yield from loops(getattr(sub, "jaxpr", sub))

  [loop] = list(loops(jax.make_jaxpr(fn)(*args).jaxpr))
  if loop.primitive.name == "scan":
    body, nconsts = loop.params["jaxpr"].jaxpr, loop.params["num_consts"]
  else:
    body, nconsts = loop.params["body_jaxpr"].jaxpr, loop.params["body_nconsts"]
  consts = set(body.invars[:nconsts])
  return sorted(e.invars[0].aval.shape for e in body.eqns
                if e.primitive.name == "convert_element_type" and e.invars[0] in consts
                and e.params["new_dtype"] == jnp.bfloat16)


def test_bf16_sampler_casts_the_dense_weights_once(tiny):
  """With bf16 compute the sampler casts every Dense kernel and bias before its step loop: the
  network gives bit-for-bit the same output as with the fp32 weights it would cast at each step,
  and no Dense weight is converted inside the loop (the (2, D) token-type table still is)."""
  import dataclasses
  from pdiff_jax.model import dense_params_in
  config, model, params, clip = tiny
  m16 = PrefixDenoiser(dataclasses.replace(model.cfg, dtype=jnp.bfloat16))
  cast = dense_params_in(params, jnp.bfloat16)
  p, c = params["params"], cast["params"]
  assert c["time_fc1"]["kernel"].dtype == c["time_fc1"]["bias"].dtype == jnp.bfloat16
  assert c["text_ln"]["bias"].dtype == c["word_embedding"].dtype == jnp.float32  # not Dense
  assert jax.tree.structure(c) == jax.tree.structure(p)
  cfg = model.cfg
  x = jax.random.normal(jax.random.key(2), (3, cfg.max_len, cfg.word_dim))
  t = jnp.array([5.0, 50.0, 90.0])
  np.testing.assert_array_equal(m16.apply(cast, x, t, clip), m16.apply(params, x, t, clip))

  sched = S.make_sampling_schedule("trunc_cos", 100, 10)
  keys = S.candidate_keys(0, jnp.arange(3), 2)
  assert _weight_casts_in_loop(lambda p, c, k: S.sample_tokens(m16, p, c, k, sched),
                               params, clip, keys) == [p["token_type_embedding"].shape]
  # The check sees the casts where the chain is given the fp32 weights directly.
  table = params["params"]["word_embedding"]
  chain = lambda p, c, k: S.sample_chain(S.model_denoiser(m16, p, c), table, sched, k,
                                         (cfg.max_len, cfg.word_dim))
  fp32_casts = _weight_casts_in_loop(chain, params, clip[0], keys[0, 0])
  assert (cfg.hidden_size, cfg.mlp_dim) in fp32_casts and (cfg.mlp_dim,) in fp32_casts
