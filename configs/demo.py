r"""The embedded demo's sizes, with the paper's recipe: Prefix-diffusion on the synthetic
captioned-shapes set with a small CLIP, one view of each image, no self-conditioning, the caption
chosen by CLIP's cosine.

  pdiff demo --config=configs/demo.py --workdir=demo_paper

`pdiff demo` fills in the data paths and the CLIP under its workdir; this file holds the sizes.
`pdiff demo` without --config runs configs/demo_plus.py: these sizes with the additions since
the paper, the config that meets the demo's quality targets (README).
A 3-layer, 128-wide denoiser (FFN 512, 16-d words, 12 tokens, k=5 prefix), no dropout, trained
for 3,000 steps of batch 128 at lr 2e-3 on the CPU (~10 steps/s). At 1,800 steps and lr 1e-3 its
loss was still falling and a third of its captions were not sentences of the data set's grammar
(chosen captions grammatical 64.6%, exactly right 24.8%); 4,000 steps gave 90.6% / 35.4%, and
lr 2e-3 93.4% / 37.0% (same features, test split, 10 candidates x 20 steps). With today's small
CLIP (2026-12-06, its features from one run of the demo; exactly right / grammatical / shape):
4,000 steps 64.0% / 94.8% / 86.2%, 3,000 steps 64.0% / 93.8% / 85.8%, 2,500 steps 61.0% / 91.8% /
85.4%, 3,000 at lr 3e-3 62.8% / 95.0% / 84.8%, 4,000 of batch 96 61.2% / 93.2% / 84.6%: the demo
trains 3,000, a quarter of its denoiser time (about 100 s here) for no loss beyond the noise
(one standard error of exactly right on 500 images: 2.1 points). The README has the whole
demo's figures.
"""

from pdiff_jax.config import base_config


def get_config():
  c = base_config()
  c.seed = 0
  c.data.source = "karpathy:demo_out/data/dataset_shapes.json"  # set by `pdiff demo`
  c.data.image_root = "demo_out/data/images"
  c.data.feature_dir = "demo_out/features"
  c.data.max_len = 12
  c.data.min_count = 1
  c.data.shard_size = 1024
  c.data.standardize_features = True
  c.clip.model = "demo_out/clip"
  c.clip.batch_size = 256
  c.model.vocab_size = 48  # the shapes vocabulary (training sets it from the feature store)
  c.model.feature_dim = 64
  c.model.prefix_len = 5
  c.model.mapper_hidden = 256
  c.model.hidden_size = 128
  c.model.num_layers = 3
  c.model.num_heads = 4
  c.model.mlp_dim = 512
  c.model.word_dim = 16
  c.model.max_position = 16
  c.model.time_embed_dim = 64
  c.model.time_hidden = 128
  # No dropout: on 40k captions it only slows learning, and on this CPU it costs 28% of a step.
  c.model.dropout = 0.0
  c.model.attention_dropout = 0.0
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.ema_decay = 0.995
  c.train.num_steps = 3000
  c.train.batch_size = 128
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.eval_every = 1000
  c.train.eval_batches = 4
  c.train.steps_per_dispatch = 4  # the same numbers as one at a time, 25% faster here (BENCHMARKS.md)
  c.sampler.num_candidates = 10
  c.sampler.steps = 20
  c.sampler.batch_size = 50
  return c
