"""CLIP loading (Flax and PyTorch weights, by path), preprocessing and sharded encoders."""

import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import write_image
from pdiff_jax import clip as clip_lib
from pdiff_jax.data.images import load_image


@pytest.fixture(scope="module")
def clip(clip_dir):
  return clip_lib.Clip.load(clip_dir)


@pytest.mark.parametrize("size", [(37, 23), (23, 37), (401, 299), (32, 32), (20, 31), (640, 480)])
@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_preprocessing_equals_clip_image_processor(tmp_path, size, fmt):
  from transformers import CLIPImageProcessor
  path = write_image(str(tmp_path / f"x.{fmt}"), size=size, seed=size[0])
  image = load_image(path)
  for proc in (CLIPImageProcessor(),  # ViT-L/14's: 224 shortest edge, 224 crop
               CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})):
    ours = clip_lib.ImageTransform.from_processor(proc)(image)
    theirs = proc(images=image, return_tensors="np")["pixel_values"][0]
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_load_by_path_and_encode(clip, clip_dir):
  assert clip.name == clip_dir and clip.embed_dim == 32
  images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 50, 3), np.uint8))
            for i in range(3)]
  emb = clip.encode_images(clip.preprocess(images))
  assert emb.shape == (3, 32) and emb.dtype == np.float32
  assert not np.allclose(emb[0], emb[1])
  # Projected, unnormalised: equal to transformers' own get_image_features.
  ref = clip.model.get_image_features(pixel_values=clip.preprocess(images), params=clip.params)
  np.testing.assert_allclose(emb, np.asarray(ref), rtol=1e-5, atol=1e-5)
  texts = clip.encode_texts(["a red circle", "a blue circle", "zebra"])
  assert texts.shape == (3, 32)
  np.testing.assert_allclose(np.linalg.norm(clip_lib.normalize(texts), axis=-1), 1.0, rtol=1e-6)


def test_sharded_encoding_equals_one_device(clip_dir, clip):
  assert len(clip.mesh.devices.flat) == 8  # all local (fake) devices
  one = clip_lib.Clip.load(clip_dir, devices=jax.devices()[:1])
  pixels = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)  # 5: padded to 8
  np.testing.assert_allclose(clip.encode_images(pixels), one.encode_images(pixels), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(clip.encode_texts(["a", "red"]), one.encode_texts(["a", "red"]),
                             rtol=1e-5, atol=1e-6)


def test_any_count_is_encoded_in_fixed_chunks_with_one_compile_per_tower(clip_dir):
  """1,000 texts (7 full chunks and a ragged one) and three odd image counts: one executable per
  tower, and the same embeddings as one unchunked call of transformers' own encoder on all of them."""
  clip = clip_lib.Clip.load(clip_dir, image_chunk=16, text_chunk=128)
  words = ["a", "red", "blue", "circle", "square", "zebra"]
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(words, int(rng.integers(1, 12)))) for _ in range(1_000)]
  emb = clip.encode_texts(texts)
  ids, mask = clip.tokenize(texts)
  text_fn = jax.jit(lambda p, i, m: clip.model.get_text_features(input_ids=i, attention_mask=m, params=p))
  np.testing.assert_allclose(emb, text_fn(clip.params, ids, mask), rtol=1e-4, atol=1e-5)  # one call
  assert emb.shape == (1_000, 32)
  pixels = rng.standard_normal((37, 3, 32, 32)).astype(np.float32)
  ref = np.asarray(clip.model.get_image_features(pixel_values=pixels, params=clip.params))
  for n in (1, 17, 37):
    np.testing.assert_allclose(clip.encode_images(pixels[:n]), ref[:n], rtol=1e-4, atol=1e-5)
  assert clip._texts._cache_size() == 1 and clip._images._cache_size() == 1
  assert clip.encode_texts([]).shape == (0, 32)


@pytest.mark.parametrize("tower", ["image", "text"])
def test_vit_l14_chunk_fits_in_4_gib(tower):
  """The real ViT-L/14 towers (random weights of the hub architecture, never allocated),
  compiled at the default chunk size: XLA's memory analysis of one call (its parameters,
  inputs, outputs and temporaries) stays under 4 GiB, whatever the number of inputs."""
  import jax.numpy as jnp
  from jax.sharding import Mesh
  model, params = clip_lib.abstract_clip(clip_lib.KNOWN_CLIPS["openai/clip-vit-large-patch14"])
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  if tower == "image":
    x = (jax.ShapeDtypeStruct((clip_lib.IMAGE_CHUNK, 3, 224, 224), jnp.float32),)
    compiled = clip_lib.image_encoder(model, mesh).lower(params, *x).compile()
  else:
    ids = jax.ShapeDtypeStruct((clip_lib.TEXT_CHUNK, model.config.text_config.max_position_embeddings),
                               jnp.int32)
    compiled = clip_lib.text_encoder(model, mesh).lower(params, ids, ids).compile()
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  print(f"ViT-L/14 {tower} tower, chunk {clip_lib.IMAGE_CHUNK if tower == 'image' else clip_lib.TEXT_CHUNK}: "
        f"arguments {m.argument_size_in_bytes / 2**30:.2f} GiB, temporaries {m.temp_size_in_bytes / 2**30:.2f} GiB")
  assert m.argument_size_in_bytes > (1.0 if tower == "image" else 0.4) * 2**30  # the real tower's weights
  assert peak < 4 * 2**30, peak / 2**30


def test_pytorch_weights_load_with_from_pt(tmp_path):
  torch = pytest.importorskip("torch")
  from transformers import CLIPModel
  d = clip_lib.save_small_clip(tmp_path / "pt", pytorch=True, seed=3)
  assert not os.path.exists(os.path.join(d, "flax_model.msgpack"))
  flax_clip = clip_lib.Clip.load(d)
  torch_model = CLIPModel.from_pretrained(d).eval()
  pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    ref = torch_model.get_image_features(pixel_values=torch.from_numpy(pixels)).numpy()
  np.testing.assert_allclose(flax_clip.encode_images(pixels), ref, rtol=1e-4, atol=1e-4)
  ids, mask = flax_clip.tokenize(["a red circle"])
  with torch.no_grad():
    ref_t = torch_model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                          attention_mask=torch.from_numpy(mask.astype(np.int64))).numpy()
  np.testing.assert_allclose(flax_clip.encode_texts(["a red circle"]), ref_t, rtol=1e-4, atol=1e-4)


def test_load_reads_the_saved_weights_and_refuses_missing_ones(tmp_path, clip_dir):
  """Loaded without transformers' random init (`_do_init=False`): the weights are the file's,
  exactly, and a file that lacks one gets a one-line error naming it instead of a random one."""
  from transformers import FlaxCLIPModel
  ref = FlaxCLIPModel.from_pretrained(clip_dir)
  loaded = clip_lib.Clip.load(clip_dir).params
  assert jax.tree.structure(loaded) == jax.tree.structure(ref.params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(ref.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  params = jax.device_get(ref.params)
  del params["text_projection"]
  shutil.copytree(clip_dir, tmp_path / "partial")
  ref.save_pretrained(tmp_path / "partial", params=params)
  with pytest.raises(clip_lib.ClipLoadError, match="lack 1 of the model's parameters, first text_projection/kernel"):
    clip_lib.Clip.load(str(tmp_path / "partial"))


def test_load_errors_are_one_line(tmp_path):
  with pytest.raises(clip_lib.ClipLoadError, match="no such directory"):
    clip_lib.Clip.load(str(tmp_path / "nope" / "clip"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(clip_lib.ClipLoadError, match="no Flax or PyTorch weights"):
    clip_lib.Clip.load(str(tmp_path / "empty"))
  with pytest.raises(clip_lib.ClipLoadError, match="cannot load CLIP 'openai/clip-vit-nonexistent'"):
    clip_lib.Clip.load("openai/clip-vit-nonexistent")


def test_frozen_param_count(clip_dir, clip):
  assert clip_lib.frozen_param_count(clip_dir) == clip.num_params


def test_small_clip_makes_each_word_one_token(tmp_path):
  # Words that share letter pairs ("right", "triangle", "purple", "plain") used to split each
  # other under BPE's merge ranks; the demo's CLIP then saw "triangle" as 7 pieces.
  from transformers import CLIPTokenizer
  from pdiff_jax.data import shapes
  words = shapes.vocabulary()
  d = clip_lib.save_small_clip(tmp_path / "c", words=words)
  tok = CLIPTokenizer.from_pretrained(d)
  assert [w for w in words if len(tok.tokenize(w)) != 1] == []
  ids = tok(" ".join(words))["input_ids"]
  assert len(ids) == len(words) + 2 and len(set(ids[1:-1])) == len(words)
  # Text outside the word list still tokenizes (falls back to smaller pieces), losslessly.
  assert tok.decode(tok("a greenish trapezoid")["input_ids"], skip_special_tokens=True) == "a greenish trapezoid"


def test_encode_images_async_equals_encode_images(clip_dir):
  from pdiff_jax import clip as clip_lib
  clip = clip_lib.Clip.load(str(clip_dir), image_chunk=4)
  size = clip.transform.crop_height
  pixels = np.random.default_rng(0).standard_normal((10, 3, size, size)).astype(np.float32)
  first = clip.encode_images_async(pixels[:7])  # two chunks, the last padded
  second = clip.encode_images_async(pixels[7:])  # queued before the first is read back
  got = np.concatenate([first(), second()])
  np.testing.assert_allclose(got, clip.encode_images(pixels), rtol=1e-5, atol=1e-6)
  assert got.shape == (10, clip.embed_dim) and got.dtype == np.float32


def _moved_numpy(pixels, dy, dx, shift):
  """The reference for `clip_lib.moved`: numpy's edge padding, then the window at the offset."""
  h, w = pixels.shape[2:]
  padded = np.pad(pixels, ((0, 0), (0, 0), (shift, shift), (shift, shift)), mode="edge")
  return padded[:, :, shift - dy:shift - dy + h, shift - dx:shift - dx + w]


def test_views_move_the_image_by_whole_pixels():
  import jax.numpy as jnp
  assert clip_lib.view_offsets(9, 2).tolist() == [[0, 0], [-2, 0], [2, 0], [0, -2], [0, 2],
                                                  [-2, -2], [-2, 2], [2, -2], [2, 2]]
  assert clip_lib.view_offsets(5, 1).tolist() == [[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]]
  assert clip_lib.view_offsets(1, 3).tolist() == [[0, 0]]
  pixels = np.random.default_rng(0).standard_normal((2, 3, 7, 6)).astype(np.float32)
  for dy, dx in clip_lib.view_offsets(9, 2):
    np.testing.assert_array_equal(clip_lib.moved(jnp.asarray(pixels), jnp.asarray([dy, dx]), 2),
                                  _moved_numpy(pixels, dy, dx, 2))
  # One pixel to the right: each column takes its left neighbour's, the first repeats itself.
  right = np.asarray(clip_lib.moved(jnp.asarray(pixels), jnp.asarray([0, 1]), 1))
  np.testing.assert_array_equal(right[..., 1:], pixels[..., :-1])
  np.testing.assert_array_equal(right[..., 0], pixels[..., 0])
  with pytest.raises(ValueError, match="views must be one of"):
    clip_lib.view_offsets(3, 1)
  with pytest.raises(ValueError, match="view_shift must be >= 1"):
    clip_lib.view_offsets(5, 0)


@pytest.mark.parametrize("views", [5, 9])
def test_views_give_the_mean_embedding_of_the_moved_images(clip, views):
  """5 images (a chunk padded to the 8 devices): the mean of transformers' own image features
  of each moved copy, made by numpy; texts are encoded as before."""
  pixels = np.random.default_rng(1).standard_normal((5, 3, 32, 32)).astype(np.float32)
  many = clip.with_views(views, 2)
  assert many.encoding == {"views": views, "view_shift": 2} and clip.encoding == {}
  assert clip.with_views(1) is clip
  assert all(a is b for a, b in zip(jax.tree.leaves(many.params), jax.tree.leaves(clip.params)))  # shared
  ref = np.mean([np.asarray(clip.model.get_image_features(
      pixel_values=_moved_numpy(pixels, dy, dx, 2), params=clip.params))
      for dy, dx in clip_lib.view_offsets(views, 2)], axis=0)
  got = many.encode_images(pixels)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  assert np.abs(got - clip.encode_images(pixels)).max() > 1e-4  # not the one view (10 x the tolerance)
  np.testing.assert_array_equal(many.encode_texts(["a red circle"]), clip.encode_texts(["a red circle"]))


def test_vit_l14_views_encode_one_at_a_time():
  """ViT-L/14 (abstract) at the default chunk with 9 views: the views run one after another
  (`lax.map`), so a call's temporaries stay those of one view, not 9 times them."""
  import jax.numpy as jnp
  from jax.sharding import Mesh
  model, params = clip_lib.abstract_clip(clip_lib.KNOWN_CLIPS["openai/clip-vit-large-patch14"])
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  x = jax.ShapeDtypeStruct((clip_lib.IMAGE_CHUNK, 3, 224, 224), jnp.float32)
  temp = {v: clip_lib.image_encoder(model, mesh, v, 3).lower(params, x).compile()
          .memory_analysis().temp_size_in_bytes for v in (1, 9)}
  print(f"ViT-L/14 image tower, chunk {clip_lib.IMAGE_CHUNK}: temporaries "
        f"{temp[1] / 2**30:.2f} GiB with 1 view, {temp[9] / 2**30:.2f} GiB with 9")
  assert temp[9] < 1.5 * temp[1], temp


def test_repeated_texts_encode_once_and_as_every_row(clip_dir):
  """Distinct texts are tokenized and encoded once; each row gets exactly the embedding that
  encoding it among all-distinct texts gives (the same fixed-size chunks)."""
  clip = clip_lib.Clip.load(clip_dir, text_chunk=8)
  distinct = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "zebra")]
  rng = np.random.default_rng(1)
  texts = [distinct[i] for i in rng.integers(0, len(distinct), 40)]
  ids, mask = clip.tokenize(texts)
  one_ids, one_mask = zip(*(clip.tokenize([t]) for t in texts))
  np.testing.assert_array_equal(ids, np.concatenate(one_ids))
  np.testing.assert_array_equal(mask, np.concatenate(one_mask))
  seen = []
  encode = clip._chunked
  clip._chunked = lambda fn, arrays, chunk: seen.append(len(arrays[0])) or encode(fn, arrays, chunk)
  emb = clip.encode_texts(texts)
  assert seen == [len(set(texts))]  # only the distinct texts reached the text tower
  clip._chunked = encode
  np.testing.assert_array_equal(emb, clip.encode_texts(distinct)[[distinct.index(t) for t in texts]])
  assert clip.tokenize([])[0].shape == (0, clip.max_text_len)
