"""The frozen CLIP encoder (transformers' FlaxCLIPModel): the only module that imports transformers.

`Clip.load(name)` takes a hub name (`openai/clip-vit-large-patch14`) or a local directory made
with `save_pretrained`, with Flax or only PyTorch weights (`from_pt`), plus its tokenizer and
image processor. Image preprocessing is re-implemented with Pillow and numpy (so that it runs in
loader threads on any decoded image) and is tested equal to `CLIPImageProcessor`. Embeddings are
the projected, unnormalised CLIP embeddings; normalisation belongs to reranking and scoring.

`views` > 1 (config `clip.views`, off by default: the original encodes each image once) makes an
image's embedding the mean of the embeddings of the image and of copies moved by `view_shift`
pixels (`view_offsets`). A ViT sees a moved image through another patch grid, so its errors
differ from view to view and the mean is a cheap ensemble: on the demo's small CLIP (patch 4),
9 one-pixel views raise a probe's reading of each object's shape where there are two from 71% to
81% (BENCHMARKS.md), the cost 9 image encodings per image.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable, Sequence

os.environ.setdefault("USE_TF", "0")  # transformers: never import TensorFlow for CLIP

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from pdiff_jax import storage


class ClipLoadError(RuntimeError):
  pass


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """CLIPImageProcessor's steps: shortest side to `size` (bicubic), centre crop, rescale, normalise."""
  size: int
  crop_height: int
  crop_width: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  resample: int = Image.BICUBIC

  @classmethod
  def from_processor(cls, processor) -> "ImageTransform":
    size = processor.size
    if "shortest_edge" not in size:
      raise ClipLoadError(f"image processor size {size} is not a shortest-edge resize")
    crop = processor.crop_size
    return cls(int(size["shortest_edge"]), int(crop["height"]), int(crop["width"]),
               tuple(float(m) for m in processor.image_mean),
               tuple(float(s) for s in processor.image_std), int(processor.resample))

  def __call__(self, image: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 (3, crop_height, crop_width), as `pixel_values`."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = self.size, int(self.size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
      image = image.resize((new_w, new_h), resample=self.resample)
    arr = np.asarray(image, dtype=np.uint8)
    top, left = (new_h - self.crop_height) // 2, (new_w - self.crop_width) // 2
    if top < 0 or left < 0:  # smaller than the crop: pad with zeros, as the processor does
      padded = np.zeros((max(new_h, self.crop_height), max(new_w, self.crop_width), 3), np.uint8)
      pt, pl = max(-top, 0), max(-left, 0)
      padded[pt:pt + new_h, pl:pl + new_w] = arr
      arr, top, left = padded, max(top, 0), max(left, 0)
    arr = arr[top:top + self.crop_height, left:left + self.crop_width]
    x = arr.astype(np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def local_copy(uri: str, only: Sequence[str] | None = None) -> str:
  """A local copy of the directory `uri` (gs://...), or of the files `only` in it, under
  $XDG_CACHE_HOME/pdiff_jax (default ~/.cache). Keyed by the URI and every copied file's name,
  size and modification time, so a replaced model is fetched again; written to a temporary name
  first, so never half there."""
  import hashlib
  import shutil
  source = storage.path(uri)
  if not source.exists():
    raise ClipLoadError(f"CLIP {uri!r}: no such directory")
  files = []

  def walk(d, rel=""):
    for child in sorted(d.iterdir(), key=lambda c: c.name):
      name = f"{rel}{child.name}"
      if child.is_dir():
        walk(child, name + "/")
      elif only is None or name in only:
        st = child.stat()
        files.append((name, child, st.length, st.mtime))

  walk(source)
  key = hashlib.sha256(repr([uri] + [(n, size, mtime) for n, _, size, mtime in files]).encode())
  cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                       "pdiff_jax", "remote", key.hexdigest()[:16])
  if os.path.isdir(cache):
    return cache
  tmp = f"{cache}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  for name, child, _, _ in files:
    os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
    with open(os.path.join(tmp, name), "wb") as f:
      f.write(child.read_bytes())
  try:
    os.replace(tmp, cache)
  except OSError:  # another process made it meanwhile
    shutil.rmtree(tmp, ignore_errors=True)
  return cache


def _has(path: str, names: Sequence[str]) -> bool:
  return any(os.path.exists(os.path.join(path, n)) for n in names)


# Fixed chunk sizes: each tower compiles once, whatever the count, and the memory of one call is
# bounded (ViT-L/14 at these sizes: tests/test_clip.py reads XLA's memory analysis).
IMAGE_CHUNK = 64
TEXT_CHUNK = 256


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= max(n, 1)."""
  return -(-max(n, 1) // multiple) * multiple


VIEWS = (1, 5, 9)


def view_offsets(views: int, shift: int) -> np.ndarray:
  """(views, 2) offsets (dy, dx) in pixels: the image itself, then moved `shift` pixels up,
  down, left and right, then diagonally (`views` 1, 5 or 9)."""
  if views not in VIEWS:
    raise ValueError(f"views must be one of {VIEWS}, got {views}")
  if shift < 1:
    raise ValueError(f"view_shift must be >= 1 pixel, got {shift}")
  s = shift
  return np.array([(0, 0), (-s, 0), (s, 0), (0, -s), (0, s), (-s, -s), (-s, s), (s, -s), (s, s)][:views],
                  np.int32)


def moved(pixels_BCHW: jax.Array, offset: jax.Array, shift: int) -> jax.Array:
  """The images moved by `offset` (dy, dx; each within +-`shift`) pixels: out[y, x] =
  in[y - dy, x - dx], the uncovered border repeating the nearest edge pixel."""
  padded = jnp.pad(pixels_BCHW, ((0, 0), (0, 0), (shift, shift), (shift, shift)), mode="edge")
  return jax.lax.dynamic_slice(padded, (0, 0, shift - offset[0], shift - offset[1]),
                               pixels_BCHW.shape)


def image_encoder(model, mesh: Mesh, views: int = 1, view_shift: int = 1):
  """Jitted `f(params, pixels_BCHW) -> (B, E)`, batch sharded on the mesh's `data` axis; with
  `views` > 1 the mean embedding of the moved copies (`view_offsets`), one view at a time
  (`lax.map`), so memory does not grow with the number of views."""
  batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  offsets = view_offsets(views, view_shift)

  def encode(p, x):
    if views == 1:
      return model.get_image_features(pixel_values=x, params=p)
    one = lambda o: model.get_image_features(pixel_values=moved(x, o, view_shift), params=p)
    return jnp.mean(jax.lax.map(one, jnp.asarray(offsets)), axis=0)
  return jax.jit(encode, in_shardings=(replicated, batch), out_shardings=batch)


def text_encoder(model, mesh: Mesh):
  """Jitted `f(params, ids_BL, mask_BL) -> (B, E)`, batch sharded on the mesh's `data` axis."""
  batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  return jax.jit(
      lambda p, ids, mask: model.get_text_features(input_ids=ids, attention_mask=mask, params=p),
      in_shardings=(replicated, batch, batch), out_shardings=batch)


class Clip:
  """A loaded CLIP: parameters, tokenizer, image transform and jitted, sharded encoders.

  Both encoders take any number of inputs in chunks of a fixed size (`image_chunk`,
  `text_chunk`, rounded up to a multiple of the local devices; the last chunk zero-padded), so
  each tower compiles once and one call's memory does not grow with the count. The next chunk
  is dispatched before the previous one is read back.
  """

  def __init__(self, name: str, model, params, tokenizer, transform: ImageTransform,
               devices: Sequence[jax.Device] | None = None, image_chunk: int = IMAGE_CHUNK,
               text_chunk: int = TEXT_CHUNK, views: int = 1, view_shift: int = 1):
    self.name, self.model, self.tokenizer, self.transform = name, model, tokenizer, transform
    self.views, self.view_shift = int(views), int(view_shift)
    self.embed_dim = int(model.config.projection_dim)
    self.max_text_len = int(model.config.text_config.max_position_embeddings)
    # Encoders run on this process's devices: each process encodes its own images.
    devices = list(jax.local_devices() if devices is None else devices)
    self.mesh = Mesh(np.asarray(devices), ("data",))
    self._batch = NamedSharding(self.mesh, P("data"))
    self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
    self.image_chunk = round_up(int(image_chunk), len(devices))
    self.text_chunk = round_up(int(text_chunk), len(devices))
    self._images = image_encoder(model, self.mesh, self.views, self.view_shift)
    self._texts = text_encoder(model, self.mesh)

  @property
  def encoding(self) -> dict:
    """How images are encoded beyond the CLIP itself: {} for one view (the original), else
    {"views", "view_shift"}; a feature store records it, so that features stay comparable."""
    return {} if self.views == 1 else {"views": self.views, "view_shift": self.view_shift}

  def with_views(self, views: int = 1, view_shift: int = 1) -> "Clip":
    """This CLIP (the same weights on the same devices) encoding images with other views."""
    if (views, view_shift) == (self.views, self.view_shift) or (views == self.views == 1):
      return self
    return Clip(self.name, self.model, self.params, self.tokenizer, self.transform,
                list(self.mesh.devices.flat), self.image_chunk, self.text_chunk, views, view_shift)

  @classmethod
  def load(cls, name: str, devices: Sequence[jax.Device] | None = None, dtype=jnp.float32,
           image_chunk: int = IMAGE_CHUNK, text_chunk: int = TEXT_CHUNK, views: int = 1,
           view_shift: int = 1) -> "Clip":
    """`name`: a hub name, a local `save_pretrained` directory, or one on gs:// (copied once
    to a local cache: transformers reads local files only). `self.name` stays as given.
    `views`, `view_shift`: see the module docstring."""
    view_offsets(views, view_shift)  # checked before anything is loaded
    from flax.core import unfreeze
    from flax.traverse_util import flatten_dict
    from transformers import AutoTokenizer, CLIPImageProcessor, FlaxCLIPModel
    given = name
    if storage.is_remote(name):
      name = local_copy(name)
    local = os.path.isdir(name)
    if not local and (name.startswith((".", "/", "~")) or name.count("/") > 1):
      raise ClipLoadError(f"CLIP {name!r}: no such directory")
    kwargs = {"local_files_only": True} if local else {}
    try:
      if local and not _has(name, ("flax_model.msgpack", "flax_model.msgpack.index.json")):
        if not _has(name, ("pytorch_model.bin", "model.safetensors", "pytorch_model.bin.index.json",
                           "model.safetensors.index.json")):
          raise ClipLoadError(f"CLIP {name!r}: no Flax or PyTorch weights in the directory")
        model = FlaxCLIPModel.from_pretrained(name, from_pt=True, dtype=dtype, **kwargs)
        params = model.params
      else:
        try:
          # Without _do_init=False, transformers first draws a whole random model op by op (9 s
          # for the demo's tiny CLIP on this CPU; ViT-L/14's 428M parameters) and then drops it.
          model, params = FlaxCLIPModel.from_pretrained(name, dtype=dtype, _do_init=False, **kwargs)
        except OSError as e:
          if local or "flax_model.msgpack" not in str(e):
            raise
          model = FlaxCLIPModel.from_pretrained(name, from_pt=True, dtype=dtype)
          params = model.params
      missing = sorted("/".join(k) for k in set(flatten_dict(unfreeze(model.params_shape_tree)))
                       - set(flatten_dict(unfreeze(params))))
      if missing:
        raise ClipLoadError(f"CLIP {name!r}: its weights lack {len(missing)} of the model's "
                            f"parameters, first {missing[0]}")
      tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
      processor = CLIPImageProcessor.from_pretrained(name, **kwargs)
    except ClipLoadError:
      raise
    except (OSError, ValueError, ImportError) as e:
      where = "directory" if local else "hub name (not in the local Hugging Face cache, and the hub is unreachable?)"
      raise ClipLoadError(f"cannot load CLIP {name!r} as a {where}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return cls(given, model, params, tokenizer, ImageTransform.from_processor(processor),
               devices, image_chunk, text_chunk, views, view_shift)

  @property
  def logit_scale(self) -> float:
    """CLIP's learnt inverse temperature: its softmax over texts is of this x the cosines."""
    return float(np.exp(jax.device_get(self.params["logit_scale"])))

  @property
  def num_params(self) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(self.params))

  def _dispatch(self, fn, arrays: Sequence[np.ndarray], chunk: int):
    """Yields `fn(params, *chunks)` over fixed-size chunks of `arrays` (the last zero-padded),
    each dispatched as it is reached, not read back."""
    n = len(arrays[0])
    for start in range(0, max(n, 1), chunk):
      parts = []
      for a in arrays:
        part = a[start:start + chunk]
        if len(part) < chunk:
          part = np.concatenate([part, np.zeros((chunk - len(part),) + a.shape[1:], a.dtype)])
        parts.append(jax.device_put(part, self._batch))
      yield fn(self.params, *parts)

  def _chunked(self, fn, arrays: Sequence[np.ndarray], chunk: int) -> np.ndarray:
    """`fn(params, *chunks)` over fixed-size chunks of `arrays`, joined; each chunk is read back
    after the next one is queued."""
    out, pending = [], None
    for result in self._dispatch(fn, arrays, chunk):
      if pending is not None:
        out.append(np.asarray(pending))
      pending = result
    out.append(np.asarray(pending))
    return np.concatenate(out)[:len(arrays[0])].astype(np.float32)

  def encode_images(self, pixels_BCHW: np.ndarray) -> np.ndarray:
    """Projected image embeddings (B, E), float32, unnormalised."""
    return self._chunked(self._images, [np.asarray(pixels_BCHW, np.float32)], self.image_chunk)

  def encode_images_async(self, pixels_BCHW: np.ndarray) -> Callable[[], np.ndarray]:
    """Dispatches `encode_images` and returns a function that reads the embeddings back, so a
    caller can queue the next batch before it waits for this one (extraction does)."""
    pixels = np.asarray(pixels_BCHW, np.float32)
    results = list(self._dispatch(self._images, [pixels], self.image_chunk))
    return lambda: np.concatenate([np.asarray(r) for r in results])[:len(pixels)].astype(np.float32)

  def encode_image_files(self, paths: Sequence[str]) -> np.ndarray:
    """`encode_images` of image files, decoded one chunk at a time (raises images.BadImage)."""
    from pdiff_jax.data.images import load_image
    out = [np.zeros((0, self.embed_dim), np.float32)]
    for i in range(0, len(paths), self.image_chunk):
      out.append(self.encode_images(self.preprocess(
          [load_image(p) for p in paths[i:i + self.image_chunk]])))
    return np.concatenate(out)

  def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
    return np.stack([self.transform(im) for im in images])

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask), (B, max_text_len) int32 each; each distinct text tokenized once."""
    distinct, rows = _distinct(texts)
    if not distinct:
      return np.zeros((0, self.max_text_len), np.int32), np.zeros((0, self.max_text_len), np.int32)
    enc = self.tokenizer(distinct, padding="max_length", truncation=True,
                         max_length=self.max_text_len, return_tensors="np")
    return enc["input_ids"].astype(np.int32)[rows], enc["attention_mask"].astype(np.int32)[rows]

  def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
    """Projected text embeddings (B, E), float32, unnormalised. Each distinct text is encoded
    once (sampled captions repeat: the demo's 5,000 test candidates are 2,500 distinct texts),
    in the same fixed-size chunks, so the embeddings are those of encoding every row."""
    distinct, rows = _distinct(texts)
    out = [np.zeros((0, self.embed_dim), np.float32)]
    # Tokenized a block of chunks at a time: 100,000 captions never sit on the host as ids at once.
    block = 16 * self.text_chunk
    for i in range(0, len(distinct), block):
      ids, mask = self.tokenize(distinct[i:i + block])
      out.append(self._chunked(self._texts, [ids, mask], self.text_chunk))
    return np.concatenate(out)[rows]


# Architectures of the usual hub CLIPs, so that sizes and encoding speed are known offline
# (random weights of the right shape; speed does not depend on the weights).
KNOWN_CLIPS = {
    "openai/clip-vit-large-patch14": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, patch_size=14, image_size=224),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12), projection_dim=768),
    "openai/clip-vit-base-patch32": dict(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, patch_size=32, image_size=224),
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=8), projection_dim=512),
}


def _config_from_arch(arch: dict):
  from transformers import CLIPConfig
  return CLIPConfig(text_config=arch["text"], vision_config=arch["vision"],
                    projection_dim=arch["projection_dim"])


def random_clip(arch: dict):
  """(FlaxCLIPModel, random params, image size) of a given architecture, for speed measurements."""
  from transformers import FlaxCLIPModel
  model = FlaxCLIPModel(_config_from_arch(arch))
  return model, model.params, arch["vision"]["image_size"]


def abstract_clip(arch: dict):
  """(FlaxCLIPModel, its parameters as ShapeDtypeStructs) of a given architecture: nothing is
  allocated, for compiling at real size (memory and cost analysis)."""
  from transformers import FlaxCLIPModel
  model = FlaxCLIPModel(_config_from_arch(arch), _do_init=False)
  return model, model.params_shape_tree


def load_clip_config(name: str):
  """CLIPConfig of a local `save_pretrained` directory or a hub name already in the local cache."""
  from transformers import CLIPConfig
  if storage.is_remote(name):
    name = local_copy(name, only=("config.json",))
  return CLIPConfig.from_pretrained(name, local_files_only=not os.path.isdir(name))


def frozen_param_count(name: str) -> int | None:
  """Parameters of the CLIP model `name` (image and text towers), counted from its config
  without allocating them (the known hub architectures need no download); None when the
  config cannot be read."""
  try:
    config = load_clip_config(name)
  except (OSError, ValueError):
    if name not in KNOWN_CLIPS:
      return None
    config = _config_from_arch(KNOWN_CLIPS[name])
  from transformers import FlaxCLIPModel
  model = FlaxCLIPModel(config, _do_init=False)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(model.params_shape_tree))


def normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _bpe(symbols: Sequence[str], merges: Sequence[tuple[str, str]]) -> list[str]:
  """The pieces CLIP's BPE makes of `symbols` under `merges` (lowest rank first, as
  `CLIPTokenizer.bpe` does)."""
  ranks = {m: i for i, m in enumerate(merges)}
  pieces = list(symbols)
  while len(pieces) > 1:
    pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(pieces, pieces[1:]))]
    rank, _ = min(pairs)
    if rank == len(ranks):
      break
    pair, merged, i = merges[rank], [], 0
    while i < len(pieces):  # every occurrence, left to right
      if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
        merged.append(pieces[i] + pieces[i + 1])
        i += 2
      else:
        merged.append(pieces[i])
        i += 1
    pieces = merged
  return pieces


def save_small_clip(directory: str | os.PathLike, *, words: Sequence[str] = (), image_size: int = 32,
                    patch_size: int = 8, width: int = 64, layers: int = 2, heads: int = 4,
                    projection_dim: int = 32, max_text_len: int = 32, seed: int = 0,
                    params=None, pytorch: bool = False) -> str:
  """Writes a small CLIP (random weights unless `params` are given) in the layout of a hub model.

  The tokenizer is CLIP's byte-level BPE with merges that make each of `words` one token (other
  text falls back to characters). Loaded with `Clip.load(directory)` exactly like
  `openai/clip-vit-large-patch14`. `pytorch=True` writes PyTorch weights (the `from_pt` path).
  """
  import json
  from transformers import CLIPConfig, CLIPImageProcessor, CLIPTokenizer, FlaxCLIPModel
  from transformers.models.clip.tokenization_clip import bytes_to_unicode

  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  byte_chars = bytes_to_unicode()
  chars = list(byte_chars.values())
  vocab = chars + [c + "</w>" for c in chars]
  merges: list[tuple[str, str]] = []
  for word in dict.fromkeys(w.lower() for w in words if w):
    symbols = [byte_chars[b] for b in word.encode()]
    symbols[-1] += "</w>"
    # BPE applies the lowest-ranked merge first, so a merge made for an earlier word (say "r i"
    # from "right") can split a later one ("triangle"). Replay the merges made so far and append
    # one for the first pair left until the word is one symbol; a merge appended last never
    # changes an earlier word's path, because each of its steps has a lower-ranked merge.
    while len(pieces := _bpe(symbols, merges)) > 1:
      merges.append((pieces[0], pieces[1]))
      if pieces[0] + pieces[1] not in vocab:
        vocab.append(pieces[0] + pieces[1])
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  tokenizer = CLIPTokenizer(os.path.join(directory, "vocab.json"),
                            os.path.join(directory, "merges.txt"), model_max_length=max_text_len)
  tokenizer.save_pretrained(directory)

  config = CLIPConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=width, intermediate_size=4 * width,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       max_position_embeddings=max_text_len, bos_token_id=len(vocab) - 2,
                       eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1),
      vision_config=dict(image_size=image_size, patch_size=patch_size, hidden_size=width,
                         intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=heads),
      projection_dim=projection_dim)
  if pytorch:
    import torch
    from transformers import CLIPModel
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
  else:
    # Initialised in one jitted program: transformers' own init runs op by op (8.2 s for the
    # demo's CLIP here, most of it compiling each op; jitted 3.0-3.7 s, 0.9 s from a warm
    # compilation cache).
    model = FlaxCLIPModel(config, seed=seed, _do_init=False)
    if params is None:
      params = jax.jit(functools.partial(model.init_weights, input_shape=model.input_shape))(model.key)
    model.save_pretrained(directory, params=params)
  CLIPImageProcessor(size={"shortest_edge": image_size},
                     crop_size={"height": image_size, "width": image_size}).save_pretrained(directory)
  return directory


def _distinct(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """The distinct texts in order of first appearance, and each text's row among them."""
  index: dict[str, int] = {}
  rows = np.fromiter((index.setdefault(t, len(index)) for t in texts), np.int64)
  return list(index), rows
