"""storage: the same operations on a local directory and on gs:// (a real local GCS server)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from gcs_server import FakeGCS, use_in_this_process
from pdiff_jax import storage


@pytest.fixture(scope="module")
def gcs():
  server = FakeGCS().start()
  server.create_bucket("unit")
  with pytest.MonkeyPatch.context() as monkeypatch:
    use_in_this_process(server.url, monkeypatch)
    yield server
  server.stop()


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path)
  request.getfixturevalue("gcs")
  return f"gs://unit/{request.node.name.replace('[', '_').replace(']', '')}"


def test_uri_never_turns_gs_into_a_local_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.uri("gs://b/runs") == "gs://b/runs"
  assert storage.uri("runs") == os.path.join(str(tmp_path), "runs")
  assert storage.join("gs://b/runs", "checkpoints", "4") == "gs://b/runs/checkpoints/4"


def test_files_json_and_arrays(root):
  storage.makedirs(storage.join(root, "d"))
  storage.write_json(storage.join(root, "d", "a.json"), {"x": [1, 2]}, indent=1)
  assert storage.read_json(storage.join(root, "d", "a.json")) == {"x": [1, 2]}
  array = np.arange(12, dtype=np.float32).reshape(3, 4)
  storage.save_npy(storage.join(root, "d", "a.npy"), array)
  loaded = storage.load_npy(storage.join(root, "d", "a.npy"))
  np.testing.assert_array_equal(loaded, array)
  assert isinstance(loaded, np.memmap) == (not storage.is_remote(root))  # mmap only where local
  storage.save_npz(storage.join(root, "d", "s.npz"), features=array, ok=np.ones(3, bool))
  z = storage.load_npz(storage.join(root, "d", "s.npz"))
  np.testing.assert_array_equal(z["features"], array)
  np.testing.assert_array_equal(z["ok"], True)
  assert storage.exists(storage.join(root, "d", "a.npy"))
  assert not storage.exists(storage.join(root, "d", "missing.npy"))
  # Nothing but the files themselves (no temporary names left behind).
  names = sorted(p.name for p in storage.path(storage.join(root, "d")).iterdir())
  assert names == ["a.json", "a.npy", "s.npz"]


def test_line_log_survives_a_restart_and_drops_lines(root):
  p = storage.join(root, "metrics.jsonl")
  log = storage.LineLog(p, min_interval=3600)
  for step in range(1, 6):
    log.append(json.dumps({"step": step}))
  log.flush()
  again = storage.LineLog(p, keep=lambda l: json.loads(l)["step"] <= 3)
  again.append(json.dumps({"step": 4}))
  again.flush()
  assert [json.loads(l)["step"] for l in storage.read_text(p).splitlines()] == [1, 2, 3, 4]


def test_remote_line_log_uploads_at_most_every_interval(gcs):
  p = "gs://unit/throttled/metrics.jsonl"
  log = storage.LineLog(p, min_interval=3600)
  log.append("one")  # the first line goes at once (nothing uploaded yet)
  log.append("two")  # within the interval: kept in memory
  assert storage.read_text(p) == "one\n"
  log.flush()
  assert storage.read_text(p) == "one\ntwo\n"


_HOLD = """
import sys, time
from pdiff_jax import storage
lock = storage.WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


def test_lock_on_object_storage(gcs, caplog):
  """A create-only object: a second holder is refused while the first lives; after a kill -9 the
  next one on the same machine takes the dead owner's lock over; a clean exit removes it."""
  workdir = "gs://unit/locked"
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, workdir, "60"], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ))
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(storage.LockedError, match=f"gs://unit/locked is being trained by pid {holder.pid}"):
      storage.WorkdirLock(workdir).acquire()
  finally:
    holder.kill()
    holder.wait()
  lock = storage.WorkdirLock(workdir).acquire()  # the owner is dead: taken over
  assert "its process is no longer running" in caplog.text
  assert storage.read_json(f"{workdir}/.train.lock")["pid"] == os.getpid()
  lock.release()
  assert not storage.exists(f"{workdir}/.train.lock")
  # A lock whose owner is on another machine and still renews it is respected...
  other = {"host": "elsewhere", "boot_id": "x", "pid": 1, "heartbeat": time.time()}
  storage.write_json(f"{workdir}/.train.lock", other)
  with pytest.raises(storage.LockedError, match="pid 1 on elsewhere"):
    storage.WorkdirLock(workdir).acquire()
  # ... until its heartbeat is older than stale_after. A holder whose lock was taken over
  # stops at its next heartbeat instead of writing on.
  slow = storage.WorkdirLock(workdir, stale_after=-1, renew=0).acquire()
  storage.WorkdirLock(workdir, stale_after=-1).acquire()
  with pytest.raises(storage.LockedError, match="took this workdir's lock over"):
    slow.heartbeat()


def test_local_lock_is_released_by_the_os(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path), "60"], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(storage.LockedError, match=f"pid {holder.pid}"):
      storage.WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.kill()
    holder.wait()
  storage.WorkdirLock(str(tmp_path)).acquire().release()


def test_copy_tree(root, tmp_path):
  src = tmp_path / "src"
  (src / "a" / "b").mkdir(parents=True)
  (src / "top.txt").write_text("top")
  (src / "a" / "b" / "deep.bin").write_bytes(b"\x00\x01")
  dest = storage.join(root, "copied")
  storage.copy_tree(str(src), dest)
  assert storage.read_text(storage.join(dest, "top.txt")) == "top"
  assert storage.path(storage.join(dest, "a", "b", "deep.bin")).read_bytes() == b"\x00\x01"


def test_demo_on_gs_runs_in_a_local_cache_and_copies_its_results(gcs, tmp_path, monkeypatch):
  """A gs:// demo workdir: the demo (stubbed here: the real one takes 10 minutes) runs in a local
  cache folder for that URI and what it wrote lands under the URI."""
  from pdiff_jax import demo
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  ran = []

  def fake_run(base, workdir, fast, progress):
    ran.append(workdir)
    os.makedirs(os.path.join(workdir, "model"), exist_ok=True)
    open(os.path.join(workdir, "demo_summary.json"), "w").write('{"seconds": 1}')
    open(os.path.join(workdir, "model", "config.json"), "w").write("{}")
    return {"seconds": 1}

  monkeypatch.setattr(demo, "_run_local", fake_run)
  assert demo.run_demo(None, "gs://unit/demo", fast=True) == {"seconds": 1}
  assert ran[0].startswith(str(tmp_path / "cache" / "pdiff_jax" / "demo"))
  assert storage.read_json("gs://unit/demo/demo_summary.json") == {"seconds": 1}
  assert storage.exists("gs://unit/demo/model/config.json")
