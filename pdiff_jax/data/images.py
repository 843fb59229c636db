"""Reading image files into RGB PIL images, robustly.

Grayscale, palette, RGBA/LA (composited on white), CMYK, 16-bit and EXIF-rotated images are
converted; missing, empty, truncated, non-image and over-large files raise `BadImage` with a
reason. Sizes are checked from the header before any pixel is decoded (decompression bombs).
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import os
import warnings
from typing import BinaryIO, Callable, Iterable, Iterator, TypeVar

import numpy as np
from PIL import Image, ImageOps

from pdiff_jax import storage

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own bomb threshold (~ 9459 x 9459)

A = TypeVar("A")
R = TypeVar("R")


class BadImage(Exception):
  """An image that cannot be used; str() is the reason, for skipped.json and stderr."""


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> 8-bit RGB; transparency composited on white, EXIF orientation applied."""
  image = ImageOps.exif_transpose(image)
  if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    arr = np.asarray(image, dtype=np.float64)
    peak = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
    image = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
  elif image.mode == "F":
    arr = np.asarray(image, dtype=np.float64)
    image = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
  if image.mode == "P":
    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
  if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, rgba)
  return image.convert("RGB") if image.mode != "RGB" else image


def load_image(path: str | os.PathLike | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
  """Opens, checks and decodes an image file (local path, gs:// URI or binary file object) to
  RGB, or raises BadImage with the reason."""
  if isinstance(path, (str, os.PathLike)) and storage.is_remote(path):  # gs://...: read it whole
    try:
      path = io.BytesIO(storage.path(path).read_bytes())
    except (FileNotFoundError, IsADirectoryError):
      raise BadImage("missing file") from None
    except Exception as e:  # noqa: BLE001 -- a denied or failed read (gcsfs has retried it)
      raise BadImage(f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
  if isinstance(path, (str, os.PathLike)):
    try:
      size = os.path.getsize(path)
    except OSError:
      raise BadImage("missing file") from None
  else:
    size = path.seek(0, os.SEEK_END)
    path.seek(0)
  if size == 0:
    raise BadImage("empty file")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(path) as image:
        w, h = image.size
        if w * h > max_pixels:
          raise BadImage(f"{w}x{h} pixels exceed the limit of {max_pixels}")
        image.load()
        return to_rgb(image)
  except BadImage:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise BadImage(f"refused as a decompression bomb ({e})") from None
  except Image.UnidentifiedImageError:
    raise BadImage("not an image file") from None
  except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
    raise BadImage(f"unreadable image data ({e})") from None


def ordered_map(fn: Callable[[A], R], items: Iterable[A], threads: int,
                ahead: int | None = None) -> Iterator[R]:
  """`fn` over `items` in `threads` threads, yielded in order, with at most `ahead` (default
  4 x threads) submitted and not yet consumed: unlike `Executor.map`, a slow consumer never
  holds a whole shard of decoded images, and a generator input is not read to its end first."""
  ahead = max(ahead or 4 * threads, 1)
  with concurrent.futures.ThreadPoolExecutor(max(threads, 1), thread_name_prefix="pdiff-load") as pool:
    window: collections.deque = collections.deque()
    for item in items:
      window.append(pool.submit(fn, item))
      if len(window) >= ahead:
        yield window.popleft().result()
    while window:
      yield window.popleft().result()
