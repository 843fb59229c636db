"""The `pdiff` command: the only place that parses flags. One small function per subcommand.

Exit codes: 0 success; 2 bad usage or configuration (the message names the flag or key);
1 any other failure, with a one-line cause on stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Callable

from absl import flags
from ml_collections import config_flags

USAGE = """usage: pdiff COMMAND [--flag=value ...]

commands:
  demo    --workdir=DIR [--fast]                                 the whole pipeline on embedded synthetic data
  extract --config=CFG [--config.key=value ...]                  CLIP features + vocabulary of every split
  train   --config=CFG --workdir=DIR [--config.key=value ...]   train; resumes from DIR
  caption --workdir=DIR [--num_candidates=N] [--steps=S] [--seed=K] [--solver=ddim|dpmpp2m|dpmpp2m-sde] [--guidance=S]
          [--length=auto|N|MIN-MAX] [--select=clip|vote|posterior|fit] [--json] IMAGE...
  eval    --workdir=DIR [--split=test] [--num_candidates=N] [--steps=S] [--solver=ddim|dpmpp2m|dpmpp2m-sde] [--guidance=S]
          [--length=auto|N|MIN-MAX] [--select=clip|vote|posterior|fit] [--sweep]
  score   --results=R.json --references=K [--split=test] [--images=DIR --clip=MODEL] --out=DIR
  bench   [--config=CFG] --out=FILE [--parts=train,sample,clip,pipeline,extract,serve] [--profile_dir=DIR]
          [--solver=NAME] [--guidance=S] [--workdir=DIR (serve)]
          throughput, FLOP/s and MFU here; with --profile_dir, where the step's time goes
  info    --config=CFG [--config.key=value ...]                  what a config builds, as JSON
  serve   --workdir=DIR [--host=127.0.0.1] [--port=8000] [--token=T] [--max_wait_ms=MS] [--max_upload_mb=MB]
          captions over HTTP, batched across requests, with a web page at /

`pdiff COMMAND --help` lists a command's flags."""


class UsageError(Exception):
  """Bad flags or configuration: exit code 2."""


def _config_flag(fv: flags.FlagValues, required: bool = True) -> None:
  config_flags.DEFINE_config_file("config", None, "Python config file (get_config()).",
                                  flag_values=fv, lock_config=True)
  if required:
    flags.mark_flag_as_required("config", flag_values=fv)


def _distributed_flags(fv: flags.FlagValues) -> None:
  """--coordinator_address/--num_processes/--process_id: join a multi-process run (the same as
  PDIFF_COORDINATOR/PDIFF_NUM_PROCESSES/PDIFF_PROCESS_ID; PDIFF_DISTRIBUTED=auto on TPU pods)."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator; every "
                      "process of a multi-process run passes the same one.", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Number of processes in the run.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1.",
                       lower_bound=0, flag_values=fv)


def _with_distributed(define: Callable[[flags.FlagValues], None]) -> Callable[[flags.FlagValues], None]:
  def both(fv: flags.FlagValues) -> None:
    define(fv)
    _distributed_flags(fv)
  return both


def _flags_train(fv: flags.FlagValues) -> None:
  _config_flag(fv)
  flags.DEFINE_string("workdir", None, "Where checkpoints, config.json and metrics.jsonl go.",
                      flag_values=fv, required=True)
  _compilation_cache_flag(fv)


def _overrides(fv: flags.FlagValues) -> tuple[str, ...]:
  """The dotted config keys set by --config.KEY=VALUE flags."""
  return tuple(config_flags.get_override_values(fv["config"]))


def _compilation_cache_flag(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("compilation_cache", None, "Persistent XLA compilation cache (a local path "
                      "or gs://...; 'none' turns it off). Default: WORKDIR/compilation_cache, "
                      "unless JAX_COMPILATION_CACHE_DIR is set. A restarted or preempted job "
                      "then loads its executables instead of compiling them again.", flag_values=fv)


def _use_compilation_cache(fv: flags.FlagValues) -> None:
  import jax
  choice = fv.compilation_cache
  if choice is None:
    if jax.config.jax_compilation_cache_dir:  # the environment chose one
      return
    from pdiff_jax import storage
    choice = storage.join(fv.workdir, "compilation_cache")
  if choice.lower() != "none":
    jax.config.update("jax_compilation_cache_dir", choice)


def _cmd_train(fv: flags.FlagValues) -> int:
  from pdiff_jax import train
  _use_compilation_cache(fv)
  train.train_and_evaluate(fv.config, fv.workdir, overrides=_overrides(fv))
  return 0


def _cmd_extract(fv: flags.FlagValues) -> int:
  import jax
  from pdiff_jax import clip as clip_lib, config as config_lib
  from pdiff_jax.data import features
  config = fv.config
  config_lib.validate(config)
  if config.data.source == "synthetic":
    raise config_lib.ConfigError("data.source", "'synthetic' is generated in memory; there is "
                                 "nothing to extract")
  clip = clip_lib.Clip.load(config.clip.model, image_chunk=config.clip.batch_size,
                            **config_lib.clip_views(config))

  def barrier(name: str) -> None:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(name)

  manifest = features.extract(config, clip, process_index=jax.process_index(),
                              process_count=jax.process_count(), barrier=barrier)
  if jax.process_index() == 0:
    print(json.dumps({"feature_dir": config.data.feature_dir, **manifest}, indent=1))
  return 0


def _sampling_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("num_candidates", None, "Candidates per image (default: sampler.num_candidates).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("steps", None, "Denoising steps (default: sampler.steps).", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Sampling seed; the same seed gives the same captions.", flag_values=fv)
  flags.DEFINE_float("eta", None, "DDIM eta in [0, 1] (default: sampler.eta).", lower_bound=0.0,
                     upper_bound=1.0, flag_values=fv)
  from pdiff_jax.sampler import SELECTS, SOLVERS
  flags.DEFINE_enum("solver", None, list(SOLVERS), "Sampling solver (default: sampler.solver; "
                    "ddim is the original's).", flag_values=fv)
  flags.DEFINE_enum("select", None, list(SELECTS), "How the caption is chosen among the "
                    "candidates (default: sampler.select): clip (the original's: highest CLIP "
                    "cosine), vote (drawn most often, ties by cosine), posterior (CLIP's softmax "
                    "summed over each caption's copies) or fit (the posterior with the denoiser's "
                    "reconstruction error of each candidate, sampler.fit_*).", flag_values=fv)
  flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: sampler.guidance; "
                     "1 = none, 0 = unconditional; needs a model trained with model.cond_drop).",
                     flag_values=fv)
  flags.DEFINE_string("length", None, "Caption length in words: auto (drawn from the length head), "
                      "N or MIN-MAX (default: sampler.length; empty = the model decides).",
                      flag_values=fv)


def _sampling_options(captioner, fv: flags.FlagValues) -> dict:
  """The --solver, --guidance and --length given, checked against the model (a bad one is a
  usage error naming its flag)."""
  try:
    return captioner.sampling_options(fv.solver, fv.guidance, fv.length)
  except ValueError as e:
    raise UsageError(f"--{e}") from None


def _flags_caption(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/).",
                      flag_values=fv, required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step to use (default: the latest).", flag_values=fv)
  _sampling_flags(fv)
  flags.DEFINE_boolean("json", False, "Print every candidate with its CLIP cosine (score), best "
                       "first, as JSON; under another --select or with a judge also its rank in "
                       "the choice (1: the caption chosen), and the judge's score (judged).",
                       flag_values=fv)


def _cmd_caption(fv: flags.FlagValues, images: list[str]) -> int:
  from pdiff_jax.data.images import BadImage, load_image
  from pdiff_jax.inference import Captioner
  if not images:
    raise UsageError("name at least one image file")
  captioner = Captioner.from_workdir(fv.workdir, step=fv.step)
  opts = _sampling_options(captioner, fv)
  readable, failed = [], 0
  for path in images:
    try:
      readable.append((path, load_image(path)))
    except BadImage as e:
      print(f"pdiff caption: {path}: {e}", file=sys.stderr)
      failed += 1
  results = captioner.caption([im for _, im in readable], num_candidates=fv.num_candidates,
                              steps=fv.steps, seed=fv.seed, eta=fv.eta, select=fv.select,
                              **opts) if readable else []
  if fv.json:
    print(json.dumps([{"image": path, **r} for (path, _), r in zip(readable, results)], indent=1))
  else:
    for (path, _), r in zip(readable, results):
      print(f"{path}\t{r['caption']}")
  return 1 if failed else 0


def _flags_eval(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "A training workdir.", flag_values=fv, required=True)
  flags.DEFINE_string("split", "test", "Split of the feature store to evaluate.", flag_values=fv)
  _sampling_flags(fv)
  flags.DEFINE_integer("max_images", None, "Evaluate only the first N images.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_boolean("sweep", False, "Also sweep n (1, 2, 5, 10, 20) and sampling steps, and "
                       "plot CIDEr and Div-2 against them in the report.", flag_values=fv)
  flags.DEFINE_integer("report_thumbnails", 300, "Embed thumbnails of at most this many images in "
                       "report.html (the rest are listed as text), so a 5,000-image report stays "
                       "a few MB.", lower_bound=0, flag_values=fv)
  _compilation_cache_flag(fv)


def _cmd_eval(fv: flags.FlagValues) -> int:
  from pdiff_jax import evaluate
  from pdiff_jax.inference import Captioner
  _use_compilation_cache(fv)
  captioner = Captioner.from_workdir(fv.workdir)
  evaluate.evaluate(fv.workdir, fv.split, fv.num_candidates, fv.steps, fv.seed, fv.eta,
                    sweep=fv.sweep, max_images=fv.max_images, report_thumbnails=fv.report_thumbnails,
                    captioner=captioner, select=fv.select, **_sampling_options(captioner, fv))
  return 0


def _flags_score(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("results", None, "COCO results JSON: [{\"image_id\": ID, \"caption\": C}, ...].",
                      flag_values=fv, required=True)
  flags.DEFINE_string("references", None, "Karpathy dataset_*.json or COCO captions_*.json.",
                      flag_values=fv, required=True)
  flags.DEFINE_string("split", "test", "Karpathy split of the references.", flag_values=fv)
  flags.DEFINE_string("out", None, "Directory for metrics.json.", flag_values=fv, required=True)
  flags.DEFINE_string("vocab", None, "vocab.json for the Vocab metric (default: words seen twice "
                      "in the references' train split, or in all references).", flag_values=fv)
  flags.DEFINE_string("images", None, "Image folder (for CLIP-S / RefCLIP-S).", flag_values=fv)
  flags.DEFINE_string("clip", None, "CLIP for CLIP-S / RefCLIP-S (hub name or directory).",
                      flag_values=fv)


def _cmd_score(fv: flags.FlagValues) -> int:
  from pdiff_jax import evaluate
  from pdiff_jax.data.vocab import Vocab, tokenize
  if bool(fv.images) != bool(fv.clip):
    raise UsageError("--images and --clip go together (CLIP-S needs both)")
  try:
    if fv.vocab:
      vocab_size = len(Vocab.load(fv.vocab))
    else:
      refs = evaluate.load_references(fv.references, "train") or evaluate.load_references(fv.references, fv.split)
      vocab_size = len(Vocab.build((tokenize(c) for caps, _ in refs.values() for c in caps)))
    evaluate.score_results(fv.results, fv.references, fv.split, fv.out, vocab_size, fv.images, fv.clip)
  except (ValueError, KeyError, OSError) as e:
    raise ScoreInputError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
  return 0


class ScoreInputError(Exception):
  pass


# The demo's default: its sizes (configs/demo.py) with the additions since the paper, the config
# that meets the demo's quality targets (README); --config=configs/demo.py is the paper's recipe.
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                           "demo_plus.py")


def _flags_demo(fv: flags.FlagValues) -> None:
  config_flags.DEFINE_config_file(
      "config", DEMO_CONFIG, "The demo's config (default configs/demo_plus.py; configs/demo.py: the "
      "same sizes with the paper's recipe).", flag_values=fv, lock_config=True)
  flags.DEFINE_string("workdir", None, "Where everything goes (resumes if re-run).", flag_values=fv,
                      required=True)
  flags.DEFINE_boolean("fast", False, "A much smaller run (tests; about a minute).", flag_values=fv)


def _cmd_demo(fv: flags.FlagValues) -> int:
  from pdiff_jax import config as config_lib, demo
  demo.use_cpu_devices()
  demo.use_consistent_numerics()
  config_lib.validate(fv.config)
  demo.run_demo(fv.config, fv.workdir, fast=fv.fast)
  return 0


def _flags_serve(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/).",
                      flag_values=fv, required=True)
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 exposes it to the network).",
                      flag_values=fv)
  flags.DEFINE_integer("port", 8000, "Port to listen on.", lower_bound=0, upper_bound=65535,
                       flag_values=fv)
  flags.DEFINE_string("token", None, "Require 'Authorization: Bearer TOKEN' on the API "
                      "(default: $PDIFF_SERVE_TOKEN; unset = no token).", flag_values=fv)
  flags.DEFINE_float("max_wait_ms", None, "How long the first request of a batch waits for others "
                     "to share its sampler call (default: 5% of the last call's time, at most "
                     "250 ms).", lower_bound=0.0, flag_values=fv)
  flags.DEFINE_float("max_upload_mb", 20.0, "Largest request body accepted.", lower_bound=0.001,
                     flag_values=fv)
  _compilation_cache_flag(fv)


def _cmd_serve(fv: flags.FlagValues) -> int:
  import importlib.util
  missing = [m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
  if missing:
    raise UsageError(f"pdiff serve needs the [serve] extra (missing {', '.join(missing)}): "
                     "pip install -c requirements.txt -e '.[serve]'")
  from pdiff_jax import serve
  _use_compilation_cache(fv)
  return serve.serve(fv.workdir, fv.host, fv.port, fv.token, fv.max_wait_ms, fv.max_upload_mb)


PAPER_CONFIG = os.path.join(os.path.dirname(DEMO_CONFIG), "paper_coco.py")


def _flags_bench(fv: flags.FlagValues) -> None:
  config_flags.DEFINE_config_file("config", PAPER_CONFIG, "Config to measure (default: the paper's).",
                                  flag_values=fv, lock_config=True)
  flags.DEFINE_string("out", None, "JSON file for the figures.", flag_values=fv, required=True)
  flags.DEFINE_list("parts", ["train", "sample", "clip"],
                    "Which of train,sample,clip,pipeline,extract,serve to measure.",
                    flag_values=fv)
  flags.DEFINE_string("profile_dir", None, "Also trace the train step and the sampler here "
                      "(jax.profiler; Perfetto/TensorBoard) and add a per-op summary to the JSON.",
                      flag_values=fv)
  from pdiff_jax.sampler import SOLVERS
  flags.DEFINE_enum("solver", None, list(SOLVERS), "Time the sampler with this solver "
                    "(default: sampler.solver).", flag_values=fv)
  flags.DEFINE_string("workdir", None, "--parts=serve: the trained workdir to serve.", flag_values=fv)
  flags.DEFINE_integer("serve_requests", 2000, "--parts=serve: requests of the 32-client run.",
                       lower_bound=32, flag_values=fv)
  flags.DEFINE_float("guidance", None, "Time the sampler with this classifier-free guidance scale "
                     "(the random-weight model gets a null condition: model.cond_drop=0.1).",
                     lower_bound=0.0, flag_values=fv)


def _cmd_bench(fv: flags.FlagValues) -> int:
  from pdiff_jax import bench
  config = fv.config
  with config.unlocked():
    if fv.solver:
      config.sampler.solver = fv.solver
    if fv.guidance is not None:
      config.sampler.guidance = fv.guidance
      if fv.guidance != 1.0 and config.model.get("cond_drop", 0.0) <= 0:
        config.model.cond_drop = 0.1
  bad = set(fv.parts) - set(bench.PARTS)
  if bad:
    raise UsageError(f"--parts: unknown {', '.join(sorted(bad))}; expected {', '.join(bench.PARTS)}")
  from pdiff_jax import storage
  if fv.profile_dir and storage.is_remote(fv.profile_dir):
    raise UsageError(f"--profile_dir={fv.profile_dir}: traces are summarised from local files; "
                     "give a local directory")
  if "serve" in fv.parts and not fv.workdir:
    raise UsageError("--parts=serve needs --workdir (a trained model to serve)")
  bench.run_bench(config, fv.out, tuple(fv.parts), profile_dir=fv.profile_dir,
                  serve_workdir=fv.workdir, serve_requests=fv.serve_requests)
  return 0


def _cmd_info(fv: flags.FlagValues) -> int:
  import jax
  from pdiff_jax import clip, config as config_lib, model as model_lib, sharding, train
  config = fv.config
  config_lib.validate(config)
  store = None
  if config.data.source != "synthetic":  # sizes as training will see them, when a store exists
    from pdiff_jax.data import features
    try:
      store = features.load_manifest(config.data.feature_dir)
    except features.FeatureStoreError:
      pass
  if store is not None:
    config.model.vocab_size = int(store["vocab_size"])
    if not config_lib.explicit(config, "model.feature_dim", _overrides(fv)):
      config.model.feature_dim = int(store["feature_dim"])
  mesh = sharding.make_mesh(config)
  model, tx = train.make_model(config), train.make_optimizer(config)
  abstract, _ = train.state_shardings(model, tx, config, mesh)
  cfg = config_lib.model_config(config)
  print(json.dumps({
      "trainable_params": model_lib.count_params(abstract.params, cfg),
      "frozen_params": clip.frozen_param_count(config.clip.model),
      "flops_per_train_example": model_lib.train_flops_per_example(cfg),
      "flops_per_denoise_step": model_lib.denoise_step_flops(cfg),
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "devices": jax.device_count(),
      "vocab_size": int(config.model.vocab_size),
      "feature_dim": int(config.model.feature_dim),
      "feature_store": config.data.feature_dir if store is not None else None,
  }))
  return 0


COMMANDS: dict[str, tuple[Callable[[flags.FlagValues], None], Callable[..., int]]] = {
    "extract": (_with_distributed(_config_flag), _cmd_extract),
    "train": (_with_distributed(_flags_train), _cmd_train),
    "caption": (_flags_caption, _cmd_caption),
    "eval": (_with_distributed(_flags_eval), _cmd_eval),
    "demo": (_flags_demo, _cmd_demo),
    "bench": (_with_distributed(_flags_bench), _cmd_bench),
    "score": (_flags_score, _cmd_score),
    "info": (lambda fv: _config_flag(fv), _cmd_info),
    "serve": (_flags_serve, _cmd_serve),
}


POSITIONAL = {"caption"}  # commands that take file names after the flags


def _parse(command: str, argv: list[str]) -> tuple[flags.FlagValues, list[str]]:
  define, _ = COMMANDS[command]
  fv = flags.FlagValues()
  define(fv)
  try:
    rest = fv(["pdiff " + command] + argv)
  except flags.Error as e:
    raise UsageError(str(e)) from None
  except SyntaxError as e:
    raise UsageError(f"--config: {e.filename}:{e.lineno}: SyntaxError: {e.msg}") from None
  except (AttributeError, KeyError) as e:  # config_flags: an override names no existing key
    overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    raise UsageError(f"unknown config key {str(e).strip(chr(34))} in {', '.join(overrides)}; "
                     "overrides can only set keys the config file defines") from None
  if len(rest) > 1 and command not in POSITIONAL:
    raise UsageError(f"unexpected arguments: {' '.join(rest[1:])}")

  if "config" in fv:
    try:
      fv.config.keys  # config_flags reports a bad file only on first use
    except OSError as e:
      lines = [l.strip() for l in str(e).splitlines() if l.strip()]
      raise UsageError(f"--config={fv['config'].config_filename}: cannot load it "
                       f"({lines[-1]})") from None
  return fv, rest[1:]


def main(argv: list[str]) -> int:
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE)
    return 0 if argv else 2
  command, args = argv[0], argv[1:]
  if command not in COMMANDS:
    print(f"pdiff: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2
  if any(a in ("-h", "--help") for a in args):
    define, _ = COMMANDS[command]
    fv = flags.FlagValues()
    define(fv)
    print(f"usage: pdiff {command} [flags]\n{fv.main_module_help() or fv}")
    return 0

  from pdiff_jax.checkpoint import CheckpointError
  from pdiff_jax.clip import ClipLoadError
  from pdiff_jax.config import ConfigError
  from pdiff_jax.data.features import FeatureStoreError
  from pdiff_jax.data.sources import SourceError
  from pdiff_jax.judge import JudgeError
  from pdiff_jax.metrics.coco import MetricError
  from pdiff_jax.train import TrainingDiverged, WorkdirLocked
  try:
    fv, positional = _parse(command, args)
    from pdiff_jax import distributed
    # Multi-process only when the flags, PDIFF_COORDINATOR or PDIFF_DISTRIBUTED=auto say so.
    given = {k: fv[k].value for k in ("coordinator_address", "num_processes", "process_id") if k in fv}
    try:
      distributed.initialize(**given)
    except ValueError as e:
      raise UsageError(str(e)) from None
    if command in POSITIONAL:
      return COMMANDS[command][1](fv, positional)
    return COMMANDS[command][1](fv)
  except (UsageError, ConfigError) as e:
    print(f"pdiff {command}: {e}", file=sys.stderr)
    return 2
  except (CheckpointError, TrainingDiverged, WorkdirLocked, ClipLoadError, SourceError, FeatureStoreError,
          MetricError, ScoreInputError, JudgeError, FileNotFoundError, PermissionError) as e:
    print(f"pdiff {command}: {e}", file=sys.stderr)
    return 1


def run() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True,
                      datefmt="%H:%M:%S")
  for noisy in ("absl", "jax._src", "orbax", "tensorflow", "httpx"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  sys.exit(main(sys.argv[1:]))
