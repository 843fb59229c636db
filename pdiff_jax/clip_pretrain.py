"""Contrastive pre-training of a small CLIP (symmetric InfoNCE, optax) for the embedded demo.

No pretrained CLIP can be downloaded here, and a random one gives features whose image-dependent
part is ~400x smaller than their mean. So the demo trains a small FlaxCLIPModel on the shapes
train split for a couple of minutes and saves it with `save_pretrained`; the pipeline then loads
it by path, exactly as it would load `openai/clip-vit-large-patch14`.

Random grayscale (SimCLR's augmentation, here on half the images) is what makes it learn shape:
without it a small ViT learns colour in a hundred steps and then loses the shape information a
random one still has (MLP probe on 64-d features, shapes test split: 25% on single objects after
2,000 steps, chance level). A grey image still has a caption that names its colours, so only the
shape, size and position can match it. With it: 91% after 3,400 steps (300 s on 2 cores); and
the longer it trains the more shape its features carry (linear + quadratic probe of the set of
shapes in each test image, 500 images: 75% after 270 s, 86% after 400 s, colour 97% either way).
Hard-negative batches (groups of images sharing their colours) and grey on 75% of the images both
raised shape (83%) but cost colour (72-76%).

(The relation figures of the probes below, up to the heads section, are of the relation in the
order the objects were drawn, which no image shows, so they could not pass about 50%;
`feature_probe` has read it in colour order since 2026-12-06.)

Where things are, InfoNCE alone does not learn at all (`feature_probe`, 4,000 steps: side
of a single object 25%, relation of two 26%, both chance; shape 74%, size 90%, count 94%), and
its text tower gives "... on the left" and "... on the right" cosine 0.999. Tried on 2026-12-01,
4,000 steps each, none kept: NegCLIP-style hard-negative captions (each caption's twin with one
attribute made false, as extra texts in the loss): side 30%, relation 31%, shape down to 62%;
the same at 64x64 pixels, patch 8: 23% / 21%, shape 55%; counterfactual twin images in every
batch (the same image with the places exchanged, or one shape or size changed): 28% / 20%,
shape 40%; 1,500-step probes with patch 8 or lr 3e-3: no better. Yet the same ViT, trained
directly (a linear head on its embedding, cross-entropy on side / relation, 1,000 steps of 64),
reads the side 86% and the relation 43% right on test: it can see where things are; the
contrastive signal does not make it (with both towers blind to place, the gradient towards it is
a product of two near-zero differences). Warm-starting the vision tower with those 1,000 steps
and then training contrastively as usual kept some of it (probe: side 52%, relation 44%) but lost
shape (33%), and the text tower still gave "left" and "right" cosine 1.000.

What breaks the saddle (2026-12-01, kept): an attribute head trained *with* InfoNCE, a linear map
of the normalised image embedding (x 16) to the image's count, side, relation and the shape and
size of each colour's object (`attribute_labels`; a loss per group, summed, weight 1), dropped
after training. Once the image embedding carries place, InfoNCE teaches the text tower to read it
too: "... on the left" / "... on the right" cosine 0.65 (0.24 with a side/relation-only head).
4,000 steps, same data, seed and batches (probe; "rerank": how often CLIP's cosine puts the
true caption above its twins with the side, relation or one shape changed, 300 test images):

| small CLIP | probe side / relation / shape / size | rerank side / relation / shape, 1 object / 2 |
|---|---|---|
| InfoNCE alone (before) | 25% / 26% / 74% / 90% | 34% / 27% / 93% / 69% |
| + side and relation head | 95% / 47% / 41% / 80% | 96% / 76% / 49% / 34% |
| + the whole head (the demo's) | 93% / 46% / 67% / 93% | 94% / 43% / 86% / 62% |
| the same, head labels that need colour masked on grey images | 91% / 48% / 56% / 93% | 84% / 44% / 68% / 53% |

In the full demo the whole head raised exactly right 37.0% -> 44.8%, place 17.7% -> 45.9%,
grammatical 93.4% -> 95.8% and CIDEr 251.8 -> 275.7, but cost colour (95.2% -> 89.4%) and shape
(78.2% -> 72.0%): the errors left are mostly two-object images whose colours and shapes are
bound to the wrong objects (README). With a supervised head alone (no InfoNCE) 1,500 steps
learn side (92%) but no shape at all (23%, chance). At 1,500 InfoNCE-only steps, 4 layers
reached shape 61% in 1.8x the time and 64 pixels at patch 8 37%, against 50% for the demo's
architecture (74% at 4,000 steps, 311 s; 4 layers took 255 s for 1,500).

Binding, on both towers (2026-12-06; options `text_head` and `hard_negatives`, off in the demo):
the head above teaches the image embedding each colour's shape, but the text tower is never
asked for it, and CLIP picks an exactly right candidate for only 11% of the two-object images
(20% of those that have one among their 10). With `text_head` the same head also reads the text
embedding (labels from the caption's own template reading, `caption_labels`, so a caption
teaches what it states); with `hard_negatives=K` each caption brings K false twins of its
phrasing, one slot changed or the two shapes exchanged (`false_twins`), as extra negatives for
its image. 4,000 steps, same data and seed; probe on test; "twins": how often the cosine puts a
test reference above a twin of each kind (size / shape / colour / place / swap), and "all
twins": above every one of its twins, one object / two:

| small CLIP | probe side / relation / shape / size | twins size / shape / colour / place / swap | all twins |
|---|---|---|---|
| image head (the demo's) | 93% / 46% / 67% / 93% | 92 / 84 / 96 / 89 / 75% | 75% / 16% |
| + text head | 95% / 45% / 78% / 91% | 92 / 92 / 87 / 93 / 72% | 73% / 12% |
| + 4 hard negatives | 92% / 46% / 60% / 93% | 92 / 81 / 98 / 91 / 73% | 72% / 16% |
| + both | 94% / 50% / 80% / 91% | 93 / 93 / 90 / 93 / 87% | 70% / 20% |
| + both, "no such colour" a class of each colour's shape | 92% / 48% / 54% / 92% | 95 / 75 / 98 / 97 / 69% | 55% / 15% |

The text head moves the image features most (shape 67% -> 78%: the two towers meet in one
labelled space); with the twins as well, exchanged shapes are beaten 87% of the time instead of
75%. The whole demo with both (`pdiff demo`, fresh clone): CLIP's pick of an exactly right
candidate, where there is one, rose from 20% to 41% on two-object images, and shape from 72.0%
to 86.4%, but colour fell from 89.4% to 65.8% (the 64-d embedding spends itself on shape and
binding; most wrong captions now name a colour that is not there) and exactly right is level,
44.0% against 44.8%, so the demo keeps the image head alone. The twins double the text batch:
run two at a time on the 2 cores, the image-head recipe took 832 s and both options 926 s
(+11%). The "no such colour" class is not in the code.

What keeps colour while binding (2026-12-06, the demo's recipe since): `presence`, one more
group of the head, a binary "an object of this colour is there" per colour, on both towers. The
whole demo (`pdiff demo`, test split, 10 candidates x 20 steps; "other": the tests' second
renderer, `tests/other_renderer.py`, 500 images):

| small CLIP | probe shape | exactly right | colour | shape | grammatical | other: exactly right / colour / shape |
|---|---|---|---|---|---|---|
| image head (the demo's before) | 67% | 44.8% | 89.4% | 72.0% | 95.8% | 12.6% / 36.0% / 47.4% |
| + text head + 4 hard negatives | 80% | 44.0% | 65.8% | 86.4% | 96.0% | |
| + presence on both towers | 72% | 56.0% | 96.0% | 80.0% | 94.4% | 18.4% / 49.0% / 59.8% |
| the same, 128-d embeddings | 74% | 51.2% | 88.8% | 80.0% | 96.4% | 17.8% / 40.8% / 61.2% |
| presence on the image tower only | 79% | 57.2% | 88.0% | 83.6% | 95.8% | 17.6% / 36.8% / 53.8% |
| presence on both + `restyle_prob=0.5` (the demo's) | 75% | 53.8% | 93.8% | 78.0% | 93.8% | 42.4% / 79.2% / 74.8% |

`restyle_prob` draws each training image once more in another style (`shapes.restyle`: a
gradient at any angle, strong noise, lines, dots or, since 2026-12-07, dead leaves behind the
same objects, radii drawn again, each object outlined with probability `restyle_outline`: half
of them in these runs, all in the demo since the night of 2026-12-07) and shows that version instead with
this probability: the CLIP then reads what is drawn rather than how, and the other renderer's
exactly right goes from 18% to 42% for 2 points (within one standard error, 2.2) on the demo's
own test split. Dead leaves (the whole demo, BENCHMARKS.md) then raised exactly right on the
demo's test split from 85.6% to 91.8% and on the other renderer from 64.4% to 76.8%.

A second CLIP for reranking alone (`sampler.rerank_clip`; the candidates of the "presence on
both towers" model reranked offline): the text head + hard negatives CLIP above raises exactly
right from 56.0% to 62.0%, but costs another 4,000 CLIP steps (about 6 minutes here) and the
demo must stay within 15; trained for 2,000 steps it gives 55.2%, or 59.2% when started from
the image-head CLIP (`init_from`). Picking the candidate closest to the others in CLIP's text
space (consensus) instead of the image gives 57.4%, no more than the noise.

Two objects: attention heads (2026-12-06, the demo's since). The captions that recipe got wrong
were mostly two-object images with a shape wrong or on the wrong object, and its features say
why: a probe reads a lone object's shape 92% right, but each object's shape where there are two
58.5% (`feature_probe`'s shape_of_two), both shapes bound to their colours 30% and the set of the
two shapes 37% (a ridge probe on all products of two features; chance 6% and 10%). The class
token gathers the image by softmax averages, one per head, and with 4 heads two objects blur
into one. Size is not the cause: a big object of two had its shape wrong as often (41%) as a
small one (47%), against 8% for a lone one. The recipe above for 2,000 steps, one change each
(probe on test; "pair / set": as above; "twins": a reference above every one of its false twins,
one object / two; run two or three at a time, so no times):

| small CLIP, 2,000 steps | shape | shape of two | pair / set | twins |
|---|---|---|---|---|
| 4 heads of 16 dimensions (the recipe above) | 57.4% | 49.0% | 21% / 33% | 69% / 12% |
| 48 pixels, patch 6 (the same 64 patches) | 60.0% | 52.3% | 21% / 36% | 55% / 13% |
| 64 pixels, patch 8 | 51.4% | 46.3% | 21% / 31% | 56% / 8% |
| 3 layers | 65.9% | 53.3% | 27% / 36% | 74% / 14% |
| 8 heads of 8 | 68.3% | 59.4% | 32% / 48% | 74% / 12% |
| **16 heads of 4 (the demo's)** | 71.3% | 58.9% | 38% / 51% | 89% / 16% |
| 32 heads of 2 | 73.4% | 59.9% | 36% / 53% | 85% / 17% |
| 8 heads, grey on 20% of the images | 37.5% | 32.8% | 15% / 21% | 44% / 11% |
| 16 heads, grey on 70% | 73.0% | 59.8% | 34% / 53% | 58% / 11% |

More heads do what a third layer does not; more pixels do not help; grey images are still what
teaches shape. Heads are not free on this CPU: the same FLOPs cut into more, smaller matmuls
(a step of the recipe, 400 steps timed alone: 100 ms with 4 heads, 122 with 8, 160-172 with 16;
130 against 98 ms in the whole demo). In the whole demo, with 4,000 steps, 16 heads take the
probe's shape of two from 58.5% to 68.4%, the captions' exactly right from 55.6% to 65.4% and
shape from 76.8% to 88.0%, but the demo from about 15 to 17.2 minutes. 3,000 steps with 16
heads, about the time of 4,000 with 4, gave 57.0% (probe shape of two 63.0%): no better than 4
heads for the same time, so the demo keeps 4,000 steps. It wins the time back elsewhere: it
trains data-parallel over the 2 devices `pdiff demo` splits the CPU into (a step 130 -> 112 ms
in the whole demo, the same updates but for the order of sums), and the denoiser trains 3,000
steps instead of 4,000 (configs/demo.py; README; BENCHMARKS.md).

The learning rate (2026-12-06, evening; 2e-3 the demo's since). Each object's shape where there
are two still rose steeply from 2,000 to 4,000 steps, so the small CLIP learns too slowly rather
than too little: fit on the train split's features, the same probe reads the train images'
shapes of two little better (75%) than the test images' (69%). Ways to learn faster for the
same steps, one change each to the 16-head recipe (probe on test: shape / shape of two /
relation / size; run two at a time, so no times; every change leaves a step's cost as it was):

| small CLIP | 2,000 steps | 4,000 steps |
|---|---|---|
| the recipe above (lr 1e-3) | 68.1 / 56.0 / 67.1 / 92.7% | 78.2 / 68.8 / 88.9 / 93.5% |
| attribute head weight 3 | 67.5 / 57.2 / 69.7 / 86.0% | |
| two-object images listed twice (so drawn twice as often) | 72.4 / 65.0 / 75.6 / 93.8% | 80.4 / 72.7 / 91.5 / 95.2% |
| **lr 2e-3 (the demo's)** | 75.8 / 64.0 / 67.1 / 92.2% | 82.6 / 74.4 / 88.0 / 94.0% |
| both | 73.0 / 62.8 / 69.2 / 90.5% | |
| two-object images thrice, lr 3e-3 | 63.3 / 56.0 / 66.2 / 88.8% | |
| lr 3e-3 | | 77.0 / 66.4 / 90.6 / 94.1% |
| lr 2e-3, two-object images twice | | 82.5 / 72.9 / 91.0 / 95.0% |

The two do not add up (at either length), and 3e-3 is past the best rate, so the demo takes
lr 2e-3, which needs no new option.

The same CPU time, the same features (2026-12-06, late evening; nothing kept). With the rate settled,
the probe still rose with every step, so a cheaper step might buy more of them. A step alone on
the 2 cores, against the demo's (batch 64, 64 patches of 4 pixels; 105 ms at speed): batch 32
0.65x (its whole runs against tqdm's rate), 16 patches of 8 pixels about 0.4x and the same with
4 layers about 0.9x (tqdm's rate over 10 s stretches, so rough). Probe on test, shape / shape of two / relation / size:

| small CLIP | steps | CPU time, x the demo's | probe |
|---|---|---|---|
| the demo's | 4,000 | 1 | 82.6 / 74.4 / 88.0 / 94.0% |
| batch 32 | 6,400 | 1.05 | 83.6 / 74.6 / 72.2 / 93.6% |
| patch 8 | 16,000 | about 1.5 | 83.0 / 74.2 / 82.1 / 95.2% |
| patch 8, 4 layers | 8,000 | about 1.8 | 75.2 / 64.0 / 73.5 / 94.1% |
| batch 32 | 12,000 | 2.0 | 87.6 / 81.0 / 86.3 / 95.5% |

Smaller batches or patches learn no more shape per CPU second than the demo's recipe (and
batch 32 less relation); only more CPU time pays (the last row: each shape of two objects 81.0%
instead of 74.4%), and the demo has no 7 more minutes within its 15.

The seed, and the shape labels weighted twice (2026-12-07, evening; `shape_weight` 2 the demo's
since). With only this function's seed changed, four whole demos gave exactly right 91.2 / 78.4 /
81.4 / 76.8% (test split): each seed's CLIP spent its 64 dimensions on the shapes of two objects
or on their relation (probe, shape of two / relation: 88.0 / 84.6, 72.9 / 93.6, 82.6 / 75.2,
76.2 / 91.0%), and the captions followed the shapes. A moving average of the weights and a
96-wide CLIP for the same time did not change that (BENCHMARKS.md). The shape group's
cross-entropy counted twice, seeds 0 / 1 / 3: shape of two 91.7 / 93.9 / 89.8%, relation 81.6 /
74.8 / 81.2%, exactly right 88.2 / 84.6 / 86.0% (mean 86.3 against 82.1, a spread of 3.6 points
against 14.4), on the tests' other renderer 69.0 / 67.8 / 68.4% (against 75.6 / 64.4 / 64.6).

Dark rims (2026-12-07, night, an Intel Xeon; `restyle_outline` 1 the demo's since). On the tests'
other renderer the captions' colour was the weakest figure, and a colour probe (the set of
colours in each image, fit on the train split's features) showed why: 96.8% right on the test
split, 81.6% on the other renderer, 91.8% on the same images without their dark outlines. With
half the images restyled, half the restyled objects outlined and half the images grey, one object
in eight that the CLIP saw was outlined and in colour. Every restyled object outlined, whole
demos, seeds 0 / 1: the other renderer's exactly right 71.0 / 61.0% -> 75.8 / 68.0% (colour 84.4 /
77.4% -> 90.2 / 82.8%), the test split's 90.4 / 82.4% -> 89.6 / 86.4%. Rims up to 3 px, or more
of the images restyled, gave no more (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from pdiff_jax import clip as clip_lib
from pdiff_jax.data import shapes
from pdiff_jax.data.images import load_image
from pdiff_jax.metrics import exact

log = logging.getLogger(__name__)

# Beside a trained small CLIP's config.json: the arguments and data it was trained with, so that a
# later call asking for another recipe stops instead of reusing it (`train_small_clip`).
RECIPE = "small_clip_recipe.json"
# `train_small_clip`'s arguments that are not part of that recipe: the data (recorded by a digest)
# and how the work is laid out, which leaves the weights as they are. Every other argument is.
_NOT_RECIPE = ("out_dir", "image_paths", "captions", "words", "attributes", "steps_per_dispatch",
               "devices", "progress")


def _info_nce(out) -> jax.Array:
  """Symmetric InfoNCE of B images against their B captions; texts past the first B (hard
  negatives) are extra wrong answers for every image, and are no image's caption."""
  logits = out.logits_per_image  # (B, T >= B), already scaled by exp(logit_scale)
  B = logits.shape[0]
  labels = jnp.arange(B)
  return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits[:, :B].T, labels).mean())


# What the attribute head predicts from an image embedding, as (name, classes) in label order:
# the object count, the side of a single object, the relation of two (the one whose colour comes
# first in shapes.COLORS to the other), and per colour the shape and the size of its object
# (0 = no object of that colour).
def _label_layout():
  colours = list(shapes.COLORS)
  return ([("count", 2), ("side", len(shapes.SIDES)), ("relation", len(shapes.INVERSE))]
          + [(f"shape_{c}", 1 + len(shapes.SHAPES)) for c in colours]
          + [(f"size_{c}", 1 + len(shapes.SIZES)) for c in colours])


def attribute_labels(attrs: dict) -> np.ndarray:
  """The attribute head's integer labels of one shapes image (-1 where a label does not apply),
  or of a caption's reading (`exact.parses`; objects without a size have size label 0)."""
  colours, objs = list(shapes.COLORS), attrs["objects"]
  ncol = len(colours)
  y = np.full(3 + 2 * ncol, 0, np.int32)
  y[0] = len(objs) - 1
  y[1] = shapes.SIDES.index(attrs["side"]) if "side" in attrs else -1
  y[2] = -1
  if "relation" in attrs:
    a, b = objs
    rel = attrs["relation"] if colours.index(a["color"]) < colours.index(b["color"]) \
        else shapes.INVERSE[attrs["relation"]]
    y[2] = list(shapes.INVERSE).index(rel)
  for o in objs:
    c = colours.index(o["color"])
    y[3 + c] = 1 + shapes.SHAPES.index(o["shape"])
    if "size" in o:
      y[3 + ncol + c] = 1 + shapes.SIZES.index(o["size"])
  return y


def caption_labels(caption: str) -> np.ndarray:
  """The attribute head's labels as far as one caption states them (`attribute_labels` of its
  first template reading: -1, or 0 for a colour's size, where it says nothing): what the text
  embedding of a true caption must carry about its image, each colour's shape included."""
  readings = exact.parses(caption)
  if not readings:
    raise ValueError(f"not a caption of the shapes grammar: {caption!r}")
  return attribute_labels(readings[0])


_VALUES = {"color": tuple(shapes.COLORS), "shape": shapes.SHAPES, "size": shapes.SIZES,
           "side": shapes.SIDES, "rel": tuple(shapes.INVERSE)}
_KIND = {"c1": "color", "c2": "color", "s1": "shape", "s2": "shape", "z1": "size", "z2": "size",
         "inv": "rel"}


def false_twins(caption: str, attrs: dict) -> dict[str, list[str]]:
  """The captions of the same phrasing as `caption` with one slot changed (colour, shape, size,
  side or relation) or, for two objects of different shapes, the shapes exchanged ("swap"), that
  are not true of the image `attrs`: hard negatives, by the kind of change."""
  templates = shapes.ONE + shapes.TWO
  for template, (_, pattern) in zip(templates, exact.patterns()):
    m = pattern.fullmatch(caption)
    if m is not None:
      break
  else:
    raise ValueError(f"not a caption of the shapes grammar: {caption!r}")
  slots = m.groupdict()
  out: dict[str, list[str]] = {}
  for slot, value in slots.items():
    kind = _KIND.get(slot, slot)
    for other in _VALUES[kind]:
      if other != value:
        out.setdefault("where" if kind in ("side", "rel") else kind, []).append(
            template.format(**{**slots, slot: other}))
  if "s1" in slots and slots["s1"] != slots["s2"]:
    out["swap"] = [template.format(**{**slots, "s1": slots["s2"], "s2": slots["s1"]})]
  out = {k: [c for c in v if not exact.exactly_right(c, attrs)] for k, v in out.items()}
  return {k: v for k, v in out.items() if v}


def _attribute_loss(head: jax.Array, embeds: jax.Array, labels: jax.Array,
                    presence: bool = False, shape_weight: float = 1.0) -> jax.Array:
  """Sum over the groups count, side, relation, shape, size of the mean cross-entropy of the
  labels that apply (shape and size only of the colours present), from 16 x the normalised
  embedding (CLIP's output `image_embeds` or `text_embeds`) times `head`; the shape group's
  term times `shape_weight`. Each group is one cross-entropy over its slots (a colour's shape,
  ...), so the step has few small ops. With `presence`, `head` has one more column per colour,
  and a last group adds the mean binary cross-entropy of "an object of this colour is there"
  (its shape label is not 0) over all of them."""
  logits = 16.0 * embeds @ head
  B, layout = labels.shape[0], _label_layout()
  ncol = (len(layout) - 3) // 2
  # (first label column, slots, classes per slot, smallest label that applies, weight)
  groups = [(0, 1, 2, 0, 1.0), (1, 1, len(shapes.SIDES), 0, 1.0), (2, 1, len(shapes.INVERSE), 0, 1.0),
            (3, ncol, 1 + len(shapes.SHAPES), 1, shape_weight), (3 + ncol, ncol, 1 + len(shapes.SIZES), 1, 1.0)]
  total, col = 0.0, 0
  for first, slots, classes, smallest, weight in groups:
    y = labels[:, first:first + slots]
    ok = y >= smallest
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, col:col + slots * classes].reshape(B, slots, classes), jnp.maximum(y, 0))
    total = total + weight * jnp.sum(ce * ok) / jnp.maximum(ok.sum(), 1)
    col += slots * classes
  if presence:
    there = (labels[:, 3:3 + ncol] >= 1).astype(logits.dtype)
    total = total + optax.sigmoid_binary_cross_entropy(logits[:, col:col + ncol], there).mean()
  return total


def random_grayscale(pixels: np.ndarray, prob: float, transform: clip_lib.ImageTransform,
                     rng: np.random.Generator) -> np.ndarray:
  """Replaces each normalised (N, 3, H, W) image by its luminance (ITU-R 601, as PIL's "L") with
  probability `prob`; returns a new array."""
  grey = rng.random(len(pixels)) < prob
  if not grey.any():
    return pixels
  mean = np.asarray(transform.mean, np.float32)[:, None, None]
  std = np.asarray(transform.std, np.float32)[:, None, None]
  rgb = pixels[grey] * std + mean
  luma = 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]
  out = pixels.copy()
  out[grey] = (luma - mean) / std
  return out


def train_small_clip(out_dir: str, image_paths: list[str], captions: list[list[str]], words: list[str],
                     *, steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                     image_size: int = 32, patch_size: int = 4, width: int = 64,
                     layers: int = 2, heads: int = 4, projection_dim: int = 64, max_text_len: int = 16,
                     grayscale_prob: float = 0.5, warmup_steps: int = 50,
                     attributes: list[dict] | None = None, attribute_weight: float = 1.0,
                     shape_weight: float = 1.0,
                     text_head: bool = False, hard_negatives: int = 0, presence: bool = False,
                     restyle_prob: float = 0.0, restyle_outline: float = 0.5,
                     init_from: str | None = None,
                     steps_per_dispatch: int = 1, devices=None, progress: bool = True) -> str:
  """Trains on (image, one of its captions) pairs for exactly `steps` steps (the same work on any
  machine) and saves to `out_dir`, with the recipe it was trained with (`RECIPE`). An `out_dir`
  that holds a CLIP is kept if its recipe is the one asked for, else `ClipLoadError`.

  With `attributes` (each image's shapes truth), a linear attribute head on the image embedding
  is trained with it (`attribute_weight` x `_attribute_loss`, its shape group times
  `shape_weight`, added to InfoNCE) and then dropped:
  the saved model is a plain CLIP. Options that need `attributes` (the module docstring has
  what each one does to the demo): `text_head` (the head also reads the text embedding, with
  `caption_labels`), `hard_negatives=K` (K `false_twins` per caption, one an extra negative at
  each step), `presence` (the head also says which colours are there) and `restyle_prob` (each
  image also drawn by `shapes.restyle`, each object outlined with probability `restyle_outline`,
  and shown so with this probability). `init_from`: start
  from a saved small CLIP instead of a random one (its architecture and tokenizer; the size
  arguments are then unused). `devices`: where to train, data-parallel (default: as many of this
  process's devices as divide the batch)."""
  recipe = {k: v for k, v in locals().items() if k not in _NOT_RECIPE}  # the arguments alone, here
  from tqdm import tqdm
  if (text_head or hard_negatives or presence or restyle_prob) and attributes is None:
    raise ValueError("text_head, hard_negatives, presence and restyle_prob need `attributes` (the "
                     "images' shapes truth)")
  if steps_per_dispatch < 1:
    raise ValueError(f"steps_per_dispatch must be >= 1, got {steps_per_dispatch}")
  # The data by a digest: the images' file names, captions, words and truth, not where they lie.
  data = json.dumps([[os.path.basename(p) for p in image_paths], captions, words, attributes],
                    sort_keys=True)
  recipe["data_sha256"] = hashlib.sha256(data.encode()).hexdigest()
  recipe = json.loads(json.dumps(recipe))  # as it reads back from RECIPE (tuples as lists), to compare
  if os.path.exists(os.path.join(out_dir, "config.json")):
    _check_recipe(out_dir, recipe)
    log.info("reusing the small CLIP in %s (trained with the same recipe and data)", out_dir)
    return out_dir
  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  if init_from:  # go on from a saved small CLIP (its architecture, tokenizer and weights)
    shutil.copytree(init_from, tmp)
  else:
    clip_lib.save_small_clip(tmp, words=words, image_size=image_size, patch_size=patch_size,
                             width=width, layers=layers, heads=heads, projection_dim=projection_dim,
                             max_text_len=max_text_len, seed=seed)
  # Data-parallel over as many of this process's devices as divide the batch: the same updates
  # but for the order of sums (params replicated, each device a slice of the images and texts).
  # On a CPU split into two devices (`pdiff demo`), a step of the demo's CLIP is ~12% faster than
  # on one: two streams of small ops keep both cores busier than one op's threads do.
  batch_size = min(batch_size, len(image_paths))
  if devices is None:
    devices = jax.local_devices()
    devices = devices[:max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)]
  elif batch_size % len(devices):
    raise ValueError(f"batch_size {batch_size} is not a multiple of the {len(devices)} devices")
  clip = clip_lib.Clip.load(tmp, devices=devices)
  pixels = np.stack([clip.transform(load_image(p)) for p in image_paths])
  restyled = None
  if restyle_prob:  # each image once more, drawn in another style (`shapes.restyle`)
    style_rng = np.random.default_rng([seed, 2])
    restyled = np.stack([clip.transform(shapes.restyle(a, style_rng, restyle_outline))
                         for a in attributes])
  per_image = len(captions[0])
  ids, mask = clip.tokenize([c for caps in captions for c in caps])
  ids = ids.reshape(len(captions), per_image, -1)
  mask = mask.reshape(len(captions), per_image, -1)

  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup_steps, steps // 10 + 1), steps)
  tx = optax.adamw(schedule, weight_decay=0.1)
  use_head = attributes is not None
  params = {"clip": clip.params}
  labels = np.zeros((len(pixels), 0), np.int32)  # sliced per batch like the ids; empty without a head
  text_labels = np.zeros((len(pixels), per_image, 0), np.int32)
  if use_head:
    labels = np.stack([attribute_labels(a) for a in attributes])
    params["head"] = jnp.zeros((clip.model.config.projection_dim, sum(k for _, k in _label_layout())
                                + presence * len(shapes.COLORS)))
    if text_head:
      text_labels = np.stack([[caption_labels(c) for c in caps] for caps in captions])
  neg_ids = neg_mask = np.zeros((len(pixels), per_image, 0, ids.shape[-1]), np.int32)
  if hard_negatives:
    # For each caption, `hard_negatives` false twins drawn up front (a kind of change, then one
    # caption of that kind), so that the steps tokenize nothing.
    twin_rng = np.random.default_rng([seed, 1])
    twins = []
    for caps, attrs in zip(captions, attributes):
      for c in caps:
        kinds = false_twins(c, attrs)
        names = sorted(kinds)
        for _ in range(hard_negatives):
          pool = kinds[names[twin_rng.integers(len(names))]]
          twins.append(pool[twin_rng.integers(len(pool))])
    neg_ids, neg_mask = clip.tokenize(twins)
    neg_ids = neg_ids.reshape(len(captions), per_image, hard_negatives, -1)
    neg_mask = neg_mask.reshape(len(captions), per_image, hard_negatives, -1)
  # The whole state placed as CLIP's params are: a head or optimizer count left uncommitted would
  # come back from the first step placed otherwise, and the step would compile a second time.
  params, opt_state = jax.device_put((params, tx.init(params)), NamedSharding(clip.mesh, P()))

  def loss_fn(params, pix, ids, mask, labels, text_labels):
    out = clip.model(input_ids=ids, pixel_values=pix, attention_mask=mask, params=params["clip"],
                     train=False)
    loss = _info_nce(out)
    if use_head:
      loss = loss + attribute_weight * _attribute_loss(params["head"], out.image_embeds, labels,
                                                          presence, shape_weight)
    if use_head and text_head:
      loss = loss + attribute_weight * _attribute_loss(
          params["head"], out.text_embeds[:labels.shape[0]], text_labels, presence, shape_weight)
    return loss

  def one_step(carry, batch):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def steps_of(params, opt_state, batches):
    """len(batches) steps in one dispatch: the same updates as one at a time, less overhead."""
    (params, opt_state), losses = jax.lax.scan(one_step, (params, opt_state), batches)
    return params, opt_state, losses[-1]

  rng = np.random.default_rng(seed)
  batch_sharding = NamedSharding(clip.mesh, P(None, "data"))  # (steps, batch, ...)

  def draw():
    """One batch from the host rng, in the same order of draws at any `steps_per_dispatch`."""
    idx = rng.choice(len(pixels), size=batch_size, replace=False)
    which = rng.integers(0, per_image, size=len(idx))
    batch = pixels[idx]
    if restyled is not None:
      swap = rng.random(len(idx)) < restyle_prob
      batch = np.where(swap[:, None, None, None], restyled[idx], batch)
    batch = random_grayscale(batch, grayscale_prob, clip.transform, rng)
    text_ids, text_mask = ids[idx, which], mask[idx, which]
    if hard_negatives:
      k = rng.integers(0, hard_negatives, size=len(idx))
      text_ids = np.concatenate([text_ids, neg_ids[idx, which, k]])
      text_mask = np.concatenate([text_mask, neg_mask[idx, which, k]])
    return batch, text_ids, text_mask, labels[idx], text_labels[idx, which]

  start = time.perf_counter()
  bar = tqdm(total=steps, desc="small CLIP", unit="step", disable=not progress, dynamic_ncols=True)
  loss = float("nan")
  done = 0
  while done < steps:
    k = min(steps_per_dispatch, steps - done)
    batches = [draw() for _ in range(k)]
    params, opt_state, loss = steps_of(params, opt_state, jax.device_put(
        tuple(np.stack(field) for field in zip(*batches)), batch_sharding))
    done += k
    bar.update(k)
    if done % 100 < k:
      bar.set_postfix(loss=f"{float(loss):.3f}")
  bar.close()
  log.info("small CLIP: %d steps in %.0f s, final loss %.3f", done,
           time.perf_counter() - start, float(loss))
  clip.model.save_pretrained(tmp, params=jax.device_get(params["clip"]))
  with open(os.path.join(tmp, RECIPE), "w") as f:
    json.dump(recipe, f, indent=1)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)
  return out_dir


def _check_recipe(out_dir: str, recipe: dict) -> None:
  """Raises `clip.ClipLoadError` unless the small CLIP in `out_dir` was trained as `recipe` asks
  (a recipe changed since, say, would otherwise be reused without a word, and every figure made
  from it would be of the old one)."""
  path = os.path.join(out_dir, RECIPE)
  if not os.path.exists(path):
    raise clip_lib.ClipLoadError(
        f"{out_dir} holds a small CLIP with no {RECIPE} (trained before its recipe was recorded), "
        "so it may not be the one asked for: delete it, with what was made from it, or give the "
        "demo another --workdir")
  with open(path) as f:
    stored = json.load(f)
  differ = sorted(k for k in recipe.keys() | stored.keys() if stored.get(k) != recipe.get(k))
  if differ:
    raise clip_lib.ClipLoadError(
        f"{out_dir} holds a small CLIP trained with " + ", ".join(f"{k}={stored.get(k)!r}" for k in differ)
        + "; this run asks for " + ", ".join(f"{k}={recipe.get(k)!r}" for k in differ)
        + ": delete it, with what was made from it (features, model), or give the demo another --workdir")


def feature_probe(train_features: np.ndarray, train_attrs: list[dict], test_features: np.ndarray,
                  test_attrs: list[dict], ridge: float = 1.0) -> dict:
  """What a CLIP's image embeddings say about the shapes data: test accuracy of ridge-regression
  probes (on the standardised features and their squares) trained on the train split, for the
  number of objects, the side of a single object, the relation of two (of the object whose
  colour comes first in shapes.COLORS to the other, as the attribute head's; before 2026-12-06
  it was in the order they were drawn, which no image shows, so at most about 50%), the shape and size of
  the object of each colour (averaged over colours), and that shape again on the two-object
  images alone ("shape_of_two": each object's shape, read through its colour, where another
  object is there too). Chance: 50%, 25%, 25%, 25%, 50%, 25%."""
  mean, std = train_features.mean(0), train_features.std(0) + 1e-6
  def design(f):
    z = (np.asarray(f, np.float64) - mean) / std
    return np.concatenate([z, z ** 2, np.ones((len(z), 1))], axis=1)
  x_train, x_test = design(train_features), design(test_features)

  def accuracy(label) -> float:
    y_train = np.array([label(a) for a in train_attrs])
    y_test = np.array([label(a) for a in test_attrs])
    tr, te = y_train >= 0, y_test >= 0
    onehot = np.eye(int(y_train.max()) + 1)[y_train[tr]]
    x = x_train[tr]
    w = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ onehot)
    return float(np.mean((x_test[te] @ w).argmax(1) == y_test[te]))

  def of_colour(key, values, colour):
    return lambda a: next((values.index(o[key]) for o in a["objects"] if o["color"] == colour), -1)

  def of_two(label):
    return lambda a: label(a) if len(a["objects"]) == 2 else -1
  return {
      "count": accuracy(lambda a: len(a["objects"]) - 1),
      "side": accuracy(lambda a: shapes.SIDES.index(a["side"]) if "side" in a else -1),
      "relation": accuracy(lambda a: int(attribute_labels(a)[2])),
      "shape": float(np.mean([accuracy(of_colour("shape", shapes.SHAPES, c)) for c in shapes.COLORS])),
      "size": float(np.mean([accuracy(of_colour("size", shapes.SIZES, c)) for c in shapes.COLORS])),
      "shape_of_two": float(np.mean([accuracy(of_two(of_colour("shape", shapes.SHAPES, c)))
                                     for c in shapes.COLORS])),
  }
