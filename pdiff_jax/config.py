"""Configuration: the defaults every config file starts from, and validation that names the bad key.

Config files in `configs/` call `base_config()` and override what differs. `validate` is run at
start-up by every command; it raises `ConfigError`, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import json
import jax.numpy as jnp
import ml_collections

from pdiff_jax import diffusion
from pdiff_jax import sampler as sampler_lib
from pdiff_jax.model import ModelConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
GELUS = ("erf", "tanh")  # exact (the original) or the tanh approximation
LR_SCHEDULES = ("linear", "constant", "cosine")

# Logical parameter/activation axis -> mesh axis. `model` shards heads, FFN and vocabulary;
# activations are split over `data` on the batch axis.
DEFAULT_RULES = (
    ("batch", "data"),
    ("heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
)


class ConfigError(ValueError):
  """A configuration value is invalid; the message starts with the dotted key."""

  def __init__(self, key: str, message: str):
    super().__init__(f"config.{key}: {message}")
    self.key = key


def base_config() -> ml_collections.ConfigDict:
  """The original Prefix-diffusion configuration (SPEC.md); config files override parts of it."""
  c = ml_collections.ConfigDict()
  c.seed = 3407

  c.clip = ml_collections.ConfigDict()
  c.clip.model = "openai/clip-vit-large-patch14"
  c.clip.batch_size = 64  # images per CLIP forward pass during extraction
  # An image's embedding as the mean over views moved by view_shift pixels: 1 (the original), 5
  # or 9 (clip.py). Off by default; the features, the judge and inference all use it.
  c.clip.views = 1
  c.clip.view_shift = 1

  c.data = ml_collections.ConfigDict()
  c.data.source = "karpathy:data/coco/dataset_coco.json"
  c.data.image_root = "data/coco/images"
  c.data.feature_dir = "data/coco/features_vitl14"
  c.data.max_len = 24
  c.data.min_count = 2
  # The original trains on Karpathy train only; configs/paper_coco_restval.py folds restval in.
  c.data.restval_in_train = False
  c.data.tfds_data_dir = ""  # for tfds:NAME; empty = TFDS's default
  c.data.feature_dtype = "float32"  # or float16, halves the store
  c.data.loader_threads = 8  # extract: threads that decode and transform the images
  # Per-dimension standardisation of the CLIP features with train-split statistics (saved in
  # every checkpoint). Off as in the original; helps a small CLIP whose features share a big mean.
  c.data.standardize_features = False
  c.data.shard_size = 1024  # images per extraction shard (the unit of resume)
  c.data.max_image_pixels = 89_478_485  # larger images are refused, not decoded
  # Only for data.source == "synthetic": in-memory random features and captions.
  c.data.synthetic_num_images = 256

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 14145  # the original's COCO vocabulary; replaced by len(vocab.json) when training on features
  c.model.feature_dim = 768  # follows the feature store unless a config or flag names another
  c.model.prefix_len = 5
  c.model.mapper_hidden = 1536
  c.model.hidden_size = 768
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.mlp_dim = 3072
  c.model.word_dim = 48
  c.model.max_position = 512  # the original's table has 512 rows, 24 of them used
  c.model.time_embed_dim = 128
  c.model.time_hidden = 512
  c.model.dropout = 0.1
  c.model.attention_dropout = 0.1
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.scan_layers = False  # encoder layers as one nn.scan: compile time flat in depth
  c.model.remat = False  # recompute each layer's activations in the backward pass (saves memory)
  c.model.fused_qkv = False  # q, k, v as one projection (same numbers; checkpoints convert on restore)
  c.model.gelu = "erf"  # "tanh": the approximation (not the original's); measured in BENCHMARKS.md
  # Additions since the paper (README "Beyond the paper"); 0 / off is the original, exactly.
  c.model.cond_drop = 0.0  # training probability of the null condition (classifier-free guidance)
  c.model.self_cond = 0.0  # training probability of feeding the model its own x0 estimate
  c.model.length_head = False  # predict the caption length from the CLIP embedding (loss weight 1)

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "trunc_cos"
  c.diffusion.num_steps = 1000

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.lr_schedule = "linear"  # decays to 0 at train.num_steps
  c.optim.warmup_steps = 0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 0.0  # global-norm clipping; 0 = off (the original has none)
  c.optim.ema_decay = 0.9999

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 200_000
  c.train.batch_size = 128
  c.train.log_every = 100
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3
  c.train.async_checkpointing = True
  c.train.eval_every = 5000
  c.train.eval_batches = 8
  c.train.prefetch = 2  # batches assembled and put on the devices ahead of the step
  c.train.steps_per_dispatch = 1  # K > 1: K steps per dispatch (lax.scan), the same numbers

  c.sampler = ml_collections.ConfigDict()
  c.sampler.num_candidates = 20
  c.sampler.steps = 200
  c.sampler.eta = 1.0  # DDIM eta: 1 = ancestral (the original), 0 = deterministic
  c.sampler.mode = "rediscretise"  # the original's fresh T_sample schedule; or "respace"
  c.sampler.clamp = True  # replace x0_hat by the nearest word embedding at every step
  c.sampler.solver = "ddim"  # the original's; "dpmpp2m" (DPM-Solver++(2M), deterministic) or "dpmpp2m-sde"
  c.sampler.guidance = 1.0  # classifier-free guidance scale: 1 = none, 0 = unconditional
  c.sampler.length = ""  # "" = the model decides (the original); "auto", "N" or "MIN-MAX" words
  c.sampler.batch_size = 8  # images per sampling call (each with num_candidates chains)
  c.sampler.rerank_clip = ""  # CLIP for reranking; empty = clip.model
  # Which candidate is chosen: "clip" (the original's: highest cosine), "vote" (drawn most often,
  # ties by cosine), "posterior" (CLIP's softmax summed over copies) or "fit" (the posterior's
  # logits less fit_weight x the denoiser's reconstruction error); inference.rank_candidates
  c.sampler.select = "clip"
  # "fit": the error at fit_points timesteps over (0, fit_max_t * T], fit_noises noises each
  # (sampler.denoiser_fit); the values measured best on the demo's val split (BENCHMARKS.md)
  c.sampler.fit_weight = 500.0
  c.sampler.fit_max_t = 0.45
  c.sampler.fit_points = 5
  c.sampler.fit_noises = 2

  # A learned judge of captions on the rerank CLIP's image embedding (judge.py), trained by
  # `pdiff train` after the denoiser when steps > 0 and used by every ranking; 0 = none (the
  # original). The rest: images per step, false captions per image, the MLP's size, its lr.
  c.judge = ml_collections.ConfigDict()
  c.judge.steps = 0
  c.judge.batch_size = 128
  c.judge.negatives = 8
  c.judge.hidden = 256
  c.judge.depth = 2
  c.judge.lr = 1e-3

  c.eval = ml_collections.ConfigDict()
  c.eval.clip_model = ""  # CLIP for CLIP-S / RefCLIP-S; empty = clip.model (then reranking inflates CLIP-S)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1)  # (data, model); -1 takes all remaining devices
  c.mesh.rules = DEFAULT_RULES
  return c


def _check(cond: bool, key: str, message: str) -> None:
  if not cond:
    raise ConfigError(key, message)


def validate(config: ml_collections.ConfigDict) -> None:
  """Rejects values that cannot work, naming the key. Checks that need devices live in sharding."""
  m, t, o, d = config.model, config.train, config.optim, config.diffusion
  _check(d.schedule in diffusion.SCHEDULES, "diffusion.schedule",
         f"unknown schedule {d.schedule!r}; expected one of {', '.join(diffusion.SCHEDULES)}")
  _check(d.num_steps >= 1, "diffusion.num_steps", f"must be >= 1, got {d.num_steps}")
  for key in ("vocab_size", "feature_dim", "prefix_len", "mapper_hidden", "hidden_size",
              "num_layers", "num_heads", "mlp_dim", "word_dim", "time_embed_dim", "time_hidden"):
    _check(int(m[key]) >= 1, f"model.{key}", f"must be a positive integer, got {m[key]}")
  _check(m.hidden_size % m.num_heads == 0, "model.num_heads",
         f"model.hidden_size={m.hidden_size} is not divisible by num_heads={m.num_heads}")
  _check(config.data.max_len >= 1, "data.max_len", f"must be >= 1, got {config.data.max_len}")
  _check(m.max_position >= config.data.max_len, "model.max_position",
         f"must be >= data.max_len={config.data.max_len}, got {m.max_position}")
  for key in ("dropout", "attention_dropout"):
    _check(0.0 <= m[key] < 1.0, f"model.{key}", f"must be in [0, 1), got {m[key]}")
  _check(m.get("gelu", "erf") in GELUS, "model.gelu",
         f"unknown GELU {m.get('gelu')!r}; expected one of {', '.join(GELUS)}")
  for key in ("dtype", "param_dtype"):
    _check(m[key] in DTYPES, f"model.{key}",
           f"unknown dtype {m[key]!r}; expected one of {', '.join(DTYPES)}")
  # No fp32 master copy is kept, so parameters must be fp32: in bf16 the EMA with decay 0.9999
  # never moves (1e-4 of a weight is below bf16's resolution) and late AdamW steps vanish.
  _check(m.param_dtype == "float32", "model.param_dtype",
         f"must be float32 (got {m.param_dtype!r}): without fp32 master weights, bf16 parameters "
         "lose the EMA and small AdamW updates; use model.dtype=bfloat16 for bf16 compute")
  _check(t.num_steps >= 0, "train.num_steps", f"must be >= 0, got {t.num_steps}")
  _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
  for key in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_every"):
    _check(t[key] >= 1, f"train.{key}", f"must be >= 1, got {t[key]}")
  _check(t.eval_batches >= 0, "train.eval_batches", f"must be >= 0, got {t.eval_batches}")
  _check(config.data.get("loader_threads", 8) >= 1, "data.loader_threads",
         f"must be >= 1, got {config.data.get('loader_threads')}")
  _check(t.get("prefetch", 2) >= 1, "train.prefetch", f"must be >= 1, got {t.get('prefetch')}")
  k = t.get("steps_per_dispatch", 1)
  _check(k >= 1, "train.steps_per_dispatch", f"must be >= 1, got {k}")
  for key in ("log_every", "checkpoint_every", "eval_every"):
    _check(t[key] % k == 0, "train.steps_per_dispatch",
           f"{k} must divide train.{key}={t[key]} (a dispatch never runs past a log, eval or "
           "checkpoint step)")
  _check(o.lr >= 0, "optim.lr", f"must be >= 0, got {o.lr}")
  _check(o.lr_schedule in LR_SCHEDULES, "optim.lr_schedule",
         f"unknown schedule {o.lr_schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")
  _check(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
  _check(0.0 <= o.ema_decay < 1.0, "optim.ema_decay", f"must be in [0, 1), got {o.ema_decay}")
  _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
  _check(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 = off), got {o.grad_clip}")
  shape = tuple(config.mesh.shape)
  _check(len(shape) == 2 and all(isinstance(s, int) and (s >= 1 or s == -1) for s in shape)
         and shape.count(-1) <= 1, "mesh.shape",
         f"must be two positive integers (data, model), at most one of them -1; got {shape}")
  _check(config.sampler.num_candidates >= 1, "sampler.num_candidates",
         f"must be >= 1, got {config.sampler.num_candidates}")
  _check(config.sampler.steps >= 1, "sampler.steps", f"must be >= 1, got {config.sampler.steps}")
  _check(0.0 <= config.sampler.eta <= 1.0, "sampler.eta",
         f"must be in [0, 1], got {config.sampler.eta}")
  for key in ("shard_size", "max_image_pixels", "min_count"):
    _check(config.data[key] >= 1, f"data.{key}", f"must be >= 1, got {config.data[key]}")
  _check(config.data.feature_dtype in ("float32", "float16"), "data.feature_dtype",
         f"must be float32 or float16, got {config.data.feature_dtype!r}")
  _check(config.clip.batch_size >= 1, "clip.batch_size", f"must be >= 1, got {config.clip.batch_size}")
  _check(config.clip.get("views", 1) in (1, 5, 9), "clip.views",
         f"must be 1, 5 or 9, got {config.clip.get('views')}")
  _check(config.clip.get("view_shift", 1) >= 1, "clip.view_shift",
         f"must be >= 1 pixel, got {config.clip.get('view_shift')}")
  j = judge_config(config)
  for key in ("steps", "negatives"):
    _check(int(j[key]) >= 0, f"judge.{key}", f"must be >= 0, got {j[key]}")
  for key in ("batch_size", "hidden", "depth"):
    _check(int(j[key]) >= 1, f"judge.{key}", f"must be a positive integer, got {j[key]}")
  _check(float(j.lr) > 0, "judge.lr", f"must be > 0, got {j.lr}")
  if int(j.steps) > 0:  # it learns from the stored embeddings of clip.model (judge.py)
    _check(config.data.source != "synthetic", "judge.steps",
           f"is {j.steps}, but data.source=synthetic has no captions to learn from; set it to 0")
    rerank = config.sampler.get("rerank_clip", "")
    _check(not rerank or rerank == config.clip.model, "judge.steps",
           f"is {j.steps}, but sampler.rerank_clip={rerank!r} is not clip.model="
           f"{config.clip.model!r}, whose stored image embeddings the judge learns from; leave "
           "sampler.rerank_clip empty or set judge.steps=0")
  _check(config.sampler.get("solver", "ddim") in sampler_lib.SOLVERS, "sampler.solver",
         f"unknown solver {config.sampler.get('solver')!r}; expected one of "
         f"{', '.join(sampler_lib.SOLVERS)}")
  for key in ("cond_drop", "self_cond"):
    _check(0.0 <= m.get(key, 0.0) < 1.0, f"model.{key}", f"must be in [0, 1), got {m.get(key)}")
  guidance = config.sampler.get("guidance", 1.0)
  _check(guidance >= 0, "sampler.guidance", f"must be >= 0 (1 = no guidance), got {guidance}")
  _check(guidance == 1.0 or m.get("cond_drop", 0.0) > 0, "sampler.guidance",
         f"{guidance} needs a model trained with model.cond_drop > 0 (it has no null condition)")
  try:
    sampler_lib.parse_length(config.sampler.get("length", ""), config.data.max_len,
                             bool(m.get("length_head", False)))
  except ValueError as e:
    raise ConfigError("sampler.length", str(e)) from None
  _check(config.sampler.mode in sampler_lib.MODES, "sampler.mode",
         f"unknown mode {config.sampler.mode!r}; expected one of {', '.join(sampler_lib.MODES)}")
  _check(config.sampler.get("select", "clip") in sampler_lib.SELECTS, "sampler.select",
         f"unknown {config.sampler.get('select')!r}; expected one of {', '.join(sampler_lib.SELECTS)}")
  _check(config.sampler.get("fit_weight", 500.0) >= 0, "sampler.fit_weight",
         f"must be >= 0, got {config.sampler.get('fit_weight')}")
  _check(0 < config.sampler.get("fit_max_t", 0.45) <= 1, "sampler.fit_max_t",
         f"must be in (0, 1] (a fraction of diffusion.num_steps), got {config.sampler.get('fit_max_t')}")
  for key in ("fit_points", "fit_noises"):
    _check(config.sampler.get(key, 1) >= 1, f"sampler.{key}", f"must be >= 1, got {config.sampler.get(key)}")
  _check(config.sampler.batch_size >= 1, "sampler.batch_size",
         f"must be >= 1, got {config.sampler.batch_size}")
  _check(config.sampler.mode != "respace" or config.sampler.steps <= d.num_steps, "sampler.steps",
         f"respace keeps a subset of the {d.num_steps} training steps; got {config.sampler.steps}")
  source = config.data.source
  kind, _, arg = source.partition(":")
  _check(source == "synthetic" or (kind in ("karpathy", "tfds", "folder") and arg),
         "data.source", f"unknown source {source!r}; expected karpathy:PATH, tfds:NAME, folder:PATH "
         "or synthetic")


def explicit(config: ml_collections.ConfigDict, key: str, overrides=()) -> bool:
  """Whether the dotted `key` was named by the config file (its value differs from
  `base_config()`) or by a `--config.KEY=` flag (`overrides`)."""
  def get(c):
    for part in key.split("."):
      c = c[part]
    return c
  return key in overrides or get(config) != get(base_config())


def clip_views(config: ml_collections.ConfigDict) -> dict:
  """{"views", "view_shift"} of `config.clip` for `Clip.load` (1 view in configs saved before
  the keys existed)."""
  return {"views": int(config.clip.get("views", 1)), "view_shift": int(config.clip.get("view_shift", 1))}


def clip_encoding(config: ml_collections.ConfigDict) -> dict:
  """`Clip.encoding` of a CLIP loaded for `config`: {} for one view, else `clip_views`."""
  views = clip_views(config)
  return {} if views["views"] == 1 else views


def judge_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.judge`, with the defaults (steps 0: no judge) in configs saved before it existed."""
  j = base_config().judge
  j.update(config.get("judge", {}))
  return j


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  m = config.model
  return ModelConfig(
      vocab_size=m.vocab_size, feature_dim=m.feature_dim, prefix_len=m.prefix_len,
      mapper_hidden=m.mapper_hidden, hidden_size=m.hidden_size, num_layers=m.num_layers,
      num_heads=m.num_heads, mlp_dim=m.mlp_dim, word_dim=m.word_dim, max_len=config.data.max_len,
      max_position=m.max_position, time_embed_dim=m.time_embed_dim, time_hidden=m.time_hidden,
      dropout=m.dropout, attention_dropout=m.attention_dropout, dtype=DTYPES[m.dtype],
      param_dtype=DTYPES[m.param_dtype], scan_layers=bool(m.get("scan_layers", False)),
      remat=bool(m.get("remat", False)), fused_qkv=bool(m.get("fused_qkv", False)),
      gelu=str(m.get("gelu", "erf")), cond_drop=float(m.get("cond_drop", 0.0)),
      self_cond=float(m.get("self_cond", 0.0)), length_head=bool(m.get("length_head", False)))


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Reads a config written by `to_json` (workdir/config.json); lists of pairs become tuples."""
  d = json.loads(text)
  d["mesh"]["shape"] = tuple(d["mesh"]["shape"])
  d["mesh"]["rules"] = tuple(tuple(r) for r in d["mesh"]["rules"])
  return ml_collections.ConfigDict(d)
