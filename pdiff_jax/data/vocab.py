"""Word-level vocabulary: built from the train split, tokenise, encode to fixed length, decode.

As the original: lowercase words without punctuation (Karpathy `tokens` when the data has them),
words seen at least `min_count` times, captions truncated or right-padded with PAD, no BOS/EOS.
PAD is an ordinary token the model learns to generate; decoding drops it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

from pdiff_jax import storage

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
_PUNCT = re.compile(r"[^a-z0-9\s]")


def tokenize(caption: str) -> list[str]:
  """Lowercase, punctuation deleted, split on white space ("A man's dog." -> [a, mans, dog])."""
  return _PUNCT.sub("", caption.lower()).split()


class Vocab:
  def __init__(self, words: Sequence[str], min_count: int = 2):
    if list(words[:2]) != [PAD, UNK]:
      raise ValueError(f"a vocabulary starts with {PAD!r}, {UNK!r}")
    self.words = list(words)
    self.min_count = min_count
    self.index = {w: i for i, w in enumerate(self.words)}
    if len(self.index) != len(self.words):
      raise ValueError("duplicate words in vocabulary")

  def __len__(self) -> int:
    return len(self.words)

  def __eq__(self, other) -> bool:
    return isinstance(other, Vocab) and self.words == other.words

  @classmethod
  def build(cls, captions: Iterable[Sequence[str]], min_count: int = 2) -> "Vocab":
    """From tokenised train captions; most frequent first, ties alphabetical (deterministic)."""
    counts = collections.Counter(w for tokens in captions for w in tokens)
    kept = sorted((w for w, c in counts.items() if c >= min_count and w not in (PAD, UNK)),
                  key=lambda w: (-counts[w], w))
    return cls([PAD, UNK] + kept, min_count)

  def encode(self, tokens: Sequence[str], max_len: int) -> np.ndarray:
    ids = [self.index.get(w, UNK_ID) for w in tokens[:max_len]]
    return np.array(ids + [PAD_ID] * (max_len - len(ids)), dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return " ".join(self.words[int(i)] for i in ids if int(i) != PAD_ID)

  def to_json(self) -> str:
    return json.dumps({"words": self.words, "min_count": self.min_count}, indent=0)

  @property
  def hash(self) -> str:
    return hashlib.sha256("\n".join(self.words).encode()).hexdigest()[:16]

  def save(self, path: str | os.PathLike) -> None:
    storage.write_text(path, self.to_json())

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Vocab":
    try:
      d = storage.read_json(path)
      return cls(d["words"], d.get("min_count", 2))
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{path}: not a readable vocabulary ({e})") from None
