import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import run_pdiff
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


@pytest.mark.slow
def test_demo_fast_end_to_end(tmp_path):
  """Every stage of `pdiff demo --fast` runs and leaves its outputs. Its 25-s CLIP and 200
  denoiser steps are too short for the captions to follow the images (the model and the
  shuffled-features control both score near zero CIDEr, in either order from run to run), so
  what is checked of the learning is that the denoiser's loss falls; the full demo's figures
  (README) show the captions following the images."""
  w = tmp_path / "demo"
  r = run_pdiff("demo", f"--workdir={w}", "--fast", env={"XLA_FLAGS": ""}, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.load(open(w / "demo_summary.json"))
  assert set(summary["variants"]) == {"model", "shuffled_features", "random_candidate"}
  for m in summary["variants"].values():
    assert {"CIDEr", "BLEU-4", "Div-2", "color_acc", "shape_acc"} <= set(m)
  losses = [r["loss"] for r in map(json.loads, open(w / "model" / "metrics.jsonl")) if "loss" in r]
  assert len(losses) >= 2 and losses[-1] < 0.9 * losses[0], losses
  assert 0 < summary["ref_Div-2"] <= 1
  assert os.path.getsize(w / "report.html") > 10_000
  assert os.path.exists(w / "model" / "eval" / "test" / "metrics.json")
  assert "| model |" in r.stdout
  # The trained model is a normal workdir: pdiff caption works on it.
  image = sorted((w / "data" / "images" / "test").iterdir())[0]
  r = run_pdiff("caption", f"--workdir={w / 'model'}", "--num_candidates=2", "--steps=5", str(image),
                env={"XLA_FLAGS": ""})
  assert r.returncode == 0 and r.stdout.startswith(str(image))
