"""pdiff_jax: Prefix-diffusion (diverse image captioning with a lightweight diffusion model) in JAX.

`Captioner.from_workdir(DIR).caption(images)` captions images with a trained model. The pure
pieces researchers compose: the network (`PrefixDenoiser`, `ModelConfig`), the diffusion
(`make_schedule`, `q_sample`, `training_losses`), the sampler (`sample_tokens`,
`sample_chain`, `make_sampling_schedule`, the solvers `ddim`, `dpm_solver_2m`: each a
`Solver`, and the denoiser wrappers `model_denoiser`, `classifier_free`, `length_mask`) and the
training step (`train.train_step`, `train.create_state`).
Commands live in `pdiff_jax.cli` (`pdiff ...`).
"""

from pdiff_jax.diffusion import Schedule, make_schedule, q_sample, training_losses
from pdiff_jax.inference import Captioner, load_bundle
from pdiff_jax.model import ModelConfig, PrefixDenoiser
from pdiff_jax.sampler import (Solver, classifier_free, ddim, dpm_solver_2m, length_mask,
                               make_sampling_schedule, model_denoiser, sample_chain, sample_tokens)

__all__ = ["Captioner", "ModelConfig", "PrefixDenoiser", "Schedule", "Solver", "classifier_free",
           "ddim", "dpm_solver_2m", "length_mask", "load_bundle", "make_sampling_schedule",
           "make_schedule", "model_denoiser", "q_sample", "sample_chain", "sample_tokens",
           "training_losses"]
__version__ = "0.1.0"
