"""CLIP-S and RefCLIP-S (Hessel et al., 2021) from precomputed CLIP embeddings.

CLIP-S = 2.5 * max(cos(image, "A photo depicts " + caption), 0); RefCLIP-S is the harmonic mean
of CLIP-S and the raw max_r cos(caption, reference_r) (no weight, no clipping on that side), the
references encoded with the same prefix: exactly what Hessel et al.'s clipscore.py computes
(`2 * per_instance_image_text * per_instance_text_text / (sum)`). Means over images.
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
  (R_i, E) embeddings of its references, also encoded with PREFIX (for RefCLIP-S). An image
  whose two terms sum to 0 scores 0 (the published code would give NaN)."""
  img, cap = _unit(image_emb), _unit(caption_emb)
  clip_s = W * np.clip(np.sum(img * cap, axis=-1), 0, None)
  out = {"CLIP-S": float(np.mean(clip_s)), "RefCLIP-S": None}
  if reference_embs is not None:
    ref_s = np.array([np.max(_unit(r) @ c) for r, c in zip(reference_embs, cap)])
    total = clip_s + ref_s
    safe = np.where(total == 0, 1.0, total)
    harmonic = np.where(total == 0, 0.0, 2 * clip_s * ref_s / safe)
    out["RefCLIP-S"] = float(np.mean(harmonic))
  return out
