"""Every kind of awkward image file: converted correctly, or skipped with a reason."""

import io

import numpy as np
import pytest
from PIL import Image

from pdiff_jax.data.images import BadImage, load_image, ordered_map


def _save(tmp_path, name, image, **kw):
  path = tmp_path / name
  image.save(path, **kw)
  return str(path)


def test_rgb_passes_through(tmp_path):
  arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  out = load_image(_save(tmp_path, "x.png", Image.fromarray(arr)))
  assert out.mode == "RGB" and np.array_equal(np.asarray(out), arr)


def test_grayscale_becomes_three_equal_channels(tmp_path):
  arr = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
  out = np.asarray(load_image(_save(tmp_path, "g.png", Image.fromarray(arr, "L"))))
  assert out.shape == (5, 7, 3) and all(np.array_equal(out[..., c], arr) for c in range(3))


def test_rgba_is_composited_on_white(tmp_path):
  arr = np.zeros((4, 4, 4), np.uint8)
  arr[..., 0] = 200
  arr[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
  out = np.asarray(load_image(_save(tmp_path, "a.png", Image.fromarray(arr, "RGBA"))))
  assert np.all(out[:2] == [200, 0, 0]) and np.all(out[2:] == [255, 255, 255])


def test_palette_with_and_without_transparency(tmp_path):
  rgb = Image.fromarray(np.full((4, 4, 3), (10, 120, 250), np.uint8))
  out = np.asarray(load_image(_save(tmp_path, "p.png", rgb.convert("P", palette=Image.ADAPTIVE))))
  assert np.all(out == [10, 120, 250])
  p = Image.new("P", (3, 3), 0)
  p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
  p.putpixel((0, 0), 1)
  out = np.asarray(load_image(_save(tmp_path, "pt.png", p, transparency=0)))
  assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
  cmyk = Image.new("CMYK", (6, 6), (0, 255, 255, 0))  # pure red in CMYK
  out = np.asarray(load_image(_save(tmp_path, "c.jpg", cmyk)))
  assert out.shape == (6, 6, 3)
  assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60 and out[..., 2].mean() < 60


def test_16_bit_is_scaled_not_clipped(tmp_path):
  arr = np.full((4, 4), 32768, np.uint16)  # mid-grey in 16 bits
  path = _save(tmp_path, "d.png", Image.fromarray(arr))
  assert Image.open(path).mode.startswith("I")
  out = np.asarray(load_image(path))
  assert np.all(np.abs(out.astype(int) - 128) <= 1)


def test_exif_orientation_is_applied(tmp_path):
  arr = np.zeros((10, 20, 3), np.uint8)
  arr[:, :10] = 255  # left half white
  image = Image.fromarray(arr)
  exif = image.getexif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise for display
  out = np.asarray(load_image(_save(tmp_path, "e.jpg", image, exif=exif, quality=100)))
  assert out.shape == (20, 10, 3)
  assert out[:10].mean() > 200 and out[10:].mean() < 50  # the white half is now on top


@pytest.mark.parametrize("kind, reason", [
    ("missing", "missing file"), ("empty", "empty file"), ("text", "not an image"),
    ("truncated", "unreadable image data"), ("huge", "exceed the limit"),
])
def test_bad_files_raise_with_reason(tmp_path, kind, reason):
  path = tmp_path / f"{kind}.png"
  if kind == "empty":
    path.write_bytes(b"")
  elif kind == "text":
    path.write_text("this is not an image")
  elif kind in ("truncated", "huge"):
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    if kind == "truncated":
      path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(BadImage, match=reason):
    load_image(str(path), max_pixels=1000 if kind == "huge" else 10**8)


def test_bytes_input():
  buf = io.BytesIO()
  Image.new("RGB", (3, 2), (1, 2, 3)).save(buf, format="PNG")
  assert load_image(io.BytesIO(buf.getvalue())).size == (3, 2)
  with pytest.raises(BadImage, match="empty"):
    load_image(io.BytesIO(b""))


def test_ordered_map_keeps_order_bounds_the_window_and_raises():
  import threading
  import time
  lock, state = threading.Lock(), {"running": 0, "most": 0, "read": 0}

  def items():
    for i in range(40):
      state["read"] += 1
      yield i

  def slow_square(i):
    with lock:
      state["running"] += 1
      state["most"] = max(state["most"], state["running"])
    time.sleep(0.002 * (i % 3))  # finishing out of order
    with lock:
      state["running"] -= 1
    return i * i

  gen = ordered_map(slow_square, items(), threads=3, ahead=5)
  assert [next(gen) for _ in range(3)] == [0, 1, 4]
  assert state["read"] <= 3 + 5  # a generator input is read only as far as the window
  assert list(gen) == [i * i for i in range(3, 40)]
  assert state["most"] <= 3

  def fails(i):
    if i == 2:
      raise ValueError("image 2 is broken")
    return i
  with pytest.raises(ValueError, match="image 2 is broken"):
    list(ordered_map(fails, range(5), threads=2))
