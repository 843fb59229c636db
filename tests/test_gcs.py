"""The TPU-pod workflow with data and workdir on gs://, against a real local GCS server.

extract -> train (2 processes) -> kill -9 -> resume (2 processes) -> eval -> caption, every
path a gs:// URI, the commands run as a user runs them (subprocesses, in an empty working
directory with an empty HOME), and nothing of the run is written to local disk but caches and
temporary files.

What the emulator (fake-gcs-server 1.54, memory backend) cannot show: it checks
`ifGenerationMatch` only on small single-request uploads (the lock uses exactly those), not on
resumable uploads or deletes; it has no IAM, quotas, retries under load or eventual listing
behaviour of its own; gcsfs's server-side move is refused (400), so renames fall back to
copy + delete (orbax does not rename on GCS: it writes commit_success.txt).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import CONFIGS, write_karpathy, xla_flags
from gcs_server import FakeGCS, use_in_this_process

BUCKET = "pdiff-test"


@pytest.fixture
def gcs(monkeypatch):
  server = FakeGCS().start()
  server.create_bucket(BUCKET)
  use_in_this_process(server.url, monkeypatch)
  yield server
  server.stop()


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.slow
def test_pod_workflow_on_gs(gcs, tmp_path, clip_dir):
  from pdiff_jax import checkpoint as ckpt_lib, storage
  data = str(tmp_path / "data")
  write_karpathy(data, splits=(("train", 10), ("val", 2), ("test", 3)))
  storage.copy_tree(data, f"gs://{BUCKET}/data")
  storage.copy_tree(clip_dir, f"gs://{BUCKET}/clip")
  cwd, home, tmp = tmp_path / "cwd", tmp_path / "home", tmp_path / "tmp"
  for d in (cwd, home, tmp):
    d.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(HOME=str(home), TMPDIR=str(tmp), JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(2))
  g = f"gs://{BUCKET}"
  config = [f"--config={CONFIGS}/tiny.py", f"--config.data.source=karpathy:{g}/data/dataset_coco.json",
            f"--config.data.image_root={g}/data/images", f"--config.data.feature_dir={g}/features",
            f"--config.clip.model={g}/clip", "--config.model.feature_dim=32", "--config.data.min_count=1",
            "--config.data.shard_size=4"]
  workdir = f"{g}/runs/w"

  def pdiff(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pdiff_jax", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)

  r = pdiff("extract", *config)
  assert r.returncode == 0, r.stderr[-3000:]
  assert storage.read_json(f"{g}/features/manifest.json")["splits"]["train"]["images"] == 10

  # Two trainer processes on the gs:// workdir, killed with SIGKILL after their first checkpoint.
  port = subprocess.run([sys.executable, "-c", "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); "
                         "print(s.getsockname()[1])"], capture_output=True, text=True).stdout.strip()
  train = ["train", *config, f"--workdir={workdir}", "--config.train.checkpoint_every=4",
           "--config.train.log_every=2", "--config.train.eval_every=1000000"]

  # The trainers use the compilation cache in the gs:// workdir (the default), not the suite's.
  train_env = {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"}

  def trainers(num_steps, log_name, *extra):
    logs = [open(tmp_path / f"{log_name}{i}.log", "w+") for i in range(2)]
    return [subprocess.Popen([sys.executable, "-m", "pdiff_jax", *train, *extra, f"--config.train.num_steps={num_steps}",
                              f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                             cwd=cwd, env=train_env, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)], logs

  procs, logs = trainers(1_000_000, "first")
  ckpts = lambda: ckpt_lib.Checkpoints(f"{workdir}/checkpoints", read_only=True).steps()
  try:
    deadline = time.time() + 300
    while not (storage.exists(f"{workdir}/checkpoints") and ckpts()):
      assert all(p.poll() is None for p in procs) and time.time() < deadline, open(logs[0].name).read()[-3000:]
      time.sleep(0.5)
    # A second trainer on the same gs:// workdir is refused while the first one runs.
    second = pdiff("train", *config, f"--workdir={workdir}", timeout=120)
    assert second.returncode == 1 and "is being trained by pid" in second.stderr, second.stderr[-2000:]
  finally:
    for p in procs:
      p.send_signal(signal.SIGKILL)
      p.wait()
  done = ckpts()[-1]
  assert done >= 4 and done % 4 == 0

  # The resumed run also trains a judge of captions (process 0, into the gs:// workdir).
  procs, logs = trainers(done + 4, "resumed", "--config.judge.steps=20", "--config.judge.batch_size=4")
  codes = [p.wait(timeout=300) for p in procs]
  out = open(logs[0].name).read()
  assert codes == [0, 0], out[-3000:] + open(logs[1].name).read()[-2000:]
  assert f"resumed from step {done}" in out
  assert "its process is no longer running" in out  # the killed run's lock was taken over
  assert ckpts()[-1] == done + 4

  r = pdiff("eval", f"--workdir={workdir}", "--num_candidates=2", "--steps=3")
  assert r.returncode == 0, r.stderr[-3000:]
  metrics = storage.read_json(f"{workdir}/eval/test/metrics.json")
  assert metrics["num_images"] == 3 and metrics["clip_model"] == f"{g}/clip" and metrics["judge"]
  image = f"{g}/data/images/val2014/COCO_000011.jpg"
  r = pdiff("caption", f"--workdir={workdir}", "--json", "--num_candidates=2", "--steps=3", image)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout)[0]["image"] == image

  objects = gcs.objects(BUCKET)
  for name in ("runs/w/config.json", "runs/w/metrics.jsonl", "runs/w/eval/test/captions.json",
               "runs/w/eval/test/report.html", "features/train_features.npy", "features/vocab.json",
               "runs/w/judge/judge.json", "runs/w/judge/params.msgpack"):
    assert name in objects, name
  assert any(o.startswith("runs/w/tensorboard/events.out.tfevents") for o in objects)
  assert any(o.startswith(f"runs/w/checkpoints/{done + 4}/") for o in objects)
  assert any(o.startswith("runs/w/compilation_cache/") for o in objects)
  assert "runs/w/.train.lock" not in objects  # released by the clean exit
  records = [json.loads(l) for l in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == list(range(2, done + 5, 2))  # the lines after the killed run's checkpoint redone once
  # Nothing of the run on local disk: the working directory stays empty, HOME holds only caches
  # (the copy of the gs:// CLIP that transformers needs), and temporary files are allowed.
  assert _files(cwd) == []
  assert all(f.startswith(".cache/") for f in _files(home)), _files(home)
