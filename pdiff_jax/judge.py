"""A learned judge of captions: the rerank CLIP's image embedding moved by a small MLP, trained
against fluent false captions made from the training captions (`judge.steps`; off by default).

CLIP scores a caption by the cosine of two embeddings, a bilinear form: it cannot weigh "the red
circle left of the blue square" against the same words with the shapes exchanged unless the
image embedding's direction alone says which. The judge keeps CLIP frozen and learns
g(u) = u + MLP(u) / logit_scale of the normalised image embedding u, so that the score of a
caption of normalised text embedding v, g(u) . v, is the cosine plus a correction that is any
function of the image (CLIP-Adapter's residual form, Gao et al., 2021, here on the image side).
It is trained as CLIP was, a softmax over the batch's captions, with each image's hard negatives
added (NegCLIP, Yuksekgonul et al., 2023): captions of its own with one word replaced or two
words exchanged where the training captions' bigrams allow it (`Negatives`), which need no
parser or word list, so they are made the same way for COCO as for the demo's shapes.

The score stays linear in the text embedding, so ranking uses it wherever it used the cosine
(`Captioner.rerank`; every `sampler.select` rule), at the cost of one small MLP per image.
Written by hand: no library trains an adapter on frozen CLIP embeddings against such negatives.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
from typing import Callable, Sequence

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pdiff_jax import clip as clip_lib
from pdiff_jax import config as config_lib
from pdiff_jax import storage

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_EMBED_CHUNK = 256  # rows per compiled call of `Judge.embed`: one compile whatever the batch


_ATTEMPTS = 20  # tries at a negative for one image before it takes another image's caption


class JudgeError(RuntimeError):
  """A judge that is missing or cannot be read (the message names the file)."""


class Negatives:
  """False captions that read like true ones, from the bigrams of a caption corpus: a word
  replaced by one that follows its left neighbour and precedes its right one somewhere in the
  corpus ("a red circle" -> "a blue circle"), or two words exchanged where each fits the other's
  place ("a red circle left of a blue square" -> "a red square left of a blue circle")."""

  def __init__(self, captions: Sequence[str]):
    follow, precede = collections.defaultdict(set), collections.defaultdict(set)
    for caption in captions:
      w = ["<s>", *caption.split(), "</s>"]
      for a, b in zip(w[:-1], w[1:]):
        follow[a].add(b)
        precede[b].add(a)
    self.follow, self.precede = dict(follow), dict(precede)

  def _fits(self, left: str, word: str, right: str) -> bool:
    return word in self.follow.get(left, ()) and right in self.follow.get(word, ())

  def edits(self, caption: str, position: int) -> list[str]:
    """Every replacement of word `position` and every exchange of it with a later word that the
    bigrams allow, sorted (so a seeded choice among them is the same on any machine)."""
    w = ["<s>", *caption.split(), "</s>"]
    i = position + 1
    out = set()
    for x in self.follow.get(w[i - 1], set()) & self.precede.get(w[i + 1], set()):
      if x != w[i] and x not in ("<s>", "</s>"):
        out.add(" ".join(w[1:i] + [x] + w[i + 1:-1]))
    for j in range(i + 2, len(w) - 1):  # not neighbours: their bigram would be new
      if w[j] != w[i] and self._fits(w[i - 1], w[j], w[i + 1]) and self._fits(w[j - 1], w[i], w[j + 1]):
        v = list(w)
        v[i], v[j] = v[j], v[i]
        out.add(" ".join(v[1:-1]))
    return sorted(out)

  def sample(self, captions: Sequence[str], k: int, rng: np.random.Generator) -> list[str]:
    """`k` negatives of an image whose captions are `captions`: each from a caption, a position
    and an edit drawn at random, never one of `captions` itself; fewer (maybe none) when the
    captions allow few edits."""
    refs, out = set(captions), []
    for _ in range(k * _ATTEMPTS):
      if len(out) == k:
        break
      caption = captions[rng.integers(len(captions))]
      n = len(caption.split())
      if n == 0:
        continue
      options = [e for e in self.edits(caption, int(rng.integers(n))) if e not in refs]
      if options:
        out.append(options[rng.integers(len(options))])
    return out


class Adapter(nn.Module):
  """MLP(u): `depth` GELU layers of `hidden` units, then back to the embedding's size."""
  hidden: int = 256
  depth: int = 2

  @nn.compact
  def __call__(self, u):
    h = u
    for _ in range(self.depth):
      h = nn.gelu(nn.Dense(self.hidden)(h))
    return nn.Dense(u.shape[-1])(h)


def judged(adapter: Adapter, params, image_BD: jax.Array, logit_scale: float) -> jax.Array:
  """g(u) = u + MLP(u) / logit_scale of the normalised image embeddings: its dot product with a
  normalised text embedding is the judge's score, on the cosine's scale."""
  u = image_BD / jnp.linalg.norm(image_BD, axis=-1, keepdims=True)
  return u + adapter.apply(params, u) / logit_scale


def loss_fn(adapter: Adapter, params, image_BD, text_BD, negatives_BKD, logit_scale: float,
            text_ids_B=None):
  """Cross-entropy of each image's caption against the batch's other captions and its own
  hard negatives, all scored by logit_scale x the judged score. `text_ids_B` (which distinct
  text each caption is): another image's caption that is the same text is left out of the
  image's negatives (short captions repeat: "a red circle" is true of both images)."""
  g = logit_scale * judged(adapter, params, image_BD, logit_scale)
  in_batch = g @ text_BD.T
  if text_ids_B is not None:
    same = (text_ids_B[:, None] == text_ids_B[None, :]) & ~jnp.eye(len(text_ids_B), dtype=bool)
    in_batch = jnp.where(same, -jnp.inf, in_batch)
  logits = jnp.concatenate([in_batch, jnp.einsum("bd,bkd->bk", g, negatives_BKD)], axis=1)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.arange(image_BD.shape[0])).mean()


@dataclasses.dataclass
class Judge:
  """A trained judge: `embed` maps image embeddings to the vectors whose dot products with
  normalised text embeddings are the judged scores."""
  params: dict
  hidden: int
  depth: int
  logit_scale: float
  meta: dict  # what it was trained on and how (judge.json)

  @functools.cached_property
  def _embed(self):
    adapter = Adapter(self.hidden, self.depth)
    return jax.jit(lambda p, x: judged(adapter, p, x, self.logit_scale))

  def embed(self, image_emb_BD: np.ndarray) -> np.ndarray:
    """g(u) of each row, in calls of `_EMBED_CHUNK` rows (the last padded), so that any number
    of images (a server's batches vary) runs one compiled program."""
    x = np.asarray(image_emb_BD, np.float32)
    out = [np.zeros((0, x.shape[1]), np.float32)]
    for start in range(0, len(x), _EMBED_CHUNK):
      part = x[start:start + _EMBED_CHUNK]
      pad = np.ones((_EMBED_CHUNK - len(part), x.shape[1]), np.float32)
      out.append(np.asarray(self._embed(self.params, np.concatenate([part, pad])))[:len(part)])
    return np.concatenate(out)

  def save(self, directory: str) -> None:
    storage.makedirs(directory)
    meta_path = storage.path(storage.join(directory, "judge.json"))
    if meta_path.exists():  # written last: a crash in between leaves no judge, not a mixed one
      meta_path.unlink()
    storage.write_atomic(storage.join(directory, "params.msgpack"),
                         lambda f: f.write(flax.serialization.to_bytes(self.params)))
    storage.write_json(storage.join(directory, "judge.json"),
                       {"format_version": FORMAT_VERSION, "hidden": self.hidden,
                        "depth": self.depth, "logit_scale": self.logit_scale, **self.meta},
                       indent=1)

  @classmethod
  def load(cls, directory: str) -> "Judge":
    meta_path = storage.join(directory, "judge.json")
    if not storage.exists(meta_path):
      raise JudgeError(f"{directory}: no trained judge (judge.json); `pdiff train` with "
                       "judge.steps > 0 trains it once the denoiser is done")
    try:
      meta = storage.read_json(meta_path)
      version = meta.pop("format_version", None)
      if version != FORMAT_VERSION:
        raise ValueError(f"format_version {version}; this pdiff reads {FORMAT_VERSION}")
      hidden, depth = int(meta.pop("hidden")), int(meta.pop("depth"))
      logit_scale = float(meta.pop("logit_scale"))
      raw = storage.path(storage.join(directory, "params.msgpack")).read_bytes()
      params = flax.serialization.msgpack_restore(raw)
      if params.get("params", {}).get("Dense_0", {}).get("kernel") is None:
        raise ValueError("params.msgpack holds no adapter")
    except Exception as e:  # any unreadable part: one line naming the directory
      raise JudgeError(f"{directory}: unreadable judge ({type(e).__name__}: {e}); train it again "
                       "(`pdiff train` with judge.steps > 0 after deleting it)") from None
    return cls(params, hidden, depth, logit_scale, meta)

  @property
  def embed_dim(self) -> int:
    return int(np.shape(self.params["params"]["Dense_0"]["kernel"])[0])


def fill_negatives(found: list[str], own: Sequence[str], captions: Sequence[Sequence[str]], k: int,
                   rng: np.random.Generator) -> list[str]:
  """`found` topped up to `k` with captions of random images that are none of `own` (an image
  whose captions allow too few edits still gets `k` false captions)."""
  found, refs = list(found), set(own)
  for _ in range(100 * k):
    if len(found) >= k:
      return found
    other = captions[int(rng.integers(len(captions)))]
    text = other[int(rng.integers(len(other)))]
    if text not in refs:
      found.append(text)
  if len(found) < k:
    raise ValueError(f"found {len(found)} of {k} false captions for an image whose captions are "
                     f"{list(own)[:3]}: the others' are its own; set judge.negatives lower")
  return found


def train_call(adapter: Adapter, tx: optax.GradientTransformation, logit_scale: float):
  """A jitted `f(params, opt_state, images (S, B, D), texts (S, B, D), negatives (S, B, K, D),
  text_ids (S, B)) -> (params, opt_state, losses (S,))`: S steps of `loss_fn` by `lax.scan`."""
  grad = jax.value_and_grad(functools.partial(loss_fn, adapter, logit_scale=logit_scale))

  def step(carry, batch):
    params, opt_state = carry
    images, texts, negatives, text_ids = batch
    loss, g = grad(params, images, texts, negatives, text_ids_B=text_ids)
    updates, opt_state = tx.update(g, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  @jax.jit
  def run(params, opt_state, images, texts, negatives, text_ids):
    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state),
                                               (images, texts, negatives, text_ids))
    return params, opt_state, losses
  return run


def train_judge(image_emb_ND: np.ndarray, captions: Sequence[Sequence[str]],
                encode_texts: Callable[[list[str]], np.ndarray], logit_scale: float, *,
                steps: int, batch_size: int = 128, negatives: int = 8, hidden: int = 256,
                depth: int = 2, lr: float = 1e-3, seed: int = 0, steps_per_call: int = 250,
                tick: Callable[[], None] = lambda: None) -> tuple[dict, dict]:
  """(params, info) of a judge of N images (their CLIP embeddings and captions).

  Each image gets `negatives` false captions once (`Negatives` of all the captions); each step
  takes `batch_size` images, one of its captions each, and its negatives.
  Every caption and negative is encoded once by `encode_texts`; the steps run in calls of
  `steps_per_call` (a `lax.scan` over batches gathered here), so memory holds only the
  embeddings and one call's batches. Deterministic in `seed`. `tick` is called after the
  encoding and after each call (a trainer's lock heartbeat)."""
  n = len(captions)
  if len(image_emb_ND) != n:
    raise ValueError(f"{len(image_emb_ND)} image embeddings but captions of {n} images")
  if batch_size > n or n < 2:
    raise ValueError(f"judge.batch_size={batch_size} needs at least that many training images, "
                     f"and 2 or more; there are {n}")
  if any(len(cs) == 0 for cs in captions):
    raise ValueError("every training image needs a caption")
  t0 = time.perf_counter()
  rng = np.random.default_rng(seed)
  finder = Negatives([c for cs in captions for c in cs])
  texts: dict[str, int] = {}
  index = lambda t: texts.setdefault(t, len(texts))
  pos = [[index(c) for c in cs] for cs in captions]
  neg = np.zeros((n, negatives), np.int32)
  short = 0
  for i, cs in enumerate(captions):
    found = finder.sample(list(cs), negatives, rng)
    short += len(found) < negatives
    neg[i] = [index(t) for t in fill_negatives(found, cs, captions, negatives, rng)]
    if i % 4096 == 4095:
      tick()
  t1 = time.perf_counter()
  order, blocks = list(texts), []
  for start in range(0, len(order), 65536):  # in blocks, with a heartbeat between them
    blocks.append(np.asarray(encode_texts(order[start:start + 65536]), np.float32))
    tick()
  text = clip_lib.normalize(np.concatenate(blocks))
  image = np.asarray(image_emb_ND, np.float32)
  t2 = time.perf_counter()
  tick()

  adapter = Adapter(hidden, depth)
  params = adapter.init(jax.random.key(seed), jnp.zeros((1, image.shape[1]), jnp.float32))
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps),
                   weight_decay=1e-4)
  opt_state = tx.init(params)
  run = train_call(adapter, tx, logit_scale)

  offsets = np.cumsum([0] + [len(p) for p in pos])
  flat_pos = np.concatenate([np.asarray(p, np.int32) for p in pos])
  losses = []
  for start in range(0, steps, steps_per_call):
    k = min(steps_per_call, steps - start)
    imgs = np.stack([rng.choice(n, batch_size, replace=False) for _ in range(k)])
    which = (rng.random(imgs.shape) * np.diff(offsets)[imgs]).astype(np.int64)
    caps = flat_pos[offsets[imgs] + which]
    params, opt_state, loss = run(params, opt_state, image[imgs], text[caps], text[neg[imgs]], caps)
    losses.append(np.asarray(loss))
    tick()
  losses = np.concatenate(losses) if losses else np.zeros(0)
  info = {"images": n, "texts": len(texts), "images_short_of_negatives": short,
          "loss_first_100": float(losses[:100].mean()) if len(losses) else None,
          "loss_last_100": float(losses[-100:].mean()) if len(losses) else None,
          "seconds": {"negatives": round(t1 - t0, 1), "encode": round(t2 - t1, 1),
                      "train": round(time.perf_counter() - t2, 1)}}
  return jax.device_get(params), info


def settings(config) -> dict:
  """The judge's training settings from `config.judge` (what a trained judge must match)."""
  j = config_lib.judge_config(config)
  return {"steps": int(j.steps), "batch_size": int(j.batch_size), "negatives": int(j.negatives),
          "hidden": int(j.hidden), "depth": int(j.depth), "lr": float(j.lr),
          "seed": int(config.seed)}


def directory(workdir: str) -> str:
  return storage.join(workdir, "judge")


def train_for_model(config, workdir: str, tick: Callable[[], None] = lambda: None) -> Judge:
  """Trains the judge of the model in `workdir` on its feature store's train split (the stored
  image embeddings, the captions as the vocabulary decodes them) with the config's CLIP's text
  tower, and saves it to WORKDIR/judge; a judge already there of the same settings and features
  is kept. In a multi-process run every process trains the same judge on one of its devices
  (from the same seed and data), so none waits on another, and process 0 saves it. The stored
  embeddings are the ones reranking uses, so the rerank CLIP must be `clip.model`
  (`config.validate` says so)."""
  from pdiff_jax.data import features as features_lib
  config_lib.validate(config)
  store = features_lib.FeatureStore(config.data.feature_dir)
  wanted = {**settings(config), "clip_model": store.manifest["clip_model"],
            "clip_encoding": store.manifest.get("clip_encoding", {}),
            "vocab_hash": store.manifest["vocab_hash"],
            "feature_dir": storage.uri(config.data.feature_dir),
            "train_split": store.manifest["splits"]["train"],
            # since 2026-12-07 another image's caption of the same text is no negative (loss_fn);
            # a judge trained before, without this key, is trained again
            "same_text": "not a negative"}
  out = directory(workdir)
  if storage.exists(storage.join(out, "judge.json")):
    try:
      old = Judge.load(out)
      if old.meta.get("trained_on") == wanted:
        log.info("judge: %s was trained with these settings on these features; kept", out)
        return old
    except JudgeError as e:
      log.warning("judge: %s; training it again", e)
  split = store.split("train")
  ids, image_index = np.asarray(split.ids), np.asarray(split.image_index)
  captions: list[list[str]] = [[] for _ in range(len(split.features))]
  for row, i in zip(ids, image_index):
    captions[int(i)].append(store.vocab.decode(row))
  keep = [i for i, c in enumerate(captions) if c]  # an image with no caption teaches nothing
  captions = [captions[i] for i in keep]
  tick()
  clip = clip_lib.Clip.load(config.clip.model, jax.local_devices()[:1],
                            **config_lib.clip_views(config))
  tick()
  s = settings(config)
  log.info("judge: %d steps of %d images, %d negatives each, on %d train images",
           s["steps"], s["batch_size"], s["negatives"], len(captions))
  params, info = train_judge(
      np.asarray(split.features, np.float32)[keep], captions, clip.encode_texts, clip.logit_scale,
      steps=s["steps"], batch_size=s["batch_size"], negatives=s["negatives"], hidden=s["hidden"],
      depth=s["depth"], lr=s["lr"], seed=s["seed"], tick=tick)
  log.info("judge: loss %.3f -> %.3f; %s", info["loss_first_100"], info["loss_last_100"],
           ", ".join(f"{k} {v} s" for k, v in info["seconds"].items()))
  judge = Judge(params, s["hidden"], s["depth"], clip.logit_scale,
                {"trained_on": wanted, "clip_name": clip.name, "train": info})
  if jax.process_index() == 0:
    judge.save(out)
  return judge
