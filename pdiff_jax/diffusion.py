"""Continuous text diffusion: noise schedules, q_sample and the three-term training loss.

Pure functions of arrays. Schedules are built in float64 with numpy (as improved-diffusion and
Diffusion-LM do) and stored as float32 device arrays; written by hand because no library has the
text-diffusion schedules (`sqrt`, `trunc_cos`, `trunc_lin`) or the x0-parameterised loss.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

SCHEDULES = ("linear", "cosine", "sqrt", "trunc_cos", "trunc_lin")
MAX_BETA = 0.999


def _betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float]) -> np.ndarray:
  """beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999) for i in 0..T-1."""
  return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), MAX_BETA)
                   for i in range(num_steps)], dtype=np.float64)


def _betas_for_alpha_bar_from_zero(num_steps: int, alpha_bar: Callable[[float], float]) -> np.ndarray:
  """Diffusion-LM's variant: beta_0 = 1 - abar(0), so that prod_{j<=k}(1 - beta_j) = abar(k/T)."""
  first = min(1 - alpha_bar(0.0), MAX_BETA)
  rest = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), MAX_BETA)
          for i in range(num_steps - 1)]
  return np.array([first] + rest, dtype=np.float64)


def betas(name: str, num_steps: int) -> np.ndarray:
  """The beta_t of a named schedule (SPEC.md), float64, shape (T,)."""
  scale = 1000.0 / num_steps
  if name == "linear":
    return np.linspace(1e-4 * scale, 0.02 * scale, num_steps, dtype=np.float64)
  if name == "trunc_lin":
    return np.linspace(1e-4 * scale + 0.01, 0.02 * scale + 0.01, num_steps, dtype=np.float64)
  if name == "cosine":
    return _betas_for_alpha_bar(
        num_steps, lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2)
  if name == "sqrt":
    return _betas_for_alpha_bar(num_steps, lambda u: 1 - math.sqrt(u + 1e-4))
  if name == "trunc_cos":
    return _betas_for_alpha_bar_from_zero(
        num_steps, lambda u: math.cos((u + 0.1) / 1.1 * math.pi / 2) ** 2)
  raise ValueError(f"unknown noise schedule {name!r}; expected one of {', '.join(SCHEDULES)}")


class Schedule(NamedTuple):
  """Per-timestep constants (float32, shape (T,)); a pytree, so it can be passed into jit."""
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array

  @property
  def num_steps(self) -> int:
    return self.betas.shape[0]


def make_schedule(name: str, num_steps: int) -> Schedule:
  b = betas(name, num_steps)
  return schedule_from_betas(b)


def schedule_from_betas(b: np.ndarray) -> Schedule:
  abar = np.cumprod(1.0 - b)
  abar_prev = np.append(1.0, abar[:-1])
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return Schedule(betas=f32(b), alphas_cumprod=f32(abar), alphas_cumprod_prev=f32(abar_prev),
                  sqrt_alphas_cumprod=f32(np.sqrt(abar)),
                  sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)))


def model_timestep(t_B: jax.Array, num_steps: int) -> jax.Array:
  """The timestep the network sees: t * 1000 / T as a float (0..999 for T = 1000)."""
  return t_B.astype(jnp.float32) * (1000.0 / num_steps)


def _bcast(v_B: jax.Array, x: jax.Array) -> jax.Array:
  return v_B.reshape(v_B.shape + (1,) * (x.ndim - 1))


def q_sample(schedule: Schedule, x0: jax.Array, t_B: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
  return (_bcast(schedule.sqrt_alphas_cumprod[t_B], x0) * x0
          + _bcast(schedule.sqrt_one_minus_alphas_cumprod[t_B], x0) * noise)


def _mean_flat(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


class Losses(NamedTuple):
  """Per-example loss terms, shape (B,); `loss` is their sum."""
  loss: jax.Array
  mse: jax.Array
  round: jax.Array
  prior: jax.Array


def training_losses(schedule: Schedule,
                    x0_mean_BLW: jax.Array,
                    ids_BL: jax.Array,
                    t_B: jax.Array,
                    key: jax.Array,
                    denoise: Callable[[jax.Array, jax.Array], jax.Array],
                    logits: Callable[[jax.Array], jax.Array]) -> Losses:
  """Diffusion-LM's x0-parameterised loss as Prefix-diffusion trains it (SPEC.md, Loss 1-7).

  `denoise(x_t, model_t)` predicts x0; `logits(x)` is the tied rounding head. No stop_gradient:
  the embedding table learns through x_t, the regression targets and the rounding term.
  """
  key_x0, key_t = jax.random.split(key)
  x0_BLW = x0_mean_BLW + schedule.sqrt_one_minus_alphas_cumprod[0] * jax.random.normal(
      key_x0, x0_mean_BLW.shape, x0_mean_BLW.dtype)
  noise_BLW = jax.random.normal(key_t, x0_BLW.shape, x0_BLW.dtype)
  x_t_BLW = q_sample(schedule, x0_BLW, t_B, noise_BLW)
  x0_hat_BLW = denoise(x_t_BLW, model_timestep(t_B, schedule.num_steps))

  mse_B = jnp.where(t_B == 0, _mean_flat((x0_mean_BLW - x0_hat_BLW) ** 2),
                    _mean_flat((x0_BLW - x0_hat_BLW) ** 2))
  nll_BL = optax.softmax_cross_entropy_with_integer_labels(logits(x0_BLW), ids_BL)
  round_B = jnp.mean(nll_BL, axis=-1)
  prior_B = _mean_flat((schedule.sqrt_alphas_cumprod[-1] * x0_BLW) ** 2)
  return Losses(loss=mse_B + round_B + prior_B, mse=mse_B, round=round_B, prior=prior_B)
