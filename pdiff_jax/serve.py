"""`pdiff serve`: captions over HTTP (FastAPI on uvicorn), with a web page, batched across requests.

  pdiff serve --workdir=DIR [--host=127.0.0.1] [--port=8000] [--token=T] [--max_wait_ms=MS]
              [--max_upload_mb=MB]

`POST /v1/caption` takes multipart `image` fields and the form fields `num_candidates`, `steps`,
`seed`, `solver`, `guidance`, `length`, `select`, and answers `{"results": [caption --json entries],
"timings": {...}}`; `GET /` is a self-contained page, `GET /healthz` says whether the model is
compiled, `GET /v1/model` describes it. Errors are 4xx with `{"error": "one line"}`.

Batching: one worker thread owns the model. Requests with the same sampler options are gathered,
up to `sampler.batch_size` images or `--max_wait_ms`, into one CLIP call and one call of the
compiled sampler at its fixed padded shape, so nothing recompiles after warm-up. A candidate's
noise depends only on (its request's seed, the image's place in that request, the candidate), so
every request gets exactly the captions a lone request would. This is the only module that
imports the web stack.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hmac
import io
import logging
import os
import signal
import threading
import time
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from pdiff_jax import sampler as sampler_lib
from pdiff_jax.data import images as images_lib
from pdiff_jax.inference import check_select

log = logging.getLogger(__name__)

TOKEN_ENV = "PDIFF_SERVE_TOKEN"
MAX_CANDIDATES = 64
MAX_STEPS = 1000
# --max_wait_ms unset: a batch waits this fraction of the last sampler call's time (a lone request
# pays at most 5% more), at most AUTO_WAIT_CAP_S. The call costs the same at any fill (one padded
# shape), so waiting long enough for the clients just answered to come back pays: 32 clients on
# the demo model, this CPU, 10 ms fixed: 8.1 requests/s, 16.1 images a call, p50 3.95 s; auto:
# 13.2 requests/s, 30.8 a call, p50 2.28 s (BENCHMARKS.md).
AUTO_WAIT_FRACTION = 0.05
AUTO_WAIT_CAP_S = 0.25
PAGE = os.path.join(os.path.dirname(__file__), "serve_page.html")


class RequestError(ValueError):
  """A bad request: `status` (4xx) and a one-line message."""

  def __init__(self, status: int, message: str):
    super().__init__(message.splitlines()[0] if message else "bad request")
    self.status = status


@dataclasses.dataclass
class _Job:
  """One request's images, waiting for the worker."""
  options: tuple  # (n, steps, solver, guidance, length): what must match to share a call
  images: list
  names: list
  seed: int
  future: concurrent.futures.Future
  queued: float = dataclasses.field(default_factory=time.perf_counter)
  select: str | None = None  # how its captions are chosen (None: the config's); calls need not match


class Batcher:
  """The worker that owns the captioner: gathers jobs of equal options into one call each."""

  def __init__(self, captioner, max_wait_ms: float | None):
    self.captioner = captioner
    self.max_batch = captioner.sample_batch
    self.max_wait = None if max_wait_ms is None else max_wait_ms / 1000.0  # None: auto
    self._call_seconds = 0.0  # how long the last sampler call took
    self.eta = float(captioner.bundle.config.sampler.eta)
    self._pending: collections.deque[_Job] = collections.deque()
    self._cv = threading.Condition()
    self._stop = False
    self._free_since = 0.0  # when the last call ended
    self.calls = 0  # sampler calls made, and images in them: the mean batch is images / calls
    self.images = 0
    self._thread = threading.Thread(target=self._run, name="pdiff-batcher", daemon=True)
    self._thread.start()

  @property
  def wait_seconds(self) -> float:
    """How long a batch waits for company: --max_wait_ms, or AUTO_WAIT_FRACTION of the last call."""
    if self.max_wait is not None:
      return self.max_wait
    return min(AUTO_WAIT_FRACTION * self._call_seconds, AUTO_WAIT_CAP_S)

  def submit(self, job: _Job) -> None:
    with self._cv:
      if self._stop:
        raise RequestError(503, "the server is shutting down")
      self._pending.append(job)
      self._cv.notify()

  def close(self) -> None:
    """Finishes every job already submitted, then stops the worker."""
    with self._cv:
      self._stop = True
      self._cv.notify()
    self._thread.join()

  def _take(self) -> list[_Job] | None:
    """The oldest job and then any others of its options, up to max_batch images, waiting at
    most `wait_seconds` for more to come, counted from the oldest's arrival or from the end of the
    last call, whichever is later: the clients just answered get the time to send their next
    request into this call (otherwise they form a second cohort that alternates with the
    first, each call half full)."""
    with self._cv:
      while not self._pending:
        if self._stop:
          return None
        self._cv.wait()
      first = self._pending[0]
      deadline = max(first.queued, self._free_since) + self.wait_seconds
      while True:
        same = [j for j in self._pending if j.options == first.options]
        count = sum(len(j.images) for j in same)
        left = deadline - time.perf_counter()
        if count >= self.max_batch or left <= 0 or self._stop:
          break
        self._cv.wait(left)
      batch, total = [], 0
      for job in list(self._pending):
        if job.options == first.options and total + len(job.images) <= self.max_batch:
          batch.append(job)
          total += len(job.images)
          self._pending.remove(job)
      return batch

  def _run(self) -> None:
    while True:
      batch = self._take()
      if batch is None:
        return
      started = time.perf_counter()
      try:
        results = self.caption(batch)
      except Exception as e:  # noqa: BLE001 -- a failed call fails its requests, not the server
        log.exception("sampler call failed")
        for job in batch:
          job.future.set_exception(RequestError(500, f"captioning failed: {type(e).__name__}"))
        continue
      self._free_since = time.perf_counter()
      self._call_seconds = self._free_since - started
      for job, result in zip(batch, results):
        job.future.set_result(result)

  def caption(self, batch: Sequence[_Job]) -> list[dict]:
    """One CLIP call and one sampler call for every image of `batch` (same options)."""
    c = self.captioner
    n, steps, solver, guidance, length = batch[0].options
    started = time.perf_counter()
    pil = [im for job in batch for im in job.images]
    t0 = time.perf_counter()
    feats = c.features(pil)
    emb = feats if c.rerank_clip is c.clip else c.rerank_clip.encode_images(c.rerank_clip.preprocess(pil))
    t1 = time.perf_counter()
    keys = jnp.concatenate([sampler_lib.candidate_keys(job.seed, jnp.arange(len(job.images), dtype=jnp.uint32), n)
                            for job in batch])
    tokens = c.sample_tokens_keyed(feats, keys, steps, self.eta, solver, guidance, length)
    t2 = time.perf_counter()
    captions = [[c.bundle.vocab.decode(t) for t in cands] for cands in tokens]
    scores = c.rerank(emb, captions) if n > 1 else None
    # the denoiser's fit of every candidate, when a request of the batch chooses by it
    fits = None
    if scores is not None and any((job.select or c.select) == "fit" for job in batch):
      fits = c.fit(feats, tokens)
    ranked = []
    for job in batch:
      k = len(ranked)
      part = slice(k, k + len(job.images))
      ranked += c.rank(captions[part], None if scores is None else scores[part], n, job.select,
                       None if fits is None else fits[part])
    t3 = time.perf_counter()
    self.calls += 1
    self.images += len(pil)
    out, at = [], 0
    for job in batch:
      k = len(job.images)
      timings = {"queue_ms": 1000 * (started - job.queued), "clip_ms": 1000 * (t1 - t0),
                 "sample_ms": 1000 * (t2 - t1), "rerank_ms": 1000 * (t3 - t2),
                 "batch_images": len(pil), "batch_requests": len(batch)}
      out.append({"results": [{"image": name, **r} for name, r in zip(job.names, ranked[at:at + k])],
                  "timings": timings})
      at += k
    return out


def _form_int(form, key: str, default: int, lo: int, hi: int) -> int:
  raw = form.get(key)
  if raw is None or raw == "":
    return default
  try:
    value = int(str(raw))
  except ValueError:
    raise RequestError(422, f"{key}: not an integer: {str(raw)[:40]!r}") from None
  if not lo <= value <= hi:
    raise RequestError(422, f"{key}: must be in [{lo}, {hi}], got {value}")
  return value


def _safe_name(name: str | None, i: int) -> str:
  """The upload's file name as given, for the answer only (never a path); separators refused."""
  if not name:
    return f"image_{i}"
  if any(ch in name for ch in "/\\\x00") or name in (".", ".."):
    raise RequestError(400, f"image {i}: a file name with path separators is refused: {name[:60]!r}")
  return name[:200]


class Service:
  """The model, its batcher and the limits; the web app (`make_app`) is a thin layer over it."""

  def __init__(self, captioner, workdir: str, max_wait_ms: float | None = None,
               max_upload_mb: float = 20.0, token: str | None = None):
    self.captioner = captioner
    self.workdir = workdir
    self.max_upload = int(max_upload_mb * 1024 * 1024)
    self.token = token or None
    self.max_images = captioner.sample_batch
    self.max_pixels = int(captioner.bundle.config.data.get("max_image_pixels",
                                                           images_lib.DEFAULT_MAX_PIXELS))
    self.batcher = Batcher(captioner, max_wait_ms)
    self.ready = threading.Event()

  def defaults(self) -> dict:
    s = self.captioner.bundle.config.sampler
    return {"num_candidates": int(s.num_candidates), "steps": int(s.steps), "seed": 0,
            **self.captioner.sampling_options(), "select": self.captioner.select}

  def warm_up(self) -> None:
    """Compiles the CLIP towers and the sampler at the default options (the shapes every
    default request uses) before /healthz says ready."""
    t = time.perf_counter()
    d = self.defaults()
    image = images_lib.to_rgb(_blank())
    for _ in range(2):  # the first compiles; the second times a compiled call (the auto wait)
      job = _Job((d["num_candidates"], d["steps"], d["solver"], d["guidance"], d["length"]), [image],
                 ["warm-up"], 0, concurrent.futures.Future())
      self.batcher.submit(job)
      job.future.result()
    self.batcher.calls = self.batcher.images = 0
    self.ready.set()
    log.info("warm-up (compilation) took %.1f s; ready", time.perf_counter() - t)

  def model_info(self) -> dict:
    b = self.captioner.bundle
    m = b.config.model
    from pdiff_jax import model as model_lib
    return {"workdir": self.workdir, "step": b.step, "vocab_size": len(b.vocab),
            "clip": self.captioner.clip.name, "rerank_clip": self.captioner.rerank_clip.name,
            "clip_views": {"views": self.captioner.clip.views, "view_shift": self.captioner.clip.view_shift},
            "judge": self.captioner.judge is not None,
            "trainable_params": model_lib.count_params(b.params, b.model.cfg),
            "model": {k: m[k] for k in ("hidden_size", "num_layers", "num_heads", "prefix_len",
                                        "word_dim", "feature_dim")},
            "max_len": int(b.config.data.max_len), "trained_with": {
                "cond_drop": float(m.get("cond_drop", 0.0)), "self_cond": float(m.get("self_cond", 0.0)),
                "length_head": bool(m.get("length_head", False))},
            "stats": {"sampler_calls": self.batcher.calls, "images": self.batcher.images,
                      "mean_images_per_call": self.batcher.images / max(self.batcher.calls, 1),
                      "rss_bytes": resident_bytes()},
            "defaults": self.defaults(), "limits": {
                "max_images": self.max_images, "max_upload_mb": self.max_upload / 2 ** 20,
                "max_candidates": MAX_CANDIDATES, "max_steps": MAX_STEPS,
                "selects": list(sampler_lib.SELECTS),
                "max_image_pixels": self.max_pixels,
                "wait_ms": 1000 * self.batcher.wait_seconds,
                "max_wait_ms": "auto" if self.batcher.max_wait is None else 1000 * self.batcher.max_wait}}

  def parse(self, form) -> _Job:
    """A `_Job` from a parsed multipart form, or RequestError naming what is wrong."""
    d = self.defaults()
    uploads = form.getlist("image")
    if not uploads:
      raise RequestError(400, "no image: send one or more multipart fields named 'image'")
    if len(uploads) > self.max_images:
      raise RequestError(413, f"{len(uploads)} images: at most {self.max_images} per request")
    n = _form_int(form, "num_candidates", d["num_candidates"], 1, MAX_CANDIDATES)
    steps = _form_int(form, "steps", d["steps"], 1, MAX_STEPS)
    seed = _form_int(form, "seed", 0, 0, 2 ** 31 - 1)
    guidance = form.get("guidance")
    if guidance not in (None, ""):
      try:
        guidance = float(str(guidance))
      except ValueError:
        raise RequestError(422, f"guidance: not a number: {str(guidance)[:40]!r}") from None
    try:
      opts = self.captioner.sampling_options(form.get("solver") or None,
                                             None if guidance in (None, "") else guidance,
                                             form.get("length"))
      select = check_select(form.get("select") or d["select"])
    except ValueError as e:
      raise RequestError(422, str(e)) from None
    images, names = [], []
    for i, up in enumerate(uploads):
      if isinstance(up, str):
        raise RequestError(400, f"image {i}: a text field, not a file upload")
      names.append(_safe_name(up.filename, i))
      data = up.file.read()
      try:
        images.append(images_lib.load_image(io.BytesIO(data), max_pixels=self.max_pixels))
      except images_lib.BadImage as e:
        raise RequestError(400, f"{names[-1]}: {e}") from None
    return _Job((n, steps, opts["solver"], opts["guidance"], opts["length"]), images, names, seed,
                concurrent.futures.Future(), select=select)


def resident_bytes() -> int | None:
  """This process's resident memory (Linux /proc; None elsewhere)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return None


def load(url: str, uploads: Sequence[tuple[str, bytes]], clients: int, requests: int,
         fields: dict | None = None, token: str | None = None, timeout_s: float = 600.0) -> dict:
  """A closed-loop load test: `clients` concurrent connections send `requests` POST /v1/caption
  in all, each with one of `uploads` (name, bytes) in turn. Returns throughput, latency
  percentiles and the status of every answer that was not 200."""
  import httpx

  async def run():
    latencies, failures, sent = [], collections.Counter(), iter(range(requests))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, headers=headers,
                                 limits=httpx.Limits(max_connections=clients)) as client:
      async def worker():
        for i in sent:
          name, data = uploads[i % len(uploads)]
          t = time.perf_counter()
          try:
            r = await client.post("/v1/caption", files=[("image", (name, data, "image/png"))],
                                  data={k: str(v) for k, v in (fields or {}).items()})
            status = r.status_code
          except httpx.HTTPError as e:
            status = type(e).__name__
          latencies.append(time.perf_counter() - t)
          if status != 200:
            failures[str(status)] += 1
      t0 = time.perf_counter()
      await asyncio.gather(*(worker() for _ in range(clients)))
      return time.perf_counter() - t0, latencies, failures

  seconds, latencies, failures = asyncio.run(run())
  ms = np.sort(np.asarray(latencies)) * 1000
  return {"clients": clients, "requests": requests, "seconds": seconds,
          "requests_per_sec": requests / seconds, "p50_ms": float(np.percentile(ms, 50)),
          "p99_ms": float(np.percentile(ms, 99)), "errors": sum(failures.values()),
          "error_statuses": dict(failures)}


def _blank():
  from PIL import Image
  return Image.new("RGB", (32, 32), (128, 128, 128))


def make_app(service: Service):
  """The FastAPI app over `service`."""
  app = FastAPI(title="pdiff serve", docs_url=None, redoc_url=None, openapi_url=None)
  error = lambda status, message: JSONResponse({"error": message}, status_code=status)

  @app.middleware("http")
  async def guard(request: Request, call_next):
    # Every route but /healthz needs the token. A browser cannot send a header when it opens a
    # page, so the page also takes it as `/?token=T` (as Jupyter does) and sends the header on
    # its API calls.
    if service.token and request.url.path != "/healthz":
      given = request.headers.get("authorization", "")
      if request.url.path == "/" and "token" in request.query_params:
        given = f"Bearer {request.query_params['token']}"
      if not hmac.compare_digest(given.encode(), f"Bearer {service.token}".encode()):
        return error(401, "missing or wrong 'Authorization: Bearer' token (the page: /?token=...)")
    if request.method == "POST":
      length = request.headers.get("content-length")
      if length is not None and (not length.isdigit() or int(length) > service.max_upload):
        return error(413, f"upload over --max_upload_mb={service.max_upload / 2 ** 20:g}")
    try:
      return await call_next(request)
    except RequestError as e:
      return error(e.status, str(e))

  @app.exception_handler(RequestError)
  async def request_error(request: Request, e: RequestError):
    return error(e.status, str(e))

  @app.exception_handler(404)
  async def not_found(request: Request, e):
    return error(404, f"no route {request.url.path}")

  @app.exception_handler(405)
  async def not_allowed(request: Request, e):
    return error(405, f"{request.method} is not allowed on {request.url.path}")

  @app.get("/healthz")
  async def healthz():
    if not service.ready.is_set():
      return JSONResponse({"ready": False}, status_code=503)
    return {"ready": True}

  @app.get("/v1/model")
  async def model_info():
    return service.model_info()

  @app.get("/", response_class=HTMLResponse)
  async def page():
    with open(PAGE, encoding="utf-8") as f:
      return f.read()

  @app.post("/v1/caption")
  async def caption(request: Request):
    t0 = time.perf_counter()
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
      return error(415, "send multipart/form-data with 'image' file fields")
    body = bytearray()
    async for chunk in request.stream():  # counted as it comes: no length header is trusted
      body += chunk
      if len(body) > service.max_upload:
        return error(413, f"upload over --max_upload_mb={service.max_upload / 2 ** 20:g}")
    async def replay():  # the form is parsed from the counted body, handed over as one message
      return {"type": "http.request", "body": bytes(body), "more_body": False}
    try:
      form = await Request(request.scope, replay).form()
    except Exception as e:  # noqa: BLE001 -- any parse failure is the client's malformed body
      return error(400, f"malformed multipart body ({getattr(e, 'detail', None) or type(e).__name__})")
    try:
      job = await asyncio.to_thread(service.parse, form)
    finally:
      await form.close()
    if not service.ready.is_set():
      return error(503, "warming up (compiling); try again when /healthz says ready")
    service.batcher.submit(job)
    result = await asyncio.wrap_future(job.future)
    result["timings"]["total_ms"] = 1000 * (time.perf_counter() - t0)
    return result

  return app


def serve(workdir: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          max_wait_ms: float | None = None, max_upload_mb: float = 20.0) -> int:
  """Loads the model, starts listening (/healthz says 503 until warm-up is done), serves until
  SIGTERM or SIGINT, finishes the requests in flight and returns 0."""
  import uvicorn
  from pdiff_jax.inference import Captioner
  captioner = Captioner.from_workdir(workdir)
  service = Service(captioner, workdir, max_wait_ms, max_upload_mb, token or os.environ.get(TOKEN_ENV))
  app = make_app(service)
  config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=60)
  server = uvicorn.Server(config)
  warm = threading.Thread(target=service.warm_up, name="pdiff-warm-up", daemon=True)
  warm.start()
  log.info("serving %s on http://%s:%d/%s", workdir, host, port,
           " (token required: the page at /?token=..., the API with 'Authorization: Bearer ...')"
           if service.token else "")
  # uvicorn handles SIGTERM / SIGINT (stop accepting, answer the requests in flight) and then
  # raises the signal again for the handler it found: this one, so the process ends with 0.
  stopped = []
  previous = {s: signal.signal(s, lambda signum, frame: stopped.append(signum))
              for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    server.run()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  service.batcher.close()
  log.info("stopped (%s); %d sampler calls, %d images", ", ".join(signal.Signals(s).name for s in stopped)
           or "exit", service.batcher.calls, service.batcher.images)
  return 0
