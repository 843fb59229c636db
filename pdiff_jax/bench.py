"""`pdiff bench`: throughput of the train step, the sampler and CLIP image encoding on this machine.

Every figure is a median over repeats after a warm-up, with device work synchronised before the
clock is read; compile time (lowering and XLA compilation, no execution) is reported separately.
Model FLOP utilisation (MFU) is the model's matmul FLOPs (model.forward_flops, counted from the
config) per second over the dense matmul rate this same run measures on this device, in the
compute dtype.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import logging
import os
import platform
import shutil
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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

PARTS = ("train", "sample", "clip", "pipeline", "extract", "serve")

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


def cpu_model() -> str:
  """The host CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."): on Linux the kernel's
  /proc/cpuinfo (no runtime dependency reads it; py-cpuinfo is not one), else what `platform`
  knows. Figures computed on a CPU can differ on another kind: XLA picks kernels for it."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
          return value.strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown"


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
  k = int(config.train.get("steps_per_dispatch", 1))  # steps per call: each figure is per step
  step = train.jit_train_step(model, tx, config, mesh, shardings, k)
  B, L, m = config.train.batch_size, config.data.max_len, config.model
  rng = np.random.default_rng(0)
  # Each process builds only its rows, so the global batch is the configured one on any number
  # of processes (as in training).
  rows = pipeline.process_rows(B, jax.process_index(), jax.process_count())
  ids = rng.integers(0, m.vocab_size, (B, L)).astype(np.int32)
  feats = rng.standard_normal((B, m.feature_dim)).astype(np.float32)
  local = {"ids": ids[rows], "features": feats[rows]}
  if k > 1:  # the same batch for each of the k steps
    local = {name: np.stack([v] * k) for name, v in local.items()}
  batch = sharding_lib.global_batch(local, mesh, stacked=k > 1)
  global_B = int(batch["ids"].shape[1 if k > 1 else 0])  # what each step really runs on
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

    def run_back_to_back(calls: int = 10):  # as `pdiff train` dispatches: no wait between calls
      for _ in range(calls):
        holder["state"], metrics = compiled(holder["state"], batch, key)
      jax.block_until_ready(metrics)

    run()
    seconds = _time(run, repeats) / k
    back_to_back = _time(run_back_to_back, repeats) / (10 * k)
    flops = model_lib.train_flops_per_example(config_lib.model_config(config)) * B
    out = {"examples_per_sec": B / seconds, "tokens_per_sec": B * L / seconds,
           "flops_per_sec": flops / seconds, "step_seconds": seconds, "compile_seconds": compile_s,
           "back_to_back_step_seconds": back_to_back,
           "back_to_back_examples_per_sec": B / back_to_back,
           "batch_size": int(config.train.batch_size), "global_batch_size": global_B,
           "steps_per_dispatch": k,
           "processes": jax.process_count()}
    if profile_dir:
      out["profile"] = _profile(compiled, run, _profile_subdir(profile_dir, "train"), flops * k)
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
  solver, guidance = s.get("solver", "ddim"), float(s.get("guidance", 1.0))
  length = sampler_lib.parse_length(s.get("length", ""), cfg.max_len, cfg.length_head)
  fn = jax.jit(functools.partial(sampler_lib.sample_tokens, model, sched=sched, eta=float(s.eta),
                                 clamp=bool(s.clamp), solver=sampler_lib.make_solver(solver, float(s.eta)),
                                 guidance=guidance, length=length))
  feats = jax.random.normal(jax.random.key(1), (images, cfg.feature_dim))
  keys = sampler_lib.candidate_keys(0, jnp.arange(images), n)
  t = time.perf_counter()
  compiled = fn.lower(params, feats, keys).compile()
  compile_s = time.perf_counter() - t
  run = lambda: compiled(params, feats, keys).block_until_ready()
  run()
  seconds = _time(run, repeats)
  step_flops = model_lib.denoise_step_flops(cfg, guided=guidance != 1.0) * n * images * steps
  out = {"images_per_sec": images / seconds, "candidates_per_sec": images * n / seconds,
         "num_candidates": n, "steps": steps, "images_per_call": images, "solver": solver,
         "guidance": guidance, "length": s.get("length", ""), "self_cond": cfg.self_cond > 0,
         # network evaluations per caption: guidance runs the network on a doubled batch
         "network_evals_per_candidate": steps * (2 if guidance != 1.0 else 1),
         "flops_per_sec": step_flops / seconds, "compile_seconds": compile_s}
  if profile_dir:
    out["profile"] = _profile(compiled, run, _profile_subdir(profile_dir, "sample"), step_flops,
                              repeats=1)
  return out


def bench_clip(name: str, batch: int, repeats: int = 3, views: int = 1, view_shift: int = 1) -> dict:
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
  # `clip.image_encoder` on one device: with views > 1 each image costs its views' encodings
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  fn = clip_lib.image_encoder(model, mesh, views, view_shift)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  x = jax.device_put(jax.random.normal(jax.random.key(0), (batch, 3, size, size)), NamedSharding(mesh, P()))
  t = time.perf_counter()
  compiled = fn.lower(params, x).compile()
  compile_s = time.perf_counter() - t
  run = lambda: compiled(params, x).block_until_ready()
  run()
  seconds = _time(run, repeats)
  return {"images_per_sec": batch / seconds, "batch_size": batch, "model": source,
          "compile_seconds": compile_s, "views": views}


COCO_SPLIT = (566_747, 123_287)  # captions, images of COCO train+restval+val+test (Karpathy)


def _write_split(directory: str, captions: int, images: int, config, seed: int = 0) -> "pipeline.CaptionSplit":
  """A feature store split of this size, written and memory-mapped as `extract` does."""
  from pdiff_jax.data import features as features_lib
  rng = np.random.default_rng(seed)
  dtype = features_lib.FEATURE_DTYPES[config.data.feature_dtype]
  arrays = {
      "features": rng.standard_normal((images, int(config.model.feature_dim)), np.float32).astype(dtype),
      "ids": rng.integers(0, int(config.model.vocab_size), (captions, int(config.data.max_len)), dtype=np.int32),
      "image_index": np.sort(rng.integers(0, images, captions)).astype(np.int32)}
  for kind, array in arrays.items():
    storage.save_npy(os.path.join(directory, f"train_{kind}.npy"), array)
  return pipeline.CaptionSplit(*(storage.load_npy(os.path.join(directory, f"train_{k}.npy"))
                                 for k in ("features", "ids", "image_index")))


def bench_pipeline(config, steps: int = 2000, sizes=(COCO_SPLIT, (COCO_SPLIT[0] // 10, COCO_SPLIT[1] // 10)),
                   workdir: str | None = None) -> dict:
  """Captions/s of the training input path at `train.batch_size`: batch assembly alone (index,
  gather from the memory-mapped store) and with the copy to the devices, at COCO's size and at a
  tenth of it (per-step host time must not grow with the split)."""
  import tempfile
  mesh = sharding_lib.make_mesh(config)
  B = int(config.train.batch_size)
  out = {"batch_size": B, "steps": steps, "feature_dim": int(config.model.feature_dim),
         "max_len": int(config.data.max_len), "feature_dtype": str(config.data.feature_dtype),
         "sizes": []}
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    for captions, images in sizes:
      split = _write_split(tmp, captions, images, config)
      local = lambda step: pipeline.local_batch(split, step, B, int(config.seed), jax.process_index(),
                                                jax.process_count())
      for step in range(3):  # draws the epoch's permutation, maps the pages in
        jax.block_until_ready(sharding_lib.global_batch(local(step), mesh))
      t = time.perf_counter()
      for step in range(steps):
        local(step)
      assemble = (time.perf_counter() - t) / steps
      t = time.perf_counter()
      for step in range(steps):
        jax.block_until_ready(sharding_lib.global_batch(local(step), mesh))
      copy = (time.perf_counter() - t) / steps
      # As the train loop consumes it: a background thread, two batches ahead.
      t = time.perf_counter()
      with pipeline.Prefetcher(lambda s: sharding_lib.global_batch(local(s), mesh), range(steps)) as q:
        for step in range(steps):
          jax.block_until_ready(q.get(step))
      prefetched = (time.perf_counter() - t) / steps
      out["sizes"].append({
          "captions": captions, "images": images,
          "assemble_us_per_step": 1e6 * assemble, "assemble_captions_per_sec": B / assemble,
          "with_copy_us_per_step": 1e6 * copy, "with_copy_captions_per_sec": B / copy,
          "prefetched_captions_per_sec": B / prefetched})
  big, small = out["sizes"][0], out["sizes"][-1]
  out["captions_per_sec"] = big["with_copy_captions_per_sec"]
  out["host_time_growth"] = big["with_copy_us_per_step"] / small["with_copy_us_per_step"]
  return out


def _write_photos(directory: str, count: int, size=(640, 480), seed: int = 0) -> None:
  """`count` COCO-like JPEGs (640 x 480, quality 90: smooth regions, edges and grain, so that
  decoding costs what a photo costs) and a folder source's captions.jsonl."""
  import json
  from PIL import Image, ImageDraw
  rng = np.random.default_rng(seed)
  w, h = size
  lines = []
  for i in range(count):
    base = np.linspace(rng.uniform(0, 255, 3), rng.uniform(0, 255, 3), w)[None].repeat(h, 0)
    image = Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
      x, y = rng.uniform(0, w), rng.uniform(0, h)
      r = rng.uniform(10, 120)
      draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    image.save(os.path.join(directory, f"{i:05d}.jpg"), quality=90)
    lines.append(json.dumps({"image": f"{i:05d}.jpg", "captions": [f"photo {i}"]}))
  with open(os.path.join(directory, "captions.jsonl"), "w") as f:
    f.write("\n".join(lines) + "\n")


def bench_extract(config, images: int = 400, threads=(1, 2), workdir: str | None = None) -> dict:
  """Images/s of extraction's host path (decode + resize, crop, normalise in the loader threads,
  no CLIP) and of `pdiff extract` end to end with a tiny CLIP of the configured CLIP's input
  size (so that the device's share is ~0 and the host path is what is measured), at each thread
  count: how many cores a GPU host needs to keep its CLIP fed."""
  import tempfile
  from pdiff_jax.data import features as features_lib
  from pdiff_jax.data import sources as sources_lib
  try:
    transform = clip_lib.Clip.load(config.clip.model).transform
    size, source = transform.crop_height, config.clip.model
  except clip_lib.ClipLoadError:
    arch = clip_lib.KNOWN_CLIPS.get(config.clip.model, clip_lib.KNOWN_CLIPS["openai/clip-vit-large-patch14"])
    size, source = arch["vision"]["image_size"], f"{config.clip.model} (its input size; not available offline)"
  out = {"images": images, "image_size": "640x480 JPEG", "clip_input": size, "transform_of": source,
         "threads": {}}
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    photos, clip_dir = os.path.join(tmp, "photos"), os.path.join(tmp, "clip")
    os.makedirs(photos)
    _write_photos(photos, images)
    clip_lib.save_small_clip(clip_dir, image_size=size, patch_size=size // 2,  # 2 x 2 patches
                             width=32, layers=1, heads=2, projection_dim=32)
    tiny = clip_lib.Clip.load(clip_dir, devices=jax.devices()[:1], image_chunk=int(config.clip.batch_size))
    for n in threads:
      src = sources_lib.open_source(f"folder:{photos}", threads=n)
      list(src.images("train", 0, min(8, images), transform=tiny.transform))  # warm the page cache
      t = time.perf_counter()
      for _ in src.images("train", 0, images, transform=tiny.transform):
        pass
      host = images / (time.perf_counter() - t)
      c = copy.deepcopy(config)
      c.data.source, c.data.image_root = f"folder:{photos}", ""
      c.data.feature_dir = os.path.join(tmp, f"features_{n}")
      c.data.loader_threads, c.data.shard_size, c.data.min_count = n, images, 1
      features_lib.extract(c, tiny, progress=False)  # compiles the tiny CLIP's one chunk shape
      shutil.rmtree(c.data.feature_dir)
      t = time.perf_counter()
      features_lib.extract(c, tiny, progress=False)
      end_to_end = images / (time.perf_counter() - t)
      out["threads"][str(n)] = {"host_images_per_sec": host, "extract_images_per_sec": end_to_end}
  rates = [out["threads"][str(n)]["host_images_per_sec"] for n in threads]
  out["host_speedup"] = rates[-1] / rates[0]
  return out


def bench_serve(workdir: str, requests: int = 2000, clients: int = 32,
                fields: dict | None = None) -> dict:
  """`pdiff serve` on `workdir` in its own process on 127.0.0.1: throughput and latency of
  `clients` concurrent clients against one client at a time (one image per request; the sampler
  options are the workdir's defaults unless `fields` names others), the mean images per sampler
  call, and the server's resident memory after warm-up and after the run."""
  import socket
  import subprocess
  import sys
  import urllib.request
  from PIL import Image
  from pdiff_jax import serve as serve_lib
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen([sys.executable, "-m", "pdiff_jax", "serve", f"--workdir={workdir}",
                           f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env={k: v for k, v in os.environ.items() if k != serve_lib.TOKEN_ENV})
  model = lambda: json.loads(urllib.request.urlopen(url + "/v1/model", timeout=30).read())
  try:
    deadline = time.time() + 600
    while True:
      if proc.poll() is not None:
        raise RuntimeError(f"pdiff serve --workdir={workdir} exited with {proc.returncode}")
      try:
        if urllib.request.urlopen(url + "/healthz", timeout=2).status == 200:
          break
      except OSError:
        if time.time() > deadline:
          raise RuntimeError("pdiff serve did not become ready in 600 s") from None
        time.sleep(0.5)
    rng = np.random.default_rng(0)
    uploads = []
    for i in range(16):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(buf, format="PNG")
      uploads.append((f"random_{i}.png", buf.getvalue()))
    defaults = model()["defaults"]
    fields = {"num_candidates": defaults["num_candidates"], "steps": defaults["steps"], **(fields or {})}
    serve_lib.load(url, uploads, clients=4, requests=16, fields=fields)  # the request path warm
    rss_warm = model()["stats"]["rss_bytes"]
    one = serve_lib.load(url, uploads, clients=1, requests=max(requests // 40, 10), fields=fields)
    before = model()["stats"]
    many = serve_lib.load(url, uploads, clients=clients, requests=requests, fields=fields)
    after = model()["stats"]
    calls = max(after["sampler_calls"] - before["sampler_calls"], 1)
    return {"workdir": workdir, "fields": fields, "one_client": one, "concurrent": many,
            "speedup": many["requests_per_sec"] / one["requests_per_sec"],
            "mean_images_per_call": (after["images"] - before["images"]) / calls,
            "images_per_call_limit": model()["limits"]["max_images"],
            "rss_after_warmup_bytes": rss_warm, "rss_after_bytes": after["rss_bytes"]}
  finally:
    proc.terminate()
    proc.wait(timeout=120)


def run_bench(config, out: str, parts=("train", "sample", "clip"),
              profile_dir: str | None = None, serve_workdir: str | None = None,
              serve_requests: int = 2000) -> dict:
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
    result["clip"] = bench_clip(config.clip.model, int(config.clip.batch_size),
                                **config_lib.clip_views(config))
  if "pipeline" in parts:
    result["pipeline"] = bench_pipeline(config)
  if "extract" in parts:
    result["extract"] = bench_extract(config)
  if "serve" in parts:
    if not serve_workdir:
      raise ValueError("--parts=serve needs --workdir (a trained model to serve)")
    result["serve"] = bench_serve(serve_workdir, serve_requests)
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
                 f"compile {t['compile_seconds']:.1f} s; back to back (as train runs): "
                 f"{t['back_to_back_examples_per_sec']:.1f} captions/s")
    if "profile" in t:
      lines.append(_profile_table(t["profile"], r["matmul_flops_per_sec"]))
  if "sample" in r:
    s = r["sample"]
    lines.append(f"sample: {s['images_per_sec']:.2f} images/s ({s['num_candidates']} candidates x "
                 f"{s['steps']} steps), MFU {100 * s['mfu']:.0f}%, compile {s['compile_seconds']:.1f} s")
    if "profile" in s:
      lines.append(_profile_table(s["profile"], r["matmul_flops_per_sec"]))
  if "pipeline" in r:
    p = r["pipeline"]
    for z in p["sizes"]:
      lines.append(f"pipeline ({z['captions']:,} captions, {z['images']:,} images, batch {p['batch_size']}): "
                   f"assemble {z['assemble_captions_per_sec']:,.0f} captions/s ({z['assemble_us_per_step']:.0f} us/step), "
                   f"+ copy to devices {z['with_copy_captions_per_sec']:,.0f} captions/s "
                   f"({z['with_copy_us_per_step']:.0f} us/step), prefetched {z['prefetched_captions_per_sec']:,.0f} captions/s")
  if "extract" in r:
    e = r["extract"]
    for n, z in e["threads"].items():
      lines.append(f"extract ({e['images']} {e['image_size']} -> {e['clip_input']} px, {n} loader thread(s)): "
                   f"host path {z['host_images_per_sec']:.1f} images/s, end to end with a tiny CLIP "
                   f"{z['extract_images_per_sec']:.1f} images/s")
  if "serve" in r:
    v = r["serve"]
    for name in ("one_client", "concurrent"):
      z = v[name]
      lines.append(f"serve ({z['clients']} client(s), {z['requests']} requests, {v['fields']}): "
                   f"{z['requests_per_sec']:.1f} requests/s, p50 {z['p50_ms']:.0f} ms, "
                   f"p99 {z['p99_ms']:.0f} ms, {z['errors']} errors")
    lines.append(f"serve: {v['speedup']:.1f}x with concurrency, {v['mean_images_per_call']:.1f} images "
                 f"per sampler call (limit {v['images_per_call_limit']})")
  if "clip" in r and r["clip"].get("images_per_sec"):
    lines.append(f"clip:   {r['clip']['images_per_sec']:.1f} images/s ({r['clip']['model']})")
  return "\n".join(lines)
