"""Captioning with a trained model: the inference bundle and `Captioner`.

`Captioner.from_workdir(DIR)` loads the EMA weights, the resolved config and the vocabulary
saved with the checkpoint, and the CLIP that made the training features. `caption(images)`
encodes the images, samples n candidates per image in parallel (sharded over the local
devices), decodes them and reranks them by CLIP image-text cosine.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from pdiff_jax import checkpoint as ckpt_lib
from pdiff_jax import clip as clip_lib
from pdiff_jax import config as config_lib
from pdiff_jax import diffusion
from pdiff_jax import judge as judge_lib
from pdiff_jax import model as model_lib
from pdiff_jax import sampler as sampler_lib
from pdiff_jax import storage
from pdiff_jax.data import images as images_lib
from pdiff_jax.data.vocab import Vocab
from pdiff_jax.model import PrefixDenoiser

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Bundle:
  """What inference needs from a training workdir: no optimizer state."""
  config: ml_collections.ConfigDict
  model: PrefixDenoiser
  params: Any  # {"params": EMA weights}
  vocab: Vocab
  step: int
  feature_stats: tuple[np.ndarray, np.ndarray] | None = None  # (mean, std) if trained standardised


def load_bundle(workdir: str, step: int | None = None,
                devices: Sequence[jax.Device] | None = None) -> Bundle:
  try:
    config = config_lib.from_json(storage.read_text(storage.join(workdir, "config.json")))
  except FileNotFoundError:
    raise ckpt_lib.CheckpointError(f"{workdir}: not a training workdir (no config.json)") from None
  model = PrefixDenoiser(config_lib.model_config(config))
  step, ema, extras = restore_ema(workdir, config, step, devices)
  vocab_json = extras.get("vocab")
  if vocab_json is None:
    raise ckpt_lib.CheckpointError(
        f"{workdir}/checkpoints/{step}: no vocabulary saved with the checkpoint (trained on "
        "data.source=synthetic?), so its word ids cannot be decoded")
  vocab = Vocab(vocab_json["words"], vocab_json.get("min_count", 2))
  if int(config.model.vocab_size) != len(vocab):
    raise ckpt_lib.CheckpointError(f"{workdir}/checkpoints/{step}: the vocabulary has {len(vocab)} "
                                   f"words but the model was trained on {config.model.vocab_size}")
  stats = extras.get("feature_stats")
  if stats is not None:
    stats = (np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32))
  return Bundle(config, model, {"params": ema}, vocab, step, stats)


def restore_ema(workdir: str, config: ml_collections.ConfigDict, step: int | None = None,
                devices: Sequence[jax.Device] | None = None) -> tuple[int, Any, dict]:
  """(step, EMA parameters replicated on `devices`, the JSON extras) of `workdir`'s checkpoint;
  one written with q, k, v in the other layout (`model.fused_qkv`) is converted to `config`'s."""
  cfg = config_lib.model_config(config)
  replicated = NamedSharding(Mesh(np.asarray(devices or jax.local_devices()), ("data",)), P())

  def abstract(c):
    shapes = nn.meta.unbox(jax.eval_shape(PrefixDenoiser(c).init, jax.random.key(0),
                                          *_dummy(config)))["params"]
    return {"ema_params": jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), shapes)}

  other = (abstract(dataclasses.replace(cfg, fused_qkv=not cfg.fused_qkv)),
           lambda state: model_lib.fuse_qkv(state, cfg.fused_qkv))
  step, state, extras = ckpt_lib.restore_subtree(storage.join(workdir, "checkpoints"),
                                                 abstract(cfg), step, layouts=(other,))
  return step, state["ema_params"], extras


def _dummy(config):
  m = config.model
  return (jnp.zeros((1, config.data.max_len, m.word_dim)), jnp.zeros((1,)),
          jnp.zeros((1, m.feature_dim)))


def to_image(image) -> Image.Image:
  """A path, PIL image or HxWx3 uint8 array -> RGB PIL image (raises BadImage)."""
  if isinstance(image, (str, os.PathLike)):
    return images_lib.load_image(image)
  if isinstance(image, Image.Image):
    return images_lib.to_rgb(image)
  arr = np.asarray(image)
  if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
    raise images_lib.BadImage(f"expected an HxW or HxWxC uint8 array, got {arr.dtype} {arr.shape}")
  return images_lib.to_rgb(Image.fromarray(arr))


def check_select(select: str) -> str:
  if select not in sampler_lib.SELECTS:
    raise ValueError(f"select: unknown {select!r}; expected one of {', '.join(sampler_lib.SELECTS)}")
  return select


def rank_candidates(captions: Sequence[Sequence[str]], scores: np.ndarray | None, k: int,
                    select: str = "clip", logit_scale: float | None = None,
                    fits: np.ndarray | None = None, fit_weight: float | None = None) -> list[dict]:
  """The first k candidates of each image: [{"caption": chosen, "candidates"}], the candidates
  sorted by their CLIP cosine ("score"), best first (CONTRACT.md). Without scores (or k = 1)
  the first candidate is chosen and its score is None.

  `scores` is (B, N) cosines, or (B, N, 2) with a learned judge (`Captioner.rerank`): the cosine
  and the judge's score, which then takes the cosine's place in every rule below; each candidate
  also gets its "judged" score.

  `select` chooses (ties keep the candidates' order):
  - "clip" (the original's): by CLIP cosine.
  - "vote": by how many of the k candidates are the same caption, then by cosine: the majority
    vote of self-consistency (Wang et al., 2023), which trusts what the sampler says most often.
  - "posterior": by the log of CLIP's softmax over the k candidates (temperature: the rerank
    CLIP's own `logit_scale`), summed over the copies of each caption, that is CLIP's
    probability of a caption times how often the sampler drew it (`logit_scale * cosine +
    log(copies)`): a vote weighted by CLIP, with no weight to tune.
  - "fit": as "posterior", with `fit_weight` x the denoiser's reconstruction error of the
    candidate (`fits`, (B, N): `sampler.denoiser_fit`) taken from each logit: CLIP and the
    denoiser's own reading of the image, each a judge of the caption.
  Where the choice may differ from the cosine's order (any rule but "clip", or a judge), each
  candidate gets its "rank" in the rule's order (1: the chosen one; `report.in_choice_order`).
  Under "vote", "posterior" and "fit" each also gets "votes", its number of copies, and under
  "fit" its "fit"."""
  check_select(select)
  if select in ("posterior", "fit") and scores is not None and k > 1 and logit_scale is None:
    raise ValueError(f"select: {select!r} needs the rerank CLIP's logit_scale")
  if select == "fit" and scores is not None and k > 1 and (fits is None or fit_weight is None):
    raise ValueError("select: 'fit' needs the denoiser's fit of every candidate and its weight")
  judged = scores is not None and np.ndim(scores) == 3
  out = []
  for i, cands in enumerate(captions):
    if k == 1 or scores is None:
      out.append({"caption": cands[0], "candidates": [{"caption": cands[0], "score": None}]})
      continue
    cands = list(cands[:k])
    cosine = np.asarray(scores[i, :k, 0] if judged else scores[i, :k], np.float64)
    score = np.asarray(scores[i, :k, 1], np.float64) if judged else cosine
    copies = {c: cands.count(c) for c in cands}
    votes = np.array([copies[c] for c in cands])
    if select == "clip":
      order = np.argsort(-score, kind="stable")
    elif select == "vote":
      order = np.lexsort((np.arange(k), -score, -votes))
    else:  # log of the softmax mass of each caption's copies (its normaliser left out)
      logits = logit_scale * score
      if select == "fit":
        fit = np.asarray(fits[i, :k], np.float64)
        logits = logits - fit_weight * fit
      mass = dict.fromkeys(copies, -np.inf)
      for c, logit in zip(cands, logits):
        mass[c] = np.logaddexp(mass[c], logit)
      order = np.argsort(-np.array([mass[c] for c in cands]), kind="stable")
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(1, k + 1)
    ranked = [{"caption": cands[j], "score": float(cosine[j]),
               **({"judged": float(score[j])} if judged else {}),
               **({"rank": int(rank[j])} if judged or select != "clip" else {}),
               **({} if select == "clip" else {"votes": int(votes[j])}),
               **({"fit": float(fit[j])} if select == "fit" else {})}
              for j in np.argsort(-cosine, kind="stable")]
    out.append({"caption": cands[order[0]], "candidates": ranked})
  return out


class Captioner:
  """Diverse captions for images: n candidates per image, reranked by CLIP."""

  def __init__(self, bundle: Bundle, clip: clip_lib.Clip, rerank_clip: clip_lib.Clip | None = None,
               judge: judge_lib.Judge | None = None):
    feature_dim = bundle.config.model.feature_dim
    if clip.embed_dim != feature_dim:
      raise clip_lib.ClipLoadError(
          f"CLIP {clip.name!r} gives {clip.embed_dim}-d embeddings, but the model in this workdir "
          f"was trained on {feature_dim}-d features ({bundle.config.clip.model})")
    views = config_lib.clip_views(bundle.config)
    for c in (clip, rerank_clip or clip):
      if c.encoding != config_lib.clip_encoding(bundle.config):
        raise clip_lib.ClipLoadError(
            f"CLIP {c.name!r} encodes images as {c.views} view(s) (view_shift {c.view_shift}), but "
            f"the model in this workdir was trained on features of clip.views={views['views']} "
            f"(view_shift {views['view_shift']}); load it with Clip.load(..., views=, view_shift=)")
    self.bundle, self.clip = bundle, clip
    self.rerank_clip = rerank_clip or clip
    if judge is not None and judge.meta.get("trained_on", {}).get("clip_encoding", {}) != self.rerank_clip.encoding:
      raise clip_lib.ClipLoadError(
          f"the judge was trained on image embeddings of "
          f"{judge.meta['trained_on'].get('clip_encoding', {}).get('views', 1)} view(s), but the "
          f"rerank CLIP {self.rerank_clip.name!r} encodes {self.rerank_clip.views}")
    if judge is not None and judge.embed_dim != self.rerank_clip.embed_dim:
      raise clip_lib.ClipLoadError(
          f"the judge reads {judge.embed_dim}-d image embeddings, but the rerank CLIP "
          f"{self.rerank_clip.name!r} gives {self.rerank_clip.embed_dim}-d ones")
    if judge is not None and judge.meta.get("clip_name") != self.rerank_clip.name:
      log.warning("the judge was trained with CLIP %r; reranking with %r",
                  judge.meta.get("clip_name"), self.rerank_clip.name)
    self.judge = judge  # a learned judge of captions (judge.py) scores them instead of the cosine
    self.select = str(bundle.config.sampler.get("select", "clip"))  # see `rank_candidates`
    self.mesh = clip.mesh
    self.params = jax.device_put(bundle.params, NamedSharding(self.mesh, P()))
    self._samplers: dict[tuple, Any] = {}
    self._length_fn = None
    self._fit_fn = None
    # Images per sampler call: sampler.batch_size, rounded up to fill the local devices.
    self.sample_batch = clip_lib.round_up(int(bundle.config.sampler.batch_size), self.mesh.devices.size)

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, clip: str | None = None,
                   rerank_clip: str | None = None,
                   devices: Sequence[jax.Device] | None = None,
                   judge: bool | None = None) -> "Captioner":
    """The model in `workdir` with its CLIP (or `clip`), its rerank CLIP and, when its config
    trained one (judge.steps > 0) or `judge` is True, its judge of captions (WORKDIR/judge);
    `judge=False` ranks by the cosine."""
    bundle = load_bundle(workdir, step, devices)
    if judge is None:
      judge = config_lib.judge_config(bundle.config).steps > 0
      if judge and not storage.exists(storage.join(judge_lib.directory(workdir), "judge.json")):
        # Training is still running, or stopped before the judge: rank as without one.
        log.warning("%s: the config trains a judge of captions (judge.steps), but none is there "
                    "yet; ranking by the rerank CLIP's cosine", workdir)
        judge = False
    name = clip or bundle.config.clip.model
    views = config_lib.clip_views(bundle.config)  # as the training features were encoded
    encoder = clip_lib.Clip.load(name, devices, **views)
    rerank = rerank_clip or bundle.config.sampler.get("rerank_clip", "") or name
    return cls(bundle, encoder,
               encoder if rerank == name else clip_lib.Clip.load(rerank, devices, **views),
               judge_lib.Judge.load(judge_lib.directory(workdir)) if judge else None)

  # -- the pure pieces, for people composing their own loops --------------------------------

  def sampling_options(self, solver: str | None = None, guidance: float | None = None,
                       length: str | None = None) -> dict:
    """{"solver", "guidance", "length"}: the sampler options given (None: the config's
    `sampler.*`), checked against this model; a bad one raises ValueError naming it."""
    s, cfg = self.bundle.config.sampler, self.bundle.model.cfg
    solver = solver or s.get("solver", "ddim")
    if solver not in sampler_lib.SOLVERS:
      raise ValueError(f"solver: unknown {solver!r}; expected one of {', '.join(sampler_lib.SOLVERS)}")
    guidance = float(s.get("guidance", 1.0) if guidance is None else guidance)
    if not np.isfinite(guidance) or guidance < 0:
      raise ValueError(f"guidance: must be a number >= 0 (1 = no guidance), got {guidance}")
    if guidance != 1.0 and cfg.cond_drop <= 0:
      raise ValueError(f"guidance: {guidance} needs a model trained with model.cond_drop > 0; this "
                       "one has no null condition (use 1)")
    length = str(s.get("length", "") if length is None else length).strip()
    try:
      sampler_lib.parse_length(length, cfg.max_len, cfg.length_head)
    except ValueError as e:
      raise ValueError(f"length: {e}") from None
    return {"solver": solver, "guidance": guidance, "length": length}

  def sample_fn(self, steps: int, eta: float, mode: str | None = None, clamp: bool | None = None,
                solver: str | None = None, guidance: float | None = None, length: str | None = None):
    """A jitted `f(params, features_BF, keys_BN) -> token ids (B, N, L)`, batch sharded on data;
    `solver` by name (`sampler.SOLVERS`), `guidance` scale and `length` ("", "auto", "N",
    "MIN-MAX") as in `sampling_options` (defaults: the config's `sampler.*`)."""
    s = self.bundle.config.sampler
    mode = mode or s.mode
    clamp = s.clamp if clamp is None else clamp
    opts = self.sampling_options(solver, guidance, length)
    key = (steps, float(eta), mode, bool(clamp), *opts.values())
    if key not in self._samplers:
      d, cfg = self.bundle.config.diffusion, self.bundle.model.cfg
      sched = sampler_lib.make_sampling_schedule(d.schedule, d.num_steps, steps, mode)
      batch = NamedSharding(self.mesh, P("data"))
      fn = functools.partial(sampler_lib.sample_tokens, self.bundle.model, sched=sched,
                             eta=float(eta), clamp=bool(clamp),
                             solver=sampler_lib.make_solver(opts["solver"], float(eta)),
                             guidance=opts["guidance"],
                             length=sampler_lib.parse_length(opts["length"], cfg.max_len,
                                                             cfg.length_head))
      self._samplers[key] = jax.jit(lambda p, f, k: fn(p, f, k),
                                    in_shardings=(NamedSharding(self.mesh, P()), batch, batch),
                                    out_shardings=batch)
    return self._samplers[key]

  def length_distribution(self, features_BF: np.ndarray) -> np.ndarray:
    """(B, max_len + 1) probabilities of each caption length in words (a model trained with
    `model.length_head`)."""
    if not self.bundle.model.cfg.length_head:
      raise ValueError("this model was trained without model.length_head; it predicts no length")
    if self._length_fn is None:
      self._length_fn = jax.jit(lambda p, f: jax.nn.softmax(
          self.bundle.model.apply(p, f, method="length_logits")))
    return np.asarray(self._length_fn(self.params, jnp.asarray(self._standardize(features_BF))))

  def _standardize(self, features_BF: np.ndarray) -> np.ndarray:
    features_BF = np.asarray(features_BF, np.float32)
    if self.bundle.feature_stats is not None:  # the model saw standardised features
      mean, std = self.bundle.feature_stats
      features_BF = (features_BF - mean) / std
    return features_BF

  def rerank(self, image_emb_BF: np.ndarray, captions: Sequence[Sequence[str]]) -> np.ndarray:
    """Cosine (B, N) between each image and each of its candidate captions (rerank CLIP); with a
    judge (B, N, 2): the cosine and the judge's score, the cosine plus its learned correction
    (`judge.judged`), each caption encoded once (`rank_candidates` reads either)."""
    flat = [c for cands in captions for c in cands]
    text = clip_lib.normalize(self.rerank_clip.encode_texts(flat)).reshape(len(captions), -1, self.rerank_clip.embed_dim)
    cosine = np.einsum("bne,be->bn", text, clip_lib.normalize(np.asarray(image_emb_BF, np.float32)))
    if self.judge is None:
      return cosine
    return np.stack([cosine, np.einsum("bne,be->bn", text, self.judge.embed(image_emb_BF))], -1)

  def rank(self, captions: Sequence[Sequence[str]], scores: np.ndarray | None, k: int,
           select: str | None = None, fits: np.ndarray | None = None) -> list[dict]:
    """`rank_candidates` by `select` (default: the config's `sampler.select`), with the rerank
    CLIP's temperature and, for "fit", `fits` (`fit`) weighted by `sampler.fit_weight`."""
    select = select or self.select
    return rank_candidates(captions, scores, k, select,
                           self.rerank_clip.logit_scale if select in ("posterior", "fit") else None,
                           fits, float(self.bundle.config.sampler.get("fit_weight", 500.0)))

  def fit(self, features_BF: np.ndarray, tokens_BNL: np.ndarray) -> np.ndarray:
    """(B, N) `sampler.denoiser_fit` of each image's candidates (token ids), at the config's
    `sampler.fit_max_t`, `fit_points` and `fit_noises`; in calls of exactly `sample_batch`
    images, as `sample_tokens`."""
    if self._fit_fn is None:
      s, d = self.bundle.config.sampler, self.bundle.config.diffusion
      schedule = diffusion.make_schedule(d.schedule, d.num_steps)
      timesteps = sampler_lib.fit_timesteps(d.num_steps, float(s.get("fit_max_t", 0.45)),
                                            int(s.get("fit_points", 5)))
      fn = functools.partial(sampler_lib.denoiser_fit, self.bundle.model, schedule=schedule,
                             timesteps=timesteps, noises=int(s.get("fit_noises", 2)))
      batch = NamedSharding(self.mesh, P("data"))
      self._fit_fn = jax.jit(lambda p, f, t: fn(p, f, t),
                             in_shardings=(NamedSharding(self.mesh, P()), batch, batch),
                             out_shardings=batch)
    tokens_BNL = jnp.asarray(tokens_BNL, jnp.int32)
    return self._in_calls(self._fit_fn, features_BF, tokens_BNL, np.zeros((0, tokens_BNL.shape[1]), np.float32))

  def _in_calls(self, fn, features_BF: np.ndarray, rows_B: jax.Array, empty: np.ndarray) -> np.ndarray:
    """`fn(params, standardised features, rows)` over calls of exactly `sample_batch` images (the
    last padded with zero features and copies of its last row), so `fn` compiles once whatever B
    is; the answers of the real images, concatenated (`empty` when there are none)."""
    features_BF = self._standardize(features_BF)
    chunk, out = self.sample_batch, [empty]
    for start in range(0, len(features_BF), chunk):
      feats, rows = features_BF[start:start + chunk], rows_B[start:start + chunk]
      pad = chunk - len(feats)
      feats = np.concatenate([feats, np.zeros((pad,) + feats.shape[1:], np.float32)])
      rows = jnp.concatenate([rows, jnp.repeat(rows[-1:], pad, axis=0)])
      out.append(np.asarray(fn(self.params, jnp.asarray(feats), rows))[:chunk - pad])
    return np.concatenate(out)

  def features(self, images: Sequence[Image.Image]) -> np.ndarray:
    return self.clip.encode_images(self.clip.preprocess(images))

  # -- the whole thing ---------------------------------------------------------------------

  def caption(self, images: Sequence[Any], num_candidates: int | None = None,
              steps: int | None = None, seed: int = 0, eta: float | None = None,
              batch_size: int | None = None, solver: str | None = None,
              guidance: float | None = None, length: str | None = None,
              select: str | None = None) -> list[dict]:
    """[{"caption": chosen, "candidates": [{"caption", "score"}, ...]}, ...] per image, the
    candidates sorted by CLIP cosine, best first (`rank_candidates`).

    `solver`, `guidance` and `length` as in `sampling_options`, `select` as in `rank_candidates`
    (default: the config's).
    Images are paths, PIL images or uint8 arrays. Results depend only on (seed, position of the
    image in `images`, candidate index), not on batching. With n = 1 no reranking is done and
    the score is None.
    """
    s = self.bundle.config.sampler
    n = int(num_candidates or s.num_candidates)
    steps = int(steps or s.steps)
    eta = s.eta if eta is None else eta
    batch_size = int(batch_size or s.batch_size)
    opts = self.sampling_options(solver, guidance, length)  # checked before any work
    check_select(select or self.select)
    pil = [to_image(im) for im in images]
    results = []
    for start in range(0, len(pil), batch_size):
      chunk = pil[start:start + batch_size]
      feats = self.features(chunk)
      emb = feats if self.rerank_clip is self.clip else self.rerank_clip.encode_images(
          self.rerank_clip.preprocess(chunk))
      results += self.caption_features(feats, emb, n, steps, seed, eta,
                                       offsets=np.arange(start, start + len(chunk)), select=select,
                                       **opts)
    return results

  def caption_features(self, features_BF: np.ndarray, rerank_emb_BF: np.ndarray | None,
                       num_candidates: int, steps: int, seed: int, eta: float,
                       offsets: np.ndarray | None = None, solver: str | None = None,
                       guidance: float | None = None, length: str | None = None,
                       select: str | None = None) -> list[dict]:
    """`caption` from precomputed CLIP features (and the rerank CLIP's image embeddings)."""
    tokens = self.sample_tokens(features_BF, num_candidates, steps, seed, eta, offsets, solver,
                                guidance, length)
    captions = [[self.bundle.vocab.decode(t) for t in cands] for cands in tokens]
    scores = self.rerank(rerank_emb_BF, captions) if num_candidates > 1 else None
    fits = self.fit(features_BF, tokens) if (select or self.select) == "fit" and scores is not None else None
    return self.rank(captions, scores, num_candidates, select, fits)

  def sample_tokens(self, features_BF: np.ndarray, num_candidates: int, steps: int, seed: int,
                    eta: float, offsets: np.ndarray | None = None, solver: str | None = None,
                    guidance: float | None = None, length: str | None = None) -> np.ndarray:
    """Token ids (B, N, L) for B feature vectors, in calls of exactly `sample_batch` images (the
    last padded), so the sampler compiles once per (n, steps, options) whatever B is; the
    options as in `sample_fn`."""
    B = features_BF.shape[0]
    offsets = np.arange(B) if offsets is None else np.asarray(offsets)
    keys = sampler_lib.candidate_keys(seed, jnp.asarray(offsets, jnp.uint32), num_candidates)
    return self.sample_tokens_keyed(features_BF, keys, steps, eta, solver, guidance, length)

  def sample_tokens_keyed(self, features_BF: np.ndarray, keys_BN: jax.Array, steps: int,
                          eta: float, solver: str | None = None, guidance: float | None = None,
                          length: str | None = None) -> np.ndarray:
    """`sample_tokens` with each image's candidate keys given (B, N): images of different seeds
    (`pdiff serve`'s requests) share a call; in calls of exactly `sample_batch` images."""
    N = keys_BN.shape[1]
    fn = self.sample_fn(steps, eta, solver=solver, guidance=guidance, length=length)
    return self._in_calls(fn, features_BF, keys_BN,
                          np.zeros((0, N, int(self.bundle.config.data.max_len)), np.int32))
