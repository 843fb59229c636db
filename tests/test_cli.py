"""The `pdiff` command line, run as a user runs it (a subprocess), on one CPU device."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_pdiff, xla_flags

ONE_DEVICE = {"XLA_FLAGS": xla_flags()}


def test_train_then_resume(tmp_path):
  w = str(tmp_path / "w")
  # Without JAX_COMPILATION_CACHE_DIR (the suite sets one), the cache lives in the workdir.
  r = run_pdiff("train", "--config=configs/tiny.py", f"--workdir={w}",
                "--config.train.num_steps=50", env={**ONE_DEVICE, "JAX_COMPILATION_CACHE_DIR": ""})
  assert r.returncode == 0, r.stderr
  assert "trainable parameters: 25,352" in r.stderr
  assert len(os.listdir(os.path.join(w, "compilation_cache"))) > 0
  records = [json.loads(l) for l in open(os.path.join(w, "metrics.jsonl"))]
  train_records = [r for r in records if "loss" in r]
  assert [r["step"] for r in train_records] == [10, 20, 30, 40, 50]
  for key in ("step", "loss", "loss_mse", "loss_round", "loss_prior", "lr", "grad_norm", "steps_per_sec"):
    assert key in train_records[-1]
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["25", "50"]
  assert json.load(open(os.path.join(w, "config.json")))["train"]["num_steps"] == 50
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(w, "tensorboard")))

  r = run_pdiff("train", "--config=configs/tiny.py", f"--workdir={w}",
                "--config.train.num_steps=80", env=ONE_DEVICE)
  assert r.returncode == 0, r.stderr
  assert "resumed from step 50" in r.stderr
  steps = [json.loads(l)["step"] for l in open(os.path.join(w, "metrics.jsonl"))
           if "loss" in json.loads(l)]
  assert steps == [10, 20, 30, 40, 50, 60, 70, 80]
  assert sorted(os.listdir(os.path.join(w, "checkpoints")), key=int) == ["50", "75", "80"]

  # A half-written newest checkpoint (its array data truncated): a warning, then the one before.
  for root, _, files in os.walk(os.path.join(w, "checkpoints", "80")):
    for f in files:
      if "manifest" in f or f.endswith(".ocdbt") or os.path.basename(root) == "d":
        path = os.path.join(root, f)
        with open(path, "r+b") as fh:
          fh.truncate(os.path.getsize(path) // 2)
  r = run_pdiff("train", "--config=configs/tiny.py", f"--workdir={w}",
                "--config.train.num_steps=90", env=ONE_DEVICE)
  assert r.returncode == 0, r.stderr
  assert "checkpoint at step 80" in r.stderr and "unreadable" in r.stderr
  assert "resumed from step 75" in r.stderr


def test_info_paper_config():
  r = run_pdiff("info", "--config=configs/paper_coco.py", env=ONE_DEVICE)
  assert r.returncode == 0, r.stderr
  info = json.loads(r.stdout)
  assert abs(info["trainable_params"] - 94.9e6) / 94.9e6 < 0.005
  assert info["trainable_params"] == 94_948_257
  assert info["flops_per_train_example"] * 128 == pytest.approx(1.95e12, rel=0.01)
  assert info["mesh"] == {"data": 1, "model": 1} and info["devices"] == 1
  assert info["frozen_params"] == 427_616_513  # CLIP ViT-L/14, counted from its architecture
  assert set(info) == {"trainable_params", "frozen_params", "flops_per_train_example",
                       "flops_per_denoise_step", "mesh", "devices", "vocab_size", "feature_dim",
                       "feature_store"}
  assert info["vocab_size"] == 14145 and info["feature_dim"] == 768 and info["feature_store"] is None


def test_info_vitb32_config():
  r = run_pdiff("info", "--config=configs/coco_vitb32.py", env=ONE_DEVICE)
  assert r.returncode == 0, r.stderr
  # Only the mapper's first layer shrinks: 256 fewer inputs x 1536.
  assert json.loads(r.stdout)["trainable_params"] == 94_948_257 - 256 * 1536


@pytest.mark.parametrize("args, expected", [
    (["--config.diffusion.schedule=cosinus"], "config.diffusion.schedule"),
    (["--config.train.num_steps=-5"], "config.train.num_steps"),
    (["--config.train.nope=1"], "nope"),
    (["--config.mesh.shape=(3,1)"], "config.mesh.shape"),
    (["--bogus=1"], "bogus"),
    (["--config.data.source=karpathy:/nonexistent.json", "--config.data.feature_dir=/nonexistent"],
     "config.data.feature_dir: /nonexistent: no manifest.json"),
    (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"], "--process_id=2 is not in 0 .. 1"),
    (["--coordinator_address=127.0.0.1:1"], "needs --num_processes and --process_id"),
])
def test_bad_usage_exits_2_naming_the_key(args, expected, tmp_path):
  r = run_pdiff("train", "--config=configs/tiny.py", f"--workdir={tmp_path}", *args, env=ONE_DEVICE)
  assert r.returncode == 2, (r.returncode, r.stderr)
  assert expected in r.stderr
  assert "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_missing_flags_and_unknown_command():
  r = run_pdiff("train", "--config=configs/tiny.py", env=ONE_DEVICE)
  assert r.returncode == 2 and "workdir" in r.stderr
  r = run_pdiff("train", "--config=configs/missing.py", "--workdir=/tmp/x", env=ONE_DEVICE)
  assert r.returncode == 2 and "missing.py" in r.stderr and "Traceback" not in r.stderr
  r = run_pdiff("frobnicate", env=ONE_DEVICE)
  assert r.returncode == 2 and "unknown command" in r.stderr
  r = run_pdiff("--help", env=ONE_DEVICE)
  assert r.returncode == 0 and "train" in r.stdout


@pytest.mark.slow
def test_sigterm_saves_and_exits_0(tmp_path):
  w = str(tmp_path / "w")
  proc = subprocess.Popen(
      [sys.executable, "-m", "pdiff_jax", "train", "--config=configs/tiny.py", f"--workdir={w}",
       "--config.train.num_steps=1000000", "--config.train.log_every=5",
       "--config.train.checkpoint_every=1000000"],
      cwd=ROOT, env=dict(os.environ, **ONE_DEVICE), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  metrics = os.path.join(w, "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
    time.sleep(0.2)
  # A second trainer on the same workdir refuses while the first holds it.
  second = run_pdiff("train", "--config=configs/tiny.py", f"--workdir={w}", env=ONE_DEVICE)
  assert second.returncode == 1 and f"is being trained by pid {proc.pid}" in second.stderr
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  steps = os.listdir(os.path.join(w, "checkpoints"))
  assert len(steps) == 1 and 5 <= int(steps[0]) < 1000000
  assert f"stopped at step {steps[0]}" in err


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical(tmp_path, delay=0.3):
  """kill -9 at some moment after the first checkpoint (saves every 25 steps, often in the middle
  of one): the lock is not left behind, and the next run resumes from the last complete checkpoint
  and ends with the same parameters, bit for bit, as a run that was never killed."""
  import jax
  import numpy as np
  from conftest import load_config
  from pdiff_jax import train
  args = ["--config=configs/tiny.py", "--config.train.checkpoint_every=25", "--config.train.log_every=5",
          "--config.train.eval_every=1000000"]
  w = str(tmp_path / "w")
  proc = subprocess.Popen(
      [sys.executable, "-m", "pdiff_jax", "train", *args, f"--workdir={w}",
       "--config.train.num_steps=300"],
      cwd=ROOT, env=dict(os.environ, **ONE_DEVICE), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not os.path.exists(os.path.join(w, "checkpoints", "25")):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  time.sleep(delay)
  proc.kill()  # kill -9: no handler runs, an async save may be half written
  assert proc.wait() == -signal.SIGKILL  # killed, not finished (the schedule needs the same num_steps)
  r = run_pdiff("train", *args, f"--workdir={w}", "--config.train.num_steps=300", env=ONE_DEVICE)
  assert r.returncode == 0, r.stderr
  assert "resumed from step" in r.stderr
  full = str(tmp_path / "full")
  r = run_pdiff("train", *args, f"--workdir={full}", "--config.train.num_steps=300", env=ONE_DEVICE)
  assert r.returncode == 0, r.stderr
  config = load_config("tiny", **{"mesh.shape": (1, 1)})
  a = train.restore_state(config, os.path.join(w, "checkpoints"), jax.devices()[:1], 300)[1]
  b = train.restore_state(config, os.path.join(full, "checkpoints"), jax.devices()[:1], 300)[1]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.params), jax.device_get(b.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.ema_params), jax.device_get(b.ema_params))


@pytest.mark.slow
def test_full_disk_while_saving_stops_cleanly(tmp_path):
  """The workdir on a tmpfs with room for one checkpoint: the second (asynchronous) save fails, the run stops
  with a one-line error naming the intact checkpoint, and that checkpoint still restores."""
  import shutil
  import jax
  from conftest import load_config
  from pdiff_jax import train
  if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
    pytest.skip("needs unshare -m (root) to mount a small tmpfs")
  w = tmp_path / "w"
  w.mkdir()
  args = ["--config=configs/tiny.py", "--config.train.checkpoint_every=10", "--config.train.eval_every=1000"]
  # The room for the workdir: what a run to the first checkpoint leaves (~700 KB: params, EMA, two
  # Adam moments, metadata, logs), plus half a checkpoint, so that the second save cannot fit.
  probe = tmp_path / "probe"
  r = run_pdiff("train", *args, f"--workdir={probe}", "--config.train.num_steps=10", env=ONE_DEVICE)
  assert r.returncode == 0, r.stderr[-2000:]
  du = lambda path: int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True).stdout.split()[0])
  room_kb = du(probe) + du(probe / "checkpoints" / "10") // 2
  cmd = [sys.executable, "-m", "pdiff_jax", "train", *args, f"--workdir={w}", "--config.train.num_steps=30"]
  # The mount ends with the namespace, so what is left on it is copied out for the restore below.
  script = (f"mount -t tmpfs -o size={room_kb}k tmpfs {w} && {{ " + " ".join(cmd) +
            f"; code=$?; cp -r {w}/checkpoints {tmp_path}/left; exit $code; }}")
  r = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, env=dict(os.environ, **ONE_DEVICE),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  # orbax's own threads print tracebacks as the interpreter exits; ours is one line.
  [last] = [l for l in r.stderr.splitlines() if l.startswith("pdiff train:")]
  assert last.startswith("pdiff train: saving step 20 to ") and "the checkpoint of step 10 is intact" in last, last
  assert "No space left on device" in last or "ENOSPC" in last or "Errno 28" in last, last
  config = load_config("tiny", **{"mesh.shape": (1, 1)})
  step, state = train.restore_state(config, str(tmp_path / "left"), jax.devices()[:1])
  assert step == 10 and int(state.step) == 10


def test_demo_stops_on_a_small_clip_of_another_recipe(tmp_path):
  """`pdiff demo` in a workdir whose small CLIP was trained otherwise (here: a record saying 1
  step) exits 1 with one line naming the CLIP's directory and the differences, before training
  anything, and leaves that CLIP as it was."""
  from pdiff_jax import clip_pretrain
  clip = tmp_path / "clip"
  clip.mkdir()
  (clip / "config.json").write_text("{}")
  (clip / clip_pretrain.RECIPE).write_text(json.dumps({"steps": 1}))
  r = run_pdiff("demo", f"--workdir={tmp_path}", "--fast", env=ONE_DEVICE)
  assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
  line = [l for l in r.stderr.splitlines() if l.startswith("pdiff demo: ")]
  assert len(line) == 1 and f"{clip} holds a small CLIP trained with" in line[0], r.stderr[-2000:]
  assert "steps=1" in line[0] and "this run asks for" in line[0] and "steps=40" in line[0]
  assert "Traceback" not in r.stderr
  assert sorted(os.listdir(clip)) == ["config.json", clip_pretrain.RECIPE]
  assert not (tmp_path / "features").exists() and not (tmp_path / "model").exists()
