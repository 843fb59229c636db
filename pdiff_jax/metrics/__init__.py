"""Caption metrics: pycocoevalcap quality scores, CLIP-S / RefCLIP-S, diversity. No JAX training here."""
