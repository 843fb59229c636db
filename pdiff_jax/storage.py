"""Storage by URI: every path the project reads or writes may be local or `gs://bucket/...`.

One path type, `etils.epath.Path`, for both (gs:// goes through gcsfs, the same client whether or
not TensorFlow is installed); orbax and tensorstore take gs:// themselves. Written by hand here
only what no library gives for both kinds of path:
- whole-file writes that a reader never sees half-done (local: a temporary file, fsync, rename;
  object storage: one upload, which GCS makes visible whole or not at all);
- arrays memory-mapped where the path is local, read whole where it is remote (an object store
  has no mmap; a COCO feature split is ~350 MB);
- a log that grows line by line (an object cannot be appended to: it is rewritten, at most every
  few seconds, and at every `flush`);
- a workdir lock that works on object storage (`WorkdirLock`).
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from typing import Any, Callable

# Before etils is imported anywhere: gs:// through fsspec/gcsfs rather than tf.io.gfile, so the
# client is the same with or without TensorFlow (and can be pointed at a local emulator).
os.environ.setdefault("EPATH_USE_TF", "false")

import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

PathLike = epath.PathLike


def _no_stale_listings() -> None:
  """gcsfs caches directory listings per process, so an object another process (or tensorstore)
  wrote stays invisible to exists(): process 0 would miss the other processes' shards."""
  try:
    import fsspec
  except ImportError:
    return
  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_no_stale_listings()


def path(p: PathLike) -> epath.Path:
  return epath.Path(p)


def is_remote(p: PathLike) -> bool:
  return "://" in os.fspath(p)


def uri(p: PathLike) -> str:
  """The path as a string: `gs://...` unchanged, a local path made absolute (never
  `os.path.abspath` on a URI, which would turn gs://b/x into ./gs:/b/x)."""
  s = os.fspath(p)
  return s if is_remote(s) else os.path.abspath(s)


def join(base: PathLike, *parts: str) -> str:
  return os.fspath(epath.Path(base).joinpath(*parts))


def makedirs(p: PathLike) -> None:
  """A directory (object stores have none: a no-op there)."""
  if not is_remote(p):
    os.makedirs(os.fspath(p), exist_ok=True)


def exists(p: PathLike) -> bool:
  return epath.Path(p).exists()


def copy_tree(local: str, dest: PathLike) -> None:
  """Copies the local directory `local` under `dest` (local or gs://), file by file."""
  for root, _, files in os.walk(local):
    folder = join(dest, os.path.relpath(root, local))
    makedirs(folder)
    for f in files:
      with open(os.path.join(root, f), "rb") as src:
        data = src.read()
      write_atomic(join(folder, f), lambda out: out.write(data))


def write_atomic(p: PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
  """Writes a whole file that readers see complete or not at all (see the module docstring)."""
  if is_remote(p):
    buf = io.BytesIO() if "b" in mode else io.StringIO()
    write(buf)
    data = buf.getvalue()
    with epath.Path(p).open("wb") as f:
      f.write(data if isinstance(data, bytes) else data.encode())
    return
  p = os.fspath(p)
  tmp = f"{p}.tmp{os.getpid()}"
  with open(tmp, mode) as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, p)


def write_text(p: PathLike, text: str) -> None:
  write_atomic(p, lambda f: f.write(text), "w")


def write_json(p: PathLike, obj, **dump_kwargs) -> None:
  write_text(p, json.dumps(obj, **dump_kwargs) + "\n")


def read_text(p: PathLike) -> str:
  return epath.Path(p).read_text()


def read_json(p: PathLike):
  return json.loads(read_text(p))


def save_npy(p: PathLike, array: np.ndarray) -> None:
  write_atomic(p, lambda f: np.save(f, array, allow_pickle=False))


def load_npy(p: PathLike) -> np.ndarray:
  """Memory-mapped where local, read whole where remote."""
  if not is_remote(p):
    return np.load(os.fspath(p), mmap_mode="r", allow_pickle=False)
  return np.load(io.BytesIO(epath.Path(p).read_bytes()), allow_pickle=False)


def save_npz(p: PathLike, **arrays: np.ndarray) -> None:
  write_atomic(p, lambda f: np.savez(f, **arrays))


def load_npz(p: PathLike) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(epath.Path(p).read_bytes()), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


class LineLog:
  """A text file that grows by whole lines: appended where local; where remote, kept in memory
  and uploaded whole at most every `min_interval` seconds and at every `flush()` (a process
  killed in between loses at most that many seconds of lines)."""

  def __init__(self, p: PathLike, keep: Callable[[str], bool] | None = None,
               min_interval: float = 10.0):
    self.path, self.remote, self.min_interval = os.fspath(p), is_remote(p), min_interval
    lines = epath.Path(p).read_text().splitlines(keepends=True) if exists(p) else []
    if keep is not None:  # e.g. a resumed run drops the lines past its checkpoint
      kept = [l for l in lines if l.strip() and keep(l)]
      if kept != lines:
        write_text(p, "".join(kept))
      lines = kept
    self.lines, self.dirty, self.uploaded = lines, False, None

  def append(self, line: str) -> None:
    line = line if line.endswith("\n") else line + "\n"
    if not self.remote:
      with open(self.path, "a") as f:
        f.write(line)
      return
    self.lines.append(line)
    self.dirty = True
    if self.uploaded is None or time.monotonic() - self.uploaded >= self.min_interval:
      self.flush()

  def flush(self) -> None:
    if self.remote and self.dirty:
      write_text(self.path, "".join(self.lines))
      self.dirty, self.uploaded = False, time.monotonic()


class LockedError(RuntimeError):
  pass


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """An exclusive lock on `directory/.train.lock` that also works on object storage.

  Local: `flock`, released by the OS when the holder dies. Remote: a create-only object
  (`if_generation_match=0`: of two processes creating it, one gets 412 and fails), holding who
  owns it (host, boot id, pid) and a heartbeat the owner renews (`heartbeat()`, at most every
  `renew` seconds). It is released on exit; when its owner died without releasing it (kill -9,
  a lost VM) the next trainer takes it over if the owner was on the same machine and that
  process is gone (same host and boot, pid not running; or another boot), or if its heartbeat
  is older than `stale_after` seconds. So a dead owner never blocks a restart on its own
  machine, and on another machine for at most `stale_after` seconds.
  """

  def __init__(self, directory: PathLike, stale_after: float = 600.0, renew: float = 60.0):
    self.path = join(directory, ".train.lock")
    self.remote, self.stale_after, self.renew = is_remote(directory), stale_after, renew
    self._file = self._blob = None
    self._beat = 0.0

  def _owner(self) -> dict:
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
            "heartbeat": time.time()}

  @staticmethod
  def _describe(owner: dict) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}"

  def acquire(self) -> "WorkdirLock":
    if self.remote:
      self._acquire_remote()
    else:
      self._acquire_local()
    return self

  def _acquire_local(self) -> None:
    import fcntl
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise LockedError(f"{os.path.dirname(self.path)} is being trained by {holder}; wait for "
                        "it or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    self._file = f

  def _bucket_blob(self):
    from google.cloud import storage
    bucket, _, name = self.path.partition("://")[2].partition("/")
    return storage.Client().bucket(bucket).blob(name)

  def _acquire_remote(self) -> None:
    from google.api_core import exceptions
    blob = self._bucket_blob()
    for _ in range(3):
      try:
        blob.upload_from_string(json.dumps(self._owner()), if_generation_match=0)
        self._blob, self._beat = blob, time.monotonic()
        return
      except exceptions.PreconditionFailed:
        pass
      try:
        blob.reload()
        owner = json.loads(blob.download_as_bytes())
      except exceptions.NotFound:
        continue  # released meanwhile: try again
      except ValueError:
        owner = {}
      why = self._stale(owner)
      if why is None:
        raise LockedError(f"{self.path.rsplit('/', 1)[0]} is being trained by "
                          f"{self._describe(owner)} (heartbeat {time.time() - owner.get('heartbeat', 0):.0f} s "
                          f"ago; a lock is taken over after {self.stale_after:.0f} s without one); "
                          "wait for it or use another --workdir")
      import logging
      logging.getLogger(__name__).warning("taking over the lock %s of %s: %s", self.path,
                                          self._describe(owner), why)
      try:
        blob.delete(if_generation_match=blob.generation)
      except (exceptions.NotFound, exceptions.PreconditionFailed):
        pass  # someone else took it over first: the create above decides
    raise LockedError(f"{self.path}: could not take the lock (contended)")

  def _stale(self, owner: dict) -> str | None:
    """Why a lock held by `owner` may be taken over, or None if it may not."""
    if owner.get("host") == socket.gethostname():
      if owner.get("boot_id") != _boot_id():
        return "its machine has rebooted since"
      if not _alive(int(owner.get("pid", -1))):
        return "its process is no longer running"
      if int(owner.get("pid", -1)) == os.getpid():
        return "held by this process"
    age = time.time() - float(owner.get("heartbeat", 0))
    if age > self.stale_after:
      return f"no heartbeat for {age:.0f} s"
    return None

  def heartbeat(self) -> None:
    """Renews a remote lock's heartbeat (cheap to call often: it writes at most every `renew` s)."""
    if self._blob is None or time.monotonic() - self._beat < self.renew:
      return
    from google.api_core import exceptions
    try:
      self._blob.upload_from_string(json.dumps(self._owner()),
                                    if_generation_match=self._blob.generation)
    except exceptions.PreconditionFailed:
      self._blob = None  # not ours any more: never delete it on release
      raise LockedError(f"{self.path}: another trainer took this workdir's lock over (no heartbeat "
                        f"from here for over {self.stale_after:.0f} s?); stopping") from None
    self._beat = time.monotonic()

  def release(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._blob is not None:
      from google.api_core import exceptions
      try:
        self._blob.delete(if_generation_match=self._blob.generation)
      except (exceptions.NotFound, exceptions.PreconditionFailed):
        pass  # taken over by another trainer after we went silent: not ours to delete
      self._blob = None
