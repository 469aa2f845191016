"""The unCLIP diffusion prior: caption -> CLIP image embedding (DALL·E 2, Karlo).

A causal pre-LN transformer over one token stream

    [caption token states (S) ; caption's CLIP text embedding ; timestep embedding ;
     noised image embedding ; learned query]                      (S + 4 tokens)

each token projected to the width D (the timestep through sinusoid -> Linear -> act ->
Linear, the query a learned vector), plus a learned positional table. Every token
attends to itself and the tokens before it, never to padding caption tokens. The
learned query's final state (LayerNorm -> Linear) is the prediction of the clean
image embedding x0 (Karlo's prior is an x0-predictor, sampled with clipping).

The diffusion runs on *normalised* image embeddings, (e - mean) / std with Karlo's
per-dimension CLIP statistics (`clip_mean` / `clip_std`); the model holds them in
the non-trainable collection 'clip_stats' (`mean` 0 and `std` 1 at init, set by the
task from the training embeddings or by the importer) and `normalize` / `denormalize`
apply them. diffusers' mask quirk: its PriorTransformer is causal only when given a
text mask (UnCLIPPipeline always gives one); this model is always causal.

Every tensor of diffusers' `PriorTransformer` maps onto one parameter here (see
dalle_jax/convert/karlo.py): the transformer is `layers.Stack` of `layers.PreLNBlock`
(LN -> attention with biases -> residual, LN -> GELU MLP -> residual), exactly
diffusers' BasicTransformerBlock without cross-attention. Caption dropout for
classifier-free guidance is the task's business (it feeds the empty caption).

Numerics: parameters in `param_dtype`, matmuls in `dtype` (bf16) with f32
accumulation, LayerNorms, softmax and the sinusoid in f32; the output is f32.

Shapes: B batch, S caption tokens, C caption state width, E CLIP embedding width,
D transformer width, T time-MLP width, N = S + 4 stream length.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dalle_jax.models import layers
from dalle_jax.models.unet import timestep_sinusoid

Dtype = Any
STATS = "clip_stats"  # the non-trainable collection of the embedding statistics
NUM_EXTRA_TOKENS = 4  # text embedding, timestep, noised image embedding, query
TIME_ACTS = {"silu": nn.swish, "swish": nn.swish, "gelu": layers.ACTIVATIONS["gelu"],
             "relu": nn.relu}


class PriorTransformer(nn.Module):
  """x0-prediction of the normalised CLIP image embedding.

  __call__(x_t_be, t_b, text_embed_be, text_bsc, text_mask_bs=None) -> x0_be (B, E) f32.
  """
  embed_dim: int = 768  # E: noised input, prediction and the text embedding
  text_dim: int = 0  # C: caption token states (0 = embed_dim)
  text_len: int = 77  # S
  num_layers: int = 20
  num_heads: int = 32
  head_dim: int = 64
  mlp_dim: int = 0  # 0 = 4 x width
  time_dim: int = 0  # T, the time MLP's hidden width (0 = width)
  time_act: str = "silu"
  norm_in: bool = False  # LayerNorm on the stream before the blocks (diffusers' norm_in_type)
  text_embed_norm: bool = False  # LayerNorm on the text embedding (embedding_proj_norm_type)
  ln_epsilon: float = 1e-5
  remat: str = "none"
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def width(self):
    return self.num_heads * self.head_dim

  @nn.compact
  def __call__(self, x_t_be, t_b, text_embed_be, text_bsc, text_mask_bs=None):
    b, e, s = x_t_be.shape[0], self.embed_dim, self.text_len
    c, d = self.text_dim or e, self.width
    for name, arr, shape in (("x_t_be", x_t_be, (b, e)), ("text_embed_be", text_embed_be, (b, e)),
                             ("text_bsc", text_bsc, (b, s, c))):
      if tuple(arr.shape) != shape:
        raise ValueError(f"PriorTransformer: {name} has shape {tuple(arr.shape)}, expected "
                         f"{shape} (embed_dim={e}, text_len={s}, text_dim={c})")
    if text_mask_bs is not None and tuple(text_mask_bs.shape) != (b, s):
      raise ValueError(f"PriorTransformer: text_mask_bs has shape {tuple(text_mask_bs.shape)}, "
                       f"expected {(b, s)}")
    # The statistics live beside the parameters (set by the task / importer).
    self.variable(STATS, "mean", nn.with_logical_partitioning(
        lambda: jnp.zeros((e,), jnp.float32), ("channels",)))
    self.variable(STATS, "std", nn.with_logical_partitioning(
        lambda: jnp.ones((e,), jnp.float32), ("channels",)))

    dense = lambda feats, axes, name: layers.Dense(feats, axes, dtype=self.dtype,
                                                   param_dtype=self.param_dtype, name=name)
    ln = lambda name: layers.LayerNorm(name, epsilon=self.ln_epsilon, param_dtype=self.param_dtype)
    t_b = jnp.broadcast_to(jnp.asarray(t_b, jnp.float32).reshape(-1), (b,))
    temb = timestep_sinusoid(t_b, d, flip_sin_to_cos=True, freq_shift=0.0)
    if self.time_act not in TIME_ACTS:
      raise ValueError(f"PriorTransformer: time_act={self.time_act!r}; choose "
                       f"{'|'.join(TIME_ACTS)}")
    temb = TIME_ACTS[self.time_act](
        dense(self.time_dim or d, ("channels", "mlp"), "time_1")(temb.astype(self.dtype)))
    temb_bd = dense(d, ("mlp", "embed"), "time_2")(temb)

    te = text_embed_be.astype(jnp.float32)
    if self.text_embed_norm:
      te = ln("text_embed_norm")(te)
    te_bd = dense(d, ("channels", "embed"), "text_embed_proj")(te.astype(self.dtype))
    text_bsd = dense(d, ("channels", "embed"), "text_proj")(text_bsc.astype(self.dtype))
    x_bd = dense(d, ("channels", "embed"), "x_proj")(x_t_be.astype(self.dtype))
    query = layers.param_with_axes(self, "query", nn.initializers.normal(0.02), (1, d),
                                   ("length", "embed"), self.param_dtype)
    pos = layers.param_with_axes(self, "pos_embed", nn.initializers.normal(0.02),
                                 (s + NUM_EXTRA_TOKENS, d), ("length", "embed"), self.param_dtype)
    h_bnd = jnp.concatenate(
        [text_bsd.astype(jnp.float32)]
        + [v.astype(jnp.float32)[:, None] for v in (te_bd, temb_bd, x_bd)]
        + [jnp.broadcast_to(query.astype(jnp.float32)[None], (b, 1, d))], axis=1)
    h_bnd = h_bnd + pos.astype(jnp.float32)[None]
    if self.norm_in:
      h_bnd = ln("norm_in")(h_bnd)
    h_bnd = layers.constrain(h_bnd.astype(self.dtype), ("batch", "length", "embed"))

    n = s + NUM_EXTRA_TOKENS
    mask = layers.causal_mask(n)[None, None]
    if text_mask_bs is not None:  # padding caption tokens are never attended to
      keys_bn = jnp.concatenate([text_mask_bs.astype(bool), jnp.ones((b, NUM_EXTRA_TOKENS), bool)],
                                axis=1)
      mask = jnp.logical_and(mask, keys_bn[:, None, None, :])
    block = dict(num_heads=self.num_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim or 4 * d,
                 activation="gelu", use_bias=True, ln_epsilon=self.ln_epsilon, dtype=self.dtype,
                 param_dtype=self.param_dtype)
    h_bnd = layers.Stack(layers.PreLNBlock, block, self.num_layers, remat=self.remat,
                         scan=self.scan, name="blocks")(h_bnd, mask)
    out_bd = ln("norm_out")(h_bnd[:, -1])
    out_be = dense(e, ("embed", "channels"), "out_proj")(out_bd.astype(self.dtype))
    return out_be.astype(jnp.float32)


def normalize(stats, image_embed_be):
  """A raw CLIP image embedding -> the prior's diffusion space ((e - mean) / std).
  stats: variables['clip_stats'] ({'mean', 'std'}: (E,))."""
  stats = nn.unbox(stats)
  return (jnp.asarray(image_embed_be, jnp.float32) - stats["mean"]) / stats["std"]


def denormalize(stats, x_be):
  """The prior's output (diffusion space) -> a CLIP image embedding (x * std + mean)."""
  stats = nn.unbox(stats)
  return jnp.asarray(x_be, jnp.float32) * stats["std"] + stats["mean"]


def example_inputs(prior, batch=1):
  """(x_t_be, t_b, text_embed_be, text_bsc, text_mask_bs) of the right shapes for init."""
  e = prior.embed_dim
  return (jnp.zeros((batch, e), jnp.float32), jnp.zeros((batch,), jnp.float32),
          jnp.zeros((batch, e), jnp.float32),
          jnp.zeros((batch, prior.text_len, prior.text_dim or e), jnp.float32),
          jnp.ones((batch, prior.text_len), bool))
