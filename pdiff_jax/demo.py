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
import shutil
import time

import jax
import numpy as np

from pdiff_jax import clip as clip_lib
from pdiff_jax import clip_pretrain, evaluate, storage, train
from pdiff_jax.data import features, shapes
from pdiff_jax.inference import rank_candidates
from pdiff_jax.metrics import coco, diversity

log = logging.getLogger(__name__)

FULL = {"sizes": {"train": 8000, "val": 500, "test": 500}, "clip_steps": 4000, "clip_seconds": 400,
        "train_steps": None}
FAST = {"sizes": {"train": 640, "val": 32, "test": 40}, "clip_steps": 200, "clip_seconds": 25,
        "train_steps": 200}


def demo_config(base, workdir: str, fast: bool):
  config = base
  d = os.path.abspath(workdir)
  config.data.source = f"karpathy:{os.path.join(d, 'data', 'dataset_shapes.json')}"
  config.data.image_root = os.path.join(d, "data", "images")
  config.data.feature_dir = os.path.join(d, "features")
  config.clip.model = os.path.join(d, "clip")
  if fast:
    config.train.num_steps = FAST["train_steps"]
    config.train.checkpoint_every = 100
    config.train.eval_every = 100
    config.train.log_every = 50
    config.optim.warmup_steps = 20
    config.optim.ema_decay = 0.9
  return config


def _stage(name: str) -> None:
  log.info("=== %s ===", name)


def _scores(chosen, cand_sets, refs, attrs) -> dict:
  q = coco.coco_scores(dict(enumerate(refs)), dict(enumerate(chosen)), spice=False)
  return {"CIDEr": q["CIDEr"], "BLEU-4": q["BLEU-4"], "Div-2": diversity.div_n(cand_sets, 2),
          **shapes.attribute_accuracy(chosen, attrs)}


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
  plan = FAST if fast else FULL
  os.makedirs(workdir, exist_ok=True)
  config = demo_config(base_config, workdir, fast)

  _stage("1/6 synthetic captioned shapes")
  data = os.path.join(workdir, "data")
  dataset = shapes.generate(data, plan["sizes"], seed=config.seed, progress=progress)
  with open(dataset) as f:
    entries = json.load(f)["images"]
  with open(os.path.join(data, "attributes.json")) as f:
    attributes = {int(k): v for k, v in json.load(f).items()}

  _stage("2/6 small CLIP, trained contrastively")
  train_entries = [e for e in entries if e["split"] == "train"]
  clip_pretrain.train_small_clip(
      config.clip.model, [os.path.join(config.data.image_root, e["filepath"], e["filename"]) for e in train_entries],
      [[s["raw"] for s in e["sentences"]] for e in train_entries], shapes.vocabulary(),
      steps=plan["clip_steps"], seconds=plan["clip_seconds"], seed=config.seed,
      projection_dim=config.model.feature_dim, progress=progress)

  _stage("3/6 CLIP features (pdiff extract)")
  manifest_path = os.path.join(config.data.feature_dir, "manifest.json")
  if not os.path.exists(manifest_path):
    clip = clip_lib.Clip.load(config.clip.model, image_chunk=config.clip.batch_size)
    features.extract(config, clip, progress=progress)

  _stage("4/6 training (pdiff train)")
  model_dir = os.path.join(workdir, "model")
  train.train_and_evaluate(config, model_dir)

  _stage("5/6 evaluation on test, n=10 (pdiff eval)")
  from pdiff_jax.inference import Captioner
  captioner = Captioner.from_workdir(model_dir)
  metrics = evaluate.evaluate(model_dir, "test", seed=config.seed, progress=progress, captioner=captioner)
  shutil.copyfile(os.path.join(model_dir, "eval", "test", "report.html"),
                  os.path.join(workdir, "report.html"))

  _stage("6/6 variants: shuffled image features, random candidate")
  # (a) and (c) come from eval's own candidates (in image order, as in the feature store); only
  # (b) needs sampling again.
  with open(os.path.join(model_dir, "eval", "test", "captions.json")) as f:
    entries = json.load(f)
  cands = [[c["caption"] for c in e["candidates"]] for e in entries]
  refs = [e["references"] for e in entries]
  attrs = [attributes[e["image_id"]] for e in entries]
  s = config.sampler
  n, steps = int(s.num_candidates), int(s.steps)
  feats = np.asarray(features.FeatureStore(config.data.feature_dir).split("test").features, np.float32)
  rng = np.random.default_rng(config.seed)
  perm = rng.permutation(len(feats))
  shuffled_cands, shuffled_scores = evaluate.sample_split(captioner, feats[perm], feats[perm], n,
                                                           steps, config.seed, s.eta, progress)
  shuffled = rank_candidates(shuffled_cands, shuffled_scores, n)
  variants = {
      "model": _scores([e["caption"] for e in entries], cands, refs, attrs),
      "shuffled_features": _scores([r["caption"] for r in shuffled], shuffled_cands, refs, attrs),
      "random_candidate": _scores([c[rng.integers(len(c))] for c in cands], cands, refs, attrs),
  }
  rng = np.random.default_rng(config.seed + 1)
  ref_div2 = diversity.div_n([shapes.captions_for(a, n, rng) for a in attrs], 2)
  summary = {"seconds": time.perf_counter() - t0, "variants": variants, "ref_Div-2": ref_div2,
             "num_test_images": len(entries), "num_candidates": n, "sample_steps": steps,
             "fast": fast, "eval_metrics": {k: metrics.get(k) for k in evaluate.TABLE_KEYS},
             "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}
  with open(os.path.join(workdir, "demo_summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(summary_table(summary))
  print(f"\nreport: {os.path.join(workdir, 'report.html')}\n"
        f"caption your own images: pdiff caption --workdir={model_dir} IMAGE...")
  return summary


def summary_table(summary: dict) -> str:
  keys = ("CIDEr", "BLEU-4", "Div-2", "color_acc", "shape_acc")
  lines = ["| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for name, m in summary["variants"].items():
    lines.append(f"| {name} | " + " | ".join(
        f"{100 * m[k]:.1f}" if k in ("CIDEr", "BLEU-4") else f"{m[k]:.3f}" for k in keys) + " |")
  lines.append(f"\nreference captions' own Div-2 (10 per image): {summary['ref_Div-2']:.3f}; "
               f"whole demo: {summary['seconds'] / 60:.1f} min")
  return "\n".join(lines)
