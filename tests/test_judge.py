"""The learned judge of captions (judge.py): its negatives, its loss, what it learns, and its
place in `pdiff train`, the Captioner and eval."""

import json
import math
import os
import shutil

import jax
import numpy as np
import optax
import pytest

from conftest import load_config
from pdiff_jax import clip as clip_lib
from pdiff_jax import config as config_lib
from pdiff_jax import judge as judge_lib
from pdiff_jax.data import features as features_lib

CORPUS = ["a red circle left of a blue square", "a green square left of a red circle",
          "a blue circle", "a red square"]


def test_negatives_are_the_edits_the_bigrams_allow():
  """By hand, in "a red circle left of a blue square": "circle" (word 2) may become "square"
  ("red square" and "square left" are in the corpus) and may change places with the last word
  ("red square", "square left", "blue circle" and a caption ending in "circle" all are)."""
  neg = judge_lib.Negatives(CORPUS)
  caption = CORPUS[0]
  assert neg.edits(caption, 2) == sorted({"a red square left of a blue square",
                                          "a red square left of a blue circle"})
  # "blue": after "a", before "square": red, green, blue in the corpus; itself left out.
  assert neg.edits(caption, 6) == ["a red circle left of a green square",
                                   "a red circle left of a red square"]
  # "left": only "circle left" / "square left" and "left of" exist, so nothing replaces it,
  # and no other word is preceded by "circle" and followed by "of".
  assert neg.edits(caption, 3) == []


def test_negatives_sample_is_seeded_and_never_a_reference():
  neg = judge_lib.Negatives(CORPUS)
  refs = [CORPUS[0], "a red square left of a blue circle"]  # a true paraphrase is no negative
  a = neg.sample(refs, 6, np.random.default_rng(3))
  assert a == neg.sample(refs, 6, np.random.default_rng(3))
  assert 0 < len(a) <= 6 and not set(a) & set(refs)
  every = {e for r in refs for i in range(len(r.split())) for e in neg.edits(r, i)} - set(refs)
  assert set(a) <= every
  assert neg.sample(["x"], 3, np.random.default_rng(0)) == []  # no bigram of "x" is shared


def _gelu(x):  # flax's default (tanh) GELU
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def test_loss_against_numpy():
  """The judged score and the loss written out in numpy: g = u + MLP(u) / s of the normalised
  image; logits s g . v over the batch's captions and the image's own negatives; the
  cross-entropy of the image's own caption; another image's caption of the same text left out."""
  rng = np.random.default_rng(0)
  B, K, D, s = 3, 2, 5, 7.0
  adapter = judge_lib.Adapter(hidden=4, depth=2)
  params = adapter.init(jax.random.key(1), np.zeros((1, D), np.float32))
  params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  image, text = rng.normal(size=(B, D)).astype(np.float32), rng.normal(size=(B, D)).astype(np.float32)
  negs = rng.normal(size=(B, K, D)).astype(np.float32)
  p = params["params"]
  u = image / np.linalg.norm(image, axis=-1, keepdims=True)
  h = _gelu(u @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  h = _gelu(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])
  g = u + (h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]) / s
  np.testing.assert_allclose(judge_lib.judged(adapter, params, image, s), g, rtol=1e-5, atol=1e-6)
  logits = np.concatenate([s * g @ text.T, s * np.einsum("bd,bkd->bk", g, negs)], axis=1)
  logits -= logits.max(1, keepdims=True)
  want = -np.mean([logits[i, i] - np.log(np.exp(logits[i]).sum()) for i in range(B)])
  got = judge_lib.loss_fn(adapter, params, image, text, negs, logit_scale=s)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Images 0 and 2 with the same caption text: neither's caption is a negative of the other.
  keep = ~np.array([[False, False, True], [False, False, False], [True, False, False]])
  keep = np.concatenate([keep, np.ones((B, K), bool)], axis=1)
  want_same = -np.mean([logits[i, i] - np.log(np.exp(logits[i][keep[i]]).sum()) for i in range(B)])
  got_same = judge_lib.loss_fn(adapter, params, image, text, negs, logit_scale=s,
                               text_ids_B=np.array([5, 1, 5]))
  np.testing.assert_allclose(float(got_same), want_same, rtol=1e-5)
  assert float(got_same) < float(got)
  # With the MLP's last layer at zero the judge is CLIP: its scores are the cosines.
  zero = jax.tree.map(np.asarray, params)
  zero["params"]["Dense_2"] = jax.tree.map(np.zeros_like, zero["params"]["Dense_2"])
  np.testing.assert_allclose(judge_lib.judged(adapter, zero, image, s), u, rtol=1e-6)


SHAPES = ["circle", "square", "triangle", "star"]


def _binding_task(seed=0, dim=16):
  """Images of two different shapes, left and right, whose embeddings are a fixed random
  non-linear function of the pair, and captions "left A right B" whose embeddings depend on the
  order: CLIP's cosine between the two means nothing, so only a learned judge can tell a
  caption from its shapes exchanged."""
  rng = np.random.default_rng(seed)
  m, n = rng.normal(size=(len(SHAPES), dim)), rng.normal(size=(len(SHAPES), dim))
  p1, p2 = rng.normal(size=(dim, len(SHAPES))), rng.normal(size=(dim, len(SHAPES)))

  def images(pairs, noise_seed):
    noise = np.random.default_rng(noise_seed).normal(size=(len(pairs), dim)) * 0.05
    return np.stack([np.tanh(m[a] * n[b] + m[b]) for a, b in pairs]) + noise

  def encode_texts(texts):
    out = []
    for t in texts:
      w = t.split()
      out.append(p1[:, SHAPES.index(w[1])] + p2[:, SHAPES.index(w[3])])
    return np.stack(out)

  caption = lambda a, b: f"left {SHAPES[a]} right {SHAPES[b]}"
  return images, encode_texts, caption


def test_the_judge_learns_what_the_cosine_cannot_tell():
  images, encode_texts, caption = _binding_task()
  pairs = [(a, b) for a in range(4) for b in range(4) if a != b]
  train_pairs = pairs * 20
  emb = images(train_pairs, 1)
  params, info = judge_lib.train_judge(
      emb, [[caption(a, b)] for a, b in train_pairs], encode_texts, logit_scale=10.0, steps=400,
      batch_size=16, negatives=4, hidden=64, depth=2, seed=0, steps_per_call=150)
  assert info["images"] == len(train_pairs) and info["images_short_of_negatives"] == 0
  assert info["loss_last_100"] < 0.5 * info["loss_first_100"]
  judge = judge_lib.Judge(params, 64, 2, 10.0, {})
  held_out = images(pairs, 2)  # new noise
  true = clip_lib.normalize(encode_texts([caption(a, b) for a, b in pairs]))
  swapped = clip_lib.normalize(encode_texts([caption(b, a) for a, b in pairs]))
  g, u = judge.embed(held_out), clip_lib.normalize(held_out)
  judged_right = np.mean((g * true).sum(1) > (g * swapped).sum(1))
  cosine_right = np.mean((u * true).sum(1) > (u * swapped).sum(1))
  assert judged_right == 1.0 and cosine_right < 0.75, (judged_right, cosine_right)
  # Deterministic in the seed; another seed trains another judge.
  again, _ = judge_lib.train_judge(
      emb, [[caption(a, b)] for a, b in train_pairs], encode_texts, logit_scale=10.0, steps=400,
      batch_size=16, negatives=4, hidden=64, depth=2, seed=0, steps_per_call=150)
  jax.tree.map(np.testing.assert_array_equal, params, again)


def test_a_call_of_training_steps_at_vit_l_size_compiles_within_a_few_gib():
  """COCO with ViT-L/14: 768-d embeddings, batch 128, 8 negatives, 250 steps per call, compiled
  without allocating. The call's inputs (the gathered batches) are 0.92 GiB, and XLA's
  temporaries stay small: the steps run one after another in the scan."""
  adapter = judge_lib.Adapter(256, 2)
  D, B, K, S = 768, 128, 8, 250
  params = jax.eval_shape(adapter.init, jax.random.key(0), jax.ShapeDtypeStruct((1, D), np.float32))
  tx = optax.adamw(1e-3)
  opt_state = jax.eval_shape(tx.init, params)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)
  compiled = judge_lib.train_call(adapter, tx, 100.0).lower(
      params, opt_state, f32(S, B, D), f32(S, B, D), f32(S, B, K, D),
      jax.ShapeDtypeStruct((S, B), np.int32)).compile()
  memory = compiled.memory_analysis()
  gib = 2.0 ** 30
  assert abs(memory.argument_size_in_bytes / gib - S * B * (K + 2) * D * 4 / gib) < 0.05
  assert memory.temp_size_in_bytes < 0.25 * gib, memory.temp_size_in_bytes / gib


def test_save_load_round_trip(tmp_path):
  images, encode_texts, caption = _binding_task()
  adapter = judge_lib.Adapter(8, 1)
  params = jax.device_get(adapter.init(jax.random.key(0), np.zeros((1, 16), np.float32)))
  judge = judge_lib.Judge(params, 8, 1, 12.5, {"trained_on": {"steps": 3}})
  judge.save(str(tmp_path / "j"))
  back = judge_lib.Judge.load(str(tmp_path / "j"))
  assert (back.hidden, back.depth, back.logit_scale, back.meta) == (8, 1, 12.5, judge.meta)
  x = images([(0, 1), (2, 3)], 0)
  np.testing.assert_array_equal(back.embed(x), judge.embed(x))
  # Any number of rows runs one compiled program (a server's batches vary), row by row the same.
  many = images([(a % 4, (a + 1) % 4) for a in range(300)], 1)
  np.testing.assert_allclose(back.embed(many)[:2], back.embed(many[:2]), rtol=1e-6)
  assert back._embed._cache_size() == 1
  with pytest.raises(judge_lib.JudgeError, match="no trained judge"):
    judge_lib.Judge.load(str(tmp_path / "none"))
  (tmp_path / "j" / "params.msgpack").write_bytes(b"not msgpack")
  with pytest.raises(judge_lib.JudgeError, match="unreadable judge"):
    judge_lib.Judge.load(str(tmp_path / "j"))
  judge.save(str(tmp_path / "j"))
  meta = json.loads((tmp_path / "j" / "judge.json").read_text())
  (tmp_path / "j" / "judge.json").write_text(json.dumps({**meta, "format_version": 99}))
  with pytest.raises(judge_lib.JudgeError, match="format_version 99"):
    judge_lib.Judge.load(str(tmp_path / "j"))


def test_too_few_edits_take_other_images_captions_never_their_own():
  """An image whose captions allow no edit gets the other images' captions as its negatives,
  never one of its own (here "beta" is a caption of two images)."""
  captions = [["alpha", "beta"], ["beta"], ["gamma"], ["delta"]]
  for i, own in enumerate(captions):
    got = judge_lib.fill_negatives([], own, captions, 6, np.random.default_rng(i))
    assert len(got) == 6 and not set(got) & set(own) and set(got) <= {"alpha", "beta", "gamma", "delta"}
  assert judge_lib.fill_negatives(["x"], ["a"], captions, 1, np.random.default_rng(0)) == ["x"]
  with pytest.raises(ValueError, match="set judge.negatives lower"):
    judge_lib.fill_negatives([], ["a"], [["a"], ["a"]], 1, np.random.default_rng(0))
  # One-word captions all sit between <s> and </s>: each image's edits are the other words.
  ids = {"alpha": 0, "beta": 1, "gamma": 2, "delta": 3}
  encode = lambda texts: np.eye(8, dtype=np.float32)[[ids[t] for t in texts]] + 0.1
  _, info = judge_lib.train_judge(np.eye(4, 8, dtype=np.float32) + 0.1, captions, encode,
                                  logit_scale=10.0, steps=3, batch_size=2, negatives=2,
                                  hidden=4, depth=1, seed=0)
  assert info["images_short_of_negatives"] == 0 and info["texts"] == 4
  with pytest.raises(ValueError, match="2 or more"):
    judge_lib.train_judge(np.ones((1, 8), np.float32), [["a"]], encode, 10.0, steps=1, batch_size=1)


def test_config_keys(tiny_config):
  config_lib.validate(tiny_config)  # steps 0: no judge, any source
  assert config_lib.judge_config(tiny_config).steps == 0
  for key, value in (("steps", -1), ("batch_size", 0), ("hidden", 0), ("lr", 0.0)):
    bad = load_config("tiny", **{f"judge.{key}": value, "data.source": "karpathy:x"})
    with pytest.raises(config_lib.ConfigError, match=f"judge.{key}"):
      config_lib.validate(bad)
  with pytest.raises(config_lib.ConfigError, match="judge.steps.*synthetic"):
    config_lib.validate(load_config("tiny", **{"judge.steps": 10}))
  with pytest.raises(config_lib.ConfigError, match="judge.steps.*rerank_clip"):
    config_lib.validate(load_config("tiny", **{"judge.steps": 10, "data.source": "karpathy:x",
                                               "clip.model": "a", "sampler.rerank_clip": "b"}))
  old = config_lib.from_json(config_lib.to_json(tiny_config))
  del old["judge"]  # a config.json saved before the judge existed
  assert config_lib.judge_config(old).steps == 0


@pytest.mark.xdist_group("trained_workdir")
def test_train_trains_it_and_ranking_uses_it(trained_workdir, tmp_path, monkeypatch):
  """`pdiff train` with judge.steps > 0 on a finished workdir trains the judge only (the
  denoiser is done), once; the Captioner loads it and ranks by its scores, eval records it."""
  from pdiff_jax import evaluate, train
  from pdiff_jax.inference import Captioner
  workdir = str(tmp_path / "model")
  shutil.copytree(trained_workdir[0], workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    config = config_lib.from_json(f.read())
  config.judge = config_lib.judge_config(config)
  config.judge.update({"steps": 60, "batch_size": 4, "negatives": 3, "hidden": 16})
  with pytest.raises(judge_lib.JudgeError, match="no trained judge"):
    Captioner.from_workdir(workdir, judge=True)
  too_big = config_lib.from_json(config_lib.to_json(config))
  too_big.judge.batch_size = 13  # the train split has 12 images: refused before any training
  with pytest.raises(config_lib.ConfigError, match="judge.batch_size"):
    train.train_and_evaluate(too_big, workdir, devices=jax.devices()[:1])
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  meta = json.load(open(os.path.join(workdir, "judge", "judge.json")))
  assert meta["trained_on"]["steps"] == 60 and meta["train"]["images"] == 12
  # Run again: the judge of these settings and features is kept, not trained again.
  monkeypatch.setattr(judge_lib, "train_judge", lambda *a, **k: pytest.fail("trained again"))
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  monkeypatch.undo()

  # A run that has not trained its judge yet (or was stopped before it) ranks by the cosine.
  early = str(tmp_path / "early")
  shutil.copytree(workdir, early, ignore=shutil.ignore_patterns("judge"))
  assert Captioner.from_workdir(early).judge is None
  judged = Captioner.from_workdir(workdir)  # config.json now says judge.steps = 60
  plain = Captioner.from_workdir(workdir, judge=False)
  assert judged.judge is not None and plain.judge is None
  emb = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)
  caps = [["a red circle", "blue square"], ["a circle", "red"]]
  text = clip_lib.normalize(judged.rerank_clip.encode_texts([c for cs in caps for c in cs])).reshape(2, 2, -1)
  want = np.einsum("bnd,bd->bn", text, judged.judge.embed(emb))
  cosine = np.einsum("bnd,bd->bn", text, clip_lib.normalize(emb))
  both = judged.rerank(emb, caps)  # the cosine and the judge's score
  assert both.shape == (2, 2, 2)
  np.testing.assert_allclose(both[..., 1], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(both[..., 0], cosine, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(plain.rerank(emb, caps), cosine, rtol=1e-5, atol=1e-6)
  assert not np.allclose(both[..., 1], cosine)
  metrics = evaluate.evaluate(workdir, "test", num_candidates=3, steps=4, progress=False,
                              captioner=judged, out_dir=str(tmp_path / "eval"))
  assert metrics["judge"] is True
  entries = json.load(open(tmp_path / "eval" / "captions.json"))
  store_emb = np.asarray(features_lib.FeatureStore(config.data.feature_dir).split("test").features,
                         np.float32)
  for e, g, u in zip(entries, judged.judge.embed(store_emb), clip_lib.normalize(store_emb)):
    # CONTRACT.md: "score" is the cosine, best first; the judge's score chose (rank 1)
    texts = [c["caption"] for c in e["candidates"]]
    text = clip_lib.normalize(judged.rerank_clip.encode_texts(texts))
    np.testing.assert_allclose([c["judged"] for c in e["candidates"]], text @ g, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([c["score"] for c in e["candidates"]], text @ u, rtol=1e-4, atol=1e-5)
    assert [c["score"] for c in e["candidates"]] == sorted((c["score"] for c in e["candidates"]), reverse=True)
    best = max(e["candidates"], key=lambda c: c["judged"])
    assert e["caption"] == best["caption"] and best["rank"] == 1
