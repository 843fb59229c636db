import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdiff_jax import diffusion


def abar_trunc_cos(u):
  return math.cos((u + 0.1) / 1.1 * math.pi / 2) ** 2


def test_check_values_from_spec():
  b = diffusion.betas("trunc_cos", 1000)
  abar = np.cumprod(1 - b)
  assert b[0] == pytest.approx(0.02025, abs=5e-6)
  assert abar[0] == pytest.approx(0.97975, abs=5e-6)
  assert abar[500] == pytest.approx(0.429, abs=5e-4)
  assert b[-1] == pytest.approx(0.75, abs=1e-3)  # not clipped at 0.999
  assert np.cumprod(1 - diffusion.betas("trunc_lin", 1000))[0] == pytest.approx(0.9899, abs=1e-6)
  assert diffusion.betas("sqrt", 1000)[0] == pytest.approx(0.0234, abs=5e-5)
  for name in ("cosine", "sqrt"):
    assert diffusion.betas(name, 1000)[-1] == pytest.approx(0.999)


@pytest.mark.parametrize("num_steps", [1000, 200, 30])
def test_closed_forms(num_steps):
  s = 1000 / num_steps
  np.testing.assert_allclose(diffusion.betas("linear", num_steps),
                             np.linspace(1e-4 * s, 0.02 * s, num_steps), rtol=0, atol=1e-15)
  np.testing.assert_allclose(diffusion.betas("trunc_lin", num_steps),
                             np.linspace(1e-4 * s + 0.01, 0.02 * s + 0.01, num_steps), atol=1e-15)
  # trunc_cos: the cumulative product at index k is abar(k / T), for every k.
  abar = np.cumprod(1 - diffusion.betas("trunc_cos", num_steps))
  np.testing.assert_allclose(abar, [abar_trunc_cos(k / num_steps) for k in range(num_steps)],
                             rtol=1e-9)
  # cosine and sqrt: abar at index k is abar((k+1)/T) wherever no beta was capped.
  for name, f in (("cosine", lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2),
                  ("sqrt", lambda u: 1 - math.sqrt(u + 1e-4))):
    b = diffusion.betas(name, num_steps)
    abar = np.cumprod(1 - b)
    ok = np.cumprod(b < 0.999).astype(bool)
    expected = np.array([f((k + 1) / num_steps) / f(0) for k in range(num_steps)])
    np.testing.assert_allclose(abar[ok], expected[ok], rtol=1e-9)


def test_against_diffusers():
  torch = pytest.importorskip("torch")
  from diffusers import DDPMScheduler
  for ours, theirs in (("linear", "linear"), ("cosine", "squaredcos_cap_v2")):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs).betas
    np.testing.assert_allclose(diffusion.betas(ours, 1000), ref.to(torch.float64).numpy(),
                               rtol=0, atol=1e-6)


def test_unknown_schedule():
  with pytest.raises(ValueError, match="unknown noise schedule 'nope'"):
    diffusion.betas("nope", 10)


def test_q_sample_closed_form():
  sched = diffusion.make_schedule("trunc_cos", 1000)
  x0 = jax.random.normal(jax.random.key(0), (3, 4, 5))
  eps = jax.random.normal(jax.random.key(1), (3, 4, 5))
  t = jnp.array([0, 500, 999])
  abar = np.cumprod(1 - diffusion.betas("trunc_cos", 1000))[np.array(t)]
  expected = np.sqrt(abar)[:, None, None] * np.array(x0) + np.sqrt(1 - abar)[:, None, None] * np.array(eps)
  np.testing.assert_allclose(diffusion.q_sample(sched, x0, t, eps), expected, rtol=1e-5, atol=1e-6)


def _reference_losses(sched_name, T, E, ids, t, key, W_denoise, bias_logits):
  """SPEC.md's loss 1-7 written out in numpy, with the same noise draws."""
  b = diffusion.betas(sched_name, T)
  abar = np.cumprod(1 - b)
  key_x0, key_t = jax.random.split(key)
  x0_mean = E[ids]
  x0 = x0_mean + np.sqrt(1 - abar[0]) * np.asarray(jax.random.normal(key_x0, x0_mean.shape))
  eps = np.asarray(jax.random.normal(key_t, x0.shape))
  x_t = np.sqrt(abar[t])[:, None, None] * x0 + np.sqrt(1 - abar[t])[:, None, None] * eps
  x0_hat = x_t @ W_denoise
  target = np.where((t == 0)[:, None, None], x0_mean, x0)
  mse = ((target - x0_hat) ** 2).mean(axis=(1, 2))
  logits = x0 @ E.T + bias_logits
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, ids[..., None], -1)[..., 0].mean(-1)
  prior = ((np.sqrt(abar[-1]) * x0) ** 2).mean(axis=(1, 2))
  return mse, nll, prior


def test_training_losses_match_reference():
  T, V, W, B, L = 1000, 11, 6, 4, 7
  rng = np.random.default_rng(0)
  E = rng.standard_normal((V, W))
  Wd = rng.standard_normal((W, W)) * 0.3
  bias = rng.standard_normal(V)
  ids = rng.integers(0, V, (B, L))
  t = np.array([0, 1, 500, 999])
  key = jax.random.key(3)
  sched = diffusion.make_schedule("trunc_cos", T)
  got = diffusion.training_losses(
      sched, jnp.asarray(E[ids], jnp.float32), jnp.asarray(ids), jnp.asarray(t), key,
      lambda x, mt: x @ jnp.asarray(Wd, jnp.float32),
      lambda x: x @ jnp.asarray(E.T, jnp.float32) + jnp.asarray(bias, jnp.float32))
  mse, nll, prior = _reference_losses("trunc_cos", T, E, ids, t, key, Wd, bias)
  np.testing.assert_allclose(got.mse, mse, rtol=1e-4)
  np.testing.assert_allclose(got.round, nll, rtol=1e-4)
  np.testing.assert_allclose(got.prior, prior, rtol=1e-4)
  np.testing.assert_allclose(got.loss, mse + nll + prior, rtol=1e-4)
  assert np.all(prior < 1e-4)  # "tiny" (~1e-6 per unit-variance dim for trunc_cos)


def test_network_sees_rescaled_timestep():
  sched = diffusion.make_schedule("trunc_cos", 200)
  seen = []

  def denoise(x, mt):
    seen.append(mt)
    return x

  diffusion.training_losses(sched, jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32),
                            jnp.array([0, 199]), jax.random.key(0), denoise,
                            lambda x: jnp.zeros(x.shape[:-1] + (5,)))
  np.testing.assert_allclose(seen[0], [0.0, 995.0])


def test_gradients_reach_embeddings_through_the_targets():
  """No stop_gradient: with a denoiser that ignores its input and a logits head that ignores
  the table, the table still gets a gradient, through the MSE target."""
  sched = diffusion.make_schedule("trunc_cos", 1000)
  ids = jnp.array([[1, 2, 3]])

  def loss(E):
    return diffusion.training_losses(sched, E[ids], ids, jnp.array([5]), jax.random.key(0),
                                     lambda x, mt: jnp.zeros_like(x),
                                     lambda x: jnp.zeros(x.shape[:-1] + (4,))).mse.sum()

  g = jax.grad(loss)(jnp.ones((4, 2)))
  assert np.all(np.abs(np.asarray(g[1:])) > 0)
  assert np.all(np.asarray(g[0]) == 0)  # row 0 is not in the caption
