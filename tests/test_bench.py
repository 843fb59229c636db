"""`pdiff bench` on the tiny config, as a user runs it: every figure of the CONTRACT's JSON is
there, positive, and consistent with the FLOPs counted from the config."""

import json

import pytest

from conftest import load_config, run_pdiff, xla_flags
from pdiff_jax import config as config_lib
from pdiff_jax import model as model_lib


def test_bench_tiny_writes_every_figure(tmp_path, clip_dir):
  out = tmp_path / "b.json"
  # Two train steps per dispatch (train.steps_per_dispatch) and the DPM-Solver++ sampler: every
  # figure is per step all the same.
  r = run_pdiff("bench", "--config=configs/tiny.py", f"--out={out}", f"--config.clip.model={clip_dir}",
                "--config.clip.batch_size=4", f"--profile_dir={tmp_path / 'prof'}",
                "--config.train.steps_per_dispatch=2", "--config.train.checkpoint_every=50",
                "--config.sampler.solver=dpmpp2m", env={"XLA_FLAGS": xla_flags()})
  assert r.returncode == 0, r.stderr[-3000:]
  b = json.loads(out.read_text())
  assert b["num_devices"] == 1 and b["backend"] == "cpu" and b["device"].startswith("1 x ")
  assert b["matmul_flops_per_sec"] > 1e8

  config = load_config("tiny")
  cfg = config_lib.model_config(config)
  t = b["train"]
  assert t["steps_per_dispatch"] == 2
  for key in ("examples_per_sec", "tokens_per_sec", "flops_per_sec", "mfu", "compile_seconds"):
    assert t[key] > 0, key
  assert t["tokens_per_sec"] == pytest.approx(t["examples_per_sec"] * config.data.max_len)
  assert t["flops_per_sec"] == pytest.approx(t["examples_per_sec"] * model_lib.train_flops_per_example(cfg))
  assert t["mfu"] == pytest.approx(t["flops_per_sec"] / b["matmul_flops_per_sec"])
  # Back to back (steps dispatched without waiting, as `pdiff train` runs them): its own figure.
  assert t["back_to_back_examples_per_sec"] == pytest.approx(
      config.train.batch_size / t["back_to_back_step_seconds"])

  s = b["sample"]
  assert (s["num_candidates"], s["steps"]) == (config.sampler.num_candidates, config.sampler.steps)
  for key in ("images_per_sec", "candidates_per_sec", "compile_seconds", "mfu"):
    assert s[key] > 0, key
  assert s["candidates_per_sec"] == pytest.approx(s["images_per_sec"] * s["num_candidates"])
  assert s["flops_per_sec"] == pytest.approx(
      s["images_per_sec"] * s["num_candidates"] * s["steps"] * model_lib.denoise_step_flops(cfg))

  assert b["clip"]["images_per_sec"] > 0 and b["clip"]["model"] == str(clip_dir)
  assert b["clip"]["compile_seconds"] > 0
  assert b["clip"]["views"] == 1
  # --profile_dir: a trace of each, and where the time went, in the train step's three phases.
  for part, phases in (("train", {"forward", "backward", "rest"}), ("sample", {"rest"})):
    p = b[part]["profile"]
    assert p["trace"].startswith(str(tmp_path / "prof" / part)), p["trace"]
    assert set(p["phase_seconds"]) == phases, p["phase_seconds"]
    assert 0 < p["matmul_fraction"] < 1 and p["matmul_flops_per_sec"] > 0
  # The printed table carries the same figures.
  assert f"MFU {100 * t['mfu']:.0f}%" in r.stdout and "images/s" in r.stdout


def test_bench_unknown_part_is_bad_usage(tmp_path):
  r = run_pdiff("bench", "--config=configs/tiny.py", f"--out={tmp_path / 'b.json'}", "--parts=train,gpu",
                env={"XLA_FLAGS": xla_flags()})
  assert r.returncode == 2 and "--parts: unknown gpu" in r.stderr


def test_a_failed_profile_summary_keeps_the_timings(tmp_path, monkeypatch):
  """A trace the summary cannot read (an unfamiliar layout on some backend) is reported in the
  JSON, with the folder that keeps the trace and the HLO, instead of losing the run's timings."""
  import jax
  import jax.numpy as jnp
  from pdiff_jax import bench, profiling

  def unreadable(*args, **kwargs):
    raise KeyError("traceEvents")

  monkeypatch.setattr(profiling, "op_seconds", unreadable)
  x = jnp.ones((64, 64))
  compiled = jax.jit(lambda x: x @ x).lower(x).compile()
  p = bench._profile(compiled, lambda: compiled(x).block_until_ready(), str(tmp_path / "train"),
                     flops=2 * 64 ** 3, repeats=1)
  assert p == {"error": "KeyError: 'traceEvents'", "dir": str(tmp_path / "train")}
  assert (tmp_path / "train" / "hlo.txt").read_text() == compiled.as_text()
  assert "profile summary failed (KeyError: 'traceEvents')" in bench._profile_table(p, 1e9)


def test_bench_pipeline_measures_the_input_path_and_cleans_up(tmp_path):
  """`--parts=pipeline` at two split sizes: the store is written as extract writes it (float16
  here), memory-mapped, timed, and removed; the figures are per-step consistent."""
  from pdiff_jax import bench
  config = load_config("tiny", **{"data.feature_dtype": "float16"})
  r = bench.bench_pipeline(config, steps=30, sizes=((3000, 600), (300, 60)), workdir=str(tmp_path))
  assert [z["captions"] for z in r["sizes"]] == [3000, 300]
  for z in r["sizes"]:
    for key in ("assemble", "with_copy"):
      assert z[f"{key}_captions_per_sec"] == pytest.approx(
          r["batch_size"] * 1e6 / z[f"{key}_us_per_step"])
    assert z["prefetched_captions_per_sec"] > 0
  assert r["captions_per_sec"] == r["sizes"][0]["with_copy_captions_per_sec"]
  assert r["host_time_growth"] > 0
  assert list(tmp_path.iterdir()) == []  # the temporary store is gone


def test_bench_extract_times_host_path_and_extract_per_thread_count(tmp_path, clip_dir):
  """`--parts=extract`: real JPEGs, decoded and transformed by 1 and 2 loader threads, and a
  whole `extract` into a temporary store, for each; nothing is left behind."""
  from pdiff_jax import bench
  config = load_config("tiny", **{"clip.model": str(clip_dir), "clip.batch_size": 4})
  r = bench.bench_extract(config, images=12, threads=(1, 2), workdir=str(tmp_path))
  assert set(r["threads"]) == {"1", "2"} and r["clip_input"] == 32
  for z in r["threads"].values():
    assert z["host_images_per_sec"] > 0 and z["extract_images_per_sec"] > 0
  assert r["host_speedup"] == pytest.approx(
      r["threads"]["2"]["host_images_per_sec"] / r["threads"]["1"]["host_images_per_sec"])
  assert list(tmp_path.iterdir()) == []



def test_bench_clip_times_the_configured_views(clip_dir):
  """`pdiff bench --parts=clip` encodes as extraction will: with clip.views=9, 9 encodings an image."""
  from pdiff_jax import bench, clip as clip_lib
  built, real = [], clip_lib.image_encoder

  def spy(model, mesh, views=1, view_shift=1):
    built.append((views, view_shift))
    return real(model, mesh, views, view_shift)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(clip_lib, "image_encoder", spy)
    one, nine = (bench.bench_clip(str(clip_dir), 4, repeats=1, views=v) for v in (1, 9))
  # Clip.load builds its own one-view encoder; the timed ones are the last of each call
  assert built[-1] == (9, 1) and (1, 1) in built
  assert (one["views"], nine["views"]) == (1, 9)
  assert one["images_per_sec"] > 0 and nine["images_per_sec"] > 0
