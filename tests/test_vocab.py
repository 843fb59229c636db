import numpy as np
import pytest

from pdiff_jax.data.vocab import PAD, PAD_ID, UNK, UNK_ID, Vocab, tokenize


def test_tokenize_lowercases_and_strips_punctuation():
  assert tokenize("A man's dog, on a SKATE-board!") == ["a", "mans", "dog", "on", "a", "skateboard"]


def test_build_min_count_and_order():
  caps = [["a", "dog"], ["a", "cat"], ["a", "dog", "runs"], ["b", "b"]]
  v = Vocab.build(caps, min_count=2)
  assert v.words == [PAD, UNK, "a", "b", "dog"]  # count desc, then alphabetical; cat/runs < 2
  assert len(Vocab.build(caps, min_count=1)) == 7


def test_encode_truncate_pad_unk_and_decode_drops_pad():
  v = Vocab([PAD, UNK, "a", "dog"])
  np.testing.assert_array_equal(v.encode(["a", "cat", "dog"], 5), [2, UNK_ID, 3, PAD_ID, PAD_ID])
  np.testing.assert_array_equal(v.encode(["a"] * 9, 4), [2, 2, 2, 2])
  assert v.encode([], 3).dtype == np.int32
  assert v.decode([2, 0, 3, 0, 0]) == "a dog"
  assert PAD not in v.decode(v.encode(["a", "dog"], 24))


def test_save_load_round_trip(tmp_path):
  v = Vocab.build([["x", "y", "x"], ["y"]], min_count=1)
  v.save(tmp_path / "vocab.json")
  w = Vocab.load(tmp_path / "vocab.json")
  assert w == v and w.hash == v.hash
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(ValueError, match="bad.json"):
    Vocab.load(tmp_path / "bad.json")
