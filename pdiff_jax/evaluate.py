"""`pdiff eval` and `pdiff score`: sample a split, rerank, and compute every metric of CONTRACT.md.

`score_captions` is the one place metrics are computed, for our own samples (`evaluate`) and
for any system's results file (`pdiff score`), so the two agree by construction.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

import numpy as np

from pdiff_jax import sampler as sampler_lib
from pdiff_jax import storage
from pdiff_jax.data import shapes
from pdiff_jax.data.vocab import tokenize
from pdiff_jax.inference import check_select
from pdiff_jax.metrics import clipscore, coco, diversity, exact

log = logging.getLogger(__name__)

SWEEP_CANDIDATES = (1, 2, 5, 10, 20)
SWEEP_STEPS = (5, 10, 20, 50, 100, 200)
SWEEP_GUIDANCE = (0.0, 1.0, 1.5, 2.0, 3.0, 4.0)  # a model trained with model.cond_drop
SWEEP_SOLVER_STEPS = (5, 10, 20)  # every solver (sampler.SOLVERS) at each of these
TABLE_KEYS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "CLIP-S", "RefCLIP-S", "Div-2",
              "mBLEU-4", "Vocab")


def score_captions(entries: Sequence[dict], vocab_size: int, clip=None,
                   image_emb: np.ndarray | None = None) -> dict:
  """Metrics for entries {"caption", "candidates": [{"caption"}...], "references": [...]}.

  CLIP-S / RefCLIP-S need `clip` (a clip.Clip) and the images' embeddings from it; without
  them they are None.
  """
  refs = {i: list(e["references"]) for i, e in enumerate(entries)}
  chosen = [e["caption"] for e in entries]
  metrics: dict[str, Any] = coco.coco_scores(refs, dict(enumerate(chosen)))
  cand_sets = [[c["caption"] for c in e["candidates"]] for e in entries]
  metrics.update(diversity.diversity_scores(chosen, cand_sets, vocab_size))
  metrics["CLIP-S"] = metrics["RefCLIP-S"] = None
  metrics["clip_model"] = None
  if clip is not None and image_emb is not None:
    cap = clip.encode_texts([clipscore.PREFIX + c for c in chosen])
    # References with the same prompt prefix as the candidates (Hessel et al.'s clipscore.py).
    flat = [clipscore.PREFIX + r for e in entries for r in e["references"]]
    ref_emb = clip.encode_texts(flat)
    splits = np.cumsum([len(e["references"]) for e in entries])[:-1]
    metrics.update(clipscore.clip_scores(image_emb, cap, np.split(ref_emb, splits)))
    metrics["clip_model"] = clip.name
  metrics["num_images"] = len(entries)
  return metrics


def mark_exact(entries: Sequence[dict], attributes: Sequence[dict]) -> dict:
  """Shapes data: `metrics.exact.shapes_scores` of the entries, and each candidate marked with
  its "grammatical" and "exactly_right" (for captions.json and the report)."""
  for e, a in zip(entries, attributes):
    for c in e["candidates"]:
      c.update({k: v for k, v in exact.check(c["caption"], a).items() if k in ("grammatical", "exactly_right")})
  return exact.shapes_scores([e["caption"] for e in entries],
                             [[c["caption"] for c in e["candidates"]] for e in entries], attributes)


def _cider_div2(entries: Sequence[dict], cider) -> dict:
  """The two numbers the sweep plots, without the cost of the full metric set (`cider`: a
  `coco.cider_against` the entries' references)."""
  return {"CIDEr": cider({i: e["caption"] for i, e in enumerate(entries)}),
          "Div-2": diversity.div_n([[c["caption"] for c in e["candidates"]] for e in entries], 2)}


def _guidance_point(entries: Sequence[dict], cider, clip, image_emb: np.ndarray | None,
                    attributes: Sequence[dict] | None) -> dict:
  """What the guidance sweep plots: CIDEr, Div-2, mBLEU-4, CLIP-S (with a CLIP) and, on the
  shapes, exactly_right; without the cost of the full metric set."""
  out = _cider_div2(entries, cider)
  out["mBLEU-4"] = diversity.mbleu4([[c["caption"] for c in e["candidates"]] for e in entries])
  if clip is not None and image_emb is not None:
    cap = clip.encode_texts([clipscore.PREFIX + e["caption"] for e in entries])
    out["CLIP-S"] = clipscore.clip_scores(image_emb, cap)["CLIP-S"]
  if attributes is not None:
    out["exactly_right"] = exact.shapes_scores([e["caption"] for e in entries], None,
                                               attributes)["exactly_right"]
  return out


def markdown_table(metrics: dict, keys: Sequence[str] = TABLE_KEYS) -> str:
  def fmt(k):
    v = metrics.get(k)
    if v is None:
      return "n/a"
    return f"{100 * v:.1f}" if k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE") else f"{v:.3f}"
  return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                    "| " + " | ".join(fmt(k) for k in keys) + " |"])


def process_share(num_items: int) -> tuple[int, int, int]:
  """(start, stop, per_process): this process's contiguous share of `num_items`."""
  import jax
  per = -(-num_items // jax.process_count())
  start = min(num_items, jax.process_index() * per)
  return start, min(num_items, start + per), per


def _gather(local: np.ndarray, per: int, total: int) -> np.ndarray:
  """Every process's share, padded to `per` rows, concatenated in process order -> `total` rows."""
  import jax
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils
  padded = np.concatenate([local, np.zeros((per - len(local),) + local.shape[1:], local.dtype)])
  return np.asarray(multihost_utils.process_allgather(padded, tiled=True))[:total]


def sample_split(captioner, features: np.ndarray, rerank_emb: np.ndarray, n: int, steps: int,
                 seed: int, eta: float, progress: bool, solver: str | None = None,
                 guidance: float | None = None, length: str | None = None,
                 fit: bool = False) -> tuple[list[list[str]], np.ndarray | None, np.ndarray | None]:
  """Unranked candidate captions (in candidate order), their rerank scores (`Captioner.rerank`:
  cosines, with a judge its scores too) and, with `fit` (for `select="fit"`), the denoiser's
  fit of each (`Captioner.fit`; else None); the sampler options as in
  `Captioner.sampling_options`.

  In a multi-process run each process samples and reranks its own share of the images on its own
  devices, and the shares are gathered, so every process returns the whole split. The result is
  the single-process one: a candidate's noise depends only on (seed, image index, candidate).
  """
  import jax
  from tqdm import tqdm
  batch = captioner.sample_batch
  start, stop, per = process_share(len(features))
  tokens = [np.zeros((0, n, int(captioner.bundle.config.data.max_len)), np.int32)]
  bar = tqdm(total=stop - start, unit="img", desc=f"sample n={n} steps={steps}",
             disable=not progress, dynamic_ncols=True)
  for b in range(start, stop, batch):
    feats = np.asarray(features[b:min(b + batch, stop)], np.float32)
    tokens.append(captioner.sample_tokens(feats, n, steps, seed, eta, np.arange(b, b + len(feats)),
                                          solver, guidance, length))
    bar.update(len(feats))
  bar.close()
  local = np.concatenate(tokens).astype(np.int32)
  decode = lambda ids: [[captioner.bundle.vocab.decode(t) for t in c] for c in ids]
  captions = decode(local)
  scores = fits = None
  if n > 1:
    local_scores = (captioner.rerank(rerank_emb[start:stop], captions).astype(np.float32)
                    if len(local) else  # (0, n) cosines, or (0, n, 2) with the judge's scores
                    np.zeros((0, n) + ((2,) if captioner.judge is not None else ()), np.float32))
    scores = _gather(local_scores, per, len(features))
    if fit:
      local_fits = (captioner.fit(features[start:stop], local).astype(np.float32)
                    if len(local) else np.zeros((0, n), np.float32))
      fits = _gather(local_fits, per, len(features))
  if jax.process_count() > 1:
    captions = decode(_gather(local, per, len(features)))
  return captions, scores, fits


def evaluate(workdir: str, split: str = "test", num_candidates: int | None = None,
             steps: int | None = None, seed: int = 0, eta: float | None = None,
             sweep: bool = False, max_images: int | None = None, progress: bool = True,
             captioner=None, out_dir: str | None = None, report_thumbnails: int = 300,
             solver: str | None = None, guidance: float | None = None,
             length: str | None = None, select: str | None = None) -> dict:
  """Samples every image of `split` from the feature store, reranks, scores; writes
  `workdir/eval/<split>/{metrics.json, captions.json, report.html}`. The sampler options
  (`solver`, `guidance`, `length`, and `select` as in `inference.rank_candidates`; default: the
  config's) are recorded in metrics.json; a model
  with a length head also gets its length accuracy against the references."""
  from pdiff_jax import clip as clip_lib, model as model_lib
  from pdiff_jax.data.features import FeatureStore
  from pdiff_jax.inference import Captioner
  import jax

  t0 = time.perf_counter()
  captioner = captioner or Captioner.from_workdir(workdir)
  config = captioner.bundle.config
  s = config.sampler
  n = int(num_candidates or s.num_candidates)
  steps = int(steps or s.steps)
  eta = float(s.eta if eta is None else eta)
  opts = captioner.sampling_options(solver, guidance, length)  # checked before any work
  select = check_select(select or captioner.select)
  store = FeatureStore(config.data.feature_dir)
  features = store.split(split).features
  meta = store.images(split)
  if max_images:
    features, meta = features[:max_images], meta[:max_images]
  features = np.asarray(features, np.float32)
  paths = [m["image"] for m in meta]

  def stored(clip) -> bool:  # the store holds exactly this CLIP's image embeddings
    return (clip.name == store.manifest["clip_model"]
            and clip.encoding == store.manifest.get("clip_encoding", {}))

  def embeddings(clip):
    return features if stored(clip) else clip.encode_image_files(paths)

  # CLIP-S is of one embedding of the image (Hessel et al.), whatever views the model reads.
  eval_clip_name = config.get("eval", {}).get("clip_model", "") or captioner.clip.name
  eval_clip = captioner.clip if eval_clip_name == captioner.clip.name else (
      captioner.rerank_clip if eval_clip_name == captioner.rerank_clip.name
      else clip_lib.Clip.load(eval_clip_name))
  eval_clip = eval_clip.with_views(1)
  clip_s_views = 1
  if not stored(eval_clip) and any(p.startswith("tfds:") for p in paths):
    # A tfds: source's images are records, not files to encode again (checked before sampling).
    if eval_clip.name != store.manifest["clip_model"]:
      raise ValueError(f"eval.clip_model={eval_clip_name!r}: the images of "
                       f"{store.manifest['source']} are not files, so only the store's own CLIP "
                       "can score them; leave eval.clip_model empty")
    clip_s_views = captioner.clip.views
    log.warning("CLIP-S of the stored mean of %d views: the images of %s are not files to "
                "encode once more", clip_s_views, store.manifest["source"])

  rerank_emb = embeddings(captioner.rerank_clip)
  n_sample = max(n, max(SWEEP_CANDIDATES)) if sweep else n
  by_fit = select == "fit"
  captions, scores, fits = sample_split(captioner, features, rerank_emb, n_sample, steps, seed, eta,
                                        progress, **opts, fit=by_fit)
  ranked = captioner.rank(captions, scores, n, select, fits)

  lead = jax.process_index() == 0  # every process samples its share; process 0 scores and writes
  entries = [{"image_id": m["image_id"], "image": m["image"], **r, "references": m["captions"]}
             for m, r in zip(meta, ranked)]
  vocab_size = len(captioner.bundle.vocab)
  metrics = score_captions(entries, vocab_size, eval_clip,
                           features if clip_s_views > 1 else embeddings(eval_clip)) if lead else {}
  if lead and clip_s_views > 1:
    metrics["CLIP-S_views"] = clip_s_views
  truth = shapes.attributes_of_source(store.manifest["source"])
  if truth is not None and lead:  # the synthetic shapes: every image's objects are known
    metrics.update(mark_exact(entries, [truth[e["image_id"]] for e in entries]))
  cfg = captioner.bundle.model.cfg
  if lead and opts["length"]:
    metrics.update(length_honoured(entries, sampler_lib.parse_length(opts["length"], cfg.max_len,
                                                                     cfg.length_head)))
  if lead and cfg.length_head:
    metrics.update(length_accuracy(captioner.length_distribution(features).argmax(-1),
                                   [m["captions"] for m in meta], cfg.max_len))
  metrics.update({
      "trainable_params": model_lib.count_params(captioner.bundle.params, captioner.bundle.model.cfg),
      "num_candidates": n, "sample_steps": steps, "sample_mode": s.mode, **opts, "select": select, "eta": eta, "seed": seed,
      "split": split, "checkpoint_step": captioner.bundle.step, "rerank_clip": captioner.rerank_clip.name,
      "judge": captioner.judge is not None,
  })

  sweeps = {}
  if sweep:
    # CIDEr of every point against the same references, tokenised once
    cider = coco.cider_against({i: e["references"] for i, e in enumerate(entries)}) if lead else None
    sweeps["candidates"] = []
    for k in SWEEP_CANDIDATES:
      sub = [{**e, **r} for e, r in zip(entries, captioner.rank(captions, scores, k, select, fits))]
      sweeps["candidates"].append({"n": k, **(_cider_div2(sub, cider) if lead else {})})
    attrs = [truth[e["image_id"]] for e in entries] if truth is not None else None

    def point(cs, sc, fi) -> dict:  # CIDEr and Div-2, and exactly_right on the shapes
      sub = [{**e, **r} for e, r in zip(entries, captioner.rank(cs, sc, n, select, fi))]
      if not lead:
        return {}
      right = {} if attrs is None else {"exactly_right": exact.shapes_scores(
          [e["caption"] for e in sub], None, attrs)["exactly_right"]}
      return {**_cider_div2(sub, cider), **right}

    sweeps["steps"], sweeps["solvers"] = [], []
    for st in sorted({x for x in SWEEP_STEPS if x <= max(steps, 20)} | {steps}):
      sweeps["steps"].append({"steps": st, **point(*sample_split(
          captioner, features, rerank_emb, n, st, seed, eta, progress, **opts, fit=by_fit))})
    for name in sampler_lib.SOLVERS:  # each solver against the steps (the configured one's reused)
      for st in SWEEP_SOLVER_STEPS:
        done = next((p for p in sweeps["steps"] if p["steps"] == st), None)
        if name != opts["solver"] or done is None:
          done = {"steps": st, **point(*sample_split(captioner, features, rerank_emb, n, st, seed,
                                                     eta, progress, **{**opts, "solver": name},
                                                     fit=by_fit))}
        sweeps["solvers"].append({"solver": name, **done})
    if cfg.cond_drop > 0:  # the fidelity / diversity trade-off of the guidance scale
      sweeps["guidance"] = []
      for g in SWEEP_GUIDANCE:
        cs, sc, fi = sample_split(captioner, features, rerank_emb, n, steps, seed, eta, progress,
                                  **{**opts, "guidance": g}, fit=by_fit)
        sub = [{**e, **r} for e, r in zip(entries, captioner.rank(cs, sc, n, select, fi))]
        point = _guidance_point(sub, cider, eval_clip, embeddings(eval_clip), attrs) if lead else {}
        sweeps["guidance"].append({"guidance": g, **point})
    metrics["sweep"] = sweeps
  metrics["seconds"] = time.perf_counter() - t0

  if lead:
    out_dir = out_dir or storage.join(workdir, "eval", split)
    write_outputs(out_dir, metrics, entries, title=f"pdiff eval: {workdir} ({split})",
                  thumbnails=report_thumbnails)
  return metrics


def length_accuracy(predicted_B: np.ndarray, references: Sequence[Sequence[str]],
                    max_len: int) -> dict:
  """The length head against the references: `length_accuracy`, the fraction of images whose
  most likely length (in words, as the vocabulary encodes: truncated at max_len) is the length of
  one of their references, and `length_error`, the mean distance to the nearest one."""
  hits, errors = [], []
  for predicted, refs in zip(np.asarray(predicted_B).tolist(), references):
    lengths = {min(len(tokenize(r)), max_len) for r in refs}
    hits.append(predicted in lengths)
    errors.append(min(abs(predicted - n) for n in lengths))
  return {"length_accuracy": float(np.mean(hits)), "length_error": float(np.mean(errors))}


def length_honoured(entries: Sequence[dict], length: tuple[int, int]) -> dict:
  """`length_honoured`: the fraction of all candidates whose word count is in the requested
  [min, max] (1 by construction; measured on the decoded captions)."""
  lo, hi = length
  counts = [len(c["caption"].split()) for e in entries for c in e["candidates"]]
  return {"length_honoured": float(np.mean([lo <= k <= hi for k in counts]))}


def write_outputs(out_dir: str, metrics: dict, entries: list[dict] | None, title: str,
                  thumbnails: int = 300) -> None:
  from pdiff_jax import report
  storage.makedirs(out_dir)
  storage.write_json(storage.join(out_dir, "metrics.json"), metrics, indent=1)
  if entries is not None:
    storage.write_json(storage.join(out_dir, "captions.json"), entries, indent=1)
    report.write_report(storage.join(out_dir, "report.html"), title, metrics, entries,
                        max_thumbnails=thumbnails)
  print(markdown_table(metrics))


def load_references(path: str, split: str = "test") -> dict:
  """image id -> (reference captions, image file name) from a Karpathy JSON (entries of `split`)
  or a COCO annotations file (`captions_val2014.json` format)."""
  data = storage.read_json(path)
  out: dict = {}
  if isinstance(data, dict) and "annotations" in data:
    files = {im["id"]: im.get("file_name", "") for im in data.get("images", [])}
    for a in data["annotations"]:
      refs, _ = out.setdefault(a["image_id"], ([], files.get(a["image_id"], "")))
      refs.append(a["caption"])
    return out
  if isinstance(data, dict) and "images" in data:
    for e in data["images"]:
      if e.get("split") == split or (split == "train" and e.get("split") == "restval"):
        image_id = e["cocoid"] if "cocoid" in e else e["imgid"]
        out[image_id] = ([s["raw"] for s in e["sentences"]],
                         os.path.join(e.get("filepath", ""), e["filename"]))
    return out
  raise ValueError(f"{path}: neither a Karpathy split file nor COCO caption annotations")


def score_results(results_path: str, references_path: str, split: str, out_dir: str,
                  vocab_size: int, images_dir: str | None = None, clip_name: str | None = None) -> dict:
  """`pdiff score`: metrics for a COCO-format results file (several entries per image allowed:
  the first is the chosen caption, all of them the candidate set)."""
  results = storage.read_json(results_path)
  if not isinstance(results, list) or not all(isinstance(r, dict) and "image_id" in r and "caption" in r
                                              for r in results):
    raise ValueError(f"{results_path}: expected a COCO results list of {{\"image_id\", \"caption\"}}")
  refs = load_references(references_path, split)
  grouped: dict = {}
  for r in results:
    grouped.setdefault(r["image_id"], []).append(r["caption"])
  missing = [i for i in grouped if i not in refs]
  if missing:
    raise ValueError(f"{results_path}: {len(missing)} image id(s) have no references in "
                     f"{references_path} (split {split}), e.g. {missing[0]!r}")
  entries = [{"image_id": i, "image": refs[i][1], "caption": caps[0],
              "candidates": [{"caption": c} for c in caps], "references": refs[i][0]}
             for i, caps in grouped.items()]
  clip = image_emb = None
  if images_dir and clip_name:
    from pdiff_jax import clip as clip_lib
    clip = clip_lib.Clip.load(clip_name)
    image_emb = clip.encode_image_files([storage.join(images_dir, e["image"]) for e in entries])
  metrics = score_captions(entries, vocab_size, clip, image_emb)
  metrics.update({"num_candidates": max(len(c) for c in grouped.values()), "sample_steps": None,
                  "trainable_params": None})
  write_outputs(out_dir, metrics, None, title="pdiff score")
  return metrics
