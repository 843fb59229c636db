"""`pdiff serve` as users use it: a real server process on 127.0.0.1, real HTTP, a real browser."""

import concurrent.futures
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import xla_flags

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from pdiff_jax import serve as serve_lib  # noqa: E402
from pdiff_jax.inference import Captioner  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "s3cret"
pytestmark = [pytest.mark.xdist_group("trained_workdir"), pytest.mark.slow]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """`pdiff serve` in its own process, ready once /healthz says so."""

  def __init__(self, workdir, *flags, token=TOKEN):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    env = {**os.environ, "XLA_FLAGS": xla_flags(), "PDIFF_SERVE_TOKEN": token}
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "pdiff_jax", "serve", f"--workdir={workdir}", f"--port={self.port}",
         *flags], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.headers = {"Authorization": f"Bearer {token}"}
    deadline = time.time() + 240
    while time.time() < deadline:
      assert self.proc.poll() is None, self.proc.stdout.read()
      try:
        if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
          return
      except httpx.HTTPError:
        pass
      time.sleep(0.5)
    raise AssertionError("the server did not become ready")

  def post(self, files, data=None, headers=None, **kw):
    return httpx.post(self.url + "/v1/caption", files=files, data=data or {},
                      headers=self.headers if headers is None else headers, timeout=120, **kw)

  def model(self):
    return httpx.get(self.url + "/v1/model", headers=self.headers, timeout=30).json()

  def stop(self) -> int:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
    return self.proc.wait(timeout=120)


@pytest.fixture(scope="module")
def server(trained_workdir):
  s = Server(trained_workdir[0], "--max_upload_mb=1", "--max_wait_ms=30")
  yield s
  s.stop()


@pytest.fixture(scope="module")
def pngs(trained_workdir):
  root = os.path.join(trained_workdir[1], "images")
  paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)[:4]
  out = []
  for p in paths:
    buf = io.BytesIO()
    Image.open(p).convert("RGB").save(buf, format="PNG")
    out.append((os.path.basename(p).rsplit(".", 1)[0] + ".png", buf.getvalue()))
  return out


def _captions(result):
  return [[c["caption"] for c in r["candidates"]] for r in result["results"]]


def test_answers_as_caption_json_and_as_a_lone_captioner(server, pngs, trained_workdir):
  assert httpx.get(server.url + "/healthz").json() == {"ready": True}  # no token needed
  for path in ("/v1/model", "/", "/?token=wrong", "/v1/model?token=" + TOKEN):  # the query is for the page only
    r = httpx.get(server.url + path)
    assert r.status_code == 401 and "token" in r.json()["error"], path
  assert httpx.get(server.url + "/?token=" + TOKEN).status_code == 200
  info = server.model()
  assert info["limits"]["max_wait_ms"] == info["limits"]["wait_ms"] == 30  # the fixture's flag
  assert info["step"] == 100 and info["vocab_size"] > 2 and info["limits"]["max_images"] >= 2
  r = server.post([("image", pngs[0]), ("image", pngs[1])],
                  {"num_candidates": 3, "steps": 4, "seed": 5})
  assert r.status_code == 200, r.text
  out = r.json()
  assert [e["image"] for e in out["results"]] == [pngs[0][0], pngs[1][0]]
  assert set(out["timings"]) >= {"queue_ms", "clip_ms", "sample_ms", "rerank_ms", "total_ms"}
  # exactly what Captioner.caption (and so `pdiff caption --json`) gives for these images
  captioner = Captioner.from_workdir(trained_workdir[0])
  lone = captioner.caption([Image.open(io.BytesIO(b)) for _, b in pngs[:2]], num_candidates=3,
                           steps=4, seed=5)
  assert _captions(out) == [[c["caption"] for c in r["candidates"]] for r in lone]
  np.testing.assert_allclose([c["score"] for e in out["results"] for c in e["candidates"]],
                             [c["score"] for e in lone for c in e["candidates"]], rtol=1e-4, atol=1e-6)
  # `select` chooses among the same candidates, per request, as the captioner does
  assert info["defaults"]["select"] == "clip"
  assert info["clip_views"] == {"views": 1, "view_shift": 1}  # as the training features were encoded
  assert info["limits"]["selects"] == ["clip", "vote", "posterior", "fit"]  # what the page offers
  voted = server.post([("image", pngs[0]), ("image", pngs[1])],
                      {"num_candidates": 3, "steps": 4, "seed": 5, "select": "vote"}).json()
  lone = captioner.caption([Image.open(io.BytesIO(b)) for _, b in pngs[:2]], num_candidates=3,
                           steps=4, seed=5, select="vote")
  assert _captions(voted) == [[c["caption"] for c in r["candidates"]] for r in lone]
  assert all("votes" in c for e in voted["results"] for c in e["candidates"])
  # by the denoiser's fit: the batcher computes it for the whole call, as the captioner per image
  fitted = server.post([("image", pngs[0]), ("image", pngs[1])],
                       {"num_candidates": 3, "steps": 4, "seed": 5, "select": "fit"}).json()
  lone = captioner.caption([Image.open(io.BytesIO(b)) for _, b in pngs[:2]], num_candidates=3,
                           steps=4, seed=5, select="fit")
  assert _captions(fitted) == [[c["caption"] for c in r["candidates"]] for r in lone]
  np.testing.assert_allclose([c["fit"] for e in fitted["results"] for c in e["candidates"]],
                             [c["fit"] for e in lone for c in e["candidates"]], rtol=1e-4)


def test_concurrent_requests_share_calls_and_get_their_lone_captions(server, pngs):
  fields = lambda seed: {"num_candidates": 2, "steps": 4, "seed": seed}
  lone = {seed: _captions(server.post([("image", pngs[seed % 4])], fields(seed)).json())
          for seed in range(12)}
  before = server.model()["stats"]
  with concurrent.futures.ThreadPoolExecutor(12) as pool:
    answers = list(pool.map(lambda seed: server.post([("image", pngs[seed % 4])], fields(seed)).json(),
                            range(12)))
  for seed, a in enumerate(answers):
    assert _captions(a) == lone[seed], seed
  after = server.model()["stats"]
  calls = after["sampler_calls"] - before["sampler_calls"]
  assert after["images"] - before["images"] == 12 and calls < 12  # gathered into fewer calls
  assert max(a["timings"]["batch_requests"] for a in answers) > 1


class _SlowBatcher(serve_lib.Batcher):
  """The real batching policy over a stand-in sampler call that takes `seconds` at any fill."""

  def __init__(self, max_wait_ms, seconds):
    import types
    config = types.SimpleNamespace(sampler=types.SimpleNamespace(eta=1.0))
    self.seconds = seconds
    super().__init__(types.SimpleNamespace(sample_batch=8, bundle=types.SimpleNamespace(config=config)),
                     max_wait_ms)

  def caption(self, batch):
    time.sleep(self.seconds)
    self.calls += 1
    self.images += sum(len(j.images) for j in batch)
    return [{} for _ in batch]


def _closed_loop(batcher, think_s, rounds):
  """Clients that each send a request, wait for its answer, take `think` seconds, and again:
  the mean images per call."""
  import threading

  def client(think):
    for _ in range(rounds):
      job = serve_lib._Job((1, 1, "ddim", 1.0, ""), [None], ["x"], 0, concurrent.futures.Future())
      batcher.submit(job)
      job.future.result(timeout=60)
      time.sleep(think)

  threads = [threading.Thread(target=client, args=(t,)) for t in think_s]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  batcher.close()
  return batcher.images / batcher.calls


def test_the_automatic_wait_lets_the_clients_just_answered_join_the_next_call():
  """Two clients coming back 2 and 10 ms after their answers: with no wait they alternate, one
  image a call; the default wait (5% of the last call: 30 ms) gathers both into every call."""
  auto = _SlowBatcher(None, seconds=0.6)
  assert auto.wait_seconds == 0.0  # no call timed yet
  assert _closed_loop(auto, (0.002, 0.010), rounds=6) >= 1.6
  assert auto.wait_seconds == pytest.approx(serve_lib.AUTO_WAIT_FRACTION * 0.6, rel=0.5)
  assert _closed_loop(_SlowBatcher(0.0, seconds=0.6), (0.002, 0.010), rounds=6) <= 1.4
  fixed = _SlowBatcher(30.0, seconds=0.6)
  assert fixed.wait_seconds == 0.03
  fixed.close()


def _bomb() -> bytes:
  buf = io.BytesIO()
  Image.new("1", (10_000, 9_000)).save(buf, format="PNG")  # 90 M pixels in a few kB
  return buf.getvalue()


def _malformed(rng: random.Random, png: tuple[str, bytes], max_images: int):
  """One randomly chosen bad request: (kind, kwargs for httpx.post)."""
  name, data = png
  kinds = {
      "not an image": lambda: {"files": [("image", ("x.png", rng.randbytes(rng.randint(1, 2000))))]},
      "truncated": lambda: {"files": [("image", (name, data[:rng.randint(1, len(data) // 2)]))]},
      "zero bytes": lambda: {"files": [("image", (name, b""))]},
      "bomb": lambda: {"files": [("image", ("bomb.png", BOMB))]},
      "too many images": lambda: {"files": [("image", png)] * (max_images + 1)},
      "no image": lambda: {"files": [("other", png)]},
      "image as text": lambda: {"files": [("x", ("x", b"1"))], "data": {"image": "not a file"}},
      "bad n": lambda: {"files": [("image", png)], "data": {"num_candidates": rng.choice(["0", "-3", "abc", "1e9", "1000"])}},
      "bad steps": lambda: {"files": [("image", png)], "data": {"steps": rng.choice(["0", "100000", "x"])}},
      "bad seed": lambda: {"files": [("image", png)], "data": {"seed": rng.choice(["-1", "s"])}},
      "bad solver": lambda: {"files": [("image", png)], "data": {"solver": rng.choice(["euler", "../ddim"])}},
      "bad guidance": lambda: {"files": [("image", png)], "data": {"guidance": rng.choice(["2", "nan", "-1", "x"])}},
      "bad select": lambda: {"files": [("image", png)], "data": {"select": rng.choice(["best", "CLIP"])}},
      "bad length": lambda: {"files": [("image", png)], "data": {"length": rng.choice(["auto", "0", "5-2", "99", "x"])}},
      "path in name": lambda: {"files": [("image", (rng.choice(["../../etc/passwd", "a/b.png", "dir\\x.png"]), data))]},
      "json body": lambda: {"json": {"image": "aGVsbG8="}},
      "urlencoded": lambda: {"data": {"image": "x"}},
      "garbage multipart": lambda: {"content": rng.randbytes(300),
                                    "headers": {"content-type": "multipart/form-data; boundary=zz"}},
      "over the upload limit": lambda: {"files": [("image", ("big.png", rng.randbytes(1_100_000)))]},
  }
  kind = rng.choice(sorted(kinds))
  return kind, kinds[kind]()


BOMB = _bomb()


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, pngs, tmp_path):
  rng = random.Random(0)
  max_images = server.model()["limits"]["max_images"]
  good = server.post([("image", pngs[0])], {"num_candidates": 2, "steps": 4, "seed": 1}).json()
  seen = {}
  for _ in range(200):
    kind, kw = _malformed(rng, pngs[rng.randrange(4)], max_images)
    headers = {**server.headers, **kw.pop("headers", {})}
    r = httpx.post(server.url + "/v1/caption", headers=headers, timeout=60, **kw)
    assert 400 <= r.status_code < 500, (kind, r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"] and "\n" not in body["error"], (kind, body)
    seen.setdefault(kind, (r.status_code, body["error"]))
  assert len(seen) == 19  # every kind was tried
  assert seen["bomb"][0] == 400 and "decompression bomb" in seen["bomb"][1]  # refused unopened
  assert seen["over the upload limit"][0] == 413 and seen["too many images"][0] == 413
  assert seen["json body"][0] == 415
  assert httpx.post(server.url + "/v1/caption", files=[("image", pngs[0])]).status_code == 401
  # alive and still right
  again = server.post([("image", pngs[0])], {"num_candidates": 2, "steps": 4, "seed": 1}).json()
  assert _captions(again) == _captions(good)
  (tmp_path / "fuzz_cases.json").write_text(json.dumps(seen, indent=1))
  print(json.dumps(seen, indent=1))


def test_load_32_clients_no_errors_and_flat_memory(server, pngs):
  """1,000 requests from 32 concurrent clients, on the suite's tiny model (the suite's size:
  ~25 s; `pdiff bench --parts=serve` runs the issue's 2,000 on the demo model for BENCHMARKS.md):
  no errors, the calls shared, resident memory within 10% of after warm-up."""
  fields = {"num_candidates": 2, "steps": 4}
  serve_lib.load(server.url, pngs, clients=8, requests=64, fields=fields, token=TOKEN)  # warm
  rss_before = server.model()["stats"]["rss_bytes"]
  stats_before = server.model()["stats"]
  result = serve_lib.load(server.url, pngs, clients=32, requests=1000, fields=fields, token=TOKEN)
  stats = server.model()["stats"]
  print(json.dumps(result))
  assert result["errors"] == 0, result["error_statuses"]
  assert stats["images"] - stats_before["images"] == 1000
  mean_batch = (stats["images"] - stats_before["images"]) / (stats["sampler_calls"] - stats_before["sampler_calls"])
  assert mean_batch > 2  # concurrent requests share sampler calls
  assert stats["rss_bytes"] <= 1.10 * rss_before, (stats["rss_bytes"], rss_before)


def test_the_page_in_a_real_browser(server, pngs, tmp_path):
  webdriver = pytest.importorskip("selenium.webdriver")
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  chromium, driver_path = "/usr/bin/chromium", "/usr/bin/chromedriver"
  if not (os.path.exists(chromium) and os.path.exists(driver_path)):
    pytest.skip("Debian's chromium and chromium-driver are not installed")
  page = httpx.get(server.url + "/", headers=server.headers).text
  assert "<script src" not in page and "http://" not in page and "https://" not in page  # self-contained
  options = webdriver.ChromeOptions()
  options.binary_location = chromium
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,900"):
    options.add_argument(arg)
  browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
  try:
    browser.get(server.url + "/?token=" + TOKEN)  # the page sends it on its API calls, and hides it
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text.startswith("checkpoint"))
    assert browser.current_url == server.url + "/"
    assert browser.find_element(By.ID, "token").get_attribute("value") == TOKEN
    assert browser.find_element(By.ID, "n").get_attribute("value") == "4"  # tiny's sampler.num_candidates
    image = tmp_path / pngs[0][0]
    image.write_bytes(pngs[0][1])
    browser.find_element(By.ID, "file").send_keys(str(image))
    n = browser.find_element(By.ID, "n")
    n.clear()
    n.send_keys("3")
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("4")
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 120).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, "ol.candidates li") or b.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""
    items = browser.find_elements(By.CSS_SELECTOR, "ol.candidates li")
    scores = [float(li.get_attribute("data-score")) for li in items]
    assert len(items) == 3 and scores == sorted(scores, reverse=True)
    assert [li.get_attribute("class") for li in items] == ["chosen", "", ""]
    assert browser.find_element(By.CSS_SELECTOR, ".result img").get_attribute("alt") == pngs[0][0]
    assert all(li.get_attribute("data-votes") is None for li in items)  # "clip" shows no votes
    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000
    # the choice among the n: the server's options, its default first, and the votes shown
    from selenium.webdriver.support.ui import Select
    select = Select(browser.find_element(By.ID, "select"))
    assert [o.get_attribute("value") for o in select.options] == ["clip", "vote", "posterior", "fit"]
    assert select.first_selected_option.get_attribute("value") == "clip"
    select.select_by_value("vote")
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 120).until(
        lambda b: all(li.get_attribute("data-votes") for li in b.find_elements(By.CSS_SELECTOR, "ol.candidates li"))
        or b.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""
    items = browser.find_elements(By.CSS_SELECTOR, "ol.candidates li")
    votes = [int(li.get_attribute("data-votes")) for li in items]
    captions = browser.execute_script(
        "return Array.from(document.querySelectorAll('ol.candidates li'), li => li.firstChild.textContent)")
    # each candidate's votes are its copies among the n, the most drawn first, shown as "xN"
    assert len(items) == 3 and votes == [captions.count(c) for c in captions] == sorted(votes, reverse=True)
    assert [li.find_element(By.CSS_SELECTOR, "span.votes").text for li in items] == [f"\u00d7{v}" for v in votes]
    assert items[0].get_attribute("class") == "chosen" and items[0].text.startswith(
        browser.find_element(By.CSS_SELECTOR, ".best").text)
    # reloading the model information (as a new token does) keeps the user's choice
    assert browser.execute_script("return loadModel().then(() => document.getElementById('select').value)") == "vote"
    assert len(select.options) == 4
    # the server's error is shown as text
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    browser.find_element(By.ID, "file").send_keys(str(broken))
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == "broken.png: not an image file"
    if os.environ.get("PDIFF_SCREENSHOT"):
      shot.rename(os.environ["PDIFF_SCREENSHOT"])
  finally:
    browser.quit()


def test_zz_sigterm_answers_the_request_in_flight_then_exits_0(server, pngs):
  """(Runs last: it stops the module's server.) A request of a new shape is in flight for
  seconds (its sampler compiles) when SIGTERM comes; it is answered, then the process exits 0."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    pending = pool.submit(server.post, [("image", pngs[0])], {"num_candidates": 7, "steps": 30})
    time.sleep(1.0)
    assert not pending.done()
    server.proc.send_signal(signal.SIGTERM)
    assert pending.result().status_code == 200
  assert server.proc.wait(timeout=60) == 0
  assert "stopped (SIGTERM)" in server.proc.stdout.read()
