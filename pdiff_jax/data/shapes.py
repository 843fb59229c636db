"""The embedded data set: captioned coloured shapes, generated deterministically from a seed.

Each 64x64 image holds one or two objects, each with a colour, a shape, a size and a position;
five reference captions per image are drawn from many phrasings, so that caption diversity
has something to find. Written in the Karpathy JSON format with PNG files, so the normal
`karpathy:` source reads it, plus the ground-truth attributes per image.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from pdiff_jax import storage

SIZE = 64
DATASET = "dataset_shapes.json"  # what `generate` writes: the Karpathy JSON ...
ATTRIBUTES = "attributes.json"   # ... and beside it every image's truth, by image id
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "big")
SIDES = ("left", "right", "top", "bottom")  # where a single object is (`_side`)

ONE = (
    "a {size} {color} {shape} on the {side}",
    "there is a {color} {shape} on the {side}",
    "the {side} side has a {size} {color} {shape}",
    "a {color} {shape}",
    "one {size} {color} {shape} in the picture",
    "a picture of a {color} {shape} on the {side}",
    "a {shape} that is {color}",
    "a {color} {shape} near the {side} edge",
    "a {size} {color} {shape} on a plain background",
    "an image with a {color} {shape}",
    "the {shape} is {color} and {size}",
    "a single {color} {shape} sits on the {side}",
    "a {size} {shape} colored {color}",
)
TWO = (
    "a {c1} {s1} {rel} a {c2} {s2}",
    "there is a {c1} {s1} {rel} a {c2} {s2}",
    "a {c2} {s2} and a {c1} {s1}",
    "two shapes a {c1} {s1} and a {c2} {s2}",
    "the {c1} {s1} is {rel} the {c2} {s2}",
    "a {c1} {s1} next to a {c2} {s2}",
    "a picture of a {c1} {s1} and a {c2} {s2}",
    "a {z1} {c1} {s1} {rel} a {z2} {c2} {s2}",
    "the {c2} {s2} is {inv} the {c1} {s1}",
    "a {c1} {s1} with a {c2} {s2}",
    "one {c1} {s1} and one {c2} {s2}",
    "a {c2} {s2} {inv} a {c1} {s1}",
    "two objects a {z1} {c1} {s1} and a {z2} {c2} {s2}",
)
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill,
          outline=None, width: int = 1) -> None:
  kw = {"fill": fill, "outline": outline, "width": width} if outline is not None else {"fill": fill}
  if shape == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], **kw)
  elif shape == "square":
    draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], **kw)
  elif shape == "triangle":
    draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], **kw)
  else:  # diamond
    draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], **kw)


def _side(cx: float, cy: float) -> str:
  dx, dy = cx - SIZE / 2, cy - SIZE / 2
  if abs(dx) >= abs(dy):
    return "left" if dx < 0 else "right"
  return "top" if dy < 0 else "bottom"


def make_example(rng: np.random.Generator) -> tuple[Image.Image, dict]:
  """One image and its attributes {"objects": [{color, shape, size, x, y}], "relation" | "side"}."""
  base = rng.integers(170, 256, 3)
  grad = np.linspace(0, rng.uniform(-40, 40), SIZE)[None, :, None]
  bg = np.clip(base[None, None] + grad + rng.normal(0, 6, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
  image = Image.fromarray(bg)
  draw = ImageDraw.Draw(image)
  n = int(rng.integers(1, 3))
  colors = rng.choice(list(COLORS), n, replace=False)
  objects = []
  if n == 1:
    centers = [(rng.uniform(14, 50), rng.uniform(14, 50))]
  else:  # two objects apart along one axis, so that the relation is clear
    if rng.random() < 0.5:
      y = rng.uniform(18, 46)
      centers = [(rng.uniform(12, 24), y + rng.uniform(-5, 5)), (rng.uniform(40, 52), y + rng.uniform(-5, 5))]
    else:
      x = rng.uniform(18, 46)
      centers = [(x + rng.uniform(-5, 5), rng.uniform(12, 24)), (x + rng.uniform(-5, 5), rng.uniform(40, 52))]
    if rng.random() < 0.5:
      centers.reverse()
  for color, (cx, cy) in zip(colors, centers):
    shape = str(rng.choice(SHAPES))
    size = str(rng.choice(SIZES))
    small, big = ((5, 7), (9, 12)) if n == 2 else ((6, 8), (11, 14))
    r = rng.uniform(*(small if size == "small" else big))
    jitter = rng.integers(-25, 26, 3)
    fill = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0, 255))
    _draw(draw, shape, cx, cy, r, fill)
    objects.append({"color": str(color), "shape": shape, "size": size, "x": float(cx), "y": float(cy)})
  return image, where(objects)


def _restyled_background(rng: np.random.Generator) -> Image.Image:
  """A light background of one of five kinds: a gradient at any angle, strong pixel noise, a few
  straight lines, scattered dots, or dead leaves (overlapping discs of radii from 1.5 to 16 px,
  log-uniform: the classic generic model of natural images' occlusion and texture, Lee,
  Mumford & Huang 2001), each in light colours, so every object colour stands out."""
  yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
  base = rng.integers(175, 250, 3).astype(np.float64)
  kind = int(rng.integers(5))
  if kind == 0:
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * rng.uniform(-60, 60, 3)
    bg = base + ramp + rng.normal(0, 4, (SIZE, SIZE, 3))
  else:
    bg = base + rng.normal(0, 18 if kind == 1 else 4, (SIZE, SIZE, 3))
  image = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  light = lambda: tuple(int(v) for v in rng.integers(160, 256, 3))
  if kind == 2:
    for _ in range(int(rng.integers(2, 7))):
      ends = rng.uniform(-8, SIZE + 8, 4)
      draw.line([(ends[0], ends[1]), (ends[2], ends[3])], fill=light(), width=int(rng.integers(1, 4)))
  elif kind == 3:
    for _ in range(int(rng.integers(8, 30))):
      x, y, r = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(0.8, 2.5)
      draw.ellipse([x - r, y - r, x + r, y + r], fill=light())
  elif kind == 4:  # dead leaves, the later discs over the earlier
    for _ in range(int(rng.integers(40, 120))):
      x, y = rng.uniform(-4, SIZE + 4), rng.uniform(-4, SIZE + 4)
      r = float(np.exp(rng.uniform(np.log(1.5), np.log(16))))
      draw.ellipse([x - r, y - r, x + r, y + r], fill=light())
  return image


def restyle(attrs: dict, rng: np.random.Generator, outline_prob: float = 0.5) -> Image.Image:
  """The same objects (colour, shape, size class and centre, hence the same captions) drawn in
  another style: another light background (`_restyled_background`), each radius drawn again
  within a somewhat wider range of its size class, and each object outlined in a darker shade
  with probability `outline_prob`. The small CLIP's augmentation, so that it learns what is
  drawn rather than how."""
  image = _restyled_background(rng)
  draw = ImageDraw.Draw(image)
  objs = attrs["objects"]
  small, big = ((4.5, 7.5), (8.5, 12.5)) if len(objs) == 2 else ((5, 9), (10.5, 15))
  for o in objs:
    r = rng.uniform(*(small if o["size"] == "small" else big))
    fill = np.clip(np.array(COLORS[o["color"]]) + rng.integers(-25, 26, 3), 0, 255)
    outline = None
    if rng.random() < outline_prob:
      outline = tuple(int(v) for v in fill * rng.uniform(0.2, 0.7))
    _draw(draw, o["shape"], o["x"], o["y"], r, tuple(int(v) for v in fill), outline,
          int(rng.integers(1, 3)))
  return image


def relation(a: dict, b: dict) -> str:
  """Where object a ({"x", "y"}) is relative to b, along the axis they are further apart on."""
  dx, dy = a["x"] - b["x"], a["y"] - b["y"]
  if abs(dx) > abs(dy):
    return "left of" if dx < 0 else "right of"
  return "above" if dy < 0 else "below"


def where(objects: list[dict]) -> dict:
  """The attributes of an image with these objects: the objects, and the relation of two (the
  first's to the second's) or the side a single one is on."""
  if len(objects) == 2:
    return {"objects": objects, "relation": relation(*objects)}
  return {"objects": objects, "side": _side(objects[0]["x"], objects[0]["y"])}


def render_caption(template: str, attrs: dict) -> str:
  """One template (of ONE or TWO, matching the number of objects) filled in from `attrs`."""
  objs = attrs["objects"]
  if len(objs) == 1:
    o = objs[0]
    return template.format(size=o["size"], color=o["color"], shape=o["shape"], side=attrs["side"])
  a, b = objs
  return template.format(c1=a["color"], s1=a["shape"], z1=a["size"], c2=b["color"], s2=b["shape"],
                         z2=b["size"], rel=attrs["relation"], inv=INVERSE[attrs["relation"]])


def captions_for(attrs: dict, k: int, rng: np.random.Generator) -> list[str]:
  """k captions drawn from the phrasings (distinct where possible)."""
  templates = ONE if len(attrs["objects"]) == 1 else TWO
  picks = rng.choice(len(templates), size=k, replace=k > len(templates))
  return [render_caption(templates[t], attrs) for t in picks]


def vocabulary() -> list[str]:
  """Every word a caption can contain (the small CLIP's tokenizer makes each one token)."""
  words = set(COLORS) | set(SHAPES) | set(SIZES) | set(SIDES) | {"of", "above", "below"}
  for t in ONE + TWO:
    words |= {w for w in t.replace("{", " {").split() if not w.startswith("{")}
  return sorted(words)


def generate(root: str, sizes: dict[str, int], seed: int = 0, progress: bool = True) -> str:
  """Writes root/images/<split>/*.png, root/dataset_shapes.json (Karpathy format) and
  root/attributes.json; returns the JSON path. Idempotent: an existing data set is kept."""
  from tqdm import tqdm
  path = os.path.join(root, DATASET)
  if os.path.exists(path):
    return path
  images, attributes, index = [], {}, 0
  bar = tqdm(total=sum(sizes.values()), unit="img", desc="shapes", disable=not progress)
  for split, count in sizes.items():
    rng = np.random.default_rng([seed, list(sizes).index(split)])
    os.makedirs(os.path.join(root, "images", split), exist_ok=True)
    for _ in range(count):
      image, attrs = make_example(rng)
      filename = f"{split}_{index:06d}.png"
      image.save(os.path.join(root, "images", split, filename))
      caps = captions_for(attrs, 5, rng)
      images.append({"filepath": split, "filename": filename, "imgid": index, "split": split,
                     "sentences": [{"raw": c, "tokens": c.split()} for c in caps]})
      attributes[index] = attrs
      index += 1
      bar.update(1)
  bar.close()
  with open(os.path.join(root, ATTRIBUTES), "w") as f:
    json.dump(attributes, f)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"dataset": "shapes", "images": images}, f)
  os.replace(tmp, path)  # last: its presence marks a complete data set
  return path


def attributes_of_source(source: str) -> dict[int, dict] | None:
  """image id -> attributes when `source` (a data.source spec) is a shapes data set written by
  `generate` (karpathy:DIR/dataset_shapes.json with DIR/attributes.json); otherwise None."""
  kind, _, arg = str(source).partition(":")
  if kind != "karpathy" or not arg or storage.path(arg).name != DATASET:
    return None
  path = storage.path(arg).parent / ATTRIBUTES  # local or gs://
  if not path.exists():
    return None
  return {int(k): v for k, v in storage.read_json(path).items()}


def attribute_accuracy(captions: Sequence[str], attributes: Sequence[dict]) -> dict:
  """Share of captions that name at least one colour (shape) and only colours (shapes) that are
  in the image."""
  def acc(vocab, key):
    hits = []
    for cap, attrs in zip(captions, attributes):
      said = [w for w in cap.split() if w in vocab]
      true = {o[key] for o in attrs["objects"]}
      hits.append(bool(said) and all(w in true for w in said))
    return float(np.mean(hits)) if hits else 0.0
  return {"color_acc": acc(set(COLORS), "color"), "shape_acc": acc(set(SHAPES), "shape")}
