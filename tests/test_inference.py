"""Captioner and `pdiff caption` on a model trained by configs/tiny.py."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import run_pdiff, xla_flags
from pdiff_jax import clip as clip_lib
from pdiff_jax.checkpoint import CheckpointError
from pdiff_jax.inference import Captioner, load_bundle, to_image
from pdiff_jax.model import padded_vocab

# One xdist worker runs every test on the session's trained workdir, so it is built once.
pytestmark = pytest.mark.xdist_group("trained_workdir")


@pytest.fixture(scope="module")
def captioner(trained_workdir):
  return Captioner.from_workdir(trained_workdir[0])


@pytest.fixture(scope="module")
def image_paths(trained_workdir):
  root = os.path.join(trained_workdir[1], "images")
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)[:3]


def test_any_number_of_images_compiles_the_sampler_once(trained_workdir, image_paths):
  """1, 3 and 5 images go through one compiled sampler (every call is padded to exactly
  sampler.batch_size images), one compiled image tower and one text tower."""
  captioner = Captioner.from_workdir(trained_workdir[0])
  images = [Image.open(p) for p in image_paths] * 2
  for count in (1, 3, 5):
    assert len(captioner.caption(images[:count], num_candidates=3, steps=4, seed=0)) == count
  assert captioner.sample_fn(4, captioner.bundle.config.sampler.eta)._cache_size() == 1
  assert captioner.clip._images._cache_size() == 1 and captioner.rerank_clip._texts._cache_size() == 1


def test_bundle_has_ema_params_vocab_and_no_optimizer(trained_workdir):
  bundle = load_bundle(trained_workdir[0])
  assert bundle.step == 100 and set(bundle.params) == {"params"}
  assert bundle.params["params"]["word_embedding"].shape[0] == padded_vocab(len(bundle.vocab))
  older = load_bundle(trained_workdir[0], step=50)
  assert older.step == 50
  assert not np.array_equal(np.asarray(older.params["params"]["head_bias"]),
                            np.asarray(bundle.params["params"]["head_bias"]))


def test_caption_structure_reproducibility_and_diversity(captioner, image_paths):
  images = [image_paths[0], Image.open(image_paths[1]), np.asarray(Image.open(image_paths[2]).convert("RGB"))]
  out = captioner.caption(images, num_candidates=5, steps=10, seed=1)
  assert len(out) == 3
  for r in out:
    scores = [c["score"] for c in r["candidates"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert r["caption"] == r["candidates"][0]["caption"]
    for c in r["candidates"]:
      assert "<pad>" not in c["caption"].split()
  assert captioner.caption(images, num_candidates=5, steps=10, seed=1) == out
  other = captioner.caption(images, num_candidates=5, steps=10, seed=2)
  assert [c["caption"] for c in other[0]["candidates"]] != [c["caption"] for c in out[0]["candidates"]]
  assert len({c["caption"] for r in out for c in r["candidates"]}) > 1  # diverse candidates
  # Batching does not change the captions (scores only to float precision).
  single = captioner.caption(images, num_candidates=5, steps=10, seed=1, batch_size=1)
  for a, b in zip(single, out):
    assert [c["caption"] for c in a["candidates"]] == [c["caption"] for c in b["candidates"]]
    np.testing.assert_allclose([c["score"] for c in a["candidates"]],
                               [c["score"] for c in b["candidates"]], rtol=1e-4, atol=1e-6)
  one = captioner.caption(images[:1], num_candidates=1, steps=10)
  assert one[0]["candidates"][0]["score"] is None
  # The solver by name (CONTRACT: `Captioner.caption(..., solver=)`): its own compiled sampler,
  # and DPM-Solver++ is as reproducible as DDIM.
  dpm = captioner.caption(images[:1], num_candidates=3, steps=5, seed=1, solver="dpmpp2m")
  assert dpm == captioner.caption(images[:1], num_candidates=3, steps=5, seed=1, solver="dpmpp2m")
  assert {key[4] for key in captioner._samplers} == {"ddim", "dpmpp2m"}  # (steps, eta, mode, clamp, solver, ...)


def test_rerank_order_equals_independent_cosine(captioner, clip_dir, image_paths):
  from transformers import CLIPProcessor, FlaxCLIPModel
  out = captioner.caption(image_paths[:2], num_candidates=4, steps=8, seed=3)
  model = FlaxCLIPModel.from_pretrained(clip_dir)
  processor = CLIPProcessor.from_pretrained(clip_dir)
  for path, r in zip(image_paths, out):
    texts = [c["caption"] for c in r["candidates"]]
    enc = processor(text=texts, images=Image.open(path).convert("RGB"), return_tensors="np",
                    padding="max_length", truncation=True)
    img = np.asarray(model.get_image_features(pixel_values=enc["pixel_values"]))
    txt = np.asarray(model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
    cos = (txt / np.linalg.norm(txt, axis=-1, keepdims=True)) @ (img[0] / np.linalg.norm(img[0]))
    np.testing.assert_allclose([c["score"] for c in r["candidates"]], cos, rtol=1e-4, atol=1e-5)
    assert list(np.argsort(-cos, kind="stable")) == list(range(len(texts)))
    # The temperature of select="posterior": transformers' logits are it times the cosines.
    logits = np.asarray(model(**enc).logits_per_image)[0]
    np.testing.assert_allclose(logits, captioner.rerank_clip.logit_scale * cos, rtol=1e-4, atol=1e-5)


def test_select_rules_against_their_definitions():
  """`rank_candidates`' vote and posterior against their definitions written out: the most
  frequent caption (ties by the highest cosine, then the first drawn), and the caption of most
  softmax mass, summed over its copies (scipy), with the cosines of copies equal as CLIP gives
  them. The original's order ("clip") stays a plain sort by cosine, without votes."""
  import collections
  from scipy.special import softmax
  from pdiff_jax.inference import rank_candidates
  from pdiff_jax.report import in_choice_order
  # By hand: "b" is drawn 3 times at a lower cosine than "a".
  caps = [["a", "b", "b", "c", "b"]]
  cos = np.array([[0.9, 0.5, 0.5, 0.8, 0.5]])
  assert rank_candidates(caps, cos, 5)[0]["caption"] == "a"
  assert "votes" not in rank_candidates(caps, cos, 5)[0]["candidates"][0]
  voted = rank_candidates(caps, cos, 5, "vote")[0]
  assert voted["caption"] == "b"
  assert [c["caption"] for c in in_choice_order(voted["candidates"])] == ["b", "b", "b", "a", "c"]
  # CONTRACT.md: the candidates are listed by cosine, best first, whatever chose
  assert [c["caption"] for c in voted["candidates"]] == ["a", "c", "b", "b", "b"]
  assert [(c["votes"], c["rank"]) for c in voted["candidates"]] == [(1, 4), (1, 5), (3, 1), (3, 2), (3, 3)]
  # 3 e^0.5 > e^0.9 at a temperature of 1; at 100 the cosine gap outweighs the copies.
  assert rank_candidates(caps, cos, 5, "posterior", logit_scale=1.0)[0]["caption"] == "b"
  assert rank_candidates(caps, cos, 5, "posterior", logit_scale=100.0)[0]["caption"] == "a"
  assert rank_candidates(caps, cos, 2, "vote")[0]["caption"] == "a"  # votes among the first k
  rng = np.random.default_rng(0)
  for _ in range(300):
    n, pool = int(rng.integers(2, 9)), [f"caption {i}" for i in range(int(rng.integers(1, 6)))]
    cands = [pool[i] for i in rng.integers(len(pool), size=n)]
    value = {c: float(rng.choice([0.1, 0.2, 0.3])) for c in pool}  # ties between captions too
    scores = np.array([[value[c] for c in cands]], np.float32)
    scale = float(rng.choice([1.0, 10.0, 23.3]))
    count = collections.Counter(cands)
    vote = max(range(n), key=lambda j: (count[cands[j]], scores[0, j], -j))
    p = softmax(scale * scores[0].astype(np.float64))
    mass = collections.defaultdict(float)
    for c, pj in zip(cands, p):
      mass[c] += pj
    post = max(range(n), key=lambda j: (round(mass[cands[j]], 12), -j))
    assert rank_candidates([cands], scores, n, "vote")[0]["caption"] == cands[vote]
    ranked = rank_candidates([cands], scores, n, "posterior", logit_scale=scale)[0]
    assert ranked["caption"] == cands[post]
    assert sorted(c["caption"] for c in ranked["candidates"]) == sorted(cands)  # all kept
    masses = [mass[c["caption"]] for c in in_choice_order(ranked["candidates"])]
    assert all(a >= b - 1e-12 for a, b in zip(masses, masses[1:]))
    assert sorted(c["rank"] for c in ranked["candidates"]) == list(range(1, n + 1))
    assert [c["score"] for c in ranked["candidates"]] == sorted(scores[0].tolist(), reverse=True)
    assert [c["caption"] for c in rank_candidates([cands], scores, n)[0]["candidates"]] == \
        [cands[j] for j in np.argsort(-scores[0], kind="stable")]
  with pytest.raises(ValueError, match="select: unknown 'best'"):
    rank_candidates(caps, cos, 5, "best")
  with pytest.raises(ValueError, match="logit_scale"):
    rank_candidates(caps, cos, 5, "posterior")


def test_a_judge_chooses_and_the_cosine_orders():
  """With a judge, `rerank`'s (B, N, 2) scores: every rule reads the judge's score where it
  read the cosine, and the candidates are still listed by cosine, best first (CONTRACT.md),
  each with its "judged" score and its "rank" in the choice."""
  from pdiff_jax.inference import rank_candidates
  from pdiff_jax.report import in_choice_order
  caps = [["a", "b", "c"], ["d", "e", "e"]]
  cos = np.array([[0.9, 0.5, 0.7], [0.2, 0.3, 0.3]])
  judged = np.array([[0.1, 0.8, 0.4], [0.9, 0.1, 0.1]])
  both = np.stack([cos, judged], -1)
  for select, kw in (("clip", {}), ("vote", {}), ("posterior", {"logit_scale": 50.0}),
                     ("fit", {"logit_scale": 50.0, "fits": np.zeros((2, 3)), "fit_weight": 1.0})):
    got, by_judge = rank_candidates(caps, both, 3, select, **kw), rank_candidates(caps, judged, 3, select, **kw)
    for g, j in zip(got, by_judge):
      assert g["caption"] == j["caption"]
      assert [c["caption"] for c in in_choice_order(g["candidates"])] == \
          [c["caption"] for c in in_choice_order(j["candidates"])]
      assert [c["score"] for c in g["candidates"]] == sorted((c["score"] for c in g["candidates"]), reverse=True)
      assert in_choice_order(g["candidates"])[0]["caption"] == g["caption"]
  got = rank_candidates(caps, both, 3)
  assert [g["caption"] for g in got] == ["b", "d"]  # not "a" and "e", the cosine's
  assert got[0]["candidates"] == [{"caption": "a", "score": 0.9, "judged": 0.1, "rank": 3},
                                  {"caption": "c", "score": 0.7, "judged": 0.4, "rank": 2},
                                  {"caption": "b", "score": 0.5, "judged": 0.8, "rank": 1}]
  # the original's rule without a judge: by cosine, no rank, as before
  assert rank_candidates(caps, cos, 3)[0]["candidates"][0] == {"caption": "a", "score": 0.9}


def test_select_by_fit_against_its_definition():
  """"fit": the posterior's rule with `fit_weight` x the denoiser's error taken from each logit.
  By hand: a fit that is worse for "a" turns the posterior's choice; with weight 0 it is the
  posterior; and on random cases the caption of most mass of exp(scale * cos - w * fit), summed
  over its copies (scipy's softmax)."""
  import collections
  from scipy.special import softmax
  from pdiff_jax.inference import rank_candidates
  from pdiff_jax.report import in_choice_order
  caps = [["a", "b", "b", "c", "b"]]
  cos = np.array([[0.9, 0.5, 0.5, 0.8, 0.5]])
  fits = np.array([[0.30, 0.10, 0.10, 0.05, 0.10]])
  assert rank_candidates(caps, cos, 5, "posterior", logit_scale=100.0)[0]["caption"] == "a"
  ranked = rank_candidates(caps, cos, 5, "fit", logit_scale=100.0, fits=fits, fit_weight=500.0)[0]
  # logits 90 - 150, 3 x (50 - 50), 80 - 25: "c" (55) over "a" (-60) and "b" (log 3)
  assert ranked["caption"] == "c"
  chosen_first = in_choice_order(ranked["candidates"])
  assert [c["caption"] for c in chosen_first] == ["c", "b", "b", "b", "a"]
  assert [c["fit"] for c in chosen_first] == [0.05, 0.1, 0.1, 0.1, 0.3]
  assert chosen_first[1]["votes"] == 3
  assert [c["caption"] for c in ranked["candidates"]] == ["a", "c", "b", "b", "b"]  # by cosine
  assert rank_candidates(caps, cos, 5, "fit", logit_scale=100.0, fits=fits, fit_weight=0.0)[0] \
      ["caption"] == "a"
  rng = np.random.default_rng(1)
  for _ in range(300):
    n, pool = int(rng.integers(2, 9)), [f"caption {i}" for i in range(int(rng.integers(1, 6)))]
    cands = [pool[i] for i in rng.integers(len(pool), size=n)]
    value = {c: (float(rng.choice([0.1, 0.2, 0.3])), float(rng.random())) for c in pool}
    scores = np.array([[value[c][0] for c in cands]], np.float32)
    fit = np.array([[value[c][1] for c in cands]], np.float32)
    scale, weight = float(rng.choice([1.0, 23.3])), float(rng.choice([0.0, 3.0, 50.0]))
    p = softmax(scale * scores[0].astype(np.float64) - weight * fit[0].astype(np.float64))
    mass = collections.defaultdict(float)
    for c, pj in zip(cands, p):
      mass[c] += pj
    best = max(mass.values())
    chosen = rank_candidates([cands], scores, n, "fit", logit_scale=scale, fits=fit,
                             fit_weight=weight)[0]["caption"]
    assert np.isclose(mass[chosen], best, rtol=1e-9)
  with pytest.raises(ValueError, match="'fit' needs the denoiser's fit"):
    rank_candidates(caps, cos, 5, "fit", logit_scale=1.0)
  with pytest.raises(ValueError, match="and its weight"):
    rank_candidates(caps, cos, 5, "fit", logit_scale=1.0, fits=fits)


def test_select_on_the_captioner(captioner, image_paths):
  """`select=` reorders the same candidates; the choice by vote is a caption drawn most often;
  the posterior uses the rerank CLIP's own temperature; a bad name fails before any work."""
  by_clip = captioner.caption(image_paths, num_candidates=6, steps=4, seed=5)
  for select in ("vote", "posterior"):
    out = captioner.caption(image_paths, num_candidates=6, steps=4, seed=5, select=select)
    for a, b in zip(out, by_clip):
      assert sorted((c["caption"], c["score"]) for c in a["candidates"]) == \
          sorted((c["caption"], c["score"]) for c in b["candidates"])
      if select == "vote":
        assert a["candidates"][0]["votes"] == max(c["votes"] for c in a["candidates"])
  scale = captioner.rerank_clip.logit_scale
  assert np.isclose(scale, np.exp(float(captioner.rerank_clip.params["logit_scale"])))
  # "fit": the same candidates, each with the denoiser's fit, which depends only on the image and
  # the caption (the same fixed noises everywhere), not on the batch it came in
  by_fit = captioner.caption(image_paths, num_candidates=6, steps=4, seed=5, select="fit")
  for a, b in zip(by_fit, by_clip):
    assert sorted((c["caption"], c["score"]) for c in a["candidates"]) == \
        sorted((c["caption"], c["score"]) for c in b["candidates"])
    assert all(np.isfinite(c["fit"]) and c["fit"] > 0 for c in a["candidates"])
  feats = captioner.features([to_image(p) for p in image_paths])
  tokens = captioner.sample_tokens(feats, 6, 4, 5, captioner.bundle.config.sampler.eta)
  fits = captioner.fit(feats, tokens)
  np.testing.assert_allclose(captioner.fit(feats[1:2], tokens[1:2])[0], fits[1], rtol=1e-5)
  for i, out in enumerate(by_fit):
    drawn = [captioner.bundle.vocab.decode(t) for t in tokens[i]]
    for c in out["candidates"]:
      assert np.isclose(c["fit"], fits[i, drawn.index(c["caption"])], rtol=1e-5)
  with pytest.raises(ValueError, match="select: unknown 'best'"):
    captioner.caption(image_paths, num_candidates=2, steps=2, select="best")


def test_refusals(trained_workdir, clip_dir, tmp_path):
  with pytest.raises(CheckpointError, match="not a training workdir"):
    load_bundle(str(tmp_path))
  bad = tmp_path / "bad"
  shutil.copytree(trained_workdir[0], bad)
  with pytest.raises(CheckpointError, match="no checkpoint at step 7"):
    load_bundle(str(bad), step=7)
  meta = bad / "checkpoints" / "100" / "vocab" / "metadata"
  words = json.loads(meta.read_text())
  words["words"].append("extra")
  meta.write_text(json.dumps(words))
  with pytest.raises(CheckpointError, match="vocabulary has .* words but the model was trained on"):
    load_bundle(str(bad))
  other = clip_lib.save_small_clip(tmp_path / "clip64", projection_dim=64)
  with pytest.raises(clip_lib.ClipLoadError, match="64-d embeddings.*32-d features"):
    Captioner.from_workdir(trained_workdir[0], clip=other)
  # A CLIP that encodes images otherwise than the training features were (clip.views) is refused.
  with pytest.raises(clip_lib.ClipLoadError, match=r"encodes images as 5 view\(s\).*clip.views=1"):
    Captioner(load_bundle(trained_workdir[0]), clip_lib.Clip.load(clip_dir, views=5))


def test_a_config_saved_before_views_loads_as_one_view(trained_workdir, tmp_path):
  """A workdir whose config.json predates clip.views / clip.view_shift captions as before."""
  old = tmp_path / "old"
  shutil.copytree(trained_workdir[0], old)
  config = json.loads((old / "config.json").read_text())
  del config["clip"]["views"], config["clip"]["view_shift"]
  (old / "config.json").write_text(json.dumps(config))
  captioner = Captioner.from_workdir(str(old))
  assert (captioner.clip.views, captioner.clip.encoding) == (1, {})


def test_caption_command(trained_workdir, image_paths, tmp_path):
  corrupt = tmp_path / "corrupt.png"
  corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  png, jpg = image_paths[0], image_paths[1]
  env = {"XLA_FLAGS": xla_flags()}
  r = run_pdiff("caption", f"--workdir={trained_workdir[0]}", "--json", "--num_candidates=3",
                "--steps=5", png, str(corrupt), jpg, env=env)
  assert r.returncode == 1, r.stderr
  assert f"{corrupt}: " in r.stderr
  out = json.loads(r.stdout)
  assert [o["image"] for o in out] == [png, jpg]
  assert all(len(o["candidates"]) == 3 and o["caption"] == o["candidates"][0]["caption"] for o in out)
  # A relative --workdir works too (the command runs in the repository root).
  relative = os.path.relpath(trained_workdir[0], os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  r2 = run_pdiff("caption", f"--workdir={relative}", "--num_candidates=3", "--steps=5",
                 "--solver=ddim", png, jpg, env=env)  # (the default, named)
  assert r2.returncode == 0, r2.stderr
  lines = r2.stdout.strip().split("\n")
  assert [l.split("\t") for l in lines] == [[o["image"], o["caption"]] for o in out]
  r3 = run_pdiff("caption", f"--workdir={tmp_path}", png, env=env)
  assert r3.returncode == 1 and "not a training workdir" in r3.stderr and "Traceback" not in r3.stderr


@pytest.fixture(scope="module")
def options_workdir(trained_workdir, tmp_path_factory):
  """The tiny model again on the same features, trained with the three additions on."""
  import jax
  from pdiff_jax import config as config_lib, storage, train
  config = config_lib.from_json(storage.read_text(os.path.join(trained_workdir[0], "config.json")))
  with config.unlocked():
    config.model.cond_drop, config.model.self_cond, config.model.length_head = 0.2, 0.5, True
    config.train.num_steps, config.train.checkpoint_every, config.train.log_every = 20, 20, 10
  workdir = str(tmp_path_factory.mktemp("options") / "workdir")
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir


def test_guidance_self_conditioning_and_length_from_a_trained_workdir(options_workdir, image_paths,
                                                                       monkeypatch):
  from pdiff_jax import evaluate
  captioner = Captioner.from_workdir(options_workdir)
  logged = [json.loads(l) for l in open(os.path.join(options_workdir, "metrics.jsonl"))]
  trained = [r for r in logged if "loss" in r]
  assert trained and all("loss_length" in r for r in trained)
  images = [Image.open(p) for p in image_paths]
  plain = captioner.caption(images, num_candidates=4, steps=5, seed=0)
  guided = captioner.caption(images, num_candidates=4, steps=5, seed=0, guidance=3.0)
  assert [c["caption"] for r in guided for c in r["candidates"]] != [
      c["caption"] for r in plain for c in r["candidates"]]
  for length, (lo, hi) in (("2-4", (2, 4)),):
    out = captioner.caption(images, num_candidates=4, steps=5, seed=0, length=length)
    assert all(lo <= len(c["caption"].split()) <= hi for r in out for c in r["candidates"])
  auto = captioner.caption(images, num_candidates=4, steps=5, seed=1, length="auto", guidance=2.0)
  assert auto == captioner.caption(images, num_candidates=4, steps=5, seed=1, length="auto", guidance=2.0)
  probs = captioner.length_distribution(captioner.features(images[:1]))
  assert probs.shape == (1, captioner.bundle.model.cfg.max_len + 1)
  np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-5)
  for bad, match in (({"guidance": -1.0}, "guidance: must be"), ({"length": "0-99"}, "length: "),
                     ({"solver": "euler"}, "solver: unknown")):
    with pytest.raises(ValueError, match=match):
      captioner.caption(images, **bad)
  # eval records the options and the length figures, and --sweep adds the guidance curve
  # (sweeps shortened here: each point is a compile)
  for name, values in (("SWEEP_GUIDANCE", (0.0, 2.0)), ("SWEEP_STEPS", (5,)), ("SWEEP_CANDIDATES", (1, 3)),
                       ("SWEEP_SOLVER_STEPS", (5,))):
    monkeypatch.setattr(evaluate, name, values)
  m = evaluate.evaluate(options_workdir, "test", num_candidates=3, steps=5, captioner=captioner,
                        progress=False, guidance=2.0, length="2-5", sweep=True)
  assert m["guidance"] == 2.0 and m["length"] == "2-5" and m["length_honoured"] == 1.0
  assert 0.0 <= m["length_accuracy"] <= 1.0 and m["length_error"] >= 0.0
  curve = m["sweep"]["guidance"]
  assert [p["guidance"] for p in curve] == [0.0, 2.0]
  assert all(set(p) >= {"CIDEr", "Div-2", "mBLEU-4", "CLIP-S"} for p in curve)
  page = open(os.path.join(options_workdir, "eval", "test", "report.html")).read()
  assert "against the guidance scale" in page


def test_sampling_options_need_a_model_trained_for_them(captioner, trained_workdir, image_paths, tmp_path):
  with pytest.raises(ValueError, match="guidance: 2.0 needs a model trained with model.cond_drop"):
    captioner.caption(image_paths[:1], guidance=2.0)
  with pytest.raises(ValueError, match="length: 'auto' needs a model trained with model.length_head"):
    captioner.caption(image_paths[:1], length="auto")
  out = captioner.caption(image_paths[:1], num_candidates=3, steps=4, length="2")  # N works on any model
  assert all(len(c["caption"].split()) == 2 for c in out[0]["candidates"])
  r = run_pdiff("caption", f"--workdir={trained_workdir[0]}", "--guidance=2", image_paths[0],
                env={"XLA_FLAGS": xla_flags()})
  assert r.returncode == 2 and "--guidance: 2.0 needs a model trained with model.cond_drop" in r.stderr
  assert "Traceback" not in r.stderr
