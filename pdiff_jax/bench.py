"""`pdiff bench`: throughput of the train step, the sampler and CLIP image encoding on this machine.

Every figure is a median over repeats after a warm-up, with device work synchronised before the
clock is read; compile time (lowering and XLA compilation, no execution) is reported separately.
Model FLOP utilisation (MFU) is the model's matmul FLOPs (model.forward_flops, counted from the
config) per second over the dense matmul rate this same run measures on this device, in the
compute dtype.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pdiff_jax import clip as clip_lib
from pdiff_jax import config as config_lib
from pdiff_jax import model as model_lib
from pdiff_jax import profiling
from pdiff_jax import sampler as sampler_lib
from pdiff_jax import sharding as sharding_lib
from pdiff_jax import storage
from pdiff_jax import train
from pdiff_jax.data import pipeline

log = logging.getLogger(__name__)

def _time(fn, repeats: int) -> float:
  """Median seconds of `fn()` (which must block until its result is ready)."""
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def matmul_rate(dtype=jnp.float32, n: int | None = None, repeats: int = 5) -> float:
  """Dense (n x n) @ (n x n) FLOP/s on the default device."""
  n = n or (2048 if jax.default_backend() == "cpu" else 8192)
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  return 2 * n ** 3 / _time(lambda: f(a, b).block_until_ready(), repeats)


def _peak_memory() -> int | None:
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # backends without memory stats
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


def _profile_subdir(profile_dir: str, part: str) -> str:
  """Each process traces into its own folder (the trace files are named after the host)."""
  if jax.process_count() > 1:
    return os.path.join(profile_dir, part, f"process_{jax.process_index()}")
  return os.path.join(profile_dir, part)


def _profile(compiled, run, logdir: str, flops: float, repeats: int = 3) -> dict:
  """profiling.summarise of `run`; a summary that fails (an unfamiliar trace layout, say) is
  reported in the JSON rather than losing the run's timings. The trace and the HLO stay in
  `logdir` for profiling.summarise_trace to read again."""
  try:
    return profiling.summarise(compiled.as_text(), run, logdir, flops, repeats=repeats)
  except Exception as e:  # noqa: BLE001 -- the measurements above must still be written
    log.warning("profile summary in %s failed: %s: %s", logdir, type(e).__name__, e)
    return {"error": f"{type(e).__name__}: {e}", "dir": logdir}


def bench_train(config, repeats: int = 5, profile_dir: str | None = None) -> dict:
  mesh = sharding_lib.make_mesh(config)
  model, tx = train.make_model(config), train.make_optimizer(config)
  state, _, shardings = train.create_state(model, tx, config, mesh, jax.random.key(0))
  step = train.jit_train_step(model, tx, config, mesh, shardings)
  B, L, m = config.train.batch_size, config.data.max_len, config.model
  rng = np.random.default_rng(0)
  # Each process builds only its rows, so the global batch is the configured one on any number
  # of processes (as in training).
  rows = pipeline.process_rows(B, jax.process_index(), jax.process_count())
  ids = rng.integers(0, m.vocab_size, (B, L)).astype(np.int32)
  feats = rng.standard_normal((B, m.feature_dim)).astype(np.float32)
  batch = sharding_lib.global_batch({"ids": ids[rows], "features": feats[rows]}, mesh)
  global_B = int(batch["ids"].shape[0])  # what the step really runs on
  if global_B != B:
    raise RuntimeError(f"the global batch has {global_B} rows, not train.batch_size={B}")
  key = jax.random.key(0)
  with jax.set_mesh(mesh):
    # Compiled once, explicitly: the compile time is XLA's alone (not a first step's too), and
    # the profile reads the HLO of the very executable it times.
    t = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t
    holder = {"state": state}

    def run():
      holder["state"], metrics = compiled(holder["state"], batch, key)
      jax.block_until_ready(metrics)

    run()
    seconds = _time(run, repeats)
    flops = model_lib.train_flops_per_example(config_lib.model_config(config)) * B
    out = {"examples_per_sec": B / seconds, "tokens_per_sec": B * L / seconds,
           "flops_per_sec": flops / seconds, "step_seconds": seconds, "compile_seconds": compile_s,
           "batch_size": int(config.train.batch_size), "global_batch_size": global_B,
           "processes": jax.process_count()}
    if profile_dir:
      out["profile"] = _profile(compiled, run, _profile_subdir(profile_dir, "train"), flops)
  return out


def bench_sample(config, repeats: int = 3, profile_dir: str | None = None) -> dict:
  cfg = config_lib.model_config(config)
  model = model_lib.PrefixDenoiser(cfg)
  import flax.linen as nn
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *train.dummy_inputs(config)))
  s = config.sampler
  n, steps, images = int(s.num_candidates), int(s.steps), int(s.batch_size)
  sched = sampler_lib.make_sampling_schedule(config.diffusion.schedule, config.diffusion.num_steps,
                                             steps, s.mode)
  fn = jax.jit(functools.partial(sampler_lib.sample_tokens, model, sched=sched, eta=float(s.eta),
                                 clamp=bool(s.clamp)))
  feats = jax.random.normal(jax.random.key(1), (images, cfg.feature_dim))
  keys = sampler_lib.candidate_keys(0, jnp.arange(images), n)
  t = time.perf_counter()
  compiled = fn.lower(params, feats, keys).compile()
  compile_s = time.perf_counter() - t
  run = lambda: compiled(params, feats, keys).block_until_ready()
  run()
  seconds = _time(run, repeats)
  step_flops = model_lib.denoise_step_flops(cfg) * n * images * steps
  out = {"images_per_sec": images / seconds, "candidates_per_sec": images * n / seconds,
         "num_candidates": n, "steps": steps, "images_per_call": images,
         "flops_per_sec": step_flops / seconds, "compile_seconds": compile_s}
  if profile_dir:
    out["profile"] = _profile(compiled, run, _profile_subdir(profile_dir, "sample"), step_flops,
                              repeats=1)
  return out


def bench_clip(name: str, batch: int, repeats: int = 3) -> dict:
  source = name
  try:
    clip = clip_lib.Clip.load(name)
    model, params, size = clip.model, clip.params, clip.transform.crop_height
  except clip_lib.ClipLoadError as e:
    if name not in clip_lib.KNOWN_CLIPS:
      return {"images_per_sec": None, "reason": str(e)}
    try:
      model, params, size = clip_lib.random_clip(clip_lib.KNOWN_CLIPS[name])
    except ImportError as e2:
      return {"images_per_sec": None, "reason": f"no FlaxCLIPModel here ({e2})"}
    source = f"{name} (random weights: not available offline)"
  fn = jax.jit(lambda p, x: model.get_image_features(pixel_values=x, params=p))
  x = jax.random.normal(jax.random.key(0), (batch, 3, size, size))
  t = time.perf_counter()
  compiled = fn.lower(params, x).compile()
  compile_s = time.perf_counter() - t
  run = lambda: compiled(params, x).block_until_ready()
  run()
  seconds = _time(run, repeats)
  return {"images_per_sec": batch / seconds, "batch_size": batch, "model": source,
          "compile_seconds": compile_s}


def run_bench(config, out: str, parts=("train", "sample", "clip"),
              profile_dir: str | None = None) -> dict:
  """Measures `parts`; with `profile_dir`, also a profiler trace of the train step and the sampler
  there, summarised per op in the JSON (`profiling.summarise`)."""
  config_lib.validate(config)
  dtype = config_lib.DTYPES[config.model.dtype]
  result = {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "backend": jax.default_backend(), "num_devices": jax.device_count(),
            "jax": jax.__version__, "compute_dtype": config.model.dtype}
  rate = matmul_rate(dtype)
  result["matmul_flops_per_sec"] = rate
  if "float32" != config.model.dtype:
    result["matmul_flops_per_sec_float32"] = matmul_rate(jnp.float32)
  if "train" in parts:
    result["train"] = bench_train(config, profile_dir=profile_dir)
    result["train"]["mfu"] = result["train"]["flops_per_sec"] / (rate * jax.device_count())
  if "sample" in parts:
    result["sample"] = bench_sample(config, profile_dir=profile_dir)
    result["sample"]["mfu"] = result["sample"]["flops_per_sec"] / rate
  if "clip" in parts:
    result["clip"] = bench_clip(config.clip.model, int(config.clip.batch_size))
  result["peak_memory_bytes"] = _peak_memory()
  result["num_processes"] = jax.process_count()
  if jax.process_index() == 0:  # the train figures are global; the others are process 0's own
    storage.write_json(out, result, indent=1)
    print(table(result))
  return result


def _profile_table(p: dict, rate: float) -> str:
  if "error" in p:
    return f"  profile summary failed ({p['error']}); trace and HLO in {p['dir']}"
  return profiling.table(p, rate)


def table(r: dict) -> str:
  lines = [f"device: {r['device']} ({r['backend']}, jax {r['jax']}, {r['compute_dtype']})",
           f"matmul: {r['matmul_flops_per_sec'] / 1e12:.2f} TFLOP/s"]
  if "train" in r:
    t = r["train"]
    lines.append(f"train:  {t['examples_per_sec']:.1f} captions/s (global batch {t['batch_size']} over "
                 f"{r.get('num_processes', 1)} process(es)), {t['tokens_per_sec']:.0f} tokens/s, "
                 f"{t['flops_per_sec'] / 1e12:.2f} TFLOP/s, MFU {100 * t['mfu']:.0f}%, "
                 f"compile {t['compile_seconds']:.1f} s")
    if "profile" in t:
      lines.append(_profile_table(t["profile"], r["matmul_flops_per_sec"]))
  if "sample" in r:
    s = r["sample"]
    lines.append(f"sample: {s['images_per_sec']:.2f} images/s ({s['num_candidates']} candidates x "
                 f"{s['steps']} steps), MFU {100 * s['mfu']:.0f}%, compile {s['compile_seconds']:.1f} s")
    if "profile" in s:
      lines.append(_profile_table(s["profile"], r["matmul_flops_per_sec"]))
  if "clip" in r and r["clip"].get("images_per_sec"):
    lines.append(f"clip:   {r['clip']['images_per_sec']:.1f} images/s ({r['clip']['model']})")
  return "\n".join(lines)
