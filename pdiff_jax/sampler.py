"""Sampling: solvers (DDIM, DPM-Solver++(2M) and its SDE variant) as step rules, the whole chain in one
`fori_loop`, n candidates per image by vmap; classifier-free guidance wraps the denoiser,
self-conditioning is a denoiser that reads the previous estimate, and a length constrains
positions (the k-diffusion shape: a sampler is a function of (denoiser, x, schedule)).

Pure functions of arrays (no files, no flags). The original samples with a fresh schedule of
T_sample steps (`rediscretise`, model fed t * 1000 / T_sample); `respace` instead keeps an
evenly spaced subset of the training timesteps (improved-diffusion's respacing). At every step
the predicted x0 is replaced by its nearest word embedding (the clamping trick), and the final
words are the argmax of the tied output head.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pdiff_jax import diffusion
from pdiff_jax import model as model_lib

MODES = ("rediscretise", "respace")
PAD_ID = 0  # data.vocab.PAD_ID (this module reads no files, so it does not import data/)
# Each candidate's length is drawn from its key folded with this (apart from the chain's keys).
_LENGTH_STREAM = 0x6C656E


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


def nearest_embedding(x_LW: jax.Array, table_VW: jax.Array,
                      allowed_LV: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(rows of the table nearest to each x in L2, their ids); one matmul, no (L, V, W) tensor.
  With `allowed_LV` (bool) position l only takes the words allowed there."""
  dist_LV = (jnp.sum(x_LW ** 2, -1, keepdims=True) - 2.0 * x_LW @ table_VW.T
             + jnp.sum(table_VW ** 2, -1)[None])
  if allowed_LV is not None:
    dist_LV = jnp.where(allowed_LV, dist_LV, jnp.inf)
  ids_L = jnp.argmin(dist_LV, axis=-1)
  return table_VW[ids_L], ids_L


def ddim_step(x_t: jax.Array, x0_hat: jax.Array, abar_t: jax.Array, abar_prev: jax.Array,
              eta: float, noise: jax.Array, is_last: jax.Array) -> jax.Array:
  """One DDIM update (Song et al.; improved-diffusion's ddim_sample); eta = 1 is ancestral DDPM."""
  eps = (x_t - jnp.sqrt(abar_t) * x0_hat) / jnp.sqrt(1.0 - abar_t)
  sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar_t)) * jnp.sqrt(1.0 - abar_t / abar_prev)
  mean = jnp.sqrt(abar_prev) * x0_hat + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma ** 2, 0.0)) * eps
  return mean + jnp.where(is_last, 0.0, sigma) * noise


class Solver(NamedTuple):
  """A step rule over a `SamplingSchedule`, with its own carried state (the k-diffusion shape):
  `init(x_T)` is the state before the first step, and `step(x, x0_hat, k, sched, state, key)`
  moves x from step k to step k - 1 given the denoiser's x0 estimate (`key`: this step's noise
  key), returning (x, state). A new solver is one such pair; `sample_chain` runs any of them."""
  init: Callable[[jax.Array], Any]
  step: Callable[..., tuple[jax.Array, Any]]


def ddim(eta: float = 1.0) -> Solver:
  """DDIM (`ddim_step`; eta = 1, the original's, is ancestral DDPM). No state."""

  def step(x, x0_hat, k, sched, state, key):
    noise = jax.random.normal(key, x.shape, jnp.float32)
    return ddim_step(x, x0_hat, sched.alphas_cumprod[k], sched.alphas_cumprod_prev[k], eta, noise,
                     k == 0), state

  return Solver(lambda x: (), step)


def dpm_solver_2m(sde: bool = False) -> Solver:
  """DPM-Solver++(2M) (Lu et al. 2022) for an x0-predicting model: second order and multistep.
  The first step is first order (nothing to extrapolate from yet), and so is the last, which
  lands on abar = 1 (sigma 0, as diffusers' `final_sigmas_type="zero"`). State: the previous
  step's x0 estimate and its lambda = log(alpha / sigma).

  `sde=False`: the deterministic ODE solver. `sde=True`: SDE-DPM-Solver++(2M) (the paper's
  stochastic variant, diffusers' "sde-dpmsolver++"), which adds fresh noise at every step as the
  original's ancestral DDIM does; its first-order step is exactly that DDPM step."""

  def step(x, x0_hat, k, sched, state, key):
    x0_prev, lam_prev, have_prev = state
    abar_s, abar_t = sched.alphas_cumprod[k], sched.alphas_cumprod_prev[k]
    alpha_s, sigma_s = jnp.sqrt(abar_s), jnp.sqrt(1.0 - abar_s)
    alpha_t, sigma_t = jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t)
    lam_s = jnp.log(alpha_s) - jnp.log(sigma_s)
    lam_t = jnp.log(alpha_t) - jnp.log(sigma_t)  # +inf on the last step
    h = lam_t - lam_s
    half_over_r = 0.5 * h / (lam_s - lam_prev)  # r = (lam_s - lam_prev) / h
    second = have_prev & (k > 0)
    d = jnp.where(second, (1.0 + half_over_r) * x0_hat - half_over_r * x0_prev, x0_hat)
    if sde:
      noise = jax.random.normal(key, x.shape, jnp.float32)
      x_next = ((sigma_t / sigma_s) * jnp.exp(-h) * x - alpha_t * jnp.expm1(-2.0 * h) * d
                + sigma_t * jnp.sqrt(-jnp.expm1(-2.0 * h)) * noise)
    else:
      x_next = (sigma_t / sigma_s) * x - alpha_t * jnp.expm1(-h) * d
    x_t = jnp.where(k > 0, x_next, x0_hat)
    return x_t, (x0_hat, lam_s, jnp.bool_(True))

  return Solver(lambda x: (jnp.zeros_like(x), jnp.float32(0.0), jnp.bool_(False)), step)


# Config names (`sampler.solver`, `--solver`) -> f(eta) -> Solver; eta is DDIM's alone.
SOLVERS = {"ddim": ddim, "dpmpp2m": lambda eta: dpm_solver_2m(),
           "dpmpp2m-sde": lambda eta: dpm_solver_2m(sde=True)}
# How the chosen caption is picked among an image's candidates (`sampler.select`, `--select`):
# `inference.rank_candidates` says what each does.
SELECTS = ("clip", "vote", "posterior", "fit")
# The noises of `denoiser_fit` come from this key: the same for every image, candidate and call.
_FIT_SEED = 0x666974


def make_solver(name: str, eta: float = 1.0) -> Solver:
  """A solver by its config name (`sampler.solver`); `eta` is DDIM's (the others ignore it)."""
  if name not in SOLVERS:
    raise ValueError(f"unknown solver {name!r}; expected one of {', '.join(SOLVERS)}")
  return SOLVERS[name](eta)


def parse_length(spec: str, max_len: int, has_head: bool) -> tuple[int, int] | None:
  """`sampler.length` / `--length` -> (min, max) words, or None (the model decides, the
  original). "auto": 1..max_len drawn from the length head's distribution; "N"; "MIN-MAX" (drawn
  from the head's distribution over that range, or uniformly for a model without a head)."""
  spec = str(spec).strip()
  if spec == "":
    return None
  if spec == "auto":
    if not has_head:
      raise ValueError("'auto' needs a model trained with model.length_head (it predicts no length)")
    return 1, max_len
  lo, sep, hi = spec.partition("-")
  try:
    lo_n, hi_n = int(lo), int(hi if sep else lo)
  except ValueError:
    raise ValueError(f"{spec!r} is not auto, N or MIN-MAX") from None
  if not 1 <= lo_n <= hi_n <= max_len:
    raise ValueError(f"{spec!r}: lengths must satisfy 1 <= MIN <= MAX <= max_len={max_len}")
  return lo_n, hi_n


def length_mask(num_words: jax.Array, max_len: int, vocab_size: int) -> jax.Array:
  """(L, V) bool: the first `num_words` positions take any word but PAD, the rest only PAD."""
  pos_L1 = jnp.arange(max_len)[:, None]
  word_1V = jnp.arange(vocab_size)[None]
  return jnp.where(pos_L1 < num_words, word_1V != PAD_ID, word_1V == PAD_ID)


def sample_chain(denoise: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                 table_VW: jax.Array, sched: SamplingSchedule, key: jax.Array,
                 shape: tuple[int, int], *, eta: float = 1.0, clamp: bool = True,
                 x_T: jax.Array | None = None, solver: Solver | None = None,
                 allowed_LV: jax.Array | None = None) -> jax.Array:
  """One candidate: x_T ~ N(0, I) of `shape` (L, W) denoised to x_0; returns x_0 (L, W).

  `denoise(x_LW, model_t, x0_prev_LW)` predicts x0 for one candidate; `x0_prev` is its previous
  estimate (zeros at the first step), which a self-conditioned denoiser reads and others ignore.
  With `clamp` the estimate is replaced by its nearest word embeddings (only the words
  `allowed_LV` allows at each position, e.g. a `length_mask`; without `clamp` the positions that
  must be PAD are set to its embedding) before the solver (default: `ddim(eta)`) takes the step.
  Step k's noise key is `fold_in(key, k)`.
  """
  solver = ddim(eta) if solver is None else solver
  key_T, key_steps = jax.random.split(key)
  x = jax.random.normal(key_T, shape, jnp.float32) if x_T is None else x_T
  S = sched.num_steps

  def body(i, carry):
    x, x0_prev, state = carry
    k = S - 1 - i
    x0_raw = denoise(x, sched.model_t[k], x0_prev)
    x0_hat = x0_raw
    if clamp:
      x0_hat, _ = nearest_embedding(x0_hat, table_VW, allowed_LV)
    elif allowed_LV is not None:
      only_pad_L = allowed_LV[:, PAD_ID] & (allowed_LV.sum(-1) == 1)
      x0_hat = jnp.where(only_pad_L[:, None], table_VW[PAD_ID][None], x0_hat)
    x, state = solver.step(x, x0_hat, k, sched, state, jax.random.fold_in(key_steps, k))
    return x, x0_raw, state

  return jax.lax.fori_loop(0, S, body, (x, jnp.zeros_like(x), solver.init(x)))[0]


def classifier_free(denoise_batch: Callable[..., jax.Array], scale: float):
  """Classifier-free guidance around a batched denoiser `denoise_batch(x_ZLW, model_t, cond_Z,
  x0_prev_ZLW)` (cond_Z False = the null condition): x0 = x0_u + scale (x0_c - x0_u), both from
  one call of batch 2. scale 1 is the conditional model alone, 0 the unconditional."""

  def denoise(x_LW, model_t, x0_prev_LW):
    both = denoise_batch(jnp.stack([x_LW, x_LW]), model_t, jnp.array([True, False]),
                         jnp.stack([x0_prev_LW, x0_prev_LW]))
    return both[1] + scale * (both[0] - both[1])

  return denoise


def model_denoiser(model, params, clip_F: jax.Array, guidance: float = 1.0):
  """Adapts the network (batched, in flax) to `denoise(x_LW, model_t, x0_prev_LW)` for one
  candidate: self-conditioned if the model was trained so (`self_cond`), and guided with
  `guidance` != 1 (`classifier_free`; needs a model trained with `cond_drop`)."""
  self_cond = model.cfg.self_cond > 0

  def denoise_batch(x_ZLW, model_t, cond_Z, x0_prev_ZLW):
    Z = x_ZLW.shape[0]
    return model.apply(params, x_ZLW, jnp.broadcast_to(model_t, (Z,)),
                       jnp.broadcast_to(clip_F, (Z,) + clip_F.shape), cond_B=cond_Z,
                       x0_self_BLW=x0_prev_ZLW if self_cond else None)

  if guidance != 1.0:
    return classifier_free(denoise_batch, guidance)

  def denoise(x_LW, model_t, x0_prev_LW):
    return denoise_batch(x_LW[None], model_t[None], None, x0_prev_LW[None])[0]

  return denoise


def candidate_lengths(model, params, clip_BF: jax.Array, keys_BN: jax.Array,
                      length: tuple[int, int]) -> jax.Array:
  """(B, N) caption lengths in [min, max] words: drawn from the length head's distribution
  (renormalised over the range) or, for a model without a head, uniformly; each from its
  candidate's key, so a candidate's length does not depend on the batching."""
  lo, hi = length
  J = model.cfg.max_len + 1
  if model.cfg.length_head:
    logits_BJ = model.apply(params, clip_BF, method="length_logits")
  else:
    logits_BJ = jnp.zeros((clip_BF.shape[0], J), jnp.float32)
  in_range_J = (jnp.arange(J) >= lo) & (jnp.arange(J) <= hi)
  logits_BJ = jnp.where(in_range_J, logits_BJ, -jnp.inf)
  draw = lambda key, logits: jax.random.categorical(jax.random.fold_in(key, _LENGTH_STREAM), logits)
  return jax.vmap(lambda keys_N, logits: jax.vmap(lambda k: draw(k, logits))(keys_N))(
      keys_BN, logits_BJ).astype(jnp.int32)


def sample_tokens(model, params, clip_BF: jax.Array, keys_BN: jax.Array, sched: SamplingSchedule,
                  *, eta: float = 1.0, clamp: bool = True, solver: Solver | None = None,
                  guidance: float = 1.0, length: tuple[int, int] | None = None) -> jax.Array:
  """Token ids (B, N, L): N candidates for each of B images, all in parallel (vmap x vmap);
  `solver` as in `sample_chain` (default: DDIM with `eta`), `guidance` as in `model_denoiser`,
  `length` (min, max) words per candidate as in `candidate_lengths` (None: the model decides);
  positions past a candidate's length are PAD by construction, the ones before it are words."""
  cfg = model.cfg
  # The real words only: the table's vocabulary padding rows are never a nearest embedding.
  table = params["params"]["word_embedding"][:cfg.vocab_size].astype(jnp.float32)
  params = model_lib.dense_params_in(params, cfg.dtype)  # cast once, not at every step
  B, N = keys_BN.shape[:2]
  lengths_BN = (jnp.zeros((B, N), jnp.int32) if length is None
                else candidate_lengths(model, params, clip_BF, keys_BN, length))

  def one(clip_F, key, num_words):
    allowed_LV = None if length is None else length_mask(num_words, cfg.max_len, cfg.vocab_size)
    x0 = sample_chain(model_denoiser(model, params, clip_F, guidance), table, sched, key,
                      (cfg.max_len, cfg.word_dim), eta=eta, clamp=clamp, solver=solver,
                      allowed_LV=allowed_LV)
    logits = model.apply(params, x0[None], method="logits")[0]
    if allowed_LV is not None:
      pad = model_lib.padded_vocab(cfg.vocab_size) - cfg.vocab_size
      logits = jnp.where(jnp.pad(allowed_LV, ((0, 0), (0, pad))), logits, -jnp.inf)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  per_image = jax.vmap(one, in_axes=(None, 0, 0))      # n seeds
  return jax.vmap(per_image, in_axes=(0, 0, 0))(clip_BF, keys_BN, lengths_BN)  # images


def fit_timesteps(num_train_steps: int, max_t: float, points: int) -> np.ndarray:
  """`points` training timesteps evenly spaced over (0, max_t * (T - 1)], the last included."""
  if not 0.0 < max_t <= 1.0 or points < 1:
    raise ValueError(f"fit timesteps: need 0 < max_t <= 1 and points >= 1, got {max_t}, {points}")
  top = max_t * (num_train_steps - 1)
  return np.maximum(np.rint(top * np.arange(1, points + 1) / points), 1).astype(np.int32)


def denoiser_fit(model, params, clip_BF: jax.Array, ids_BNL: jax.Array,
                 schedule: diffusion.Schedule, timesteps: np.ndarray, noises: int) -> jax.Array:
  """(B, N) how badly the denoiser reconstructs each candidate caption of each image: the mean
  squared error of its x0 estimate from x_t ~ q(x_t | x0 = E[w]) against E[w], averaged over
  `timesteps` x `noises` noisy copies (the diffusion classifier of Li et al., 2023, over the
  candidates; lower = the denoiser finds the caption likelier for this image). Every image and
  candidate sees the same noises (`_FIT_SEED`), so they are compared on equal terms and the
  result does not depend on the batching."""
  B, N, L = ids_BNL.shape
  x0_ZLW = model.apply(params, ids_BNL.reshape(B * N, L), method="embed")
  clip_ZF = jnp.repeat(clip_BF, N, axis=0)
  t_K = jnp.repeat(jnp.asarray(timesteps, jnp.int32), noises)
  noise_KLW = jax.random.normal(jax.random.key(_FIT_SEED), (t_K.shape[0],) + x0_ZLW.shape[1:])

  def error(args):
    t, noise_LW = args
    t_Z = jnp.full((B * N,), t)
    x_t = diffusion.q_sample(schedule, x0_ZLW, t_Z, jnp.broadcast_to(noise_LW, x0_ZLW.shape))
    x0_hat = model.apply(params, x_t, diffusion.model_timestep(t_Z, schedule.num_steps), clip_ZF)
    return jnp.mean((x0_hat.astype(jnp.float32) - x0_ZLW) ** 2, axis=(1, 2))

  return jnp.mean(jax.lax.map(error, (t_K, noise_KLW)), axis=0).reshape(B, N)


def candidate_keys(seed: int, image_offsets: jax.Array, num_candidates: int) -> jax.Array:
  """Keys (B, N) that depend only on (seed, image position, candidate): reproducible whatever
  the batching."""
  base = jax.random.key(seed)
  per_image = jax.vmap(lambda i: jax.random.fold_in(base, i))(image_offsets)
  return jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(
      jnp.arange(num_candidates)))(per_image)

