"""Exact correctness of captions of the synthetic shapes data, which knows every image's truth.

A caption is **grammatical** when it is an instance of one of the generator's phrasing templates
(`data.shapes.ONE` / `TWO`) with any attribute values, and **exactly right** when it is an
instance whose values are all true of the image: the template is one for the image's number of
objects, every named object is in the image with that colour, shape and (where said) size, two
named objects are two different objects, and a stated relation ("left of", ...) or side holds.
Hand-written here because no library knows this grammar; the parser is a regular expression per
template, built from the templates themselves, so it follows any change to them.
"""

from __future__ import annotations

import copy
import functools
import itertools
import re
from typing import Sequence

import numpy as np

from pdiff_jax.data import shapes

SIDES = shapes.SIDES
RELATIONS = tuple(shapes.INVERSE)
_SLOT = {"color": shapes.COLORS, "c1": shapes.COLORS, "c2": shapes.COLORS,
         "shape": shapes.SHAPES, "s1": shapes.SHAPES, "s2": shapes.SHAPES,
         "size": shapes.SIZES, "z1": shapes.SIZES, "z2": shapes.SIZES,
         "side": SIDES, "rel": RELATIONS, "inv": RELATIONS}
_SIZE_WORDS = set(shapes.SIZES)
_RELATION_WORDS = set(SIDES) | {"above", "below"}


def _compile(template: str) -> re.Pattern:
  out, pos = [], 0
  for m in re.finditer(r"\{(\w+)\}", template):
    out.append(re.escape(template[pos:m.start()]))
    out.append(f"(?P<{m.group(1)}>" + "|".join(map(re.escape, _SLOT[m.group(1)])) + ")")
    pos = m.end()
  out.append(re.escape(template[pos:]))
  return re.compile("".join(out))


@functools.lru_cache(maxsize=1)
def patterns() -> tuple[tuple[int, re.Pattern], ...]:
  """(number of objects, regular expression with a group per slot) of each template, in the
  order of `shapes.ONE + shapes.TWO`."""
  return tuple((1, _compile(t)) for t in shapes.ONE) + tuple((2, _compile(t)) for t in shapes.TWO)


def parses(caption: str) -> list[dict]:
  """Every reading of `caption` as a template instance: {"objects": [{color, shape[, size]}],
  "side" | "relation"} with "relation" the first object's to the second's; [] if ungrammatical."""
  return copy.deepcopy(list(_readings_of(caption)))


def _readings_of(caption: str) -> tuple[dict, ...]:
  return _readings(" ".join(caption.lower().split()))


# Cached: the small CLIP's false twins check 563,876 captions of 22,511 distinct texts, and a
# split's candidates repeat too. Shared between callers, so only read here (`parses` copies).
@functools.lru_cache(maxsize=1 << 16)
def _readings(text: str) -> tuple[dict, ...]:
  out = []
  for count, pattern in patterns():
    m = pattern.fullmatch(text)
    if m is None:
      continue
    g = m.groupdict()
    if count == 1:
      obj = {"color": g["color"], "shape": g["shape"], **({"size": g["size"]} if g.get("size") else {})}
      out.append({"objects": [obj], **({"side": g["side"]} if g.get("side") else {})})
      continue
    objs = [{"color": g[f"c{i}"], "shape": g[f"s{i}"], **({"size": g[f"z{i}"]} if g.get(f"z{i}") else {})}
            for i in (1, 2)]
    reading: dict = {"objects": objs}
    if g.get("rel"):
      reading["relation"] = g["rel"]
    elif g.get("inv"):  # "the {c2} {s2} is {inv} the {c1} {s1}": object 1 is the inverse of 2
      reading["relation"] = shapes.INVERSE[g["inv"]]
    out.append(reading)
  return tuple(out)


def _true_reading(reading: dict, attrs: dict) -> tuple[bool, bool, bool]:
  """(all true, sizes true, relation or side true) of one reading against the image. The named
  objects are matched to distinct image objects by colour and shape; all true also needs the
  template to be one for the image's number of objects."""
  objs, said = attrs["objects"], reading["objects"]
  best = (False, False, False)
  for chosen in itertools.permutations(objs, len(said)):
    if not all(s["color"] == o["color"] and s["shape"] == o["shape"] for s, o in zip(said, chosen)):
      continue
    ok_size = all(s.get("size", o["size"]) == o["size"] for s, o in zip(said, chosen))
    if "side" in reading:
      ok_where = len(objs) == 1 and reading["side"] == attrs.get("side")
    elif "relation" in reading:
      ok_where = reading["relation"] == shapes.relation(*chosen)
    else:
      ok_where = True
    best = max(best, (len(said) == len(objs) and ok_size and ok_where, ok_size, ok_where))
  return best


def check(caption: str, attrs: dict) -> dict:
  """{"grammatical", "exactly_right"} of one caption against one image's attributes, plus
  "size_ok" / "relation_ok": None when the caption states no size (relation or side), else
  whether a grammatical reading states them truly of the objects it names."""
  words = caption.split()
  readings = _readings_of(caption)
  results = [_true_reading(r, attrs) for r in readings]
  says_size = any(w in _SIZE_WORDS for w in words)
  says_where = any(w in _RELATION_WORDS for w in words)
  return {"grammatical": bool(readings), "exactly_right": any(r[0] for r in results),
          "size_ok": any(r[1] for r in results) if says_size else None,
          "relation_ok": any(r[2] for r in results) if says_where else None}


def exactly_right(caption: str, attrs: dict) -> bool:
  """`check(caption, attrs)["exactly_right"]`, computing nothing else."""
  return any(_true_reading(r, attrs)[0] for r in _readings_of(caption))


def _count_ok(caption: str, attrs: dict) -> bool:
  """The caption names as many objects as the image has (a template reading's object count; for
  an ungrammatical caption the number of shape words)."""
  readings = _readings_of(caption)
  named = len(readings[0]["objects"]) if readings else sum(w in shapes.SHAPES for w in caption.split())
  return named == len(attrs["objects"])


def _share(values) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def shapes_scores(chosen: Sequence[str], candidates: Sequence[Sequence[str]] | None,
                  attributes: Sequence[dict]) -> dict:
  """The exact-correctness metrics of CONTRACT.md for chosen captions (and all candidates):
  grammatical, exactly_right, any_exactly_right (an exactly right caption among an image's
  candidates), cand_grammatical, cand_exactly_right, and the per-attribute accuracies
  color_acc, shape_acc (names some and only true ones), size_acc, relation_acc (of captions that
  state one; None if none does) and count_acc."""
  checks = [check(c, a) for c, a in zip(chosen, attributes)]
  out = {"grammatical": _share(c["grammatical"] for c in checks),
         "exactly_right": _share(c["exactly_right"] for c in checks),
         **shapes.attribute_accuracy(chosen, attributes),
         "size_acc": _share(c["size_ok"] for c in checks),
         "relation_acc": _share(c["relation_ok"] for c in checks),
         "count_acc": _share(_count_ok(c, a) for c, a in zip(chosen, attributes))}
  if candidates is not None:
    cand = [[check(c, a) for c in cs] for cs, a in zip(candidates, attributes)]
    out["cand_grammatical"] = _share(c["grammatical"] for cs in cand for c in cs)
    out["cand_exactly_right"] = _share(c["exactly_right"] for cs in cand for c in cs)
    out["any_exactly_right"] = _share(any(c["exactly_right"] for c in cs) for cs in cand)
  return out
