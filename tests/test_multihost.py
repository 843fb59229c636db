"""Real multi-process runs on this machine (JAX processes joined through a local coordinator)."""

import os
import subprocess

import jax
import numpy as np
import pytest

from conftest import ROOT, load_config, xla_flags
from pdiff_jax import train

LAUNCH = os.path.join(ROOT, "launch", "multihost_local.sh")


def _restore(workdir, step):
  config = load_config("tiny", **{"mesh.shape": (1, 1)})
  return train.restore_state(config, os.path.join(workdir, "checkpoints"), jax.devices()[:1], step)[1]


def test_launch_script_syntax_and_dry_run():
  assert subprocess.run(["bash", "-n", LAUNCH]).returncode == 0
  r = subprocess.run(["bash", LAUNCH, "--dry_run", "3", "train", "--config=configs/tiny.py"],
                     capture_output=True, text=True)
  lines = r.stdout.strip().splitlines()
  assert r.returncode == 0 and len(lines) == 3
  assert all(f"PDIFF_PROCESS_ID={i}" in l and "PDIFF_NUM_PROCESSES=3" in l and l.endswith(
      "-m pdiff_jax train --config=configs/tiny.py") for i, l in enumerate(lines))


@pytest.mark.slow
def test_two_processes_train_like_one_and_past_a_corrupt_checkpoint(tmp_path):
  """2 processes x 2 devices == 1 process x 4 devices (same global batch), and the 2-process
  checkpoint restores in a single process. Then the 2-process run's step 4 is corrupted: both
  processes resume from 2, process 0 moves 4 aside, and the run trains through 4 to 6.
  (One test: the second half goes on from the first's workdir, saving a 2-process start-up.)
  Both run two steps per dispatch."""
  from test_train import corrupt_checkpoint
  # Two steps per dispatch (train.steps_per_dispatch): each process stacks its rows of both
  # batches (the SIGTERM test below trains one step at a time).
  args = ["train", "--config=configs/tiny.py", "--config.train.checkpoint_every=2",
          "--config.train.eval_every=1000", "--config.train.steps_per_dispatch=2"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  w = tmp_path / "two"
  two = lambda steps: subprocess.run(
      ["bash", LAUNCH, "2", *args, f"--config.train.num_steps={steps}", f"--workdir={w}"], cwd=ROOT,
      env={**env, "XLA_FLAGS": xla_flags(2)}, capture_output=True,
      text=True, timeout=600)
  first = two(4)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  one = subprocess.run([os.path.join(ROOT, ".venv", "bin", "python") if os.path.exists(
      os.path.join(ROOT, ".venv", "bin", "python")) else "python3", "-m", "pdiff_jax", *args,
                        "--config.train.num_steps=4", f"--workdir={tmp_path}/one"], cwd=ROOT,
                       env={**env, "XLA_FLAGS": xla_flags(4)},
                       capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  a, b = _restore(str(w), 4), _restore(f"{tmp_path}/one", 4)
  assert int(a.step) == int(b.step) == 4
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5),
               a.params, b.params)
  # Only process 0 writes the metrics log.
  lines = open(w / "metrics.jsonl").read().splitlines()
  assert len(lines) == len(open(f"{tmp_path}/one/metrics.jsonl").read().splitlines())

  corrupt_checkpoint(w / "checkpoints" / "4")
  second = two(6)
  assert second.returncode == 0, second.stdout[-3000:]
  assert "[process 0]" in second.stdout and "moved the unreadable checkpoint of step 4 aside" in second.stdout
  assert "resumed from step 2" in second.stdout
  names = sorted(os.listdir(w / "checkpoints"))
  assert [n for n in names if n.isdigit()] == ["2", "4", "6"]
  assert any(n.startswith("4.corrupt-") for n in names)
  assert int(_restore(str(w), 6).step) == 6


def test_failing_process_fails_the_launch(tmp_path):
  r = subprocess.run(["bash", LAUNCH, "2", "train", "--config=configs/missing.py", f"--workdir={tmp_path}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0


def test_gpu_and_tpu_pod_launch_dry_runs():
  for script in ("gpu.sh", "tpu_pod.sh"):
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", script)]).returncode == 0
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu.sh"), "--dry_run", "configs/paper_coco.py",
                      "runs/p", "--config.train.batch_size=256"], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert "jax[cuda12]==0.10.2" in r.stdout
  assert r.stdout.strip().splitlines()[-1] == (
      "+ .venv/bin/pdiff train --config=configs/paper_coco.py --workdir=runs/p --config.train.batch_size=256")
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--dry_run", "pod", "us-central2-b",
                      "v4-32", "configs/paper_coco.py", "gs://b/runs/p", "--config.data.feature_dir=gs://b/f"],
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert lines[0].startswith("+ gcloud compute tpus tpu-vm create pod --zone us-central2-b --accelerator-type v4-32")
  assert any("--worker=all" in l and "jax[tpu]==0.10.2" in l for l in lines)
  # extract (resumable), then train, on every worker, all paths on gs://
  assert "--worker=all" in lines[-1] and "PDIFF_DISTRIBUTED=auto nohup bash -c" in lines[-1]
  assert ".venv/bin/pdiff extract --config=configs/paper_coco.py --config.data.feature_dir=gs://b/f" in lines[-1]
  assert "&& .venv/bin/pdiff train --config=configs/paper_coco.py --workdir=gs://b/runs/p --config.data.feature_dir=gs://b/f" in lines[-1]
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--dry_run", "pod"],
                     capture_output=True, text=True)
  assert r.returncode != 0 and "usage" in r.stderr


@pytest.mark.slow
def test_sigterm_on_one_process_stops_all_at_one_step(tmp_path):
  """A preemption notice (SIGTERM) to one process of two: JAX's preemption service makes both save
  the same step and exit 0; the run then resumes from it."""
  import signal
  import sys
  import time
  w = str(tmp_path / "w")
  port = subprocess.run([sys.executable, "-c", "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); "
                         "print(s.getsockname()[1])"], capture_output=True, text=True).stdout.strip()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
  args = ["train", "--config=configs/tiny.py", f"--workdir={w}", "--config.train.num_steps=1000000",
          "--config.train.checkpoint_every=1000000", "--config.train.log_every=5",
          "--config.train.eval_every=1000000", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  logs = [open(tmp_path / f"p{i}.log", "w+") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-m", "pdiff_jax", *args, f"--process_id={i}"], cwd=ROOT, env=env,
                            stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
  try:
    metrics = os.path.join(w, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
      assert all(p.poll() is None for p in procs) and time.time() < deadline, open(logs[0].name).read()[-3000:]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    for p in procs:
      p.kill()
  out = [open(l.name).read() for l in logs]
  assert codes == [0, 0], out[0][-2000:] + out[1][-2000:]
  steps = os.listdir(os.path.join(w, "checkpoints"))
  assert len(steps) == 1 and 5 <= int(steps[0]) < 1000000
  assert all(f"stopped at step {steps[0]}" in o for o in out)
  assert int(_restore(w, int(steps[0])).step) == int(steps[0])


def _copy_workdir(src, dst):
  """A copy of a training workdir (checkpoints and config; the feature store stays shared)."""
  import shutil
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("eval"))
  return str(dst)


@pytest.mark.slow
@pytest.mark.xdist_group("trained_workdir")
def test_two_process_eval_equals_one(tmp_path, trained_workdir):
  """`pdiff eval` as 2 processes, with a learned judge of captions: each samples and reranks its
  share of the images (the cosine and the judge's score; and, chosen by `fit`, scores its share
  with the denoiser), process 0 scores and writes, and captions.json and the metrics equal a
  single-process eval's."""
  import json
  from pdiff_jax import config as config_lib, evaluate
  base = _copy_workdir(trained_workdir[0], tmp_path / "base")
  with open(os.path.join(base, "config.json")) as f:
    config = config_lib.from_json(f.read())
  config.judge = config_lib.judge_config(config)
  config.judge.update({"steps": 40, "batch_size": 4, "negatives": 3, "hidden": 16})
  train.train_and_evaluate(config, base, devices=jax.devices()[:1])  # the denoiser is done: the judge only
  assert os.path.exists(os.path.join(base, "judge", "judge.json"))
  one = _copy_workdir(base, tmp_path / "one")
  two = _copy_workdir(base, tmp_path / "two")
  evaluate.evaluate(one, "test", num_candidates=3, steps=5, seed=0, progress=False, select="fit")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run(["bash", LAUNCH, "2", "eval", f"--workdir={two}", "--split=test", "--num_candidates=3",
                      "--steps=5", "--select=fit"], cwd=ROOT, env={**env, "XLA_FLAGS": xla_flags(1)},
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert r.stdout.count("| BLEU-4 |") == 1 and "[process 0] | BLEU-4 |" in r.stdout  # process 0 reports
  load = lambda w, f: json.load(open(os.path.join(w, "eval", "test", f)))
  a, b = load(one, "captions.json"), load(two, "captions.json")
  assert len(a) == 3 and [e["caption"] for e in a] == [e["caption"] for e in b]
  for x, y in zip(a, b):
    assert [c["caption"] for c in x["candidates"]] == [c["caption"] for c in y["candidates"]]
    # cosines: float32 rounding is absolute (~1e-7), so a score near 0 needs atol, not rtol
    np.testing.assert_allclose([c["score"] for c in x["candidates"]], [c["score"] for c in y["candidates"]],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([c["fit"] for c in x["candidates"]], [c["fit"] for c in y["candidates"]],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose([c["judged"] for c in x["candidates"]], [c["judged"] for c in y["candidates"]],
                               rtol=1e-5, atol=1e-6)
    assert [c["rank"] for c in x["candidates"]] == [c["rank"] for c in y["candidates"]]
  ma, mb = load(one, "metrics.json"), load(two, "metrics.json")
  assert ma["judge"] is True and mb["judge"] is True
  for key in ("BLEU-4", "CIDEr", "Div-2", "CLIP-S", "num_images"):
    assert mb[key] == pytest.approx(ma[key], rel=1e-5), key


@pytest.mark.slow
def test_two_process_bench(tmp_path):
  """`pdiff bench` as 2 processes x 2 devices: the train step runs on the global 4-device mesh and
  only process 0 writes the JSON."""
  import json
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = tmp_path / "b.json"
  r = subprocess.run(["bash", LAUNCH, "2", "bench", "--config=configs/tiny.py", f"--out={out}",
                      "--parts=train"], cwd=ROOT,
                     env={**env, "XLA_FLAGS": xla_flags(2)},
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  b = json.loads(out.read_text())
  assert b["num_devices"] == 4 and b["num_processes"] == 2
  # The global batch is the configured one (each process built half of it), and the figures
  # are per global step of that batch.
  assert b["train"]["batch_size"] == b["train"]["global_batch_size"] == 16
  assert b["train"]["examples_per_sec"] == pytest.approx(16 / b["train"]["step_seconds"])
  assert b["train"]["examples_per_sec"] > 0 and "sample" not in b
  assert 0 < b["train"]["mfu"] and b["train"]["flops_per_sec"] > 0
  assert r.stdout.count("train:") == 1 and "[process 0] train:" in r.stdout
