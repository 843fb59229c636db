"""Diversity of captions: corpus-level Dist-n and Vocab (as the original computes them) and,
across the n candidates of each image, Div-n and mBLEU-4 (standard in diverse captioning)."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_PUNCT = re.compile(r"[^a-z0-9\s]")


def words(caption: str) -> list[str]:
  return _PUNCT.sub("", caption.lower()).split()


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
  return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(captions: Sequence[str], n: int) -> float:
  """Distinct n-grams over all captions / total words over all captions (0 for no words)."""
  toks = [words(c) for c in captions]
  total = sum(len(t) for t in toks)
  distinct = {g for t in toks for g in _ngrams(t, n)}
  return len(distinct) / total if total else 0.0


def vocab_usage(captions: Sequence[str], vocab_size: int) -> float:
  """Distinct words used / vocabulary size."""
  return len({w for c in captions for w in words(c)}) / vocab_size


def div_n(candidate_sets: Sequence[Sequence[str]], n: int) -> float:
  """Per image: distinct n-grams in its candidate set / total words in the set; mean over images."""
  return float(np.mean([distinct_n(cands, n) for cands in candidate_sets]))


def mbleu4(candidate_sets: Sequence[Sequence[str]]) -> float | None:
  """BLEU-4 of each candidate against the other candidates of its image, averaged (lower = more
  diverse); None when no image has two or more candidates."""
  from pycocoevalcap.bleu.bleu import Bleu
  gts, res = {}, {}
  for i, cands in enumerate(candidate_sets):
    if len(cands) < 2:
      continue
    for j, c in enumerate(cands):
      key = f"{i}_{j}"
      res[key] = [" ".join(words(c))]
      gts[key] = [" ".join(words(o)) for k, o in enumerate(cands) if k != j]
  if not res:
    return None
  _, per_candidate = Bleu(4).compute_score(gts, res, verbose=0)
  return float(np.mean(per_candidate[3]))


def diversity_scores(chosen: Sequence[str], candidate_sets: Sequence[Sequence[str]],
                     vocab_size: int) -> dict:
  return {
      "Dist-1": distinct_n(chosen, 1), "Dist-2": distinct_n(chosen, 2), "Dist-3": distinct_n(chosen, 3),
      "Vocab": vocab_usage(chosen, vocab_size),
      "Div-1": div_n(candidate_sets, 1), "Div-2": div_n(candidate_sets, 2),
      "mBLEU-4": mbleu4(candidate_sets),
  }
