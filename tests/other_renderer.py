"""A second renderer of the shapes data, never used in training: other sizes, outlined shapes,
other positions and textured backgrounds, with the same attributes (colour names, shapes, small
and big, relation, side) as `pdiff_jax.data.shapes`. A model that reads shapes, and not the
pixels of one renderer, should caption these as well as the demo's own test split.

  python tests/other_renderer.py demo_out/model [--images=500]   # exact-correctness metrics (JSON)
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image, ImageDraw

from pdiff_jax.data import shapes

SIZE = shapes.SIZE


def _background(rng: np.random.Generator) -> np.ndarray:
  """Stripes, a checkerboard or blotchy noise, light enough for every colour to stand out."""
  a, b = rng.integers(175, 250, 3), rng.integers(175, 250, 3)
  yy, xx = np.mgrid[:SIZE, :SIZE]
  kind = rng.integers(3)
  if kind == 0:  # stripes at a random angle
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 14)
    mask = (np.cos(angle) * xx + np.sin(angle) * yy) % period < period / 2
  elif kind == 1:  # checkerboard
    cell = int(rng.integers(5, 11))
    mask = (xx // cell + yy // cell) % 2 == 0
  else:  # blotches: upsampled coarse noise
    coarse = rng.random((5, 5))
    mask = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)) > 127
  bg = np.where(mask[..., None], a, b) + rng.normal(0, 4, (SIZE, SIZE, 3))
  return np.clip(bg, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, outline, width) -> None:
  if shape == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
  elif shape == "square":
    draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill,
                   outline=outline, width=width)
  elif shape == "triangle":
    draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill,
                 outline=outline, width=width)
  else:
    draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill,
                 outline=outline, width=width)


def make_example(rng: np.random.Generator) -> tuple[Image.Image, dict]:
  """One image and its attributes, in the format of `shapes.make_example`."""
  image = Image.fromarray(_background(rng))
  draw = ImageDraw.Draw(image)
  n = int(rng.integers(1, 3))
  colors = rng.choice(list(shapes.COLORS), n, replace=False)
  if n == 1:  # nearer the edges than the training renderer's 14..50
    centers = [(rng.uniform(11, 53), rng.uniform(11, 53))]
  else:  # apart along one axis by 22..34 px, up to 8 px off it (training: about 28 and 5)
    apart, off = rng.uniform(22, 34), rng.uniform(-8, 8)
    first = (rng.uniform(11, 53 - apart), rng.uniform(16, 48))
    second = (first[0] + apart, first[1] + off)
    if rng.random() < 0.5:
      first, second = (first[1], first[0]), (second[1], second[0])
    centers = [first, second]
    if rng.random() < 0.5:
      centers.reverse()
  objects = []
  for color, (cx, cy) in zip(colors, centers):
    shape = str(rng.choice(shapes.SHAPES))
    size = str(rng.choice(shapes.SIZES))
    small, big = ((4.5, 6), (9.5, 11.5)) if n == 2 else ((5, 6.5), (12, 15))
    r = rng.uniform(*(small if size == "small" else big))
    fill = tuple(int(v) for v in np.clip(np.array(shapes.COLORS[color]) + rng.integers(-20, 21, 3), 0, 255))
    outline = tuple(int(v) for v in np.array(fill) * 0.45)
    _draw(draw, shape, cx, cy, r, fill, outline, int(rng.integers(1, 3)))
    objects.append({"color": str(color), "shape": shape, "size": size, "x": float(cx), "y": float(cy)})
  return image, shapes.where(objects)


def draw_set(count: int, seed: int = 0) -> tuple[list[Image.Image], list[dict]]:
  rng = np.random.default_rng([seed, 7919])
  pairs = [make_example(rng) for _ in range(count)]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def score_workdir(model_dir: str, count: int = 500, seed: int = 0, num_candidates: int | None = None,
                  steps: int | None = None, select: str | None = None) -> dict:
  """The exact-correctness metrics of a trained shapes model on `count` images of this renderer,
  sampled and reranked as `pdiff eval` does (the model's sampler settings unless given)."""
  from pdiff_jax.inference import Captioner
  from pdiff_jax.metrics import exact
  images, attrs = draw_set(count, seed)
  results = Captioner.from_workdir(model_dir).caption(images, num_candidates, steps, seed=seed,
                                                      select=select)
  return {"num_images": count, **exact.shapes_scores(
      [r["caption"] for r in results], [[c["caption"] for c in r["candidates"]] for r in results], attrs)}


if __name__ == "__main__":
  from pdiff_jax import demo
  demo.use_consistent_numerics()  # as `pdiff demo` samples, so the same figures on another CPU
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("model_dir")
  parser.add_argument("--images", type=int, default=500)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--select", default=None, help="clip, vote, posterior or fit (default: the model's)")
  args = parser.parse_args()
  print(json.dumps(score_workdir(args.model_dir, args.images, args.seed, select=args.select), indent=1))
