import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CONFIGS, load_config
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


def test_denoiser_fit_against_a_loop_over_candidates_and_noises(tiny):
  """`denoiser_fit` (one vmapped-in-batch, lax.map-over-noises program) against its definition
  written out one candidate, one timestep and one noise at a time: the mean squared error of the
  model's x0 from sqrt(abar_t) E[w] + sqrt(1 - abar_t) eps, averaged; the noises are the same for
  every candidate (so two copies of a caption get the same fit) and independent of the batch."""
  config, model, params, clip = tiny
  cfg = model.cfg
  schedule = diffusion.make_schedule("trunc_cos", 100)
  ts = S.fit_timesteps(100, 0.45, 3)
  np.testing.assert_array_equal(ts, [15, 30, 45])
  ids = jax.random.randint(jax.random.key(3), (3, 4, cfg.max_len), 1, cfg.vocab_size)
  ids = ids.at[1, 2].set(ids[1, 0])  # a copy
  fit = jax.jit(lambda p, c, i: S.denoiser_fit(model, p, c, i, schedule, ts, 2))(params, clip, ids)
  assert fit.shape == (3, 4)
  noise = np.asarray(jax.random.normal(jax.random.key(S._FIT_SEED), (6, cfg.max_len, cfg.word_dim)))
  table = np.asarray(params["params"]["word_embedding"], np.float64)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  one = jax.jit(lambda p, x, t, c: model.apply(p, x[None], t[None], c[None])[0])
  for b in range(3):
    for n in range(4):
      x0 = table[np.asarray(ids[b, n])]
      errs = []
      for k, t in enumerate(np.repeat(ts, 2)):
        x_t = np.sqrt(abar[t]) * x0 + np.sqrt(1 - abar[t]) * noise[k]
        x0_hat = np.asarray(one(params, jnp.asarray(x_t, jnp.float32), jnp.float32(t * 1000 / 100), clip[b]))
        errs.append(np.mean((x0_hat - x0) ** 2))
      np.testing.assert_allclose(fit[b, n], np.mean(errs), rtol=2e-4)
  assert fit[1, 2] == fit[1, 0]
  # the copies of a caption under another image fit otherwise (the image is read)
  assert not np.isclose(fit[0, 0], S.denoiser_fit(model, params, clip[1:2], ids[0:1], schedule, ts, 2)[0, 0])
  with pytest.raises(ValueError, match="fit timesteps"):
    S.fit_timesteps(100, 0.0, 3)


def test_denoiser_fit_at_paper_size_holds_one_noisy_copy_at_a_time():
  """The paper's 12 x 768 model, a sampling batch of 8 images x 20 candidates, compiled without
  allocating: the (timestep, noise) pairs run one after the other (lax.map), so the working
  memory does not grow with their number (it would 40-fold if they were batched)."""
  config = load_config("paper_coco")
  model = PrefixDenoiser(config_lib.model_config(config))
  cfg = model.cfg
  params = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.key(0), jnp.zeros((1, cfg.max_len, cfg.word_dim)), jnp.zeros((1,)),
      jnp.zeros((1, cfg.feature_dim)))))
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_steps)
  B, N = config.sampler.batch_size, config.sampler.num_candidates
  clip = jax.ShapeDtypeStruct((B, cfg.feature_dim), jnp.float32)
  ids = jax.ShapeDtypeStruct((B, N, cfg.max_len), jnp.int32)

  def temp_bytes(points, noises):
    ts = S.fit_timesteps(config.diffusion.num_steps, 0.45, points)
    fn = jax.jit(lambda p, c, i: S.denoiser_fit(model, p, c, i, schedule, ts, noises))
    return fn.lower(params, clip, ids).compile().memory_analysis().temp_size_in_bytes

  one, many = temp_bytes(1, 1), temp_bytes(10, 4)
  assert many <= 1.05 * one, (one, many)
  assert many < 1 << 30  # one forward pass of B x N captions: ~240 MB here


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


def _chain_before_the_solver_seam(denoise, table, sched, key, shape, eta):
  """The sampler's loop as it was before solvers became pluggable (DDIM hard-wired), kept here
  as the reference that the default path must reproduce bit for bit."""
  key_T, key_steps = jax.random.split(key)
  x = jax.random.normal(key_T, shape, jnp.float32)

  def body(i, x):
    k = sched.num_steps - 1 - i
    x0_hat, _ = S.nearest_embedding(denoise(x, sched.model_t[k], jnp.zeros_like(x)), table)
    noise = jax.random.normal(jax.random.fold_in(key_steps, k), shape, jnp.float32)
    return S.ddim_step(x, x0_hat, sched.alphas_cumprod[k], sched.alphas_cumprod_prev[k], eta, noise, k == 0)

  return jax.lax.fori_loop(0, sched.num_steps, body, x)


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_default_solver_is_the_hard_wired_ddim_bit_for_bit(tiny, eta):
  config, model, params, clip = tiny
  cfg = model.cfg
  table = params["params"]["word_embedding"][:cfg.vocab_size]
  sched = S.make_sampling_schedule("trunc_cos", 100, 7)
  shape = (cfg.max_len, cfg.word_dim)
  denoise = S.model_denoiser(model, params, clip[0])
  before = jax.jit(lambda k: _chain_before_the_solver_seam(denoise, table, sched, k, shape, eta))
  now = jax.jit(lambda k: S.sample_chain(denoise, table, sched, k, shape, eta=eta))
  explicit = jax.jit(lambda k: S.sample_chain(denoise, table, sched, k, shape, solver=S.make_solver("ddim", eta)))
  for seed in range(3):
    np.testing.assert_array_equal(now(jax.random.key(seed)), before(jax.random.key(seed)))
    np.testing.assert_array_equal(explicit(jax.random.key(seed)), before(jax.random.key(seed)))


@pytest.mark.parametrize("mode", ["respace", "rediscretise"])
def test_dpm_solver_2m_matches_diffusers(mode):
  """DPM-Solver++(2M) stepping a fixed x0-predictor equals diffusers' DPMSolverMultistepScheduler
  (dpmsolver++, order 2, prediction_type="sample", final sigma 0) fed the same predictions on
  the same schedule, to 1e-5."""
  import torch
  from diffusers import DPMSolverMultistepScheduler
  train_steps, steps, shape = 100, 10, (6, 4)
  sched = S.make_sampling_schedule("trunc_cos", train_steps, steps, mode)
  if mode == "respace":  # diffusers on the training schedule, at the kept timesteps
    betas, timesteps = diffusion.betas("trunc_cos", train_steps), S.respaced_timesteps(train_steps, steps)
  else:  # the fresh schedule of `steps` steps, every one of them
    betas, timesteps = diffusion.betas("trunc_cos", steps), np.arange(steps)
  w = np.asarray(jax.random.normal(jax.random.key(3), (shape[1], shape[1]))) / 2

  def denoise_np(x, model_t):  # any smooth function of (x, t) will do
    return np.tanh(x @ w) * (1.0 - model_t / 2000.0) + 0.05 * x

  denoise = lambda x, model_t, x0_prev: jnp.tanh(x @ jnp.asarray(w)) * (1.0 - model_t / 2000.0) + 0.05 * x
  x_T = jax.random.normal(jax.random.key(4), shape)
  ours = S.sample_chain(denoise, None, sched, jax.random.key(0), shape, clamp=False, x_T=x_T,
                        solver=S.dpm_solver_2m())

  ref = DPMSolverMultistepScheduler(num_train_timesteps=len(betas), trained_betas=np.asarray(betas, np.float64),
                                    algorithm_type="dpmsolver++", solver_order=2, prediction_type="sample",
                                    final_sigmas_type="zero", lower_order_final=True)
  ref.set_timesteps(timesteps=[int(t) for t in timesteps[::-1]])
  x = torch.tensor(np.asarray(x_T), dtype=torch.float64)
  for i, t in enumerate(ref.timesteps):
    k = steps - 1 - i
    x0 = torch.tensor(denoise_np(x.numpy(), float(sched.model_t[k])))
    x = ref.step(x0, t, x).prev_sample
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), atol=1e-5, rtol=1e-5)
  # ... and it is deterministic: the chain's key does not matter, only x_T.
  again = S.sample_chain(denoise, None, sched, jax.random.key(9), shape, clamp=False, x_T=x_T,
                         solver=S.dpm_solver_2m())
  np.testing.assert_array_equal(ours, again)


@pytest.mark.parametrize("mode", ["respace", "rediscretise"])
def test_sde_dpm_solver_2m_matches_diffusers(mode):
  """SDE-DPM-Solver++(2M) equals diffusers' DPMSolverMultistepScheduler with
  algorithm_type="sde-dpmsolver++" handed the same noise at every step (`variance_noise`: the
  chain's noise of step k is normal(fold_in(key_steps, k))), to 1e-5; a different chain key
  gives a different sample from the same x_T."""
  import torch
  from diffusers import DPMSolverMultistepScheduler
  train_steps, steps, shape = 100, 10, (6, 4)
  sched = S.make_sampling_schedule("trunc_cos", train_steps, steps, mode)
  if mode == "respace":
    betas, timesteps = diffusion.betas("trunc_cos", train_steps), S.respaced_timesteps(train_steps, steps)
  else:
    betas, timesteps = diffusion.betas("trunc_cos", steps), np.arange(steps)
  w = np.asarray(jax.random.normal(jax.random.key(3), (shape[1], shape[1]))) / 2
  denoise = lambda x, model_t, x0_prev: jnp.tanh(x @ jnp.asarray(w)) * (1.0 - model_t / 2000.0) + 0.05 * x
  x_T = jax.random.normal(jax.random.key(4), shape)
  key = jax.random.key(0)
  ours = S.sample_chain(denoise, None, sched, key, shape, clamp=False, x_T=x_T,
                        solver=S.make_solver("dpmpp2m-sde"))

  ref = DPMSolverMultistepScheduler(num_train_timesteps=len(betas), trained_betas=np.asarray(betas, np.float64),
                                    algorithm_type="sde-dpmsolver++", solver_order=2, prediction_type="sample",
                                    final_sigmas_type="zero", lower_order_final=True)
  ref.set_timesteps(timesteps=[int(t) for t in timesteps[::-1]])
  key_steps = jax.random.split(key)[1]
  x = torch.tensor(np.asarray(x_T), dtype=torch.float64)
  for i, t in enumerate(ref.timesteps):
    k = steps - 1 - i
    x0 = torch.tensor(np.asarray(denoise(jnp.asarray(x.numpy(), jnp.float32), sched.model_t[k], None)),
                      dtype=torch.float64)
    noise = torch.tensor(np.asarray(jax.random.normal(jax.random.fold_in(key_steps, k), shape)),
                         dtype=torch.float64)
    x = ref.step(x0, t, x, variance_noise=noise).prev_sample
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), atol=1e-5, rtol=1e-5)
  other = S.sample_chain(denoise, None, sched, jax.random.key(9), shape, clamp=False, x_T=x_T,
                         solver=S.make_solver("dpmpp2m-sde"))
  assert np.abs(np.asarray(other) - np.asarray(ours)).max() > 1e-2
  # Its first-order step (the first of the chain) is the original's ancestral DDIM (DDPM) step.
  sde, ddim = S.make_solver("dpmpp2m-sde"), S.make_solver("ddim", 1.0)
  x0 = denoise(x_T, sched.model_t[steps - 1], None)
  a = sde.step(x_T, x0, steps - 1, sched, sde.init(x_T), jax.random.key(5))[0]
  b = ddim.step(x_T, x0, steps - 1, sched, ddim.init(x_T), jax.random.key(5))[0]
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_the_solver_is_a_config_key_and_a_flag(tiny):
  config, model, params, clip = tiny
  with pytest.raises(config_lib.ConfigError, match="sampler.solver"):
    config_lib.validate(load_config("tiny", **{"sampler.solver": "euler"}))
  with pytest.raises(config_lib.ConfigError, match="sampler.select.*'best'.*clip, vote, posterior, fit"):
    config_lib.validate(load_config("tiny", **{"sampler.select": "best"}))
  for key, bad in (("fit_weight", -1.0), ("fit_max_t", 1.5), ("fit_points", 0), ("fit_noises", 0)):
    with pytest.raises(config_lib.ConfigError, match=f"sampler.{key}"):
      config_lib.validate(load_config("tiny", **{f"sampler.{key}": bad}))
  sched = S.make_sampling_schedule("trunc_cos", 100, 5)
  keys = S.candidate_keys(0, jnp.arange(3), 2)
  tokens = jax.jit(lambda p, c, k: S.sample_tokens(model, p, c, k, sched, solver=S.dpm_solver_2m()))(
      params, clip, keys)
  assert tokens.shape == (3, 2, model.cfg.max_len)
  assert np.all((np.asarray(tokens) >= 0) & (np.asarray(tokens) < model.cfg.vocab_size))


# -- the additions since the paper: guidance, self-conditioning, length ---------------------

def _tiny_with(**options):
  config = load_config("tiny", **{f"model.{k}": v for k, v in options.items()})
  model = PrefixDenoiser(config_lib.model_config(config))
  cfg = model.cfg
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, cfg.max_len, cfg.word_dim)),
                                    jnp.zeros((1,)), jnp.zeros((1, cfg.feature_dim))))
  return model, params


class _Recording:
  """The model, recording the batch size and keyword arguments of every denoiser call."""

  def __init__(self, model):
    self.model, self.cfg, self.calls = model, model.cfg, []

  def apply(self, params, *args, **kwargs):
    if "method" not in kwargs:
      self.calls.append((args[0].shape[0], kwargs))
    return self.model.apply(params, *args, **kwargs)


def test_guidance_is_one_batched_call_of_the_cfg_formula():
  model, params = _tiny_with(cond_drop=0.1)
  cfg = model.cfg
  clip_F = jax.random.normal(jax.random.key(1), (cfg.feature_dim,))
  x = jax.random.normal(jax.random.key(2), (cfg.max_len, cfg.word_dim))
  t, prev = jnp.float32(500.0), jnp.zeros_like(x)
  rec = _Recording(model)
  guided = S.model_denoiser(rec, params, clip_F, guidance=3.0)(x, t, prev)
  assert [c[0] for c in rec.calls] == [2]  # conditional and unconditional in one call of batch 2
  apply = lambda cond: model.apply(params, x[None], t[None], clip_F[None], cond_B=jnp.array([cond]))[0]
  cond, uncond = apply(True), apply(False)
  assert not np.allclose(cond, uncond)  # the null prefix is a different condition
  np.testing.assert_allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-5)
  np.testing.assert_allclose(S.model_denoiser(model, params, clip_F, 0.0)(x, t, prev), uncond, atol=1e-6)
  # guidance 1 is the conditional model alone, one call of batch 1: the original's path.
  rec.calls.clear()
  np.testing.assert_array_equal(S.model_denoiser(rec, params, clip_F, 1.0)(x, t, prev),
                                model.apply(params, x[None], t[None], clip_F[None])[0])
  assert [c[0] for c in rec.calls] == [1]
  with pytest.raises(ValueError, match="cond_drop"):
    tiny_model, tiny_params = _tiny_with()
    S.model_denoiser(tiny_model, tiny_params, clip_F, 2.0)(x, t, prev)


def test_self_conditioned_sampling_feeds_the_previous_estimate():
  """sample_chain against a Python loop that hands the model its previous raw x0 estimate
  (zeros first); the estimate changes the prediction, so feeding the wrong one would show."""
  model, params = _tiny_with(self_cond=0.5)
  cfg = model.cfg
  clip_F = jax.random.normal(jax.random.key(1), (cfg.feature_dim,))
  table = params["params"]["word_embedding"][:cfg.vocab_size]
  sched = S.make_sampling_schedule("trunc_cos", 100, 6)
  shape = (cfg.max_len, cfg.word_dim)
  ours = S.sample_chain(S.model_denoiser(model, params, clip_F), table, sched, jax.random.key(3), shape)
  net = jax.jit(lambda x, t, prev: model.apply(params, x[None], t[None], clip_F[None], x0_self_BLW=prev[None])[0])
  key_T, key_steps = jax.random.split(jax.random.key(3))
  x = jax.random.normal(key_T, shape)
  prev, changed = jnp.zeros(shape), []
  for k in reversed(range(sched.num_steps)):
    raw = net(x, sched.model_t[k], prev)
    changed.append(float(jnp.abs(raw - net(x, sched.model_t[k], jnp.zeros(shape))).max()))
    x0_hat, _ = S.nearest_embedding(raw, table)
    x, _ = S.ddim().step(x, x0_hat, k, sched, (), jax.random.fold_in(key_steps, k))
    prev = raw
  np.testing.assert_allclose(ours, x, atol=1e-5)
  assert changed[0] == 0.0 and max(changed[1:]) > 1e-3


def test_lengths_are_honoured_by_construction():
  model, params = _tiny_with(length_head=True)
  cfg = model.cfg
  sched = S.make_sampling_schedule("trunc_cos", 100, 4)
  clip = jax.random.normal(jax.random.key(1), (3, cfg.feature_dim))
  keys = S.candidate_keys(0, jnp.arange(3), 6)
  # (min, max) may be traced: one compile for every length asked for below
  sample = jax.jit(lambda p, length: S.sample_tokens(model, p, clip, keys, sched, length=length))
  for length in ((3, 3), (2, 6), (1, cfg.max_len)):
    tokens = np.asarray(sample(params, tuple(map(jnp.int32, length))))
    words = (tokens != S.PAD_ID).sum(-1)
    assert np.all((words >= length[0]) & (words <= length[1]))
    # the words come first, PAD after them: position l is a word iff l < the length
    np.testing.assert_array_equal(tokens != S.PAD_ID, np.arange(cfg.max_len) < words[..., None])
  # auto draws each candidate's length from the head: a head certain of 5 words gives 5 ...
  head = jax.tree.map(jnp.zeros_like, params["params"]["length_fc2"])
  certain = {"params": {**params["params"], "length_fc2": {**head, "bias": head["bias"].at[5].set(50.0)}}}
  auto = S.parse_length("auto", cfg.max_len, True)
  assert np.all((np.asarray(sample(certain, tuple(map(jnp.int32, auto)))) != S.PAD_ID).sum(-1) == 5)
  assert sample._cache_size() == 1
  # ... and one spread over 2..4 words gives candidates of different lengths, in that range.
  spread = {"params": {**params["params"], "length_fc2": {**head, "bias": jnp.where(
      (jnp.arange(cfg.max_len + 1) >= 2) & (jnp.arange(cfg.max_len + 1) <= 4), 0.0, -50.0)}}}
  lengths = np.asarray(S.candidate_lengths(model, spread, clip, keys, auto))
  assert set(lengths.ravel()) == {2, 3, 4}
  # A candidate's length depends on its key alone, not on the batch it is drawn in.
  np.testing.assert_array_equal(S.candidate_lengths(model, spread, clip[1:2], keys[1:2, 3:4], auto),
                                lengths[1:2, 3:4])


def test_parse_length():
  assert S.parse_length("", 8, False) is None
  assert S.parse_length("auto", 8, True) == (1, 8)
  assert S.parse_length("5", 8, False) == (5, 5)
  assert S.parse_length("2-6", 8, True) == (2, 6)
  for bad, match in (("auto", "length_head"), ("0", "1 <= MIN"), ("3-2", "MIN <= MAX"),
                     ("9", "max_len=8"), ("long", "auto, N or MIN-MAX")):
    with pytest.raises(ValueError, match=match):
      S.parse_length(bad, 8, False)
  with pytest.raises(config_lib.ConfigError, match="sampler.length"):
    config_lib.validate(load_config("tiny", **{"sampler.length": "auto"}))
  with pytest.raises(config_lib.ConfigError, match="sampler.guidance.*cond_drop"):
    config_lib.validate(load_config("tiny", **{"sampler.guidance": 2.0}))


def test_every_config_file_validates():
  """configs/*.py as shipped (demo_plus's sampler.select included) pass `config.validate`."""
  names = sorted(f[:-3] for f in os.listdir(CONFIGS) if f.endswith(".py"))
  assert {"demo", "demo_plus", "paper_coco"} <= set(names)
  for name in names:
    config_lib.validate(load_config(name))
  assert load_config("demo_plus").sampler.select == "fit"
  assert load_config("paper_coco").sampler.select == "clip"  # the original's
