"""The Prefix-diffusion network: CLIP-prefix mapper and bidirectional x0-denoiser (flax.linen).

Pure modules: nothing here reads files or knows about data sources. Tensor names carry
their shapes as suffixes: B batch, L caption length, P prefix length, T = L + P,
D hidden size, W word-embedding size, F CLIP feature size, V vocabulary, H heads, K head size.

Initialisation follows the original PyTorch code, not BERT or Flax defaults (SPEC.md):
embedding tables N(0, 1); every Linear weight and bias U(+-1/sqrt(fan_in)); LayerNorm
eps 1e-12; exact (erf) GELU (the tanh approximation and a fused q/k/v projection are options,
off by default).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any

LN_EPS = 1e-12


def torch_linear_init(fan_in: int):
  """PyTorch's nn.Linear default for weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def normal_init(key, shape, dtype=jnp.float32):
  """PyTorch's nn.Embedding default: N(0, 1)."""
  return jax.random.normal(key, shape, dtype)


# The vocabulary axis of the word table and the head bias is padded to a multiple of this, so
# that it splits evenly on a model axis (any power of two up to 128). The padding rows start at
# zero, are masked out of every use (logits -inf, never the nearest embedding), so they get no
# gradient and stay zero; they are not counted as parameters.
VOCAB_MULTIPLE = 128


def padded_vocab(vocab_size: int) -> int:
  return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def zero_padded(init, rows: int):
  """`init` for the first `rows` entries of the leading axis (the same numbers as an unpadded
  table of `rows` rows), zeros after them."""

  def padded(key, shape, dtype=jnp.float32):
    real = init(key, (rows,) + tuple(shape[1:]), dtype)
    return jnp.concatenate([real, jnp.zeros((shape[0] - rows,) + tuple(shape[1:]), dtype)])

  return padded


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes of the network; `configs/paper_coco.py` holds the original's values."""
  vocab_size: int = 14145
  feature_dim: int = 768
  prefix_len: int = 5
  mapper_hidden: int = 1536
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  word_dim: int = 48
  max_len: int = 24
  max_position: int = 512
  time_embed_dim: int = 128
  time_hidden: int = 512
  dropout: float = 0.1
  attention_dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # The encoder layers as one `nn.scan` (parameters stacked on a leading "layers" axis): compile
  # time stays flat in depth. `remat` recomputes each layer's activations in the backward pass.
  scan_layers: bool = False
  remat: bool = False
  # Speed options, off by default (the original's layout and numbers): q, k and v as one
  # (D, 3, H, K) projection ("qkv", one GEMM instead of three; `fuse_qkv` converts a tree of the
  # other layout), and GELU by its tanh approximation instead of the exact erf.
  fused_qkv: bool = False
  gelu: str = "erf"
  # Additions since the paper, off by default (no parameters, the original's numbers):
  # `cond_drop` > 0 gives a learned null prefix that training puts in place of the image's with
  # that probability (classifier-free guidance); `self_cond` > 0 a projection of the previous x0
  # estimate added to the text path (self-conditioning, used with that probability in training);
  # `length_head` an MLP from the CLIP embedding to the caption's length (0..max_len words).
  cond_drop: float = 0.0
  self_cond: float = 0.0
  length_head: bool = False


class Dense(nn.Module):
  """A Linear layer with PyTorch's init and logical axis names on its kernel and bias."""
  features: int | tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  contract: int = 1  # number of trailing input axes contracted
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[-self.contract:]
    fan_in = math.prod(in_shape)
    init = torch_linear_init(fan_in)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                        in_shape + features, self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(init, self.kernel_axes[self.contract:]),
                      features, self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    lhs = tuple(range(x.ndim - self.contract, x.ndim))
    y = jax.lax.dot_general(x, kernel, ((lhs, tuple(range(self.contract))), ((), ())))
    return y + bias


def layer_norm(name: str, cfg: ModelConfig) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPS, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def embed_table(module: nn.Module, name: str, rows: int, cols: int, axes, cfg: ModelConfig,
                padded_rows: int | None = None):
  init = normal_init if padded_rows is None else zero_padded(normal_init, rows)
  return module.param(name, nn.with_logical_partitioning(init, axes), (padded_rows or rows, cols),
                      cfg.param_dtype)


def timestep_embedding(t_B: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [cos, sin] of (possibly fractional) timesteps, as in improved-diffusion."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t_B.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


QKV = ("query", "key", "value")


def fuse_qkv(tree, fused: bool):
  """`tree` (parameters, or any tree shaped like them: EMA, AdamW's moments) in the q/k/v layout
  `fused` asks for: each attention's "query", "key", "value" Dense stacked into one "qkv" on the
  axis before the heads (kernel (D, 3, H, K), bias (3, H, K); a leading scanned-layers axis stays
  first), or split back. The same numbers either way; a tree already in that layout is returned
  as it is."""

  def convert(node):
    if fused and all(k in node for k in QKV):
      rest = {k: v for k, v in node.items() if k not in QKV}
      return {**rest, "qkv": {p: jnp.stack([node[k][p] for k in QKV], axis=-3)
                              for p in ("kernel", "bias")}}
    if not fused and "qkv" in node:
      rest = {k: v for k, v in node.items() if k != "qkv"}
      return {**rest, **{k: {p: jnp.take(node["qkv"][p], i, axis=-3) for p in ("kernel", "bias")}
                         for i, k in enumerate(QKV)}}
    return node

  is_attention = lambda x: isinstance(x, Mapping) and ("qkv" in x or all(k in x for k in QKV))
  return jax.tree.map(lambda x: convert(x) if is_attention(x) else x, tree, is_leaf=is_attention)


class SelfAttention(nn.Module):
  """BERT self-attention, no mask (every caption and prefix position sees every other)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, deterministic: bool):
    cfg = self.cfg
    head_dim = cfg.hidden_size // cfg.num_heads
    if cfg.fused_qkv:
      qkv_BT3HK = Dense((3, cfg.num_heads, head_dim), ("embed", None, "heads", "kv"),
                        dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="qkv")(x_BTD)
      q_BTHK, k_BTHK, v_BTHK = (qkv_BT3HK[:, :, i] for i in range(3))
    else:
      proj = lambda name: Dense((cfg.num_heads, head_dim), ("embed", "heads", "kv"),
                                dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
      q_BTHK, k_BTHK, v_BTHK = (proj(name)(x_BTD) for name in QKV)
    logits_BHTT = jnp.einsum("bqhk,bthk->bhqt", q_BTHK, k_BTHK) / math.sqrt(head_dim)
    # Softmax in fp32 whatever the compute dtype.
    probs_BHTT = jax.nn.softmax(logits_BHTT.astype(jnp.float32), axis=-1).astype(cfg.dtype)
    probs_BHTT = nn.Dropout(cfg.attention_dropout)(probs_BHTT, deterministic=deterministic)
    out_BTHK = jnp.einsum("bhqt,bthk->bqhk", probs_BHTT, v_BTHK)
    return Dense(cfg.hidden_size, ("heads", "kv", "embed"), contract=2, dtype=cfg.dtype,
                 param_dtype=cfg.param_dtype, name="out")(out_BTHK)


class EncoderLayer(nn.Module):
  """Post-LN BERT block: x = LN(x + attn(x)); x = LN(x + ffn(x)). As the body of `nn.scan`
  (`scanned`), it returns (x, None): the carry and no per-layer output."""
  cfg: ModelConfig
  scanned: bool = False

  @nn.compact
  def __call__(self, x_BTD, deterministic: bool):
    cfg = self.cfg
    drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
    h_BTD = SelfAttention(cfg, name="attention")(x_BTD, deterministic)
    x_BTD = layer_norm("attention_ln", cfg)(x_BTD + drop(h_BTD))
    h_BTF = Dense(cfg.mlp_dim, ("embed", "mlp"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  name="intermediate")(x_BTD)
    h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "length", "mlp"))
    h_BTF = jax.nn.gelu(h_BTF, approximate=cfg.gelu == "tanh")
    h_BTD = Dense(cfg.hidden_size, ("mlp", "embed"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  name="output")(h_BTF)
    x_BTD = layer_norm("output_ln", cfg)(x_BTD + drop(h_BTD))
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))
    return (x_BTD, None) if self.scanned else x_BTD


def encoder_stack(cfg: ModelConfig):
  """The encoder layers: a list of `EncoderLayer` ("layer_0" ...), or with `cfg.scan_layers` one
  scanned "layers" module whose parameters carry a leading (num_layers,) "layers" axis. Either way
  `apply_stack(stack, x, deterministic)` runs them all; `remat` wraps each layer in `nn.remat`."""
  layer = nn.remat(EncoderLayer, static_argnums=(2,)) if cfg.remat else EncoderLayer
  if not cfg.scan_layers:
    return [layer(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
  scanned = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                    in_axes=nn.broadcast, length=cfg.num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(cfg, scanned=True, name="layers")


def apply_stack(stack, x_BTD: jax.Array, deterministic: bool) -> jax.Array:
  if isinstance(stack, (list, tuple)):
    for layer in stack:
      x_BTD = layer(x_BTD, deterministic)
    return x_BTD
  return stack(x_BTD, deterministic)[0]


class Mapper(nn.Module):
  """CLIP embedding -> k prefix vectors: Linear, ReLU, Dropout, Linear, reshape."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, clip_BF, deterministic: bool):
    cfg = self.cfg
    h = Dense(cfg.mapper_hidden, ("feature", "mlp"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
              name="fc1")(clip_BF)
    h = nn.Dropout(cfg.dropout)(jax.nn.relu(h), deterministic=deterministic)
    h = Dense(cfg.prefix_len * cfg.hidden_size, ("mlp", "prefix_embed"), dtype=cfg.dtype,
              param_dtype=cfg.param_dtype, name="fc2")(h)
    return h.reshape(h.shape[0], cfg.prefix_len, cfg.hidden_size)


class PrefixDenoiser(nn.Module):
  """Predicts clean word embeddings x0 from noisy ones x_t, the timestep and the CLIP embedding.

  `__call__(x_BLW, t_B, clip_BF)` -> x0_hat_BLW; `embed(ids_BL)` and `logits(x_BLW)` share the word
  embedding table (the output head is tied to it and has its own bias). The table has
  `padded_vocab(vocab_size)` rows; `logits` gives the padding rows -inf.
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    dense = lambda n, axes, name: Dense(n, axes, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                        name=name)
    rows = padded_vocab(cfg.vocab_size)
    self.word_embedding = embed_table(self, "word_embedding", cfg.vocab_size, cfg.word_dim,
                                      ("vocab", "word"), cfg, padded_rows=rows)
    self.head_bias = self.param("head_bias", nn.with_logical_partitioning(
        zero_padded(torch_linear_init(cfg.word_dim), cfg.vocab_size), ("vocab",)), (rows,),
        cfg.param_dtype)
    self.mapper = Mapper(cfg)
    self.time_fc1 = dense(cfg.time_hidden, ("time", "time_hidden"), "time_fc1")
    self.time_fc2 = dense(cfg.hidden_size, ("time_hidden", "embed"), "time_fc2")
    self.up_fc1 = dense(cfg.hidden_size, ("word", "embed"), "up_fc1")
    self.up_fc2 = dense(cfg.hidden_size, ("embed", "embed_out"), "up_fc2")
    self.position_embedding = embed_table(self, "position_embedding", cfg.max_position,
                                          cfg.hidden_size, ("position", "embed"), cfg)
    self.prefix_position_embedding = embed_table(self, "prefix_position_embedding", cfg.prefix_len,
                                                 cfg.hidden_size, ("position", "embed"), cfg)
    self.token_type_embedding = embed_table(self, "token_type_embedding", 2, cfg.hidden_size,
                                            ("position", "embed"), cfg)
    self.text_ln = layer_norm("text_ln", cfg)
    self.prefix_ln = layer_norm("prefix_ln", cfg)
    self.layers = encoder_stack(cfg)
    self.down_fc1 = dense(cfg.hidden_size, ("embed", "embed_out"), "down_fc1")
    self.down_fc2 = dense(cfg.word_dim, ("embed", "word"), "down_fc2")
    self.dropout = nn.Dropout(cfg.dropout)
    if cfg.cond_drop > 0:
      # The null condition is a learned (P, D) prefix, not the prefix of a zeroed feature: a zero
      # feature is a real point of the feature space (the mean image, with standardised
      # features), and its prefix would be tied to the mapper's biases.
      self.null_prefix = embed_table(self, "null_prefix", cfg.prefix_len, cfg.hidden_size,
                                     ("position", "embed"), cfg)
    if cfg.self_cond > 0:
      self.self_cond_proj = dense(cfg.hidden_size, ("word", "embed"), "self_cond_proj")
    if cfg.length_head:
      self.length_fc1 = dense(cfg.hidden_size, ("feature", "mlp"), "length_fc1")
      self.length_fc2 = dense(cfg.max_len + 1, ("mlp", None), "length_fc2")

  def length_logits(self, clip_BF: jax.Array) -> jax.Array:
    """(B, max_len + 1) fp32 logits of the caption's length in words (the length head)."""
    h = jax.nn.relu(self.length_fc1(clip_BF.astype(self.cfg.dtype)))
    return self.length_fc2(h).astype(jnp.float32)

  def embed(self, ids_BL: jax.Array) -> jax.Array:
    """Token ids -> word embeddings E[w] (the mean of x0), in fp32."""
    return jnp.take(self.word_embedding, ids_BL, axis=0).astype(jnp.float32)

  def logits(self, x_BLW: jax.Array) -> jax.Array:
    """Tied output head: x @ E^T + b, in fp32, over the padded vocabulary (padding: -inf)."""
    logits_BLV = jnp.einsum("blw,vw->blv", x_BLW.astype(jnp.float32),
                            self.word_embedding.astype(jnp.float32))
    # The padding rows' -inf is added with the bias (one (V,) vector, fused into the add) rather
    # than selected over the (B, L, V) logits: the same numbers, without a select whose
    # backward pass rewrites the whole logits tensor (~10% of a 2-layer paper-size step on CPU).
    bias_V = self.head_bias.astype(jnp.float32) + jnp.where(vocab_mask(self.cfg), 0.0, -jnp.inf)
    return nn.with_logical_constraint(logits_BLV + bias_V, ("batch", "length", "vocab"))

  def __call__(self, x_BLW: jax.Array, t_B: jax.Array, clip_BF: jax.Array,
               deterministic: bool = True, cond_B: jax.Array | None = None,
               x0_self_BLW: jax.Array | None = None) -> jax.Array:
    """`cond_B` (bool, default all True): False puts the null prefix in place of the image's
    (a model with `cond_drop`); `x0_self_BLW`: the self-conditioning input (a model with
    `self_cond`; default zeros, "no estimate")."""
    cfg = self.cfg
    if cond_B is not None and cfg.cond_drop <= 0:
      raise ValueError("cond_B needs a model trained with cond_drop > 0 (it has no null prefix)")
    if cfg.length_head and self.is_initializing():
      self.length_logits(clip_BF)  # creates the head's parameters
    drop = lambda y: self.dropout(y, deterministic=deterministic)
    length = x_BLW.shape[1]
    cast = lambda a: a.astype(cfg.dtype)

    # Prefix path: no timestep embedding.
    prefix_BPD = self.mapper(clip_BF, deterministic)
    if cond_B is not None:
      prefix_BPD = jnp.where(cond_B[:, None, None], prefix_BPD, cast(self.null_prefix)[None])
    prefix_BPD = prefix_BPD + cast(self.token_type_embedding[0]) + cast(self.prefix_position_embedding)
    prefix_BPD = drop(self.prefix_ln(prefix_BPD))

    # Text path: up-projected noisy embeddings + position + timestep + token type.
    time_BD = self.time_fc2(jax.nn.silu(self.time_fc1(timestep_embedding(t_B, cfg.time_embed_dim))))
    text_BLD = self.up_fc2(drop(jnp.tanh(self.up_fc1(x_BLW))))
    if cfg.self_cond > 0:
      x0_self_BLW = jnp.zeros_like(x_BLW) if x0_self_BLW is None else x0_self_BLW
      text_BLD = text_BLD + self.self_cond_proj(x0_self_BLW)
    text_BLD = (text_BLD + cast(self.position_embedding[:length])[None] + time_BD[:, None]
                + cast(self.token_type_embedding[1]))
    text_BLD = drop(self.text_ln(text_BLD))

    h_BTD = jnp.concatenate([text_BLD, prefix_BPD], axis=1)
    h_BTD = nn.with_logical_constraint(h_BTD, ("batch", "length", "embed"))
    h_BTD = apply_stack(self.layers, h_BTD, deterministic)
    h_BLD = h_BTD[:, :length]
    x0_BLW = self.down_fc2(drop(jnp.tanh(self.down_fc1(h_BLD))))
    return x0_BLW.astype(jnp.float32)


def vocab_mask(cfg: ModelConfig) -> jax.Array:
  """(padded V,) True for the real words, False for the padding rows."""
  return jnp.arange(padded_vocab(cfg.vocab_size)) < cfg.vocab_size


def dense_params_in(params, dtype: Dtype):
  """`params` with every Dense kernel and bias already in `dtype`, the compute dtype its Dense
  casts them to on each call: the same numbers, cast once. The sampler does this before its
  step loop, which XLA does not hoist the casts out of (with bf16 compute on an H100 they were
  ~9% of the sampler's time). LayerNorm parameters and the embedding tables stay as they are.
  Every module with a `kernel` here is a `Dense` built with `cfg.dtype`; a module computing in
  another dtype would need its own rule."""

  def cast(tree):
    if not isinstance(tree, Mapping):
      return tree
    if "kernel" in tree:  # a Dense: its kernel and bias (a LayerNorm has a bias, no kernel)
      return {k: v.astype(dtype) if k in ("kernel", "bias") else v for k, v in tree.items()}
    return {k: cast(v) for k, v in tree.items()}

  return cast(params)


def count_params(params, cfg: ModelConfig | None = None) -> int:
  """Number of parameters; with `cfg`, the vocabulary padding rows of the word table and the
  head bias (which never change) are not counted, so the figure is the original's."""
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  if cfg is not None:
    total -= (padded_vocab(cfg.vocab_size) - cfg.vocab_size) * (cfg.word_dim + 1)
  return total


def forward_flops(cfg: ModelConfig, *, with_mapper: bool = True, with_head: bool = True) -> int:
  """Matmul FLOPs (2 per multiply-add) of one example's forward pass, counted from the config.

  Mapper (once per image), timestep MLP, up/down projections, per layer QKV/output projections
  (8 T D^2), attention scores and mixing (4 T^2 D) and FFN (4 T D F), and the tied V-way head
  over L positions (rounding in training, nearest-embedding clamping in sampling). Element-wise
  work (LayerNorm, softmax, GELU) is left out, as is customary for MFU.
  """
  L, P, D, W = cfg.max_len, cfg.prefix_len, cfg.hidden_size, cfg.word_dim
  T = L + P
  flops = 2 * (cfg.time_embed_dim * cfg.time_hidden + cfg.time_hidden * D)
  flops += 2 * L * (W * D + D * D) * 2  # up and down projections
  flops += cfg.num_layers * (8 * T * D * D + 4 * T * T * D + 4 * T * D * cfg.mlp_dim)
  if cfg.self_cond > 0:
    flops += 2 * L * W * D  # the projection of the x0 estimate
  if with_mapper:
    flops += 2 * (cfg.feature_dim * cfg.mapper_hidden + cfg.mapper_hidden * P * D)
    if cfg.length_head:
      flops += 2 * (cfg.feature_dim * D + D * (L + 1))
  if with_head:
    flops += 2 * L * W * cfg.vocab_size
  return flops


def train_flops_per_example(cfg: ModelConfig) -> int:
  """Forward + backward (twice the forward) of one training example; with `self_cond`, plus
  the forward pass without gradient that makes the estimate (every example runs it)."""
  extra = forward_flops(cfg, with_head=False) if cfg.self_cond > 0 else 0
  return 3 * forward_flops(cfg) + extra


def denoise_step_flops(cfg: ModelConfig, guided: bool = False) -> int:
  """One candidate, one sampling step: the denoiser plus nearest-embedding search; the mapper
  runs once per image, not per step. `guided` (classifier-free guidance): the network twice (the
  conditional and unconditional halves of one batch), the search once."""
  network = forward_flops(cfg, with_mapper=False, with_head=False)
  return (2 if guided else 1) * network + 2 * cfg.max_len * cfg.word_dim * cfg.vocab_size
