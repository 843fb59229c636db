"""`pdiff eval` and `pdiff score` on a model trained by configs/tiny.py."""

import html as html_lib
import json
import os

import numpy as np
import pytest

from conftest import run_pdiff, xla_flags
from pdiff_jax import evaluate, report, sampler
from pdiff_jax.inference import load_bundle
from pdiff_jax.model import count_params

# One xdist worker runs every test on the session's trained workdir, so it is built once.
pytestmark = pytest.mark.xdist_group("trained_workdir")

CONTRACT_KEYS = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE",
                 "SPICE_unavailable_reason", "CLIP-S", "RefCLIP-S", "Dist-1", "Dist-2", "Dist-3",
                 "Vocab", "Div-1", "Div-2", "mBLEU-4", "trainable_params", "num_images",
                 "num_candidates", "sample_steps", "clip_model"}


@pytest.fixture(scope="module")
def evaluated(trained_workdir):
  workdir = trained_workdir[0]
  # The solvers' sweep at 5 steps only (each point is a compile of the sampler; the solvers' table
  # at 5, 10 and 20 is the same loop over SWEEP_SOLVER_STEPS)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(evaluate, "SWEEP_SOLVER_STEPS", (5,))
    metrics = evaluate.evaluate(workdir, "test", num_candidates=3, steps=5, seed=0, sweep=True,
                                progress=False)
  out = os.path.join(workdir, "eval", "test")
  return workdir, metrics, json.load(open(os.path.join(out, "captions.json"))), out


def test_eval_outputs(evaluated, trained_workdir):
  workdir, metrics, captions, out = evaluated
  assert CONTRACT_KEYS <= set(metrics)
  assert json.load(open(os.path.join(out, "metrics.json")))["CIDEr"] == metrics["CIDEr"]
  assert metrics["num_images"] == 3 and metrics["num_candidates"] == 3 and metrics["sample_steps"] == 5
  bundle = load_bundle(workdir)
  assert metrics["trainable_params"] == count_params(bundle.params, bundle.model.cfg) > 0
  assert metrics["SPICE"] is None and metrics["SPICE_unavailable_reason"]
  ids = [c["image_id"] for c in captions]
  assert ids == [1014, 1015, 1016]  # Karpathy cocoid of the test images (after 12 train, 2 val)
  for c in captions:
    assert c["caption"] == c["candidates"][0]["caption"] and len(c["candidates"]) == 3
    assert len(c["references"]) == 5 and os.path.exists(c["image"])
    scores = [x["score"] for x in c["candidates"]]
    assert scores == sorted(scores, reverse=True)
  sweep = metrics["sweep"]
  assert [p["n"] for p in sweep["candidates"]] == [1, 2, 5, 10, 20]
  assert [p["steps"] for p in sweep["steps"]][:3] == [5, 10, 20]
  # every solver at each of SWEEP_SOLVER_STEPS (5 here); the configured one's points are the
  # steps sweep's
  assert [(p["solver"], p["steps"]) for p in sweep["solvers"]] == [(name, 5) for name in sampler.SOLVERS]
  for p in sweep["solvers"]:
    assert 0 <= p["Div-2"] <= 1 and p["CIDEr"] >= 0
    if p["solver"] == "ddim":
      assert p == {"solver": "ddim", **next(q for q in sweep["steps"] if q["steps"] == p["steps"])}


def test_eval_quality_equals_the_scorers_by_hand(evaluated):
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  _, metrics, captions, _ = evaluated
  tok = PTBTokenizer()
  gts = tok.tokenize({i: [{"caption": r} for r in c["references"]] for i, c in enumerate(captions)})
  res = tok.tokenize({i: [{"caption": c["caption"]}] for i, c in enumerate(captions)})
  assert metrics["BLEU-4"] == pytest.approx(Bleu(4).compute_score(gts, res)[0][3], rel=1e-12, abs=1e-15)
  assert metrics["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)


def _clip_s_by_hand(captions, clip_dir):
  """(CLIP-S, RefCLIP-S) of eval's captions.json, by transformers' CLIP and numpy."""
  from transformers import CLIPProcessor, FlaxCLIPModel
  from PIL import Image
  model = FlaxCLIPModel.from_pretrained(clip_dir)
  proc = CLIPProcessor.from_pretrained(clip_dir)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  clip_s, ref_s = [], []
  for c in captions:
    pix = proc(images=Image.open(c["image"]).convert("RGB"), return_tensors="np")["pixel_values"]
    img = unit(np.asarray(model.get_image_features(pixel_values=pix))[0])
    texts = ["A photo depicts " + c["caption"]] + ["A photo depicts " + r for r in c["references"]]
    enc = proc(text=texts, return_tensors="np", padding="max_length", truncation=True)
    t = unit(np.asarray(model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])))
    s = 2.5 * max(float(t[0] @ img), 0)
    r = float(np.max(t[1:] @ t[0]))  # Hessel et al.: the raw cosine, no weight, no clipping
    clip_s.append(s)
    ref_s.append(2 * s * r / (s + r))
  return np.mean(clip_s), np.mean(ref_s)


def test_clip_s_against_numpy(evaluated, clip_dir):
  _, metrics, captions, _ = evaluated
  clip_s, ref_s = _clip_s_by_hand(captions, clip_dir)
  assert metrics["CLIP-S"] == pytest.approx(clip_s, rel=1e-4)
  assert metrics["RefCLIP-S"] == pytest.approx(ref_s, rel=1e-4)
  assert metrics["clip_model"] == clip_dir


def test_views_from_features_to_the_choice(trained_workdir, clip_dir, tmp_path):
  """A model trained on features of 5 views (`clip.views`): its captioner encodes images as the
  store did, eval's scores are cosines with that embedding, and CLIP-S stays the metric of one
  embedding of the image (by hand, as above)."""
  import jax
  from pdiff_jax import clip as clip_lib, config as config_lib, storage, train
  from pdiff_jax.data import features
  from pdiff_jax.data.images import load_image
  from pdiff_jax.inference import Captioner
  config = config_lib.from_json(storage.read_text(os.path.join(trained_workdir[0], "config.json")))
  with config.unlocked():
    config.clip.views = 5
    config.data.feature_dir = str(tmp_path / "features")
    config.train.num_steps, config.train.checkpoint_every = 20, 20
  clip = clip_lib.Clip.load(clip_dir, **config_lib.clip_views(config))
  features.extract(config, clip, progress=False)
  workdir = str(tmp_path / "workdir")
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  captioner = Captioner.from_workdir(workdir)
  assert (captioner.clip.views, captioner.clip.view_shift) == (5, 1)
  metrics = evaluate.evaluate(workdir, "test", num_candidates=3, steps=5, progress=False,
                              captioner=captioner)
  captions = json.load(open(os.path.join(workdir, "eval", "test", "captions.json")))
  images = [load_image(c["image"]) for c in captions]
  np.testing.assert_allclose(captioner.features(images), features.FeatureStore(
      config.data.feature_dir).split("test").features, rtol=1e-5, atol=1e-5)
  image = clip_lib.normalize(clip.encode_images(clip.preprocess(images)))
  for c, emb in zip(captions, image):
    text = clip_lib.normalize(clip.encode_texts([x["caption"] for x in c["candidates"]]))
    np.testing.assert_allclose([x["score"] for x in c["candidates"]], text @ emb, rtol=1e-4, atol=1e-5)
  clip_s, ref_s = _clip_s_by_hand(captions, clip_dir)
  assert metrics["CLIP-S"] == pytest.approx(clip_s, rel=1e-4)
  assert metrics["RefCLIP-S"] == pytest.approx(ref_s, rel=1e-4)
  assert "CLIP-S_views" not in metrics

  # A tfds: source's images are records, not files: CLIP-S is then of the stored mean of the
  # views, and says so; another eval.clip_model could not read them, and stops before sampling.
  real = features.FeatureStore.images
  tfds = lambda self, split: [{**m, "image": f"tfds:coco_captions/{split}/{os.path.basename(m['image'])}"}
                              for m in real(self, split)]
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(features.FeatureStore, "images", tfds)
    stored = evaluate.evaluate(workdir, "test", num_candidates=3, steps=5, progress=False,
                               captioner=captioner, out_dir=str(tmp_path / "tfds"))
    assert stored["CLIP-S_views"] == 5 and stored["CLIP-S"] != pytest.approx(metrics["CLIP-S"], rel=1e-6)
    with captioner.bundle.config.unlocked():
      captioner.bundle.config.eval.clip_model = clip_lib.save_small_clip(tmp_path / "other",
                                                                         projection_dim=32)
    with pytest.raises(ValueError, match="^eval.clip_model=.*are not files"):
      evaluate.evaluate(workdir, "test", num_candidates=3, steps=5, progress=False,
                        captioner=Captioner(captioner.bundle, captioner.clip),
                        out_dir=str(tmp_path / "other_eval"))


def test_report_has_every_image_and_escapes_text(evaluated):
  _, metrics, captions, out = evaluated
  page = open(os.path.join(out, "report.html")).read()
  assert page.count("data:image/jpeg;base64,") == len(captions)
  assert page.count("data:image/png;base64,") == 3  # the sweep plots: n, steps, solvers
  for c in captions:
    assert str(c["image_id"]) in page
  evil = [{**captions[0], "caption": "<script>alert(1)</script>",
           "candidates": [{"caption": "<script>alert(1)</script>", "score": 0.5}],
           "references": ["<b>bold</b> & co"]}]
  html = report.render("t", metrics, evil)
  assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
  assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in html
  # At most N thumbnails: the rest are listed as text, every caption still there.
  capped = report.render("t", metrics, captions, max_thumbnails=1)
  assert capped.count("data:image/jpeg;base64,") == 1 and "the other 2 are listed" in capped
  for c in captions:
    assert str(c["image_id"]) in capped and html_lib.escape(c["caption"]) in capped


def test_score_on_a_results_file_equals_eval(evaluated, trained_workdir, clip_dir, tmp_path):
  workdir, metrics, captions, _ = evaluated
  data = trained_workdir[1]
  results = [{"image_id": c["image_id"], "caption": x["caption"]} for c in captions for x in c["candidates"]]
  (tmp_path / "results.json").write_text(json.dumps(results))
  vocab = json.load(open(os.path.join(workdir, "config.json")))["data"]["feature_dir"] + "/vocab.json"
  r = run_pdiff("score", f"--results={tmp_path}/results.json",
                f"--references={data}/dataset_coco.json", "--split=test", f"--vocab={vocab}",
                f"--images={data}/images", f"--clip={clip_dir}", f"--out={tmp_path}/out",
                env={"XLA_FLAGS": xla_flags()})
  assert r.returncode == 0, r.stderr
  scored = json.load(open(tmp_path / "out" / "metrics.json"))
  assert CONTRACT_KEYS <= set(scored)
  for key in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "Dist-1", "Dist-2", "Dist-3",
              "Vocab", "Div-1", "Div-2", "mBLEU-4", "CLIP-S", "RefCLIP-S", "num_images", "num_candidates"):
    assert scored[key] == pytest.approx(metrics[key], rel=1e-5), key
  assert "| BLEU-4 |" in r.stdout  # the Markdown table
  # Without images, CLIP-S is null; bad input is a one-line error.
  r = run_pdiff("score", f"--results={tmp_path}/results.json", f"--references={data}/dataset_coco.json",
                f"--out={tmp_path}/out2", env={"XLA_FLAGS": xla_flags()})
  assert r.returncode == 0 and json.load(open(tmp_path / "out2" / "metrics.json"))["CLIP-S"] is None
  (tmp_path / "bad.json").write_text('[{"image_id": 1}]')
  r = run_pdiff("score", f"--results={tmp_path}/bad.json", f"--references={data}/dataset_coco.json",
                f"--out={tmp_path}/out3", env={"XLA_FLAGS": xla_flags()})
  assert r.returncode == 1 and "bad.json" in r.stderr and "Traceback" not in r.stderr


def test_eval_command(trained_workdir):
  r = run_pdiff("eval", f"--workdir={trained_workdir[0]}", "--split=val", "--num_candidates=3",
                "--steps=4", "--select=vote", env={"XLA_FLAGS": xla_flags()})
  assert r.returncode == 0, r.stderr
  assert "| BLEU-4 | METEOR |" in r.stdout
  out = os.path.join(trained_workdir[0], "eval", "val")
  m = json.load(open(os.path.join(out, "metrics.json")))
  assert m["num_images"] == 2 and m["num_candidates"] == 3 and m["select"] == "vote"
  for e in json.load(open(os.path.join(out, "captions.json"))):  # chosen by vote: the most copies
    chosen = [c for c in e["candidates"] if c["rank"] == 1]
    assert len(chosen) == 1 and chosen[0]["caption"] == e["caption"]
    assert chosen[0]["votes"] == max(c["votes"] for c in e["candidates"])
    scores = [c["score"] for c in e["candidates"]]  # still listed by cosine, best first
    assert scores == sorted(scores, reverse=True)


def test_report_with_a_summary_first_marks_exact_and_ungrammatical_candidates():
  from pdiff_jax import report
  entries = [{"image_id": 1, "image": "", "caption": "a red circle", "references": ["a red circle"],
              "candidates": [{"caption": "a red circle", "score": 0.9, "grammatical": True, "exactly_right": True},
                             {"caption": "a blue circle", "score": 0.8, "grammatical": True, "exactly_right": False},
                             {"caption": "red red", "score": 0.7, "grammatical": False, "exactly_right": False}]}]
  variants = {"model": {"CIDEr": 2.0, "Div-2": 0.4204, "exactly_right": 0.5, "grammatical": 1.0},
              "shuffled_features": {"CIDEr": 0.5, "exactly_right": 0.0, "grammatical": 0.9}}
  page = report.render("t", {"CIDEr": 2.0}, entries, preface="<h2>Summary</h2>" + report.summary_table(variants))
  assert page.index("<h2>Summary</h2>") < page.index("<h2>Captions") < page.index("<h2>Metrics")
  # CIDEr x 100, Div-2 a ratio, grammatical and exactly right in %; n/a where a variant lacks one
  assert "<td>model</td><td>200.0</td><td>0.420</td><td>100.0</td><td>50.0</td>" in page
  assert "<td>shuffled_features</td><td>50.0</td><td>n/a</td>" in page
  items = page[page.index("<ol>"):page.index("</ol>")].split("<li")[1:]
  assert "chosen" in items[0] and "exactly right</span>" in items[0]
  assert "exactly right</span>" not in items[1] and "ungrammatical" not in items[1]
  assert "ungrammatical</span>" in items[2]
  assert report.render("t", {"CIDEr": 2.0}, entries).index("<h2>Metrics") < page.index("<h2>Captions")
  # A choice by vote (`sampler.select`) shows each candidate's copies where there are several.
  entries[0]["candidates"][0]["votes"], entries[0]["candidates"][1]["votes"] = 3, 1
  items = report.render("t", {}, entries).split("<ol>")[1].split("<li")[1:]
  assert ">x3</span>" in items[0] and ">x1<" not in items[1]
  # Chosen by another rule or a judge: listed in its order (each "rank"), the chosen one first,
  # with the judge's score beside the cosine.
  for c, rank, judged in zip(entries[0]["candidates"], (2, 3, 1), (0.5, 0.4, 0.95)):
    c["rank"], c["judged"] = rank, judged
  entries[0]["caption"] = "red red"
  items = report.render("t", {}, entries).split("<ol>")[1].split("<li")[1:]
  assert "red red" in items[0] and "chosen" in items[0] and "judged 0.950" in items[0]
  assert "a red circle" in items[1] and "0.900" in items[1] and "chosen" not in items[1]


def test_report_plots_the_guidance_sweep(tmp_path):
  from pdiff_jax import report
  points = [{"guidance": g, "CIDEr": 1.0 + g, "Div-2": 0.5 - g / 10, "mBLEU-4": 0.3, "exactly_right": 0.4}
            for g in evaluate.SWEEP_GUIDANCE]
  page = report.render("t", {"sweep": {"guidance": points}}, [])
  assert "<img alt='exactly_right and Div-2 against the guidance scale' src='data:image/png;base64," in page
  # without the shapes' ground truth the curve is CIDEr's
  plain = [{k: v for k, v in p.items() if k != "exactly_right"} for p in points]
  assert "CIDEr and Div-2 against the guidance scale" in report.render("t", {"sweep": {"guidance": plain}}, [])
