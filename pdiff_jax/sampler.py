"""Sampling: one DDIM step, the whole chain in one `fori_loop`, n candidates per image by vmap.

Pure functions of arrays (no files, no flags). The original samples with a fresh schedule of
T_sample steps (`rediscretise`, model fed t * 1000 / T_sample); `respace` instead keeps an
evenly spaced subset of the training timesteps (improved-diffusion's respacing). At every step
the predicted x0 is replaced by its nearest word embedding (the clamping trick), and the final
words are the argmax of the tied output head.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pdiff_jax import diffusion
from pdiff_jax import model as model_lib

MODES = ("rediscretise", "respace")


class SamplingSchedule(NamedTuple):
  """Per sampling step k = 0..S-1 (k = 0 is the last, least noisy step)."""
  alphas_cumprod: jax.Array       # abar at step k
  alphas_cumprod_prev: jax.Array  # abar at step k - 1 (1 for k = 0)
  model_t: jax.Array              # the float timestep the network is fed at step k

  @property
  def num_steps(self) -> int:
    return self.alphas_cumprod.shape[0]


def respaced_timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
  """Evenly spaced training timesteps, as improved-diffusion's `space_timesteps(T, [S])`."""
  if not 1 <= num_steps <= num_train_steps:
    raise ValueError(f"cannot respace {num_train_steps} training steps to {num_steps}")
  if num_steps == 1:
    return np.array([0])
  stride = (num_train_steps - 1) / (num_steps - 1)
  return np.array(sorted({round(i * stride) for i in range(num_steps)}))


def make_sampling_schedule(schedule_name: str, num_train_steps: int, num_steps: int,
                           mode: str = "rediscretise") -> SamplingSchedule:
  if mode == "rediscretise":
    abar = np.cumprod(1.0 - diffusion.betas(schedule_name, num_steps))
    model_t = np.arange(num_steps) * (1000.0 / num_steps)
  elif mode == "respace":
    train_abar = np.cumprod(1.0 - diffusion.betas(schedule_name, num_train_steps))
    kept = respaced_timesteps(num_train_steps, num_steps)
    abar = train_abar[kept]
    model_t = kept * (1000.0 / num_train_steps)
  else:
    raise ValueError(f"unknown sampling mode {mode!r}; expected one of {', '.join(MODES)}")
  abar_prev = np.append(1.0, abar[:-1])
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return SamplingSchedule(f32(abar), f32(abar_prev), f32(model_t))


def nearest_embedding(x_LW: jax.Array, table_VW: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(rows of the table nearest to each x in L2, their ids); one matmul, no (L, V, W) tensor."""
  dist_LV = (jnp.sum(x_LW ** 2, -1, keepdims=True) - 2.0 * x_LW @ table_VW.T
             + jnp.sum(table_VW ** 2, -1)[None])
  ids_L = jnp.argmin(dist_LV, axis=-1)
  return table_VW[ids_L], ids_L


def ddim_step(x_t: jax.Array, x0_hat: jax.Array, abar_t: jax.Array, abar_prev: jax.Array,
              eta: float, noise: jax.Array, is_last: jax.Array) -> jax.Array:
  """One DDIM update (Song et al.; improved-diffusion's ddim_sample); eta = 1 is ancestral DDPM."""
  eps = (x_t - jnp.sqrt(abar_t) * x0_hat) / jnp.sqrt(1.0 - abar_t)
  sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar_t)) * jnp.sqrt(1.0 - abar_t / abar_prev)
  mean = jnp.sqrt(abar_prev) * x0_hat + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma ** 2, 0.0)) * eps
  return mean + jnp.where(is_last, 0.0, sigma) * noise


def sample_chain(denoise: Callable[[jax.Array, jax.Array], jax.Array], table_VW: jax.Array,
                 sched: SamplingSchedule, key: jax.Array, shape: tuple[int, int], *,
                 eta: float = 1.0, clamp: bool = True, x_T: jax.Array | None = None) -> jax.Array:
  """One candidate: x_T ~ N(0, I) of `shape` (L, W) denoised to x_0; returns x_0 (L, W).

  `denoise(x_LW, model_t)` predicts x0 for one candidate. Step noise is `fold_in(key, k)`.
  """
  key_T, key_steps = jax.random.split(key)
  x = jax.random.normal(key_T, shape, jnp.float32) if x_T is None else x_T
  S = sched.num_steps

  def body(i, x):
    k = S - 1 - i
    x0_hat = denoise(x, sched.model_t[k])
    if clamp:
      x0_hat, _ = nearest_embedding(x0_hat, table_VW)
    noise = jax.random.normal(jax.random.fold_in(key_steps, k), shape, jnp.float32)
    return ddim_step(x, x0_hat, sched.alphas_cumprod[k], sched.alphas_cumprod_prev[k], eta, noise,
                     k == 0)

  return jax.lax.fori_loop(0, S, body, x)


def model_denoiser(model, params, clip_F: jax.Array):
  """Adapts the network (batched, in flax) to `denoise(x_LW, model_t)` for one candidate."""

  def denoise(x_LW, model_t):
    return model.apply(params, x_LW[None], model_t[None], clip_F[None])[0]

  return denoise


def sample_tokens(model, params, clip_BF: jax.Array, keys_BN: jax.Array, sched: SamplingSchedule,
                  *, eta: float = 1.0, clamp: bool = True) -> jax.Array:
  """Token ids (B, N, L): N candidates for each of B images, all in parallel (vmap x vmap)."""
  cfg = model.cfg
  # The real words only: the table's vocabulary padding rows are never a nearest embedding.
  table = params["params"]["word_embedding"][:cfg.vocab_size].astype(jnp.float32)
  params = model_lib.dense_params_in(params, cfg.dtype)  # cast once, not at every step

  def one(clip_F, key):
    x0 = sample_chain(model_denoiser(model, params, clip_F), table, sched, key,
                      (cfg.max_len, cfg.word_dim), eta=eta, clamp=clamp)
    logits = model.apply(params, x0[None], method="logits")[0]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  per_image = jax.vmap(one, in_axes=(None, 0))      # n seeds
  return jax.vmap(per_image, in_axes=(0, 0))(clip_BF, keys_BN)  # images


def candidate_keys(seed: int, image_offsets: jax.Array, num_candidates: int) -> jax.Array:
  """Keys (B, N) that depend only on (seed, image position, candidate): reproducible whatever
  the batching."""
  base = jax.random.key(seed)
  per_image = jax.vmap(lambda i: jax.random.fold_in(base, i))(image_offsets)
  return jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(
      jnp.arange(num_candidates)))(per_image)

