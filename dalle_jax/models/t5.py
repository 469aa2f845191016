"""T5 text encoder (original T5, T5 v1.1, UMT5): the frozen language model of Imagen / DeepFloyd IF.

Layout follows the T5 papers and Hugging Face's `T5EncoderModel` /
`UMT5EncoderModel`, so their checkpoints import one-to-one
(dalle_jax/convert/hf_t5.py):

  ids (B, T) -> token_embed (no scaling, no positions)
    -> L x [ x + Attn(RMSNorm(x), position bias, key mask);  x + FF(RMSNorm(x)) ]
    -> final RMSNorm                                               (B, T, D) f32

  * attention: no 1/sqrt(K) scaling of the logits (T5 folds it into the
    initialisation) plus a learned relative position bias (H per bucket): one
    table shared by every layer (T5, computed once here) or one per layer (UMT5,
    `per_layer_position_bias`).
  * buckets: |key - query| below num_buckets/4 exact per side, then log-spaced up
    to `max_distance`, separately for keys after and before the query.
  * feed-forward: relu(x wi) wo (T5) or act(x wi) * (x wi_gate) wo (v1.1 / UMT5
    "gated-gelu" with tanh GELU): layers.Mlp without biases.
  * RMSNorm: x / sqrt(mean(x^2) + eps) * scale in f32 — no mean, no bias.
  * no dropout: the encoder is frozen (Imagen and IF never fine-tune it).

Attention is our own few lines over `layers.mixed_einsum`, not
`layers.dot_product_attention`: that one scales the logits and takes boolean
masks only, while T5 adds a (H, T, S) bias; text lengths here (77-512) keep the
(B, H, T, S) logits small.

Shapes: B batch, T query length, S key length (= T), D model width, H heads,
K head dim (d_kv, not D/H in general), F feed-forward width, N buckets.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dalle_jax.configs import common
from dalle_jax.models import layers

Dtype = Any

# Published encoder dimensions (Hugging Face config names). The XXL v1.1 encoder
# is Imagen's and DeepFloyd IF's text encoder (4.76B parameters).
PRESETS = {
    "t5_small": dict(d_model=512, d_kv=64, num_heads=8, d_ff=2048, num_layers=6,
                     feed_forward_proj="relu"),
    "t5_base": dict(d_model=768, d_kv=64, num_heads=12, d_ff=3072, num_layers=12,
                    feed_forward_proj="relu"),
    "t5_large": dict(d_model=1024, d_kv=64, num_heads=16, d_ff=4096, num_layers=24,
                     feed_forward_proj="relu"),
    "t5_v1_1_base": dict(d_model=768, d_kv=64, num_heads=12, d_ff=2048, num_layers=12,
                         feed_forward_proj="gated-gelu"),
    "t5_v1_1_xl": dict(d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24,
                       feed_forward_proj="gated-gelu"),
    "t5_v1_1_xxl": dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                        feed_forward_proj="gated-gelu"),
    "umt5_xxl": dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                     feed_forward_proj="gated-gelu", vocab_size=256384, per_layer_position_bias=True),
}

# Hugging Face `dense_act_fn` -> layers.ACTIVATIONS ("gated-gelu" means gelu_new).
HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "silu": "swish", "swish": "swish"}


def parse_feed_forward_proj(spec):
  """HF `feed_forward_proj` ("relu", "gated-gelu", "gated-silu", ...) -> (activation, gated)."""
  parts = str(spec).split("-")
  gated = len(parts) == 2 and parts[0] == "gated"
  if len(parts) > 2 or (len(parts) == 2 and not gated):
    raise ValueError(f"feed_forward_proj={spec!r}: expected 'ACT' or 'gated-ACT'")
  act = "gelu_new" if spec == "gated-gelu" else parts[-1]
  if act not in HF_ACTIVATIONS:
    raise ValueError(f"feed_forward_proj={spec!r}: unsupported activation {act!r} "
                     f"(supported: {', '.join(sorted(HF_ACTIVATIONS))})")
  return HF_ACTIVATIONS[act], gated


def model_config(vocab_size=32128, d_model=512, d_kv=64, num_heads=8, d_ff=2048, num_layers=6,
                 feed_forward_proj="relu", relative_attention_num_buckets=32,
                 relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                 per_layer_position_bias=False):
  """`config.model` of a T5 encoder (HF names, plus our activation / gated keys)."""
  activation, gated = parse_feed_forward_proj(feed_forward_proj)
  return ml_collections.ConfigDict(dict(
      vocab_size=int(vocab_size), d_model=int(d_model), d_kv=int(d_kv), num_heads=int(num_heads),
      d_ff=int(d_ff), num_layers=int(num_layers), feed_forward_proj=str(feed_forward_proj),
      activation=activation, gated=gated,
      relative_attention_num_buckets=int(relative_attention_num_buckets),
      relative_attention_max_distance=int(relative_attention_max_distance),
      layer_norm_epsilon=float(layer_norm_epsilon),
      per_layer_position_bias=bool(per_layer_position_bias)))


def get_config(preset="t5_v1_1_xxl", **overrides):
  """A full config (family "t5": inference only, no task) for a preset's dimensions."""
  if preset not in PRESETS:
    raise ValueError(f"unknown T5 preset {preset!r}; choose {' | '.join(PRESETS)}")
  c = ml_collections.ConfigDict()
  c.family = "t5"
  c.model = model_config(**{**PRESETS[preset], **overrides})
  c.dtype = "float32"  # imported encoders run in f32 (parity with the reference)
  c.param_dtype = "float32"
  c.remat = "none"
  c.scan_layers = False
  c.logical_axis_rules = common.DEFAULT_RULES
  c.allow_replication_below = 1 << 20
  # IF pads prompts to 77 T5 tokens; `tools.embed --max_len` overrides.
  c.text = common.text_config(max_len=77, tokenizer="t5", path="",
                              vocab_size=c.model.vocab_size)
  c.text.lowercase = False  # T5's SentencePiece normalises itself
  return c


def relative_position_buckets(t, s, num_buckets=32, max_distance=128, bidirectional=True):
  """(T, S) int32 bucket of key j relative to query i (Mesh TensorFlow's T5 scheme).

  Computed on the host in float32 like the reference (log-spaced buckets are
  truncated toward zero), so bucket edges fall exactly where theirs do.
  """
  rel = np.arange(s, dtype=np.int64)[None, :] - np.arange(t, dtype=np.int64)[:, None]
  buckets = np.zeros_like(rel)
  n = num_buckets
  if bidirectional:
    n //= 2
    buckets += (rel > 0) * n
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = n // 2
  with np.errstate(divide="ignore"):
    scaled = (np.log(rel.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(n - max_exact))
  large = max_exact + np.where(rel < max_exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, n - 1)
  buckets += np.where(rel < max_exact, rel, large)
  return buckets.astype(np.int32)


class RMSNorm(nn.Module):
  """T5LayerNorm: x / sqrt(mean(x^2) + eps) * scale, computed and returned in f32."""
  epsilon: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = layers.param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",),
                                   self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return x * scale.astype(jnp.float32)


class PositionBias(nn.Module):
  """Learned relative position bias: (T, S) buckets -> (1, H, T, S) f32."""
  num_heads: int
  num_buckets: int
  param_dtype: Dtype = jnp.float32
  init_std: float = 1.0  # T5 uses d_model ** -0.5

  @nn.compact
  def __call__(self, buckets_ts):
    table = layers.param_with_axes(self, "table", nn.initializers.normal(self.init_std),
                                   (self.num_buckets, self.num_heads), ("relpos_buckets", "heads"),
                                   self.param_dtype)
    bias_tsh = jnp.take(table.astype(jnp.float32), buckets_ts, axis=0)
    return jnp.transpose(bias_tsh, (2, 0, 1))[None]


class T5Attention(nn.Module):
  """Unscaled multi-head self-attention plus an additive (1, H, T, S) bias."""
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd, bias_1hts, key_valid_bs):
    d = x_btd.shape[-1]
    hk = (self.num_heads, self.head_dim)
    std = (d * self.head_dim) ** -0.5  # HF's query init folds in the missing 1/sqrt(K)
    proj = lambda name, init_std: layers.DenseGeneral(
        hk, ("embed", "heads", "kv"), dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.normal(init_std), name=name)
    qkv_names = ("batch", "length", "heads", "kv")
    q_bthk = layers.constrain(proj("query", std)(x_btd), qkv_names)
    k_bshk = layers.constrain(proj("key", d ** -0.5)(x_btd), qkv_names)
    v_bshk = layers.constrain(proj("value", d ** -0.5)(x_btd), qkv_names)
    logits_bhts = layers.mixed_einsum("bthk,bshk->bhts", q_bthk, k_bshk, self.dtype, jnp.float32)
    logits_bhts = logits_bhts + bias_1hts
    logits_bhts = jnp.where(key_valid_bs[:, None, None, :], logits_bhts, layers.NEG_INF)
    probs_bhts = jax.nn.softmax(logits_bhts, axis=-1)
    out_bthk = layers.mixed_einsum("bhts,bshk->bthk", probs_bhts, v_bshk, self.dtype)
    out_btd = layers.DenseGeneral(
        d, ("heads", "kv", "embed"), axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.normal((self.num_heads * self.head_dim) ** -0.5),
        name="out")(out_bthk)
    return layers.constrain(out_btd, ("batch", "length", "embed"))


class T5Block(nn.Module):
  """x + Attn(RMSNorm(x)); x + FF(RMSNorm(x)). Scan-friendly: (x, ...) -> (x, None).

  `bias_1hts` is the shared position bias, or None when the block owns its table
  (UMT5) and computes it from `buckets_ts`.
  """
  num_heads: int
  head_dim: int
  d_ff: int
  activation: str = "relu"
  gated: bool = False
  num_buckets: int = 32
  per_layer_position_bias: bool = False
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd, bias_1hts, buckets_ts, key_valid_bs, layer_arg=None):
    del layer_arg
    if self.per_layer_position_bias:
      bias_1hts = PositionBias(self.num_heads, self.num_buckets, self.param_dtype,
                               x_btd.shape[-1] ** -0.5, name="position_bias")(buckets_ts)
    norm = lambda name: RMSNorm(self.epsilon, self.param_dtype, name=name)
    h = norm("ln_attn")(x_btd).astype(self.dtype)
    x_btd = x_btd + T5Attention(self.num_heads, self.head_dim, self.dtype, self.param_dtype,
                                name="attn")(h, bias_1hts, key_valid_bs)
    h = norm("ln_mlp")(x_btd).astype(self.dtype)
    x_btd = x_btd + layers.Mlp(self.d_ff, activation=self.activation, glu=self.gated,
                               use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                               name="mlp")(h)
    return layers.constrain(x_btd, ("batch", "length", "embed")), None


class T5Encoder(nn.Module):
  """(ids (B, T), mask (B, T) or None) -> last hidden states (B, T, D) f32.

  Padding keys are masked out of every attention; padded positions' outputs
  are computed but meaningless (use the mask).
  """
  vocab_size: int
  d_model: int
  d_kv: int
  num_heads: int
  d_ff: int
  num_layers: int
  activation: str = "relu"
  gated: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  per_layer_position_bias: bool = False
  layer_norm_epsilon: float = 1e-6
  remat: str = "none"
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids_bt, mask_bt=None):
    b, t = ids_bt.shape
    key_valid_bs = jnp.ones((b, t), bool) if mask_bt is None else jnp.asarray(mask_bt, bool)
    x_btd = layers.Embed(self.vocab_size, self.d_model, name="token_embed", std=1.0,
                         dtype=self.dtype, param_dtype=self.param_dtype)(ids_bt)
    x_btd = layers.constrain(x_btd, ("batch", "length", "embed"))
    buckets_ts = jnp.asarray(relative_position_buckets(
        t, t, self.relative_attention_num_buckets, self.relative_attention_max_distance))
    bias_1hts = None
    if not self.per_layer_position_bias:  # one table for all layers (HF: block 0's)
      bias_1hts = PositionBias(self.num_heads, self.relative_attention_num_buckets,
                               self.param_dtype, self.d_model ** -0.5,
                               name="position_bias")(buckets_ts)
    block_kwargs = dict(
        num_heads=self.num_heads, head_dim=self.d_kv, d_ff=self.d_ff, activation=self.activation,
        gated=self.gated, num_buckets=self.relative_attention_num_buckets,
        per_layer_position_bias=self.per_layer_position_bias, epsilon=self.layer_norm_epsilon,
        dtype=self.dtype, param_dtype=self.param_dtype)
    x_btd = layers.Stack(T5Block, block_kwargs, self.num_layers, remat=self.remat, scan=self.scan,
                         name="blocks")(x_btd, bias_1hts, buckets_ts, key_valid_bs)
    x_btd = RMSNorm(self.layer_norm_epsilon, self.param_dtype, name="ln_final")(x_btd)
    return layers.constrain(x_btd, ("batch", "length", "embed"))


def build_model(config, dtype=None):
  """T5Encoder from a full config (`config.model`, dtype, remat, scan_layers)."""
  m = config.model
  return T5Encoder(
      vocab_size=m.vocab_size, d_model=m.d_model, d_kv=m.d_kv, num_heads=m.num_heads,
      d_ff=m.d_ff, num_layers=m.num_layers, activation=m.activation, gated=m.gated,
      relative_attention_num_buckets=m.relative_attention_num_buckets,
      relative_attention_max_distance=m.relative_attention_max_distance,
      per_layer_position_bias=m.per_layer_position_bias, layer_norm_epsilon=m.layer_norm_epsilon,
      remat=config.get("remat", "none"), scan=bool(config.get("scan_layers", False)),
      dtype=layers.dtype_from_name(dtype or config.get("dtype", "float32")),
      param_dtype=layers.dtype_from_name(config.get("param_dtype", "float32")))


def dummy_inputs(config, batch_size=1, length=None):
  """Zero ids and a full mask of the model's input shapes (for init / eval_shape)."""
  t = int(length or config.text.max_len)
  return np.zeros((batch_size, t), np.int32), np.ones((batch_size, t), bool)


def param_count(params):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
