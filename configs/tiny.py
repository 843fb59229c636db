r"""A tiny model on in-memory synthetic features, for tests and smoke runs on a CPU.

  pdiff train --config=configs/tiny.py --workdir=/tmp/tiny --config.train.num_steps=50

Expect a few seconds of compilation, then ~50 steps/s on a 2-core CPU; the loss falls from ~9
to ~5 within 200 steps. Not a captioning model: the data are random features and word ids.
"""

from pdiff_jax.config import base_config


def get_config():
  c = base_config()
  c.seed = 0
  c.data.source = "synthetic"
  c.data.max_len = 8
  c.data.synthetic_num_images = 64
  c.model.vocab_size = 64
  c.model.feature_dim = 16
  c.model.prefix_len = 2
  c.model.mapper_hidden = 32
  c.model.hidden_size = 32
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.mlp_dim = 64
  c.model.word_dim = 8
  c.model.max_position = 16
  c.model.time_embed_dim = 16
  c.model.time_hidden = 32
  c.diffusion.num_steps = 100
  c.optim.lr = 1e-3
  c.optim.ema_decay = 0.99
  c.train.num_steps = 200
  c.train.batch_size = 16
  c.train.log_every = 10
  c.train.checkpoint_every = 25
  c.train.eval_every = 50
  c.train.eval_batches = 2
  c.clip.batch_size = 8  # `pdiff bench` times the (random-weight, offline) ViT-L/14 at this batch
  c.sampler.num_candidates = 4
  c.sampler.steps = 10
  return c
