"""`pdiff demo`: the whole pipeline on the embedded synthetic data, CPU-sized, resumable by stage.

shapes data set -> small CLIP (contrastive) -> `extract` -> `train` -> `eval` (n = 10) ->
report, plus three variants that show the captions follow the image and what reranking buys.
Every stage keeps its output in DIR and is skipped (or resumed) when the demo runs again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import jax
import numpy as np

from pdiff_jax import clip as clip_lib
from pdiff_jax import bench, clip_pretrain, evaluate, report, storage, train
from pdiff_jax import config as config_lib
from pdiff_jax.data import features, shapes
from pdiff_jax.metrics import coco, diversity, exact

log = logging.getLogger(__name__)

# A fixed amount of work per stage (steps, never seconds), so that the figures are the same on
# any machine and a change can be measured against them.
FULL = {"sizes": {"train": 8000, "val": 500, "test": 500}, "clip_steps": 4000, "train_steps": None}
FAST = {"sizes": {"train": 480, "val": 24, "test": 32}, "clip_steps": 40, "train_steps": 80}
# How the small CLIP learns (`clip_pretrain.train_small_clip`, whose docstring has the
# measurements): InfoNCE with an attribute head on both towers that also learns which colours are
# there, four hard-negative twins per caption, and half the images drawn in another style; 16
# attention heads of 4 dimensions rather than 4 of 16, so that the class token can gather two
# objects apart (a step 1.3x dearer on the 2-core CPU; BENCHMARKS.md); a learning rate of
# 2e-3 rather than train_small_clip's 1e-3, which reads the shapes of two objects sooner; and the
# head's shape labels weighted twice, so that every seed's CLIP carries the shapes of two objects,
# where at 1 each seed chose shapes or relations (exactly right 76.8-91.2% over four seeds); and
# every object of a restyled image outlined, not half, so that a dark rim does not change the
# colour the CLIP reads (the tests' other renderer, seeds 0 / 1: exactly right 71.0 / 61.0% ->
# 75.8 / 68.0%; the test split 90.4 / 82.4% -> 89.6 / 86.4%; BENCHMARKS.md).
CLIP_RECIPE = {"heads": 16, "text_head": True, "hard_negatives": 4, "presence": True,
               "restyle_prob": 0.5, "restyle_outline": 1.0, "lr": 2e-3, "shape_weight": 2.0}
# `pdiff demo` splits the CPU into this many JAX devices (unless XLA_FLAGS or JAX_NUM_CPU_DEVICES
# set a count): one layout, so one set of figures, on any CPU, and the small CLIP, which trains
# data-parallel over them, takes a step ~12% faster on 2 cores than on one device (BENCHMARKS.md).
CPU_DEVICES = 2
# XLA flags `pdiff demo` adds to XLA_FLAGS (unless they are set there), so that its figures are the
# same on other kinds of x86-64 CPU. At XLA's defaults they were not: on this project's AVX-512
# Xeon, XLA capped at AVX2 (as on a CPU without AVX-512) gave other small-CLIP weights from
# the second step on, from the same optimised programs and LLVM IR, so from the machine
# code LLVM's optimiser chose for the CPU. With these two (LLVM's level 2, and XLA's arithmetic
# that does not depend on the CPU), the whole fast demo is byte-identical either way, and the
# small CLIP no slower (BENCHMARKS.md, "The same figures on another kind of CPU").
CONSISTENT_XLA_FLAGS = {"xla_backend_optimization_level": "2",
                        "xla_cpu_enable_platform_dependent_math": "false"}
# Keys of demo_summary.json that depend on the machine and its load; everything else is a
# function of the code and the seed (tests/test_demo.py runs the fast demo twice to check it).
TIMING_KEYS = ("seconds", "stage_seconds", "machine")


def use_cpu_devices() -> None:
  """Sets `CPU_DEVICES` CPU devices for this process, before JAX starts its backends (the
  count cannot change after), unless the environment chose a count."""
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") \
      or "JAX_NUM_CPU_DEVICES" in os.environ:
    return
  try:
    jax.config.update("jax_num_cpu_devices", CPU_DEVICES)
  except RuntimeError:  # JAX already runs in this process: its count stays, so may the figures
    log.warning("JAX has started: the demo runs on its %d CPU device(s), not %d, and its figures "
                "may differ from the README's", jax.local_device_count(), CPU_DEVICES)


def use_consistent_numerics() -> list[str]:
  """Adds `CONSISTENT_XLA_FLAGS` to XLA_FLAGS, before JAX starts its backends (XLA reads them
  then), but none that XLA_FLAGS already sets; returns the flags added."""
  from jax._src import xla_bridge  # JAX has no public way to ask whether its backends started
  given = os.environ.get("XLA_FLAGS", "")
  names = {f.lstrip("-").split("=", 1)[0] for f in given.split()}
  extra = [f"--{k}={v}" for k, v in CONSISTENT_XLA_FLAGS.items() if k not in names]
  if extra and xla_bridge.backends_are_initialized():
    log.warning("JAX has started: the demo runs without %s, and its figures may differ from the "
                "README's on another kind of CPU", " ".join(extra))
    return []
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([given, *extra]).strip()
  return extra


def demo_config(base, workdir: str, fast: bool):
  config = base
  d = os.path.abspath(workdir)
  config.data.source = f"karpathy:{os.path.join(d, 'data', 'dataset_shapes.json')}"
  config.data.image_root = os.path.join(d, "data", "images")
  config.data.feature_dir = os.path.join(d, "features")
  config.clip.model = os.path.join(d, "clip")
  if fast:
    config.train.num_steps = FAST["train_steps"]
    config.train.checkpoint_every = 80  # multiples of train.steps_per_dispatch
    config.train.eval_every = 80
    config.train.log_every = 20
    config.optim.warmup_steps = 20
    config.optim.ema_decay = 0.9
    if config.judge.steps > 0:
      config.judge.steps = min(int(config.judge.steps), 200)
      config.judge.batch_size = min(int(config.judge.batch_size), 32)
  return config


class _Stages:
  """Logs each stage's start and keeps its wall time."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self._name, self._t = None, 0.0

  def __call__(self, name: str | None) -> None:
    now = time.perf_counter()
    if self._name is not None:
      self.seconds[self._name] = round(now - self._t, 1)
    self._name, self._t = name, now
    if name is not None:
      log.info("=== %s ===", name)


def _features_done(config) -> bool:
  """Whether an earlier run extracted the features (re-running resumes each stage); they must be
  of the views `config` asks for, since the demo chooses their directory itself."""
  if not storage.exists(storage.join(config.data.feature_dir, "manifest.json")):
    return False
  stored = features.load_manifest(config.data.feature_dir).get("clip_encoding", {})
  if stored != config_lib.clip_encoding(config):
    raise config_lib.ConfigError(
        "clip.views", f"is {config_lib.clip_views(config)['views']}, but "
        f"{config.data.feature_dir} holds features of {stored.get('views', 1)} view(s) from an "
        "earlier run; give the demo another --workdir")
  return True


def _scores(chosen, cand_sets, refs, attrs) -> dict:
  q = coco.coco_scores(dict(enumerate(refs)), dict(enumerate(chosen)), spice=False, meteor=False)
  return {"CIDEr": q["CIDEr"], "BLEU-4": q["BLEU-4"], "Div-2": diversity.div_n(cand_sets, 2),
          **exact.shapes_scores(chosen, cand_sets, attrs)}


def run_demo(base_config, workdir: str, fast: bool = False, progress: bool = True) -> dict:
  """The whole demo in `workdir`. A gs:// workdir: the demo generates images and trains its CLIP
  with local file APIs, so it runs in a local cache directory for that URI (re-runs resume
  there) and its results are then copied to the URI. The copied model's config.json names that
  cache (its feature store and CLIP), so `pdiff caption --workdir=URI/model` works on this
  machine."""
  if storage.is_remote(workdir):
    local = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "pdiff_jax", "demo", hashlib.sha256(workdir.encode()).hexdigest()[:16])
    summary = _run_local(base_config, local, fast, progress)
    storage.copy_tree(local, workdir)
    log.info("demo results copied from %s to %s", local, workdir)
    return summary
  return _run_local(base_config, workdir, fast, progress)


def _run_local(base_config, workdir: str, fast: bool, progress: bool) -> dict:
  t0 = time.perf_counter()
  # This CPU's speed varies within a day (BENCHMARKS.md), so the times are only comparable with
  # the matmul rate they ran at: measured before and after.
  speed = [bench.matmul_rate() / 1e12]
  plan = FAST if fast else FULL
  os.makedirs(workdir, exist_ok=True)
  config = demo_config(base_config, workdir, fast)
  stage = _Stages()

  stage("1/6 synthetic captioned shapes")
  data = os.path.join(workdir, "data")
  dataset = shapes.generate(data, plan["sizes"], seed=config.seed, progress=progress)
  with open(dataset) as f:
    entries = json.load(f)["images"]
  attributes = shapes.attributes_of_source(f"karpathy:{dataset}")

  stage("2/6 small CLIP, contrastive with an attribute head and hard negatives")
  train_entries = [e for e in entries if e["split"] == "train"]
  clip_pretrain.train_small_clip(
      config.clip.model, [os.path.join(config.data.image_root, e["filepath"], e["filename"]) for e in train_entries],
      [[s["raw"] for s in e["sentences"]] for e in train_entries], shapes.vocabulary(),
      steps=plan["clip_steps"], seed=config.seed, projection_dim=config.model.feature_dim,
      attributes=[attributes[e["imgid"]] for e in train_entries], steps_per_dispatch=4,
      progress=progress, **CLIP_RECIPE)

  stage("3/6 CLIP features (pdiff extract)")
  if not _features_done(config):
    clip = clip_lib.Clip.load(config.clip.model, image_chunk=config.clip.batch_size,
                              **config_lib.clip_views(config))
    features.extract(config, clip, progress=progress)
  store = features.FeatureStore(config.data.feature_dir)
  split_attrs = lambda split: [attributes[m["image_id"]] for m in store.images(split)]
  probe = clip_pretrain.feature_probe(np.asarray(store.split("train").features), split_attrs("train"),
                                      np.asarray(store.split("test").features), split_attrs("test"))
  log.info("what the small CLIP's image features say (probe accuracy on test): %s",
           ", ".join(f"{k} {100 * v:.1f}%" for k, v in probe.items()))

  stage("4/6 training (pdiff train)")
  model_dir = os.path.join(workdir, "model")
  train.train_and_evaluate(config, model_dir)

  stage("5/6 evaluation on test, n=10 (pdiff eval)")
  from pdiff_jax.inference import Captioner
  captioner = Captioner.from_workdir(model_dir)
  metrics = evaluate.evaluate(model_dir, "test", seed=config.seed, progress=progress, captioner=captioner)

  stage("6/6 variants: shuffled image features, random candidate")
  # (a) and (c) come from eval's own candidates (in image order, as in the feature store); only
  # (b) needs sampling again.
  with open(os.path.join(model_dir, "eval", "test", "captions.json")) as f:
    entries = json.load(f)
  # in the order of the rule that chose (the chosen first), which the random control draws from
  cands = [[c["caption"] for c in report.in_choice_order(e["candidates"])] for e in entries]
  refs = [e["references"] for e in entries]
  attrs = [attributes[e["image_id"]] for e in entries]
  s = config.sampler
  n, steps = int(s.num_candidates), int(s.steps)
  feats = np.asarray(store.split("test").features, np.float32)
  rng = np.random.default_rng(config.seed)
  perm = rng.permutation(len(feats))
  by_fit = captioner.select == "fit"
  shuffled_cands, shuffled_scores, shuffled_fits = evaluate.sample_split(
      captioner, feats[perm], feats[perm], n, steps, config.seed, s.eta, progress, fit=by_fit)
  shuffled = captioner.rank(shuffled_cands, shuffled_scores, n, fits=shuffled_fits)
  variants = {
      "model": _scores([e["caption"] for e in entries], cands, refs, attrs),
      "shuffled_features": _scores([r["caption"] for r in shuffled], shuffled_cands, refs, attrs),
      "random_candidate": _scores([c[rng.integers(len(c))] for c in cands], cands, refs, attrs),
  }
  rng = np.random.default_rng(config.seed + 1)
  ref_div2 = diversity.div_n([shapes.captions_for(a, n, rng) for a in attrs], 2)
  report.write_report(os.path.join(workdir, "report.html"), "pdiff demo: Prefix-diffusion on captioned shapes",
                      metrics, entries, preface=_report_preface(variants, n, steps, _choice(captioner)))
  stage(None)
  speed.append(bench.matmul_rate() / 1e12)
  summary = {"variants": variants, "ref_Div-2": ref_div2, "clip_probe": probe,
             "num_test_images": len(entries), "num_candidates": n, "sample_steps": steps,
             "select": captioner.select, "judge": captioner.judge is not None,
             "fast": fast, "eval_metrics": {k: metrics.get(k) for k in evaluate.TABLE_KEYS},
             "seconds": time.perf_counter() - t0, "stage_seconds": stage.seconds,
             "machine": {"devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                         "cpu": bench.cpu_model(), "cpus": os.cpu_count(),
                         "xla_flags": os.environ.get("XLA_FLAGS", ""),
                         "matmul_tflops_before_after": [round(r, 4) for r in speed]}}
  with open(os.path.join(workdir, "demo_summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(summary_table(summary))
  print(f"\nreport: {os.path.join(workdir, 'report.html')}\n"
        f"caption your own images: pdiff caption --workdir={model_dir} IMAGE...")
  return summary


def _report_preface(variants: dict, n: int, steps: int, choice: str) -> str:
  return ("<h2>Summary</h2>"
          f"<p>Test split, {n} candidates x {steps} steps, % of the chosen captions unless said. "
          f"<b>model</b>: the candidate chosen by {choice}; controls: <b>shuffled_features</b> (each image "
          "captioned from another image's features), <b>random_candidate</b> (a random one of the "
          f"{n} instead of the reranked one). <b>grammatical</b>: a sentence of one of the data "
          "set's phrasings; <b>exactly right</b>: and everything it says is true of the image; "
          f"<b>exactly right among n</b>: one of the {n} is; <b>all</b>: over all candidates; "
          "colour, shape: names some and only true ones; size, place (relation or side): of "
          "captions that state one, true.</p>" + report.summary_table(variants))


def _choice(captioner) -> str:
  """How the model's caption is chosen, in words for the report."""
  by = {"clip": "CLIP's cosine (the original's)", "vote": "vote", "posterior": "CLIP's posterior",
        "fit": "CLIP's posterior and the denoiser's fit"}[captioner.select]
  return f"{by} (sampler.select={captioner.select})" + (
      ", with CLIP's scores from the learned judge (judge.steps)" if captioner.judge is not None else "")


def summary_table(summary: dict) -> str:
  keys = ("CIDEr", "BLEU-4", "Div-2", "grammatical", "exactly_right", "color_acc", "shape_acc")
  lines = ["| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for name, m in summary["variants"].items():
    lines.append(f"| {name} | " + " | ".join(
        f"{100 * m[k]:.1f}" if k in ("CIDEr", "BLEU-4") else f"{m[k]:.3f}" for k in keys) + " |")
  rate = summary["machine"]["matmul_tflops_before_after"]
  lines.append(f"\nreference captions' own Div-2 (10 per image): {summary['ref_Div-2']:.3f}; "
               f"whole demo: {summary['seconds'] / 60:.1f} min on {summary['machine']['cpu']} "
               f"(float32 matmul {rate[0]:.3f} TFLOP/s before, {rate[1]:.3f} after)")
  return "\n".join(lines)
