"""pdiff_jax: Prefix-diffusion (diverse image captioning with a lightweight diffusion model) in JAX.

The pure pieces researchers compose: the network (`PrefixDenoiser`, `ModelConfig`), the
diffusion (`make_schedule`, `q_sample`, `training_losses`) and the training step
(`train.train_step`, `train.create_state`). Commands live in `pdiff_jax.cli` (`pdiff ...`).
"""

from pdiff_jax.diffusion import Schedule, make_schedule, q_sample, training_losses
from pdiff_jax.model import ModelConfig, PrefixDenoiser

__all__ = ["ModelConfig", "PrefixDenoiser", "Schedule", "make_schedule", "q_sample",
           "training_losses"]
__version__ = "0.1.0"
