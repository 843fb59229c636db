import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import HIDDEN_HEAVY, run_pdiff
from pdiff_jax.data import shapes


def test_shapes_are_deterministic_and_captions_match_attributes(tmp_path):
  a = shapes.generate(str(tmp_path / "a"), {"train": 6, "test": 3}, seed=5, progress=False)
  b = shapes.generate(str(tmp_path / "b"), {"train": 6, "test": 3}, seed=5, progress=False)
  ja, jb = json.load(open(a)), json.load(open(b))
  assert ja == jb
  for e in ja["images"]:
    pa = tmp_path / "a" / "images" / e["filepath"] / e["filename"]
    pb = tmp_path / "b" / "images" / e["filepath"] / e["filename"]
    assert np.array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(pb)))
    assert Image.open(pa).size == (64, 64) and len(e["sentences"]) == 5
  attrs = json.load(open(tmp_path / "a" / "attributes.json"))
  for e in ja["images"]:
    truth = attrs[str(e["imgid"])]
    captions = [s["raw"] for s in e["sentences"]]
    acc = shapes.attribute_accuracy(captions, [truth] * 5)
    assert acc == {"color_acc": 1.0, "shape_acc": 1.0}
  assert shapes.attribute_accuracy(["a purple thing"], [{"objects": [{"color": "red", "shape": "circle"}]}]) == \
      {"color_acc": 0.0, "shape_acc": 0.0}


def test_the_object_is_where_the_caption_says(tmp_path):
  rng = np.random.default_rng(0)
  for _ in range(50):
    image, attrs = shapes.make_example(rng)
    arr = np.asarray(image).astype(int)
    for o in attrs["objects"]:
      colour = np.array(shapes.COLORS[o["color"]])
      assert np.abs(arr[int(o["y"]), int(o["x"])] - colour).max() <= 25  # object centre has its colour
  assert len(shapes.ONE) >= 12 and len(shapes.TWO) >= 12


@pytest.mark.parametrize("outline_prob,low,high", [(0.0, 0.0, 0.0), (0.5, 0.28, 0.72), (1.0, 0.9, 1.0)])
def test_a_restyled_image_draws_the_same_objects_in_the_same_places(outline_prob, low, high):
  """`shapes.restyle` keeps what the captions say: each object's colour is at its centre, the
  image is another one (background, radius, outline), and the same rng state draws it again;
  about `outline_prob` of the ~75 objects are outlined (36 of 75 with this seed at 0.5, 79 of 79
  at 1)."""
  rng = np.random.default_rng(1)
  outlined = objects = 0
  for _ in range(50):
    image, attrs = shapes.make_example(rng)
    state = rng.bit_generator.state
    styled = np.asarray(shapes.restyle(attrs, rng, outline_prob)).astype(int)
    rng.bit_generator.state = state
    np.testing.assert_array_equal(np.asarray(shapes.restyle(attrs, rng, outline_prob)), styled)
    assert styled.shape == (64, 64, 3) and not np.array_equal(styled, np.asarray(image))
    for o in attrs["objects"]:
      colour = np.array(shapes.COLORS[o["color"]])
      assert np.abs(styled[int(o["y"]), int(o["x"])] - colour).max() <= 25
      # outlined: somewhere on the row through the centre a much darker shade of the colour
      row = styled[int(o["y"]), max(0, int(o["x"]) - 16):int(o["x"]) + 17]
      outlined += bool((np.abs(row - colour * 0.45).max(-1) < 0.27 * colour.max()).any())
      objects += 1
  assert low <= outlined / objects <= high


def test_restyled_backgrounds_are_light_and_some_are_dead_leaves():
  """Every restyled background is light (so that every object colour stands out), and about a
  fifth are dead leaves: flat discs, so a few dozen colours each covering a patch, where the
  other kinds have pixel noise on one base colour, with at most a few flat lines."""
  rng = np.random.default_rng(0)
  leaves = 0
  for _ in range(100):
    bg = np.asarray(shapes._restyled_background(rng))
    assert bg.shape == (64, 64, 3) and bg.mean() >= 160 and np.percentile(bg, 1) >= 120
    colours, counts = np.unique(bg.reshape(-1, 3), axis=0, return_counts=True)
    leaves += int((counts >= 12).sum() >= 15)
  assert 10 <= leaves <= 32


def test_random_grayscale_gives_pil_luminance(clip_dir):
  from pdiff_jax import clip as clip_lib
  from pdiff_jax.clip_pretrain import random_grayscale
  transform = clip_lib.Clip.load(clip_dir).transform
  images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8)) for i in range(6)]
  pixels = np.stack([transform(im) for im in images])
  assert random_grayscale(pixels, 0.0, transform, np.random.default_rng(0)) is pixels
  out = random_grayscale(pixels, 1.0, transform, np.random.default_rng(0))
  expected = np.stack([transform(im.convert("L").convert("RGB")) for im in images])
  # PIL rounds luminance to 8 bits: half a grey level, over the smallest CLIP std.
  np.testing.assert_allclose(out, expected, atol=0.6 / 255 / min(transform.std) + 1e-6)
  half = random_grayscale(pixels, 0.5, transform, np.random.default_rng(1))
  grey = [np.allclose(h, e, atol=0.01) for h, e in zip(half, expected)]
  kept = [np.array_equal(h, p) for h, p in zip(half, pixels)]
  assert all(g != k for g, k in zip(grey, kept)) and 0 < sum(grey) < len(images)


def test_attribute_labels_and_loss_of_the_small_clip_head():
  """The labels a shapes image gives the attribute head, by hand; and with a zero head every
  applicable group's cross-entropy is log(its number of classes)."""
  import jax.numpy as jnp
  from pdiff_jax import clip_pretrain
  one = {"objects": [{"color": "blue", "shape": "diamond", "size": "big", "x": 10, "y": 30}],
         "side": "left"}
  y = clip_pretrain.attribute_labels(one)
  colours = list(shapes.COLORS)
  b = colours.index("blue")
  assert (y[0], y[1], y[2]) == (0, 0, -1)  # one object, on the left, no relation
  assert y[3 + b] == 1 + shapes.SHAPES.index("diamond") and y[9 + b] == 2  # 1 + index of "big"
  assert all(y[3 + c] == 0 and y[9 + c] == 0 for c in range(6) if c != b)  # no such colour
  # Two objects: the relation is that of the object whose colour comes first in COLORS.
  red = {"color": "red", "shape": "circle", "size": "small", "x": 50, "y": 30}
  green = {"color": "green", "shape": "square", "size": "big", "x": 12, "y": 30}
  for objs in ([red, green], [green, red]):
    y2 = clip_pretrain.attribute_labels(shapes.where(objs))
    assert y2[0] == 1 and y2[1] == -1
    assert list(shapes.INVERSE)[y2[2]] == "right of"  # red (first in COLORS) is right of green
  labels = jnp.asarray(np.stack([y, y2]))
  k = sum(n for _, n in clip_pretrain._label_layout())
  emb = jnp.ones((2, 8)) / np.sqrt(8)
  loss = float(clip_pretrain._attribute_loss(jnp.zeros((8, k)), emb, labels))
  # count (2 classes), side (4, one image), relation (4, one), shape (5), size (3)
  assert loss == pytest.approx(np.log(2) + np.log(4) + np.log(4) + np.log(5) + np.log(3), rel=1e-6)
  # with presence: one more binary cross-entropy, log 2 at zero logits
  ncol = len(shapes.COLORS)
  loss = float(clip_pretrain._attribute_loss(jnp.zeros((8, k + ncol)), emb, labels, presence=True))
  assert loss == pytest.approx(np.log(2) + np.log(4) + np.log(4) + np.log(5) + np.log(3) + np.log(2), rel=1e-6)


def test_attribute_loss_is_the_mean_cross_entropy_of_each_group():
  """Against numpy, slot by slot: each group's cross-entropy averaged over the labels that apply."""
  import jax.numpy as jnp
  from pdiff_jax import clip_pretrain
  rng = np.random.default_rng(0)
  attrs = [shapes.make_example(rng)[1] for _ in range(16)]
  labels = np.stack([clip_pretrain.attribute_labels(a) for a in attrs])
  layout = clip_pretrain._label_layout()
  head = rng.normal(size=(8, sum(k for _, k in layout))) / 4
  emb = rng.normal(size=(16, 8))
  logits = 16.0 * emb @ head
  bounds = np.cumsum([0] + [k for _, k in layout])
  ncol = len(shapes.COLORS)
  means = []  # count, side, relation, shape, size
  for group in ([0], [1], [2], range(3, 3 + ncol), range(3 + ncol, 3 + 2 * ncol)):
    ces = []
    for t in group:
      part = logits[:, bounds[t]:bounds[t + 1]]
      for b in range(16):
        if labels[b, t] >= (1 if t >= 3 else 0):
          ces.append(np.log(np.exp(part[b]).sum()) - part[b, labels[b, t]])
    means.append(np.mean(ces) if ces else 0.0)
  expected = sum(means)
  got = clip_pretrain._attribute_loss(jnp.asarray(head, jnp.float32), jnp.asarray(emb, jnp.float32),
                                      jnp.asarray(labels))
  assert float(got) == pytest.approx(expected, rel=1e-4)
  # shape_weight scales the shape group's term alone
  got = clip_pretrain._attribute_loss(jnp.asarray(head, jnp.float32), jnp.asarray(emb, jnp.float32),
                                      jnp.asarray(labels), shape_weight=2.5)
  assert means[3] > 0 and float(got) == pytest.approx(expected + 1.5 * means[3], rel=1e-4)
  # presence: one logit per colour after the groups, "an object of this colour is there"
  extra = rng.normal(size=(8, ncol)) / 4
  z = 16.0 * emb @ extra
  there = np.array([[any(o["color"] == c for o in a["objects"]) for c in shapes.COLORS]
                    for a in attrs])
  bce = np.mean(np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0) - z * there)
  got = clip_pretrain._attribute_loss(jnp.asarray(np.concatenate([head, extra], 1), jnp.float32),
                                      jnp.asarray(emb, jnp.float32), jnp.asarray(labels), presence=True)
  assert float(got) == pytest.approx(expected + bce, rel=1e-4)


def test_feature_probe_reads_what_the_features_hold():
  """Features that are the attribute head's labels, one-hot, give every probe 100%; the same with
  the shapes scrambled keep all but the shape probes, which fall to about chance (25%)."""
  from pdiff_jax import clip_pretrain
  rng = np.random.default_rng(0)
  attrs = [shapes.make_example(rng)[1] for _ in range(700)]
  labels = np.stack([clip_pretrain.attribute_labels(a) for a in attrs])
  onehot = lambda y: np.concatenate([np.eye(y[:, j].max() + 2)[y[:, j] + 1] for j in range(y.shape[1])], 1)
  ncol = len(shapes.COLORS)
  probe = lambda f: clip_pretrain.feature_probe(f[:500], attrs[:500], f[500:], attrs[500:])
  full = probe(onehot(labels) + 0.01 * rng.standard_normal((700, onehot(labels).shape[1])))
  assert full == pytest.approx({k: 1.0 for k in ("count", "side", "relation", "shape", "size", "shape_of_two")})
  scrambled = labels.copy()
  scrambled[:, 3:3 + ncol] = np.where(labels[:, 3:3 + ncol] > 0, rng.integers(1, 5, (700, ncol)), 0)
  blind = probe(onehot(scrambled) + 0.01 * rng.standard_normal((700, onehot(labels).shape[1])))
  assert blind["count"] == blind["side"] == blind["relation"] == blind["size"] == 1.0
  assert blind["shape"] < 0.4 and blind["shape_of_two"] < 0.4


def test_caption_labels_are_the_image_labels_the_caption_states():
  """A true caption's labels agree with its image's wherever the caption states one, and state
  every colour's shape (class 0: no object of that colour); sizes only where it names them."""
  from pdiff_jax import clip_pretrain
  ncol = len(shapes.COLORS)
  rng = np.random.default_rng(3)
  for _ in range(40):
    _, attrs = shapes.make_example(rng)
    truth = clip_pretrain.attribute_labels(attrs)
    for caption in shapes.captions_for(attrs, 5, rng):
      y = clip_pretrain.caption_labels(caption)
      np.testing.assert_array_equal(y[3:3 + ncol], truth[3:3 + ncol])  # shape per colour, 0 = absent
      assert y[0] == truth[0]
      for t in (1, 2):  # side, relation: stated or -1
        assert y[t] in (-1, truth[t])
      assert (y[1] >= 0) == any(w in caption.split() for w in shapes.SIDES if len(attrs["objects"]) == 1)
      says_size = any(w in caption.split() for w in shapes.SIZES)
      sizes = y[3 + ncol:]
      assert np.all((sizes == 0) | (sizes == truth[3 + ncol:])) and (sizes.any() == says_size)
  y = clip_pretrain.caption_labels("a blue square below a red triangle")
  colours = list(shapes.COLORS)
  assert y[0] == 1 and y[1] == -1 and list(shapes.INVERSE)[y[2]] == "above"  # red (first) is above blue
  assert y[3 + colours.index("red")] == 1 + shapes.SHAPES.index("triangle")
  assert y[3 + colours.index("blue")] == 1 + shapes.SHAPES.index("square")
  with pytest.raises(ValueError, match="not a caption"):
    clip_pretrain.caption_labels("a square red blue")


def test_false_twins_are_sentences_of_the_grammar_and_false_of_the_image():
  from pdiff_jax import clip_pretrain
  from pdiff_jax.metrics import exact
  rng = np.random.default_rng(4)
  for _ in range(30):
    _, attrs = shapes.make_example(rng)
    for caption in shapes.captions_for(attrs, 3, rng):
      twins = clip_pretrain.false_twins(caption, attrs)
      assert {"color", "shape"} <= set(twins) <= {"color", "shape", "size", "where", "swap"}
      for kind, captions in twins.items():
        for c in captions:
          check = exact.check(c, attrs)
          assert check["grammatical"] and not check["exactly_right"], (caption, kind, c)
          assert c != caption
  red = {"color": "red", "shape": "circle", "size": "small", "x": 12, "y": 30}
  blue = {"color": "blue", "shape": "square", "size": "big", "x": 50, "y": 30}
  twins = clip_pretrain.false_twins("a red circle left of a blue square", shapes.where([red, blue]))
  assert twins["swap"] == ["a red square left of a blue circle"]
  assert twins["where"] == ["a red circle right of a blue square", "a red circle above a blue square",
                            "a red circle below a blue square"]
  assert "a red square left of a blue square" in twins["shape"] and len(twins["shape"]) == 6
  assert "size" not in twins  # the phrasing names no size


def test_binding_options_need_the_shapes_truth(tmp_path):
  from pdiff_jax import clip_pretrain
  for options in ({"text_head": True}, {"hard_negatives": 2}, {"presence": True}, {"restyle_prob": 0.5}):
    with pytest.raises(ValueError, match="need `attributes`"):
      clip_pretrain.train_small_clip(str(tmp_path / "clip"), [], [], [], steps=1, **options)
  with pytest.raises(ValueError, match="steps_per_dispatch"):
    clip_pretrain.train_small_clip(str(tmp_path / "clip"), [], [], [], steps=1, steps_per_dispatch=0)
  assert not (tmp_path / "clip").exists()


TINY_CLIP = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2,
             "projection_dim": 16, "max_text_len": 16}


def _tiny_shapes_set(tmp_path, count=12):
  rng = np.random.default_rng(0)
  paths, captions, attrs = [], [], []
  for i in range(count):
    image, a = shapes.make_example(rng)
    paths.append(str(tmp_path / f"{i}.png"))
    image.save(paths[-1])
    captions.append(shapes.captions_for(a, 2, rng))
    attrs.append(a)
  return paths, captions, attrs


def test_train_small_clip_from_a_saved_clip_k_steps_per_dispatch_equal_single_steps(tmp_path):
  """`init_from` keeps the saved CLIP's architecture and tokenizer and starts from its weights; a
  few steps with every option (head on both towers, presence, twins, restyled images) move them,
  the result loads as a plain CLIP, and four steps in one dispatch (a scan), data-parallel over
  the 8 devices, give the weights of four dispatches of one step on one device. Each compiles its
  step once (the state is placed before the first step, so the second finds the same program)."""
  import logging
  import jax
  from pdiff_jax import clip as clip_lib
  from pdiff_jax import clip_pretrain
  paths, captions, attrs = _tiny_shapes_set(tmp_path)
  init = clip_lib.save_small_clip(tmp_path / "init", words=shapes.vocabulary(), **TINY_CLIP)
  compiled = []
  handler = logging.Handler()
  handler.emit = lambda record: compiled.append(record.getMessage().startswith("Compiling jit(steps_of)"))
  logging.getLogger("jax").addHandler(handler)
  out = {}
  recipe = dict(steps=4, batch_size=8, attributes=attrs, text_head=True, hard_negatives=2,
                presence=True, restyle_prob=0.5, init_from=init, width=999, progress=False)
  try:
    for k in (1, 4):
      with jax.log_compiles(True):
        out[k] = clip_pretrain.train_small_clip(
            str(tmp_path / f"k{k}"), paths, captions, shapes.vocabulary(), steps_per_dispatch=k,
            devices=jax.devices()[:1] if k == 1 else None, **recipe)
      assert sum(compiled) == 1, f"steps_per_dispatch={k}: the step compiled {sum(compiled)} times"
      compiled.clear()
  finally:
    logging.getLogger("jax").removeHandler(handler)
  before, after = clip_lib.Clip.load(init), clip_lib.Clip.load(out[1])
  assert json.load(open(os.path.join(out[1], "config.json"))) == json.load(open(os.path.join(init, "config.json")))
  caption = "a red circle left of a blue square"
  np.testing.assert_array_equal(after.tokenize([caption])[0], before.tokenize([caption])[0])
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                 before.params, after.params)
  assert max(jax.tree_util.tree_leaves(moved)) > 0
  assert after.encode_images(np.stack([after.transform(Image.open(p)) for p in paths[:2]])).shape == (2, 16)
  # The 8 devices sum the gradients in another order, and Adam turns a near-zero gradient's
  # rounding into a step of its own (up to 6e-6 here); Adam moves a weight by up to ~lr = 1e-3 a
  # step, so training on other rows would show.
  for a, b in zip(jax.tree_util.tree_leaves(after.params),
                  jax.tree_util.tree_leaves(clip_lib.Clip.load(out[4]).params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-5)

  # Asked again, the same recipe on the same data (from elsewhere on disk) reuses the CLIP; another
  # recipe, other data, or a CLIP with no record of its recipe stops with the directory and the
  # differences named, and leaves the CLIP as it was.
  weights = (tmp_path / "k1" / "flax_model.msgpack").read_bytes()
  moved_paths = [str(tmp_path / "elsewhere" / os.path.basename(p)) for p in paths]
  again = lambda **change: clip_pretrain.train_small_clip(
      out[1], change.pop("paths", moved_paths), change.pop("captions", captions),
      shapes.vocabulary(), **{**recipe, **change})
  assert again() == out[1]
  with pytest.raises(clip_lib.ClipLoadError, match=r"k1 holds a small CLIP trained with lr=0.001, "
                     r"shape_weight=1.0; this run asks for lr=0.002, shape_weight=2.0: delete it"):
    again(shape_weight=2.0, lr=2e-3)
  with pytest.raises(clip_lib.ClipLoadError, match=r"trained with data_sha256="):
    again(captions=captions[::-1])
  os.remove(tmp_path / "k1" / clip_pretrain.RECIPE)
  with pytest.raises(clip_lib.ClipLoadError, match=r"k1 holds a small CLIP with no small_clip_recipe.json"):
    again()
  assert (tmp_path / "k1" / "flax_model.msgpack").read_bytes() == weights


def test_info_nce_with_hard_negative_texts():
  """Texts past the first B are extra wrong answers for every image and no image's caption: the
  image-to-text term runs over all T texts, the text-to-image term over the B true ones."""
  import jax.numpy as jnp
  from types import SimpleNamespace
  from pdiff_jax import clip_pretrain
  logits = np.random.default_rng(0).normal(size=(3, 6)) * 3
  lse = lambda a, axis: np.log(np.exp(a).sum(axis))
  i2t = np.mean(lse(logits, 1) - logits[np.arange(3), np.arange(3)])
  t2i = np.mean(lse(logits[:, :3], 0) - logits[np.arange(3), np.arange(3)])
  got = clip_pretrain._info_nce(SimpleNamespace(logits_per_image=jnp.asarray(logits)))
  assert float(got) == pytest.approx(0.5 * (i2t + t2i), rel=1e-5)
  square = clip_pretrain._info_nce(SimpleNamespace(logits_per_image=jnp.asarray(logits[:, :3])))
  assert float(square) == pytest.approx(0.5 * (np.mean(lse(logits[:, :3], 1) - np.diag(logits[:, :3])) + t2i), rel=1e-5)


LIGHT_INSTALL = "tensorflow,torch,tensorflow_datasets,diffusers"  # what the demo's light install lacks


@pytest.mark.slow
def test_demo_fast_end_to_end_twice_gives_the_same_figures(tmp_path):
  """Two `pdiff demo --fast` in two fresh workdirs, one after the other, with tensorflow and torch
  hidden (the demo's light install has neither): every stage runs and leaves its outputs, and the
  two demo_summary.json are byte-identical but for the timing keys (the demo does fixed work). The
  second run reads the executables the first wrote to their compilation cache, so the figures are
  also checked not to depend on whether a program was compiled or read back.

  Its CLIP and denoiser are too briefly trained for the captions to follow the images (the model
  and the shuffled-features control both score near zero, in either order from one code change to
  the next), so what is checked of the learning is that the denoiser's loss falls; the full
  demo's figures (README) show the captions following the images."""
  import sys
  from conftest import ROOT
  from pdiff_jax import demo
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=HIDDEN_HEAVY, PDIFF_TESTS_HIDE=LIGHT_INSTALL,
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "compilation_cache"))
  out, cached = {}, {}
  for name in ("a", "b"):
    p = subprocess.run([sys.executable, "-m", "pdiff_jax", "demo", f"--workdir={tmp_path / name}", "--fast"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    out[name] = p.stdout, p.stderr
    cached[name] = set(os.listdir(tmp_path / "compilation_cache"))
  assert cached["a"] and cached["b"] == cached["a"]  # the second run compiled nothing: it read them all
  w = tmp_path / "a"
  summary = json.load(open(w / "demo_summary.json"))
  assert set(summary["variants"]) == {"model", "shuffled_features", "random_candidate"}
  for m in summary["variants"].values():
    assert {"CIDEr", "BLEU-4", "Div-2", "color_acc", "shape_acc", "grammatical", "exactly_right",
            "cand_grammatical", "cand_exactly_right"} <= set(m)
    assert all(0 <= m[k] <= 1 for k in ("grammatical", "exactly_right", "cand_grammatical", "cand_exactly_right"))
  assert len(summary["stage_seconds"]) == 6 and all(v >= 0 for v in summary["stage_seconds"].values())
  losses = [r["loss"] for r in map(json.loads, open(w / "model" / "metrics.jsonl")) if "loss" in r]
  assert len(losses) >= 2 and losses[-1] < 0.9 * losses[0], losses
  assert 0 < summary["ref_Div-2"] <= 1
  page = open(w / "report.html").read()
  assert len(page) > 10_000 and page.index("<h2>Summary</h2>") < page.index("<h2>Captions")
  summary_table = page[page.index("<h2>Summary</h2>"):page.index("<h2>Captions")]
  assert all(f"<td>{v}</td>" in summary_table for v in ("model", "shuffled_features", "random_candidate"))
  assert "exactly right" in summary_table and page.index("<h2>Captions") < page.index("<h2>Metrics")
  eval_metrics = json.load(open(w / "model" / "eval" / "test" / "metrics.json"))
  assert {"grammatical", "exactly_right", "cand_grammatical", "cand_exactly_right"} <= set(eval_metrics)
  for e in json.load(open(w / "model" / "eval" / "test" / "captions.json")):
    assert all({"grammatical", "exactly_right"} <= set(c) for c in e["candidates"])
  assert "| model |" in out["a"][0]

  strip = lambda path: {k: v for k, v in json.load(open(path)).items() if k not in demo.TIMING_KEYS}
  a, b = strip(tmp_path / "a" / "demo_summary.json"), strip(tmp_path / "b" / "demo_summary.json")
  assert json.dumps(a, indent=1) == json.dumps(b, indent=1)
  assert set(json.load(open(w / "demo_summary.json"))) - set(a) == set(demo.TIMING_KEYS)
  # one CPU split into the demo's fixed number of devices, whatever the machine has
  machine = json.load(open(w / "demo_summary.json"))["machine"]
  assert machine["devices"] == f"{demo.CPU_DEVICES} x cpu"
  # under the XLA flags that keep the figures the same on other kinds of CPU, which it records
  assert all(f"--{k}={v}" in machine["xla_flags"].split() for k, v in demo.CONSISTENT_XLA_FLAGS.items())
  # and the times come with the CPU's speed they ran at (it varies within a day here)
  assert len(machine["matmul_tflops_before_after"]) == 2 and min(machine["matmul_tflops_before_after"]) > 0
  # and with the kind of CPU (the figures can differ on another kind), as lscpu names it
  lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if shutil.which("lscpu") else ""
  named = [line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name:")]
  assert machine["cpu"] and (not named or machine["cpu"] == named[0])
  assert f"on {machine['cpu']} " in out["a"][0]

  # The trained model is a normal workdir: pdiff caption works on it.
  image = sorted((w / "data" / "images" / "test").iterdir())[0]
  r = run_pdiff("caption", f"--workdir={w / 'model'}", "--num_candidates=2", "--steps=5", str(image),
                env={"XLA_FLAGS": "", "PYTHONPATH": HIDDEN_HEAVY, "PDIFF_TESTS_HIDE": LIGHT_INSTALL})
  assert r.returncode == 0 and r.stdout.startswith(str(image))
  # ... and so does the other renderer's test set (its figures for the full demo: README).
  import other_renderer
  got = other_renderer.score_workdir(str(w / "model"), count=6, num_candidates=2, steps=5)
  assert got["num_images"] == 6 and 0 <= got["exactly_right"] <= got["grammatical"] <= 1


def test_demo_device_count_yields_to_the_environment_and_to_a_started_jax(monkeypatch, caplog):
  """`use_cpu_devices` keeps a count the environment set (JAX_NUM_CPU_DEVICES here; the fast
  demo's test sees the default 2), and where JAX already runs it says that its count stays."""
  import subprocess
  import sys
  from conftest import ROOT
  from pdiff_jax import demo
  code = "from pdiff_jax import demo; demo.use_cpu_devices(); import jax; print(jax.device_count())"
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                     env={**os.environ, "XLA_FLAGS": "", "JAX_NUM_CPU_DEVICES": "3"})
  assert r.returncode == 0 and r.stdout.split()[-1] == "3", r.stderr[-2000:]
  import jax
  jax.devices()  # this process's JAX has started (8 devices, tests/conftest.py)
  monkeypatch.setenv("XLA_FLAGS", "")
  with caplog.at_level("WARNING", logger="pdiff_jax.demo"):
    demo.use_cpu_devices()
  assert jax.device_count() == 8 and "runs on its 8 CPU device(s), not 2" in caplog.text


def test_the_other_renderer_draws_what_its_attributes_say():
  """Its images are labelled like the training renderer's (object centres have their colour; a
  relation is clear along one axis) but look otherwise: outlines, textured backgrounds."""
  import other_renderer
  from pdiff_jax.metrics import exact
  images, attrs = other_renderer.draw_set(60, seed=1)
  rng = np.random.default_rng(1)
  for image, a in zip(images, attrs):
    arr = np.asarray(image).astype(int)
    assert arr.shape == (shapes.SIZE, shapes.SIZE, 3)
    for o in a["objects"]:
      assert np.abs(arr[int(o["y"]), int(o["x"])] - np.array(shapes.COLORS[o["color"]])).max() <= 20
    if len(a["objects"]) == 2:
      p, q = a["objects"]
      dx, dy = abs(p["x"] - q["x"]), abs(p["y"] - q["y"])
      assert max(dx, dy) >= 22 and min(dx, dy) <= 8
    for c in shapes.captions_for(a, 3, rng):
      assert exact.check(c, a)["exactly_right"]
  # Not the training renderer's backgrounds: theirs are a smooth gradient under pixel noise, so
  # once the noise is blurred away they have hardly any edges but the objects'.
  def roughness(im):
    from PIL import ImageFilter
    arr = np.asarray(im.filter(ImageFilter.BoxBlur(2))).astype(float)
    return np.abs(np.diff(arr, axis=1)).mean() + np.abs(np.diff(arr, axis=0)).mean()
  train = [shapes.make_example(rng)[0] for _ in range(60)]
  assert np.median([roughness(i) for i in images]) > 1.4 * np.median([roughness(i) for i in train])


def test_the_demo_reuses_features_only_of_the_views_its_config_asks_for(tmp_path):
  """Re-running resumes a stage whose output is there; features of other views (a demo_plus
  run in the demo's workdir, say) stop the run with the key named, not after training."""
  from pdiff_jax import demo
  from conftest import load_config
  config = load_config("demo", **{"data.feature_dir": str(tmp_path / "features")})
  assert not demo._features_done(config)
  os.makedirs(tmp_path / "features")
  manifest = tmp_path / "features" / "manifest.json"
  manifest.write_text(json.dumps({"format_version": 1, "clip_model": "c"}))
  assert demo._features_done(config)
  with config.unlocked():
    config.clip.views = 9
  with pytest.raises(demo.config_lib.ConfigError, match="^config.clip.views: is 9, but .* 1 view"):
    demo._features_done(config)
  manifest.write_text(json.dumps({"format_version": 1, "clip_model": "c",
                                  "clip_encoding": {"views": 9, "view_shift": 1}}))
  assert demo._features_done(config)


_ISA_RUN = """
import hashlib, json, sys
from pdiff_jax import demo
demo.use_cpu_devices()
demo.use_consistent_numerics()
from pdiff_jax import clip_pretrain
from pdiff_jax.data import shapes
paths, captions, attrs = json.load(open(sys.argv[1]))
recipe = {**demo.CLIP_RECIPE, "steps": 2, "warmup_steps": 1, "progress": False}
out = clip_pretrain.train_small_clip(sys.argv[2], paths, captions, shapes.vocabulary(), attributes=attrs, **recipe)
print(hashlib.sha256(open(out + "/flax_model.msgpack", "rb").read()).hexdigest())
"""


@pytest.mark.skipif("avx512f" not in (open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""),
                    reason="needs an AVX-512 CPU, to run XLA as on one and, capped at AVX2, as on another")
def test_the_demo_numerics_are_the_same_on_a_cpu_without_avx512(tmp_path):
  """The small CLIP's first steps, with the demo's recipe and sizes, give the same weights with
  XLA capped at AVX2 (as on a CPU without AVX-512) as on this AVX-512 CPU, under the
  XLA flags `pdiff demo` adds (`demo.CONSISTENT_XLA_FLAGS`); under XLA's defaults they do not,
  which is what the flags are for."""
  import sys
  from conftest import ROOT
  paths, captions, attrs = _tiny_shapes_set(tmp_path, count=64)
  json.dump([paths, captions, attrs], open(tmp_path / "set.json", "w"))
  defaults = "--xla_backend_optimization_level=3 --xla_cpu_enable_platform_dependent_math=true"
  weights = {}
  for name, flags in [("demo", ""), ("demo_avx2", "--xla_cpu_max_isa=AVX2"),
                      ("xla", defaults), ("xla_avx2", defaults + " --xla_cpu_max_isa=AVX2")]:
    r = subprocess.run([sys.executable, "-c", _ISA_RUN, str(tmp_path / "set.json"), str(tmp_path / name)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "XLA_FLAGS": flags})
    assert r.returncode == 0, r.stderr[-3000:]
    weights[name] = r.stdout.split()[-1]
  assert weights["demo"] == weights["demo_avx2"]
  assert weights["xla"] != weights["xla_avx2"]  # the test can tell
  assert weights["demo"] != weights["xla"]


def test_the_demo_numerics_flags_yield_to_the_environment_and_to_a_started_jax(monkeypatch, caplog):
  """`use_consistent_numerics` adds none of its flags that XLA_FLAGS sets, and where JAX already
  runs (XLA has read its flags) it adds none and says which the demo runs without."""
  import jax
  from pdiff_jax import demo
  jax.devices()  # this process's JAX has started (tests/conftest.py)
  given = "--xla_backend_optimization_level=3 --xla_cpu_enable_platform_dependent_math=true"
  monkeypatch.setenv("XLA_FLAGS", given)
  assert demo.use_consistent_numerics() == [] and os.environ["XLA_FLAGS"] == given
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=1")
  with caplog.at_level("WARNING", logger="pdiff_jax.demo"):
    assert demo.use_consistent_numerics() == []
  assert os.environ["XLA_FLAGS"] == "--xla_backend_optimization_level=1"
  assert "without --xla_cpu_enable_platform_dependent_math=false" in caplog.text
