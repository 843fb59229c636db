import os
import shutil

import numpy as np
import pytest

from pdiff_jax.metrics import clipscore, coco, diversity


def test_distinct_and_vocab_by_hand():
  caps = ["A b a.", "a C"]
  assert diversity.distinct_n(caps, 1) == pytest.approx(3 / 5)  # {a, b, c} / 5 words
  assert diversity.distinct_n(caps, 2) == pytest.approx(3 / 5)  # {ab, ba, ac}
  assert diversity.distinct_n(caps, 3) == pytest.approx(1 / 5)  # {aba}
  assert diversity.vocab_usage(caps, 10) == pytest.approx(0.3)
  assert diversity.distinct_n([], 1) == 0.0


def test_div_n_by_hand():
  sets = [["a b", "a b"], ["x y z", "x"]]
  assert diversity.div_n(sets, 1) == pytest.approx((2 / 4 + 3 / 4) / 2)
  assert diversity.div_n(sets, 2) == pytest.approx((1 / 4 + 2 / 4) / 2)


def test_mbleu4():
  same = [["a man rides a big horse"] * 3]
  assert diversity.mbleu4(same) == pytest.approx(1.0, abs=1e-6)
  apart = [["a man rides a horse", "two dogs sleep on grass", "the red bus is parked"]]
  assert diversity.mbleu4(apart) < 1e-3
  # Against pycocoevalcap's BLEU by hand: candidate 0 vs the others, etc., averaged.
  from pycocoevalcap.bleu.bleu import Bleu
  cands = ["a man rides a horse", "a man rides a brown horse", "a woman walks a dog"]
  by_hand = []
  for j, c in enumerate(cands):
    refs = [o for k, o in enumerate(cands) if k != j]
    by_hand.append(Bleu(4).compute_score({0: refs}, {0: [c]}, verbose=0)[0][3])
  assert diversity.mbleu4([cands]) == pytest.approx(np.mean(by_hand), rel=1e-9)
  assert diversity.mbleu4([["only one"]]) is None


def _hessel_refclipscore(images, candidates, references, w=2.5):
  """The published formula as Hessel et al.'s clipscore.py computes it, in numpy: rows
  normalised, CLIP-S = w * clip(cos, 0), text-text = the raw max cosine over the references,
  RefCLIP-S = 2 * a * b / (a + b) per image."""
  norm = lambda x: x / np.sqrt(np.sum(x ** 2, axis=1, keepdims=True))
  images, candidates = norm(images), norm(candidates)
  per_image_text = w * np.clip(np.sum(images * candidates, axis=1), 0, None)
  per_text_text = np.array([np.max(c.dot(norm(r).T)) for c, r in zip(candidates, references)])
  ref = 2 * per_image_text * per_text_text / (per_image_text + per_text_text)
  return np.mean(per_image_text), np.mean(ref)


def test_clip_scores_by_hand():
  img = np.array([[1.0, 0.0], [0.0, 2.0]])
  cap = np.array([[1.0, 1.0], [1.0, -1.0]])
  refs = [np.array([[0.0, 1.0], [1.0, 1.0]]), np.array([[-1.0, -1.0]])]
  out = clipscore.clip_scores(img, cap, refs)
  c1 = 2.5 * np.cos(np.pi / 4)  # image 1: 45 degrees
  c2 = 0.0  # image 2: cos < 0 -> clipped
  assert out["CLIP-S"] == pytest.approx((c1 + c2) / 2)
  r1 = 1.0  # image 1: its caption is its second reference: raw cosine 1, no 2.5 weight
  # image 2: orthogonal to its only reference, and CLIP-S 0: both terms 0, scored 0 (not NaN)
  h1 = 2 * c1 * r1 / (c1 + r1)
  assert out["RefCLIP-S"] == pytest.approx((h1 + 0.0) / 2)
  # A negative text-text cosine is not clipped: it lowers the harmonic mean below 0.
  img3, cap3, refs3 = np.array([[1.0, 0.2]]), np.array([[1.0, 0.0]]), [np.array([[-1.0, 0.5]])]
  raw = -1 / np.sqrt(1.25)
  a = 2.5 * (1 / np.sqrt(1.04))
  assert clipscore.clip_scores(img3, cap3, refs3)["RefCLIP-S"] == pytest.approx(2 * a * raw / (a + raw))


def test_clip_scores_equal_the_published_formula():
  rng = np.random.default_rng(0)
  img, cap = rng.standard_normal((40, 16)), rng.standard_normal((40, 16))
  cap[:20] += 2 * img[:20]  # half the captions near their image, so both terms vary in sign
  refs = [rng.standard_normal((int(rng.integers(1, 6)), 16)) + (c if i % 2 else 0)
          for i, c in enumerate(cap)]
  clip_s, ref_s = _hessel_refclipscore(img, cap, refs)
  out = clipscore.clip_scores(img, cap, refs)
  assert out["CLIP-S"] == pytest.approx(clip_s, rel=1e-12)
  assert out["RefCLIP-S"] == pytest.approx(ref_s, rel=1e-12)
  assert clipscore.clip_scores(img, cap)["RefCLIP-S"] is None


REFS = {1: ["A man riding a horse.", "a person on a horse"],
        2: ["Two dogs play in the snow!", "dogs in snow"], 3: ["A red bus.", "a bus on the street"]}
CANDS = {1: "a man on a horse", 2: "two dogs in the snow", 3: "a red bus parked on a street"}


def test_coco_scores_equal_the_scorers_by_hand():
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.meteor.meteor import Meteor
  from pycocoevalcap.rouge.rouge import Rouge
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  tok = PTBTokenizer()
  gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
  res = tok.tokenize({k: [{"caption": c}] for k, c in CANDS.items()})
  ours = coco.coco_scores(REFS, CANDS)
  bleu = Bleu(4).compute_score(gts, res)[0]
  for i in range(4):
    assert ours[f"BLEU-{i + 1}"] == pytest.approx(bleu[i], rel=1e-12)
  assert ours["METEOR"] == pytest.approx(Meteor().compute_score(gts, res)[0], rel=1e-9)
  assert ours["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-12)
  assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)
  assert ours["SPICE"] is None and "CoreNLP" in ours["SPICE_unavailable_reason"]
  # CIDEr alone, of two sets of candidates against references tokenised once (an eval sweep's)
  score = coco.cider_against(REFS)
  other = {k: CANDS[j] for k, j in zip(CANDS, reversed(list(CANDS)))}
  res_other = tok.tokenize({k: [{"caption": c}] for k, c in other.items()})
  assert score(CANDS) == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)
  assert score(other) == pytest.approx(Cider().compute_score(gts, res_other)[0], rel=1e-12)
  assert score(other) != score(CANDS) and coco.cider(other, REFS) == score(other)


def _snapshot(root):
  return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getmtime(os.path.join(d, f)))
                for d, _, fs in os.walk(root) for f in fs if "__pycache__" not in d)


def test_nothing_is_written_into_the_package_dir(tmp_path, monkeypatch):
  """Works with a read-only pycocoevalcap: all temporary files go to a private mirror."""
  package = coco._package_dir()
  before = _snapshot(package)
  coco.coco_scores(REFS, CANDS)
  assert _snapshot(package) == before
  # And on a copy of the package whose directories really are read-only to its owner.
  if os.geteuid() != 0:  # root ignores permission bits
    copy = tmp_path / "pycocoevalcap"
    shutil.copytree(package, copy, symlinks=True)
    for d, _, _ in os.walk(copy):
      os.chmod(d, 0o555)
    monkeypatch.setattr(coco, "_package_dir", lambda: str(copy))
    monkeypatch.setattr(coco, "_MIRROR", None)
    assert coco.coco_scores(REFS, CANDS)["CIDEr"] > 0


def test_missing_java_is_named(monkeypatch):
  monkeypatch.setattr(shutil, "which", lambda name: None)
  with pytest.raises(coco.MetricError, match="Java"):
    coco.coco_scores(REFS, CANDS)


def test_scores_with_the_package_mounted_read_only():
  """The real thing: pycocoevalcap's directory on a read-only mount (a private mount namespace)."""
  import subprocess
  import sys
  package = coco._package_dir()
  probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
  if shutil.which("unshare") is None or probe.returncode != 0:
    pytest.skip("needs unshare -m (root) to make a read-only mount")
  code = ("from pdiff_jax.metrics.coco import coco_scores; import json; "
          f"print(json.dumps(coco_scores({REFS!r}, {CANDS!r})))")
  script = (f"mount --bind {package} {package} && mount -o remount,bind,ro {package} && "
            f"! touch {package}/probe 2>/dev/null && {sys.executable} -c \"{code}\"")
  r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  import json
  out = json.loads(r.stdout.strip().splitlines()[-1])
  # (METEOR's Java, ~10 s of CPU, is left out of the reference: only CIDEr is compared)
  assert out["CIDEr"] == pytest.approx(coco.coco_scores(REFS, CANDS, meteor=False)["CIDEr"])
  assert out["METEOR"] > 0


# The exact-correctness checker of the shapes data, on hand-written captions.
ONE_OBJECT = {"objects": [{"color": "red", "shape": "circle", "size": "big", "x": 14.0, "y": 30.0}],
              "side": "left"}
TWO_OBJECTS = {"objects": [{"color": "blue", "shape": "square", "size": "small", "x": 16.0, "y": 20.0},
                           {"color": "green", "shape": "triangle", "size": "big", "x": 46.0, "y": 22.0}],
               "relation": "left of"}


@pytest.mark.parametrize("caption, attrs, grammatical, right", [
    # true
    ("a big red circle on the left", ONE_OBJECT, True, True),
    ("a red circle", ONE_OBJECT, True, True),
    ("the circle is red and big", ONE_OBJECT, True, True),
    ("a single red circle sits on the left", ONE_OBJECT, True, True),
    ("a blue square left of a green triangle", TWO_OBJECTS, True, True),
    ("the green triangle is right of the blue square", TWO_OBJECTS, True, True),  # {inv}: same fact
    ("a green triangle right of a blue square", TWO_OBJECTS, True, True),
    ("a green triangle and a blue square", TWO_OBJECTS, True, True),  # either order
    ("two objects a small blue square and a big green triangle", TWO_OBJECTS, True, True),
    # false, but sentences of the grammar
    ("a small red circle on the left", ONE_OBJECT, True, False),      # size
    ("a big red circle on the right", ONE_OBJECT, True, False),       # side
    ("a red square", ONE_OBJECT, True, False),                         # shape
    ("a purple circle", ONE_OBJECT, True, False),                      # colour
    ("a blue square", TWO_OBJECTS, True, False),                       # one of two objects
    ("a blue square right of a green triangle", TWO_OBJECTS, True, False),  # relation
    ("the blue square is right of the green triangle", TWO_OBJECTS, True, False),
    ("a blue triangle and a green square", TWO_OBJECTS, True, False),  # shapes swapped
    ("a blue square and a blue square", TWO_OBJECTS, True, False),     # one object named twice
    ("two objects a big blue square and a big green triangle", TWO_OBJECTS, True, False),
    ("a red circle left of a green triangle", ONE_OBJECT, True, False),  # two named, one there
    # not sentences of the grammar
    ("a orange diamond red above the green green circle", TWO_OBJECTS, False, False),
    ("a red red circle on the left", ONE_OBJECT, False, False),
    ("a single red circle sits on the background", ONE_OBJECT, False, False),
    ("a big red", ONE_OBJECT, False, False),
    ("", ONE_OBJECT, False, False),
])
def test_exact_checker_by_hand(caption, attrs, grammatical, right):
  from pdiff_jax.metrics import exact
  got = exact.check(caption, attrs)
  assert (got["grammatical"], got["exactly_right"]) == (grammatical, right), got


def test_exact_scores_by_hand():
  from pdiff_jax.metrics import exact
  chosen = ["a big red circle on the left", "a blue square right of a green triangle", "a red red circle"]
  cands = [[chosen[0], "a small red circle on the left"], [chosen[1], "a blue square and a green triangle"],
           [chosen[2], "a red circle sits"]]
  attrs = [ONE_OBJECT, TWO_OBJECTS, ONE_OBJECT]
  got = exact.shapes_scores(chosen, cands, attrs)
  assert got["grammatical"] == pytest.approx(2 / 3) and got["exactly_right"] == pytest.approx(1 / 3)
  assert got["cand_grammatical"] == pytest.approx(4 / 6) and got["cand_exactly_right"] == pytest.approx(2 / 6)
  assert got["any_exactly_right"] == pytest.approx(2 / 3)
  # colour and shape as before: all three name only true colours and shapes
  assert got["color_acc"] == 1.0 and got["shape_acc"] == 1.0
  # sizes stated: only the first ("big", true); places: the first (true) and the second (false)
  assert got["size_acc"] == 1.0 and got["relation_acc"] == 0.5
  assert got["count_acc"] == 1.0
  assert exact.shapes_scores(["a red circle"], None, [ONE_OBJECT])["size_acc"] is None


def _falsified(attrs: dict, rng: np.random.Generator) -> dict:
  """A copy of `attrs` with one thing made false: an object's shape, colour or size, the side,
  the relation (inverted), or the two objects' shapes swapped."""
  from pdiff_jax.data import shapes
  out = {**attrs, "objects": [dict(o) for o in attrs["objects"]]}
  objs = out["objects"]
  kinds = ["shape", "color", "size", "where"] + (["swap"] if len(objs) == 2 and
                                                  objs[0]["shape"] != objs[1]["shape"] else [])
  kind = kinds[rng.integers(len(kinds))]
  o = objs[rng.integers(len(objs))]
  if kind == "shape":
    o["shape"] = str(rng.choice([s for s in shapes.SHAPES if s != o["shape"]]))
  elif kind == "color":
    o["color"] = str(rng.choice([c for c in shapes.COLORS if c not in {x["color"] for x in objs}]))
  elif kind == "size":
    o["size"] = "small" if o["size"] == "big" else "big"
  elif kind == "swap":
    objs[0]["shape"], objs[1]["shape"] = objs[1]["shape"], objs[0]["shape"]
  elif len(objs) == 1:
    out["side"] = str(rng.choice([s for s in ("left", "right", "top", "bottom") if s != attrs["side"]]))
  else:
    out["relation"] = shapes.INVERSE[attrs["relation"]]
  return out


def test_every_generated_caption_is_exactly_right_and_every_falsified_one_false():
  """The checker against the generator itself: every phrasing of every image parses and is true;
  the same phrasing with one attribute made false parses and is false (unless the phrasing does
  not mention that attribute, when the words are the same)."""
  from pdiff_jax.data import shapes
  from pdiff_jax.metrics import exact
  rng = np.random.default_rng(3)
  falsified = 0
  for _ in range(400):
    _, attrs = shapes.make_example(rng)
    templates = shapes.ONE if len(attrs["objects"]) == 1 else shapes.TWO
    for t in templates:
      true = shapes.render_caption(t, attrs)
      assert exact.check(true, attrs)["grammatical"] and exact.check(true, attrs)["exactly_right"], (true, attrs)
      false = shapes.render_caption(t, _falsified(attrs, rng))
      got = exact.check(false, attrs)
      assert got["grammatical"] and got["exactly_right"] == (false == true), (false, attrs)
      assert exact.exactly_right(true, attrs) and exact.exactly_right(false, attrs) == (false == true)
      falsified += false != true
  assert falsified > 2000
  # parses' readings are the caller's own (the checker's cache behind them is not)
  first = exact.parses("a red circle")
  first[0]["objects"][0]["color"] = "blue"
  assert exact.parses("a red circle")[0]["objects"][0]["color"] == "red"
