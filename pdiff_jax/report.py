"""A self-contained HTML report: metrics table, sweep plots, and every image with its references
and candidates (sorted by CLIP score, the chosen one marked). All text is HTML-escaped;
images and plots are embedded as base64 so the file can be mailed or archived alone."""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Sequence

from pdiff_jax import storage

THUMB = 112
# Shapes data only (metrics.exact): how often captions are sentences of the data set's grammar,
# and exactly true of their image.
EXACT_KEYS = ("grammatical", "exactly_right", "any_exactly_right", "cand_grammatical",
              "cand_exactly_right", "color_acc", "shape_acc", "size_acc", "relation_acc", "count_acc")
METRIC_ORDER = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE",
                "CLIP-S", "RefCLIP-S", "Dist-1", "Dist-2", "Dist-3", "Vocab", "Div-1", "Div-2",
                "mBLEU-4", *EXACT_KEYS, "num_images", "num_candidates", "sample_steps", "trainable_params",
                "clip_model")

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table.metrics td,table.metrics th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}
.item{display:flex;gap:16px;border-top:1px solid #ccc;padding:10px 0}
.item img{width:%dpx;height:%dpx;object-fit:cover;border:1px solid #aaa}
.noimg{width:%dpx;height:%dpx;background:#eee;display:flex;align-items:center;justify-content:center;color:#888;font-size:12px}
ol{margin:4px 0;padding-left:22px} .chosen{font-weight:bold;color:#0a5} .score{color:#888;font-size:90%%}
h3{margin:0 0 4px 0;font-size:14px} .refs{color:#555}
.exact{color:#fff;background:#0a5;border-radius:3px;padding:0 4px;font-size:80%%;font-weight:normal}
.ungram{color:#fff;background:#b33;border-radius:3px;padding:0 4px;font-size:80%%;font-weight:normal}
table.summary td,table.summary th{padding:3px 7px;border-bottom:1px solid #ddd;text-align:right;font-size:90%%}
table.summary th:first-child,table.summary td:first-child{text-align:left}
""" % (THUMB, THUMB, THUMB, THUMB)


def _thumbnail(path: str) -> str | None:
  from PIL import Image
  from pdiff_jax.data.images import BadImage, load_image
  try:
    image = load_image(path)  # local or gs://
  except BadImage:
    return None
  image.thumbnail((THUMB * 2, THUMB * 2), Image.BICUBIC)
  buf = io.BytesIO()
  image.save(buf, format="JPEG", quality=80)
  return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _png(fig) -> str:
  """A matplotlib figure as a PNG data URI (and closed)."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plot(points: Sequence[dict], x: str, title: str, left: str = "CIDEr",
          log_x: bool = True) -> str:
  """A PNG data URI: `left` (CIDEr or a fraction, as %) on the left axis, Div-2 on the right."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax1 = plt.subplots(figsize=(4.8, 3.2), dpi=100)
  xs = [p[x] for p in points]
  ax1.plot(xs, [100 * p[left] for p in points], "o-", color="tab:blue", label=left)
  ax1.set_xlabel(x)
  ax1.set_ylabel(left if left == "CIDEr" else f"{left} (%)", color="tab:blue")
  if log_x:
    ax1.set_xscale("log")
  ax2 = ax1.twinx()
  ax2.plot(xs, [p["Div-2"] for p in points], "s--", color="tab:orange", label="Div-2")
  ax2.set_ylabel("Div-2", color="tab:orange")
  ax1.set_title(title)
  return _png(fig)


def _fmt(v) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, float):
    return f"{v:.4f}"
  return str(v)


def in_choice_order(candidates: Sequence[dict]) -> list[dict]:
  """An image's candidates (`inference.rank_candidates`) in the order of the rule that chose
  among them, the chosen one first; without ranks (select=clip, no judge) that is their order,
  the cosine's."""
  return sorted(candidates, key=lambda c: c.get("rank", 0))


def _candidate(rank: int, c: dict) -> str:
  score = "" if c.get("score") is None else f" <span class='score' title='CLIP cosine'>{c['score']:.3f}</span>"
  if c.get("judged") is not None:  # the learned judge's score (judge.steps), which the choice used
    score += f" <span class='score' title='the judge&#39;s score'>judged {c['judged']:.3f}</span>"
  if c.get("votes", 1) > 1:  # chosen by vote or posterior (`sampler.select`): its copies count
    score += f" <span class='score' title='drawn this many times among the candidates'>x{c['votes']}</span>"
  mark = (" <span class='exact' title='every stated attribute is true of the image'>exactly right</span>"
          if c.get("exactly_right") else
          " <span class='ungram' title='not a sentence of the data set&#39;s templates'>ungrammatical</span>"
          if c.get("grammatical") is False else "")
  if rank == 0:
    return f"<li class='chosen'>{html.escape(c['caption'])}{score} &#10003; chosen{mark}</li>"
  return f"<li>{html.escape(c['caption'])}{score}{mark}</li>"


SUMMARY_HEADS = {"grammatical": "grammatical", "exactly_right": "exactly right",
                 "any_exactly_right": "exactly right among n", "cand_grammatical": "all: grammatical",
                 "cand_exactly_right": "all: exactly right", "color_acc": "colour", "shape_acc": "shape",
                 "size_acc": "size", "relation_acc": "place", "count_acc": "count"}


def summary_table(variants: dict[str, dict], keys: Sequence[str] = ("CIDEr", "BLEU-4", "Div-2", *EXACT_KEYS)) -> str:
  """An HTML table, one row per variant (e.g. the model and its controls): fractions as %, and
  CIDEr / BLEU x 100 as usual; the diversity ratios (Div-n) as they are, like the papers'."""
  e = html.escape
  keys = [k for k in keys if any(m.get(k) is not None for m in variants.values())]
  head = "".join(f"<th>{e(SUMMARY_HEADS.get(k, k))}</th>" for k in keys)
  def cell(k, v):
    if v is None:
      return "n/a"
    return f"{v:.3f}" if k.startswith("Div-") else f"{100 * v:.1f}"
  rows = "".join(f"<tr><td>{e(name)}</td>" + "".join(f"<td>{cell(k, m.get(k))}</td>" for k in keys) + "</tr>"
                 for name, m in variants.items())
  return f"<table class='summary'><tr><th></th>{head}</tr>{rows}</table>"


def _plot_solvers(points: Sequence[dict]) -> str:
  """A PNG data URI: exactly_right (%, on the shapes) or CIDEr against sampling steps, one line
  per solver (`{"solver", "steps", ...}` points)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  left = "exactly_right" if points[0].get("exactly_right") is not None else "CIDEr"
  fig, ax = plt.subplots(figsize=(4.8, 3.2), dpi=100)
  for name in dict.fromkeys(p["solver"] for p in points):
    line = [p for p in points if p["solver"] == name]
    ax.plot([p["steps"] for p in line], [100 * p[left] for p in line], "o-", label=name)
  ax.set_xscale("log")
  steps = sorted({p["steps"] for p in points})
  ax.set_xticks(steps, [str(st) for st in steps])  # the step counts, not powers of ten
  ax.minorticks_off()
  ax.set_xlabel("steps")
  ax.set_ylabel(left if left == "CIDEr" else f"{left} (%)")
  ax.legend()
  ax.set_title("solvers against sampling steps")
  return _png(fig)


def render(title: str, metrics: dict, entries: Sequence[dict], max_thumbnails: int | None = None,
           preface: str = "") -> str:
  """The page; thumbnails for the first `max_thumbnails` images only (None: all), the rest as
  text. `preface` (HTML, e.g. a `summary_table`) comes first, under the title, and the full
  metrics table then goes last, after the captions."""
  e = html.escape
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{e(title)}</h1>{preface}"]
  rows = "".join(f"<tr><th>{e(k)}</th><td>{e(_fmt(metrics.get(k)))}</td></tr>"
                 for k in METRIC_ORDER if k in metrics)
  if metrics.get("SPICE_unavailable_reason"):
    rows += f"<tr><th>SPICE</th><td>{e(metrics['SPICE_unavailable_reason'])}</td></tr>"
  table = f"<h2>Metrics</h2><table class='metrics'>{rows}</table>"
  if not preface:
    parts.append(table)
  sweep = metrics.get("sweep")
  if sweep:
    parts.append("<h2>Quality and diversity</h2>")
    if sweep.get("candidates"):
      parts.append(f"<img alt='CIDEr and Div-2 against n' src='{_plot(sweep['candidates'], 'n', 'against candidates n')}'>")
    if sweep.get("steps"):
      parts.append(f"<img alt='CIDEr and Div-2 against steps' src='{_plot(sweep['steps'], 'steps', 'against sampling steps')}'>")
    if sweep.get("solvers"):
      parts.append(f"<img alt='solvers against steps' src='{_plot_solvers(sweep['solvers'])}'>")
    if sweep.get("guidance"):
      points = sweep["guidance"]
      left = "exactly_right" if points[0].get("exactly_right") is not None else "CIDEr"
      parts.append(f"<img alt='{left} and Div-2 against the guidance scale' "
                   f"src='{_plot(points, 'guidance', 'against the guidance scale', left, log_x=False)}'>")
  limit = len(entries) if max_thumbnails is None else max_thumbnails
  parts.append(f"<h2>Captions ({len(entries)} images)</h2>")
  if limit < len(entries):
    parts.append(f"<p>Thumbnails of the first {limit} images; the other {len(entries) - limit} "
                 "are listed without them (pdiff eval --report_thumbnails=N).</p>")
  for i, item in enumerate(entries):
    thumb = _thumbnail(str(item.get("image", ""))) if i < limit else None
    img = (f"<img src='{thumb}' alt='{e(str(item.get('image', '')))}'>" if thumb
           else f"<div class='noimg'>{'no image' if i < limit else e(os.path.basename(str(item.get('image', ''))))}</div>")
    cands = "".join(_candidate(i, c) for i, c in enumerate(in_choice_order(item["candidates"])))
    refs = "".join(f"<li>{e(r)}</li>" for r in item.get("references", []))
    parts.append(f"<div class='item'>{img}<div><h3>{e(str(item.get('image_id', '')))}</h3>"
                 f"<b>candidates</b> (as ranked by the choice)<ol>{cands}</ol>"
                 f"<b>references</b><ul class='refs'>{refs}</ul></div></div>")
  if preface:
    parts.append(table)
  parts.append("</body></html>")
  return "\n".join(parts)


def write_report(path: str, title: str, metrics: dict, entries: Sequence[dict],
                 max_thumbnails: int | None = None, preface: str = "") -> None:
  storage.write_text(path, render(title, metrics, entries, max_thumbnails, preface))
