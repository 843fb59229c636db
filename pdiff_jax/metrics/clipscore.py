"""CLIP-S and RefCLIP-S (Hessel et al., 2021) from precomputed CLIP embeddings.

CLIP-S = 2.5 * max(cos(image, "A photo depicts " + caption), 0); RefCLIP-S is the harmonic mean
of CLIP-S and 2.5 * max(max_r cos(caption, reference_r), 0). Means over images.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PREFIX = "A photo depicts "
W = 2.5


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def clip_scores(image_emb: np.ndarray, caption_emb: np.ndarray,
                reference_embs: Sequence[np.ndarray] | None = None) -> dict:
  """`image_emb` (B, E), `caption_emb` (B, E) (captions encoded with PREFIX), and per image the
  (R_i, E) embeddings of its references (for RefCLIP-S)."""
  img, cap = _unit(image_emb), _unit(caption_emb)
  clip_s = W * np.clip(np.sum(img * cap, axis=-1), 0, None)
  out = {"CLIP-S": float(np.mean(clip_s)), "RefCLIP-S": None}
  if reference_embs is not None:
    ref_s = W * np.clip([np.max(_unit(r) @ c) for r, c in zip(reference_embs, cap)], 0, None)
    harmonic = np.where(clip_s + ref_s > 0, 2 * clip_s * ref_s / np.maximum(clip_s + ref_s, 1e-12), 0.0)
    out["RefCLIP-S"] = float(np.mean(harmonic))
  return out
