"""The diffusion U-Net (DDPM / ADM / GLIDE / unCLIP / Imagen / DeepFloyd IF), Flax Linen.

    x_t (B, H, W, C) [++ low_res resized to H, W] [++ masked image, mask]
                                                        t (B,) [+ embeds, pooled context]
      -> conv_in                                        -> sinusoid -> time MLP -> temb (B, T)
      -> down_0 .. down_{n-1}: per level `num_res_blocks` ResBlocks (each followed by the
         level's attention), then a conv or resnet down-sample (not after the last level;
         with `downsample_first` it opens levels 1.. instead); every block output is kept
      -> mid: ResBlock, (attention, ResBlock) x mid_layers
      -> up_{n-1} .. up_0: per level num_res_blocks + 1 ResBlocks, each fed the next kept
         skip (x skip_scale) concatenated to its input (+ attention), then an up-sample
      -> GroupNorm, act, conv_out -> (B, H, W, out_channels) f32 (ε/x0/v [+ variance])

Every tensor of diffusers' `UNet2DModel` and of the `UNet2DConditionModel` block
types DownBlock2D / AttnDownBlock2D / ResnetDownsampleBlock2D /
SimpleCrossAttnDownBlock2D / UNetMidBlock2D / UNetMidBlock2DSimpleCrossAttn and
their up blocks maps onto one parameter here (see dalle_jax/convert/diffusers_unet.py):
the skip bookkeeping, the resnet/attention order, the epsilons and the
scale factors follow diffusers exactly.

Model config keys (`default_model_config()`; per-level keys take one value for
every level or a tuple with one entry per level):
  in_channels, out_channels    image channels in / out (2x out for learned variance)
  block_channels               channels per level, e.g. (128, 256, 256, 256)
  num_res_blocks               ResBlocks per level on the way down (int or per level;
                               Efficient U-Net: more at low resolution)
  attention                    per level: none | self | added_kv (context K/V joined to
                               the image's, GLIDE/unCLIP/IF) | cross (K/V from the context
                               only) | self_cross (a self then a cross attention block)
  mid_block, mid_attention, mid_layers   the middle: ResBlock + mid_layers x (attn, ResBlock)
  attn_heads / attn_head_dim   a fixed number of heads, or heads = channels // head_dim
                               (set exactly one > 0)
  attn_norm_eps                GroupNorm eps in attention blocks (None = norm_eps)
  mid_attn_norm_groups         groups of the mid self-attention's norm (None = norm_groups,
                               0 = no norm: diffusers' UNet2DModel with scale_shift)
  resample                     per level: conv (strided conv / nearest + conv) | resnet
                               (ADM's resblock_updown: a ResBlock that down/up-samples)
  downsample_padding           1: symmetric pad; 0: pad bottom/right only (DDPM releases)
  downsample_first             Efficient U-Net: levels 1.. open with the down-sample
                               (to the level's channels) instead of ending with one
  skip_scale                   skip connections are multiplied by this (1/sqrt(2): Imagen)
  time_embed_dim               T (0 = 4 x block_channels[0]); time_sinusoid_dim (0 =
                               block_channels[0]); flip_sin_to_cos, freq_shift as diffusers
  time_embed_out_act           none | silu | gelu: applied to temb after all additions (IF)
  act                          silu | gelu (ResBlocks, time MLP, output)
  norm_groups, norm_eps        GroupNorm of the ResBlocks and the output
  time_cond                    add (DDPM) | scale_shift (ADM: norm(h) * (1 + s) + b)
  skip_time_act                no activation before a ResBlock's time projection (IF)
  res_out_scale, mid_out_scale ResBlock outputs divided by these (IF stage II: sqrt 2);
                               the mid self-attention also divides by mid_out_scale
  dropout                      in the ResBlocks, when train=True
  context_dim                  width of the context tokens (0 = none)
  context_proj_dim             Dense context_dim -> this before attention (0 = none; IF's
                               encoder_hid_proj)
  context_norm, context_norm_groups  none | group_norm of the context in each attention
                               block (IF's cross_attention_norm; eps 1e-5)
  context_pool, context_pool_heads   none | attention: attention-pool the raw context into
                               the timestep embedding (IF's addition_embed_type="text")
  extra_embeds                 ("name:kind[:dim]", ...) embeddings added to temb, given at call
                               time as embeds[name]: class:N (table of N, int labels (B,)),
                               timestep (a value embedded like t), mlp:D / linear:D (a (B, D)
                               vector through Linear-act-Linear / Linear), identity ((B, T)).
                               Names not declared get a linear projection of their width.
  low_res_channels             channels of an SR model's low-res input (0 = none); resized
                               bilinearly (align_corners=False) to x's size and concatenated
  inpaint                      GLIDE's inpainting layout: the known image (zero where
                               unknown, C channels) and the mask (1 = known) are concatenated
                               to x after any low-res input: C + C + 1 input channels
  center_input                 x -> 2x - 1 first (diffusers' center_input_sample)
  conv_in_kernel, conv_out_kernel

Numerics: parameters in `param_dtype` (f32), compute in `dtype` (bf16); norms,
softmax and the timestep sinusoid in f32; the output is f32. `remat` (none|full|
dots|save_dots) rematerialises every ResBlock and attention block.
ADM initialisation: the last conv of each ResBlock, attention output projections
and conv_out start at zero.

Shapes: B batch, H/W height/width, C channels, T time-embedding width, S context
length, D context width, N heads, K head dim, L = H*W image tokens.
"""
import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dalle_jax.models import layers
from dalle_jax.models.vqgan import ACT_AXES, Conv, GroupNorm

Dtype = Any
ATTENTION_KINDS = ("none", "self", "added_kv", "cross", "self_cross")
RESAMPLE_KINDS = ("conv", "resnet")
EMBED_KINDS = ("class", "timestep", "mlp", "linear", "identity")
_ACTS = {"silu": nn.swish, "swish": nn.swish, "gelu": layers.ACTIVATIONS["gelu"],
         "gelu_tanh": layers.ACTIVATIONS["gelu_tanh"], "relu": nn.relu}


def _act(name):
  return _ACTS[name]


def timestep_sinusoid(t_b, dim, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000.0):
  """(B,) timesteps (may be fractional) -> (B, dim) f32 [sin | cos] (or [cos | sin]).

  Frequencies exp(-log(max_period) * i / (dim/2 - freq_shift)), i < dim/2, as diffusers'
  get_timestep_embedding (DDPM: freq_shift=1, sin first; ADM/IF: 0, cos first).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args_bf = jnp.asarray(t_b, jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args_bf), jnp.cos(args_bf)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _remat(cls, policy):
  if policy == "none":
    return cls
  return nn.remat(cls, policy=layers.REMAT_POLICIES[policy])


class TimeMLP(nn.Module):
  """Linear -> act -> Linear (diffusers' TimestepEmbedding: linear_1 / linear_2)."""
  features: int
  act: str = "silu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_be):
    dense = lambda axes, name: layers.Dense(self.features, axes, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
    h_bt = _act(self.act)(dense(("channels", "mlp"), "linear_1")(x_be))
    return dense(("mlp", "embed"), "linear_2")(h_bt)


class ContextPool(nn.Module):
  """Attention pooling of the context into one (B, T) vector (IF's TextTimeEmbedding):
  LayerNorm -> a query (mean token + learned offset) attends over [query, tokens]
  -> Linear -> LayerNorm. Padding tokens are pooled too, as IF does."""
  features: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ctx_bsd):
    b, s, d = ctx_bsd.shape
    if d % self.num_heads:
      raise ValueError(f"model.context_pool_heads={self.num_heads} does not divide context "
                       f"width {d}")
    x = layers.LayerNorm("norm_in", param_dtype=self.param_dtype)(ctx_bsd.astype(jnp.float32))
    pos = layers.param_with_axes(self, "pos_emb", nn.initializers.normal(d ** -0.5), (1, d),
                                 ("length", "embed"), self.param_dtype)
    cls_b1d = jnp.mean(x, axis=1, keepdims=True) + pos[None]
    x = jnp.concatenate([cls_b1d, x], axis=1).astype(self.dtype)
    k_dim = d // self.num_heads
    proj = lambda name: layers.DenseGeneral((self.num_heads, k_dim), ("embed", "heads", "kv"),
                                            use_bias=True, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
    q = proj("query")(cls_b1d.astype(self.dtype))
    out_b1nk = layers.dot_product_attention(q, proj("key")(x), proj("value")(x), None, self.dtype)
    pooled_bd = out_b1nk.reshape(b, d)
    h = layers.Dense(self.features, ("channels", "embed"), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="proj")(pooled_bd)
    return layers.LayerNorm("norm_out", param_dtype=self.param_dtype)(h.astype(jnp.float32))


class ResBlock(nn.Module):
  """GroupNorm-act-[resample]-conv, + time (add or scale-shift), GroupNorm-act-dropout-conv,
  + (1x1-conv) shortcut, / out_scale. `resample` up/down resamples both paths
  (nearest x2 / 2x2 average), as diffusers' ResnetBlock2D(up=/down=True) and ADM's
  resblock_updown."""
  out_channels: int
  norm_groups: int = 32
  norm_eps: float = 1e-5
  act: str = "silu"
  time_cond: str = "add"
  skip_time_act: bool = False
  out_scale: float = 1.0
  dropout: float = 0.0
  resample: str = "none"  # none | up | down
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc, temb_bt):
    act = _act(self.act)
    c = self.out_channels
    norm = lambda name: GroupNorm(self.norm_groups, self.norm_eps, self.dtype, self.param_dtype, name)
    conv = lambda feats, k, name, **kw: Conv(feats, k, name, dtype=self.dtype,
                                             param_dtype=self.param_dtype, **kw)
    h = act(norm("norm1")(x_bhwc))
    if self.resample == "up":
      x_bhwc, h = _upsample_nearest(x_bhwc), _upsample_nearest(h)
    elif self.resample == "down":
      x_bhwc, h = _avg_pool2(x_bhwc), _avg_pool2(h)
    h = conv(c, 3, "conv1", padding=((1, 1), (1, 1)))(h)
    t = temb_bt if self.skip_time_act else act(temb_bt)
    scale_shift = self.time_cond == "scale_shift"
    t = layers.Dense(2 * c if scale_shift else c, ("embed", "channels"), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="time_proj")(t)[:, None, None, :]
    if scale_shift:
      scale, shift = jnp.split(t, 2, axis=-1)
      h = norm("norm2")(h) * (1 + scale) + shift
    else:
      h = norm("norm2")(h + t)
    h = nn.Dropout(self.dropout)(act(h), deterministic=self.deterministic)
    h = conv(c, 3, "conv2", padding=((1, 1), (1, 1)), kernel_init=nn.initializers.zeros)(h)
    if x_bhwc.shape[-1] != c:
      x_bhwc = conv(c, 1, "shortcut", padding="VALID")(x_bhwc)
    out = x_bhwc + h
    if self.out_scale != 1.0:
      out = out / self.out_scale
    return layers.constrain(out.astype(self.dtype), ACT_AXES)


def _upsample_nearest(x_bhwc):
  return jnp.repeat(jnp.repeat(x_bhwc, 2, axis=1), 2, axis=2)


def _avg_pool2(x_bhwc):
  b, h, w, c = x_bhwc.shape
  y = x_bhwc.astype(jnp.float32).reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  return y.astype(x_bhwc.dtype)


class AttnBlock(nn.Module):
  """Residual multi-head attention over the L = H*W image tokens.

  kind self:     q, k, v from GroupNorm(x)                  (AttnDownBlock2D's Attention)
  kind added_kv: keys/values = [context's (add_key/add_value) ; image's]  (GLIDE, IF)
  kind cross:    keys/values from the context only          (only_cross_attention)
  The context may be group-normed first (context_norm). context_mask (B, S) hides
  padding tokens; image keys are always visible.
  """
  kind: str
  num_heads: int
  norm_groups: int = 32  # 0: no norm on the image tokens
  norm_eps: float = 1e-5
  out_scale: float = 1.0
  context_norm: str = "none"
  context_norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc, ctx_bsd=None, ctx_mask_bs=None):
    b, hgt, wid, c = x_bhwc.shape
    n = self.num_heads
    k_dim = c // n
    h = x_bhwc
    if self.norm_groups:
      h = GroupNorm(self.norm_groups, self.norm_eps, self.dtype, self.param_dtype, "norm")(h)
    h_bld = layers.constrain(h.reshape(b, hgt * wid, c), ("batch", "length", "embed"))
    proj = lambda name: layers.DenseGeneral((n, k_dim), ("embed", "heads", "kv"), use_bias=True,
                                            dtype=self.dtype, param_dtype=self.param_dtype,
                                            name=name)
    q = proj("query")(h_bld)
    mask = None
    if self.kind == "self":
      k, v = proj("key")(h_bld), proj("value")(h_bld)
    else:
      if ctx_bsd is None:
        raise ValueError(f"a '{self.kind}' attention block needs context_bsd")
      ctx = ctx_bsd
      if self.context_norm == "group_norm":
        ctx = GroupNorm(self.context_norm_groups, 1e-5, self.dtype, self.param_dtype,
                        "context_norm")(ctx)
      k, v = proj("add_key")(ctx.astype(self.dtype)), proj("add_value")(ctx.astype(self.dtype))
      s = ctx.shape[1]
      keep_bs = (jnp.ones((b, s), bool) if ctx_mask_bs is None else ctx_mask_bs.astype(bool))
      if self.kind == "added_kv":
        k = jnp.concatenate([k, proj("key")(h_bld)], axis=1)
        v = jnp.concatenate([v, proj("value")(h_bld)], axis=1)
        keep_bs = jnp.concatenate([keep_bs, jnp.ones((b, hgt * wid), bool)], axis=1)
      if ctx_mask_bs is not None:
        mask = keep_bs[:, None, None, :]
    heads_axes = ("batch", "length", "heads", "kv")
    q, k, v = (layers.constrain(a, heads_axes) for a in (q, k, v))
    out_blnk = layers.dot_product_attention(q, k, v, mask, self.dtype).astype(self.dtype)
    out_bld = layers.DenseGeneral(c, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=True,
                                  dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=nn.initializers.zeros, name="out")(out_blnk)
    out = x_bhwc + out_bld.reshape(b, hgt, wid, c)
    if self.out_scale != 1.0:
      out = out / self.out_scale
    return layers.constrain(out.astype(self.dtype), ACT_AXES)


class Downsample(nn.Module):
  """Stride-2 3x3 conv; padding 1 all round, or (downsample_padding=0) one row and
  column at the bottom/right (diffusers' Downsample2D, DDPM releases)."""
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc):
    pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
    return Conv(self.out_channels, 3, "conv", strides=2, padding=pad, dtype=self.dtype,
                param_dtype=self.param_dtype)(x_bhwc)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc):
    return Conv(x_bhwc.shape[-1], 3, "conv", padding=((1, 1), (1, 1)), dtype=self.dtype,
                param_dtype=self.param_dtype)(_upsample_nearest(x_bhwc))


def _heads(channels, heads, head_dim, where):
  if heads:
    if channels % heads:
      raise ValueError(f"model.attn_heads={heads} does not divide {channels} channels ({where})")
    return heads
  if channels % head_dim:
    raise ValueError(f"model.attn_head_dim={head_dim} does not divide {channels} channels ({where})")
  return channels // head_dim


# The attention blocks after each ResBlock, per `attention` value.
_ATTN_BLOCKS = {"none": (), "self": ("self",), "added_kv": ("added_kv",), "cross": ("cross",),
                "self_cross": ("self", "cross")}


@dataclasses.dataclass(frozen=True)
class BlockSettings:
  """The UNet settings its ResBlocks and attention blocks share (hashable, so Levels
  take it as an attribute); builds those blocks in the calling module's scope."""
  norm_groups: int
  norm_eps: float
  act: str
  time_cond: str
  skip_time_act: bool
  res_out_scale: float
  mid_out_scale: float
  dropout: float
  attn_heads: int
  attn_head_dim: int
  attn_norm_eps: Optional[float]
  mid_attn_norm_groups: Optional[int]
  context_norm: str
  context_norm_groups: int
  downsample_padding: int
  skip_scale: float
  remat: str
  dtype: Any
  param_dtype: Any

  @classmethod
  def of(cls, unet):
    return cls(**{f.name: getattr(unet, f.name) for f in dataclasses.fields(cls)})

  def res(self, out_channels, name, deterministic, resample="none", mid=False):
    return _remat(ResBlock, self.remat)(
        out_channels=out_channels, norm_groups=self.norm_groups, norm_eps=self.norm_eps,
        act=self.act, time_cond=self.time_cond, skip_time_act=self.skip_time_act,
        out_scale=self.mid_out_scale if mid else self.res_out_scale, dropout=self.dropout,
        resample=resample, deterministic=deterministic, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)

  def attend(self, h, ctx, ctx_mask, attention, names, mid=False):
    """h through the blocks of `attention` (named names[0], names[1]). In the middle,
    self-attention takes mid_attn_norm_groups and divides by mid_out_scale, as
    diffusers' UNetMidBlock2D (its added-KV middle does neither)."""
    c = h.shape[-1]
    for kind, name in zip(_ATTN_BLOCKS[attention], names):
      groups, out_scale = self.norm_groups, 1.0
      if mid and kind == "self":
        out_scale = self.mid_out_scale
        if self.mid_attn_norm_groups is not None:
          groups = self.mid_attn_norm_groups
      h = _remat(AttnBlock, self.remat)(
          kind=kind, num_heads=_heads(c, self.attn_heads, self.attn_head_dim, name),
          norm_groups=groups,
          norm_eps=self.norm_eps if self.attn_norm_eps is None else self.attn_norm_eps,
          out_scale=out_scale, context_norm=self.context_norm,
          context_norm_groups=self.context_norm_groups, dtype=self.dtype,
          param_dtype=self.param_dtype, name=name)(h, ctx, ctx_mask)
    return h


class Level(nn.Module):
  """One resolution level of the down (mode='down') or up (mode='up') path.

  down: [pre-downsample] (res_j, attention) x num_blocks [downsample] -> (h, the skips
        it keeps: every block's output). up: (h ++ skip x skip_scale, res_j, attention)
        x num_blocks [upsample] -> h.
  """
  mode: str
  out_channels: int
  num_blocks: int
  attention: str
  resample: str  # none | conv | resnet
  settings: BlockSettings
  resample_out: int = 0  # channels after a pre-downsample (downsample_first)
  pre_resample: bool = False
  deterministic: bool = True

  def _block(self, h, j, temb, ctx, ctx_mask):
    s = self.settings
    h = s.res(self.out_channels, f"res_{j}", self.deterministic)(h, temb)
    return s.attend(h, ctx, ctx_mask, self.attention, (f"attn_{j}", f"xattn_{j}"))

  def _resampler(self, h, temb, name):
    s = self.settings
    direction = "down" if self.mode == "down" else "up"
    out = self.resample_out or h.shape[-1]
    if self.resample == "resnet":
      return s.res(out, name, self.deterministic, resample=direction)(h, temb)
    if direction == "down":
      return Downsample(out, s.downsample_padding, dtype=s.dtype, param_dtype=s.param_dtype,
                        name=name)(h)
    return Upsample(dtype=s.dtype, param_dtype=s.param_dtype, name=name)(h)

  @nn.compact
  def __call__(self, h, temb, ctx, ctx_mask, skips=None):
    if self.mode == "down":
      kept = []
      if self.pre_resample:
        h = self._resampler(h, temb, "downsample")
        kept.append(h)
      for j in range(self.num_blocks):
        h = self._block(h, j, temb, ctx, ctx_mask)
        kept.append(h)
      if self.resample != "none" and not self.pre_resample:
        h = self._resampler(h, temb, "downsample")
        kept.append(h)
      return h, kept
    skips = list(skips)
    scale = self.settings.skip_scale
    for j in range(self.num_blocks):
      skip = skips.pop()
      if scale != 1.0:
        skip = skip * jnp.asarray(scale, skip.dtype)
      h = self._block(jnp.concatenate([h, skip.astype(h.dtype)], axis=-1), j, temb, ctx, ctx_mask)
    if self.resample != "none":
      h = self._resampler(h, temb, "upsample")
    return h


class UNet(nn.Module):
  """The configurable diffusion U-Net; attributes = the model config keys (module doc),
  defaulting to DDPM's CIFAR-10 U-Net.

  __call__(x_bhwc, t_b, *, context_bsd, context_mask_bs, embeds, low_res_bhwc, inpaint_bhwc,
           train) -> (B, H, W, out_channels) f32.
  inpaint_bhwc (B, H, W, C + 1): masked image ++ mask (models with `inpaint`; inpaint_input).
  """
  in_channels: int = 3
  out_channels: int = 3
  block_channels: Sequence[int] = (128, 256, 256, 256)
  num_res_blocks: Any = (2, 2, 2, 2)
  attention: Any = ("none", "self", "none", "none")
  mid_block: bool = True
  mid_attention: str = "self"
  mid_layers: int = 1
  attn_heads: int = 1
  attn_head_dim: int = 0
  attn_norm_eps: Optional[float] = None
  mid_attn_norm_groups: Optional[int] = None
  resample: Any = ("conv",) * 4
  downsample_padding: int = 0
  downsample_first: bool = False
  skip_scale: float = 1.0
  time_embed_dim: int = 0
  time_sinusoid_dim: int = 0
  flip_sin_to_cos: bool = False
  freq_shift: float = 1.0
  time_embed_out_act: str = "none"
  act: str = "silu"
  norm_groups: int = 32
  norm_eps: float = 1e-6
  time_cond: str = "add"
  skip_time_act: bool = False
  res_out_scale: float = 1.0
  mid_out_scale: float = 1.0
  dropout: float = 0.1
  context_dim: int = 0
  context_proj_dim: int = 0
  context_norm: str = "none"
  context_norm_groups: int = 32
  context_pool: str = "none"
  context_pool_heads: int = 64
  extra_embeds: Sequence[str] = ()
  low_res_channels: int = 0
  inpaint: bool = False
  center_input: bool = False
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  # --- derived ---------------------------------------------------------------
  @property
  def levels(self):
    return len(self.block_channels)

  def per_level(self, name):
    return _per_level(name, getattr(self, name), self.levels)

  @property
  def temb_dim(self):
    return self.time_embed_dim or 4 * self.block_channels[0]

  @property
  def sinusoid_dim(self):
    return self.time_sinusoid_dim or self.block_channels[0]

  # --- conditioning ------------------------------------------------------------
  def _embed(self, t_b, embeds, raw_ctx_bsd):
    d, sd = self.temb_dim, self.sinusoid_dim
    sinusoid = lambda v: timestep_sinusoid(v, sd, self.flip_sin_to_cos, self.freq_shift)
    mlp = lambda name: TimeMLP(d, self.act, dtype=self.dtype, param_dtype=self.param_dtype,
                               name=name)
    temb = mlp("time_embed")(sinusoid(t_b).astype(self.dtype)).astype(jnp.float32)
    embeds = dict(embeds or {})
    declared = parse_extra_embeds(self.extra_embeds)
    for name in declared:
      if name not in embeds:
        raise ValueError(f"embeds[{name!r}] is missing (declared in model.extra_embeds)")
    for name in sorted(embeds):
      e = embeds[name]
      kind, dim = declared.get(name, ("linear", None))
      mod = f"embed_{name}"
      if kind == "class":
        e = layers.Embed(dim, d, name=mod, std=1.0, dtype=jnp.float32,
                         param_dtype=self.param_dtype, axes=("vocab", "embed"))(
                             jnp.asarray(e, jnp.int32))
      elif kind == "timestep":
        e = mlp(mod)(sinusoid(jnp.reshape(e, (-1,))).astype(self.dtype))
      else:
        e = jnp.asarray(e)
        if e.ndim != 2 or (dim is not None and e.shape[-1] != dim):
          raise ValueError(f"embeds[{name!r}] has shape {e.shape}; expected (B, "
                           f"{dim if dim is not None else 'E'})")
        if kind == "identity":
          if e.shape[-1] != d:
            raise ValueError(f"embeds[{name!r}] is 'identity' but has width {e.shape[-1]}, "
                             f"not the time embedding's {d}")
        elif kind == "mlp":
          e = mlp(mod)(e.astype(self.dtype))
        else:
          e = layers.Dense(d, ("channels", "embed"), dtype=self.dtype,
                           param_dtype=self.param_dtype, name=mod)(e.astype(self.dtype))
      temb = temb + e.astype(jnp.float32)
    if self.context_pool == "attention":
      if raw_ctx_bsd is None:
        raise ValueError("model.context_pool='attention' needs context_bsd")
      temb = temb + ContextPool(d, self.context_pool_heads, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="context_pool")(raw_ctx_bsd)
    if self.time_embed_out_act != "none":
      temb = _act(self.time_embed_out_act)(temb)
    return layers.constrain(temb.astype(self.dtype), ("batch", "embed"))

  @nn.compact
  def __call__(self, x_bhwc, t_b, *, context_bsd=None, context_mask_bs=None, embeds=None,
               low_res_bhwc=None, inpaint_bhwc=None, train=False):
    validate(self)
    b, hgt, wid, c_in = x_bhwc.shape
    n = self.levels
    if c_in != self.in_channels:
      raise ValueError(f"x has {c_in} channels; model.in_channels={self.in_channels}")
    if hgt % 2 ** (n - 1) or wid % 2 ** (n - 1):
      raise ValueError(f"image size {hgt}x{wid} is not divisible by 2^{n - 1} "
                       f"({n} levels of model.block_channels)")
    t_b = jnp.broadcast_to(jnp.asarray(t_b, jnp.float32).reshape(-1), (b,))
    x = x_bhwc.astype(jnp.float32)
    if self.center_input:
      x = 2 * x - 1
    if self.low_res_channels:
      if low_res_bhwc is None:
        raise ValueError(f"model.low_res_channels={self.low_res_channels}: low_res_bhwc is required")
      if low_res_bhwc.shape[-1] != self.low_res_channels or low_res_bhwc.shape[0] != b:
        raise ValueError(f"low_res_bhwc has shape {low_res_bhwc.shape}; expected "
                         f"({b}, h, w, {self.low_res_channels})")
      lr = low_res_bhwc.astype(jnp.float32)
      if lr.shape[1:3] != (hgt, wid):
        lr = jax.image.resize(lr, (b, hgt, wid, lr.shape[-1]), "bilinear", antialias=False)
      x = jnp.concatenate([x, lr], axis=-1)
    elif low_res_bhwc is not None:
      raise ValueError("low_res_bhwc given but model.low_res_channels=0")
    if self.inpaint:
      want = (b, hgt, wid, self.in_channels + 1)
      if inpaint_bhwc is None or tuple(inpaint_bhwc.shape) != want:
        got = None if inpaint_bhwc is None else tuple(inpaint_bhwc.shape)
        raise ValueError(f"model.inpaint: inpaint_bhwc (masked image ++ mask) must have shape "
                         f"{want}, got {got}")
      x = jnp.concatenate([x, inpaint_bhwc.astype(jnp.float32)], axis=-1)
    elif inpaint_bhwc is not None:
      raise ValueError("inpaint_bhwc given but model.inpaint=False")

    ctx = None
    if context_bsd is not None:
      if not self.context_dim:
        raise ValueError("context_bsd given but model.context_dim=0")
      if context_bsd.ndim != 3 or context_bsd.shape[-1] != self.context_dim:
        raise ValueError(f"context_bsd has shape {context_bsd.shape}; expected "
                         f"(B, S, {self.context_dim}) (model.context_dim)")
      ctx = layers.constrain(context_bsd.astype(self.dtype), ("batch", "length", "embed"))
      if self.context_proj_dim:
        ctx = layers.Dense(self.context_proj_dim, ("embed", "mlp"), dtype=self.dtype,
                           param_dtype=self.param_dtype, name="context_proj")(ctx)
    temb = self._embed(t_b, embeds, context_bsd)

    chans = tuple(self.block_channels)
    nres, attn, resample = (self.per_level("num_res_blocks"), self.per_level("attention"),
                            self.per_level("resample"))
    conv = lambda feats, k, name, **kw: Conv(feats, k, name, dtype=self.dtype,
                                             param_dtype=self.param_dtype,
                                             padding=((k // 2, k // 2),) * 2, **kw)
    h = conv(chans[0], self.conv_in_kernel, "conv_in")(x.astype(self.dtype))
    h = layers.constrain(h, ACT_AXES)
    skips = [h]
    det = not train
    settings = BlockSettings.of(self)
    for i in range(n):
      # the n-1 down-samples end levels 0..n-2, or (downsample_first) open levels 1..n-1
      pre = self.downsample_first and i > 0
      has_down = pre or (not self.downsample_first and i < n - 1)
      h, kept = Level(mode="down", out_channels=chans[i], num_blocks=nres[i], attention=attn[i],
                      resample=resample[i] if has_down else "none",
                      resample_out=chans[i] if pre else 0, pre_resample=pre, settings=settings,
                      deterministic=det, name=f"down_{i}")(h, temb, ctx, context_mask_bs)
      skips += kept
    if self.mid_block:  # ResBlock, (attention, ResBlock) x mid_layers
      h = settings.res(h.shape[-1], "mid_res_0", det, mid=True)(h, temb)
      for j in range(self.mid_layers):
        h = settings.attend(h, ctx, context_mask_bs, self.mid_attention,
                            (f"mid_attn_{j}", f"mid_xattn_{j}"), mid=True)
        h = settings.res(h.shape[-1], f"mid_res_{j + 1}", det, mid=True)(h, temb)
    for i in reversed(range(n)):
      k = nres[i] + 1
      h = Level(mode="up", out_channels=chans[i], num_blocks=k, attention=attn[i],
                resample=resample[i] if i > 0 else "none", settings=settings, deterministic=det,
                name=f"up_{i}")(h, temb, ctx, context_mask_bs, skips[-k:])
      skips = skips[:-k]
    h = _act(self.act)(GroupNorm(self.norm_groups, self.norm_eps, self.dtype, self.param_dtype,
                                 "norm_out")(h))
    out = conv(self.out_channels, self.conv_out_kernel, "conv_out",
               kernel_init=nn.initializers.zeros)(h)
    return out.astype(jnp.float32)


def inpaint_input(image_bhwc, keep_bhw1):
  """GLIDE-inpaint's extra channels: the image where known (zero elsewhere) ++ the mask
  (1 = known), (B, H, W, C + 1) f32; keep broadcasts over the channels."""
  keep = jnp.broadcast_to(jnp.asarray(keep_bhw1, jnp.float32),
                          tuple(image_bhwc.shape[:-1]) + (1,))
  return jnp.concatenate([jnp.asarray(image_bhwc, jnp.float32) * keep, keep], axis=-1)


def example_inputs(unet, batch=1, size=None):
  """(x_bhwc, t_b, call kwargs) of the right shapes for `unet.init` (abstract inits,
  converters, tests); size defaults to the smallest the levels allow, 2^(levels-1)."""
  size = size or 2 ** (len(unet.block_channels) - 1)
  kw = {}
  if unet.context_dim:
    kw["context_bsd"] = jnp.zeros((batch, 4, unet.context_dim), jnp.float32)
    kw["context_mask_bs"] = jnp.ones((batch, 4), bool)
  t_dim = unet.time_embed_dim or 4 * unet.block_channels[0]
  embeds = {}
  for name, (kind, dim) in parse_extra_embeds(unet.extra_embeds).items():
    embeds[name] = {"class": jnp.zeros((batch,), jnp.int32), "timestep": jnp.zeros((batch,)),
                    "identity": jnp.zeros((batch, t_dim))}.get(kind)
    if embeds[name] is None:  # mlp / linear
      embeds[name] = jnp.zeros((batch, dim), jnp.float32)
  kw["embeds"] = embeds
  if unet.low_res_channels:
    kw["low_res_bhwc"] = jnp.zeros((batch, size, size, unet.low_res_channels), jnp.float32)
  if unet.inpaint:
    kw["inpaint_bhwc"] = jnp.zeros((batch, size, size, unet.in_channels + 1), jnp.float32)
  x = jnp.zeros((batch, size, size, unet.in_channels), jnp.float32)
  return x, jnp.zeros((batch,), jnp.float32), kw


# --- config -----------------------------------------------------------------------

_NUMERICS = ("remat", "dtype", "param_dtype")


def default_model_config():
  """Every model key with its default (a plain dict; configs build ConfigDicts from it):
  the UNet's attribute defaults, DDPM's CIFAR-10 U-Net (35.7M parameters). Per-level
  keys default to tuples, so that a (type-safe) ConfigDict takes per-level overrides."""
  out = {}
  for f in UNet.__dataclass_fields__.values():
    if f.name in _NUMERICS or f.name in ("parent", "name"):
      continue
    out[f.name] = f.default
  return out


def _per_level(name, value, n):
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"model.{name} has {len(value)} entries; block_channels has {n} levels")
    return tuple(value)
  return (value,) * n


def parse_extra_embeds(specs):
  """("name:kind[:dim]", ...) -> {name: (kind, dim or None)}."""
  out = {}
  for spec in specs or ():
    parts = str(spec).split(":")
    name, kind = parts[0], parts[1] if len(parts) > 1 else ""
    if not name or kind not in EMBED_KINDS or len(parts) > 3:
      raise ValueError(f"model.extra_embeds entry {spec!r}: expected 'name:kind[:dim]' with kind "
                       f"in {'|'.join(EMBED_KINDS)}")
    needs_dim = kind in ("class", "mlp", "linear")
    if needs_dim != (len(parts) == 3):
      raise ValueError(f"model.extra_embeds entry {spec!r}: kind {kind!r} "
                       f"{'needs' if needs_dim else 'takes no'} ':dim'")
    dim = int(parts[2]) if needs_dim else None
    if dim is not None and dim <= 0:
      raise ValueError(f"model.extra_embeds entry {spec!r}: dim must be > 0")
    if name in out:
      raise ValueError(f"model.extra_embeds names {name!r} twice")
    out[name] = (kind, dim)
  return out


def validate(m):
  """One-line ValueErrors naming the bad model key (m: UNet or an attribute namespace)."""
  chans = tuple(m.block_channels)
  n = len(chans)
  if n == 0 or any(int(c) <= 0 for c in chans):
    raise ValueError(f"model.block_channels={chans}: need at least one positive entry")
  for key in ("in_channels", "out_channels", "norm_groups", "conv_in_kernel", "conv_out_kernel"):
    if int(getattr(m, key)) <= 0:
      raise ValueError(f"model.{key}={getattr(m, key)} must be > 0")
  for key in ("conv_in_kernel", "conv_out_kernel"):
    if int(getattr(m, key)) % 2 == 0:
      raise ValueError(f"model.{key}={getattr(m, key)} must be odd")
  for c in chans:
    if c % m.norm_groups:
      raise ValueError(f"model.norm_groups={m.norm_groups} does not divide {c} "
                       f"(model.block_channels)")
  nres = _per_level("num_res_blocks", m.num_res_blocks, n)
  if any(int(r) < 1 for r in nres):
    raise ValueError(f"model.num_res_blocks={m.num_res_blocks}: need >= 1 per level")
  attn = _per_level("attention", m.attention, n)
  for a in attn + (m.mid_attention,):
    if a not in ATTENTION_KINDS:
      raise ValueError(f"model.attention/mid_attention {a!r}: choose {'|'.join(ATTENTION_KINDS)}")
  for r in _per_level("resample", m.resample, n):
    if r not in RESAMPLE_KINDS:
      raise ValueError(f"model.resample {r!r}: choose {'|'.join(RESAMPLE_KINDS)}")
  if (int(m.attn_heads) > 0) == (int(m.attn_head_dim) > 0):
    raise ValueError(f"model.attn_heads={m.attn_heads}, model.attn_head_dim={m.attn_head_dim}: "
                     "set exactly one of them > 0")
  if m.downsample_padding not in (0, 1):
    raise ValueError(f"model.downsample_padding={m.downsample_padding}: choose 0 or 1")
  if m.time_cond not in ("add", "scale_shift"):
    raise ValueError(f"model.time_cond={m.time_cond!r}: choose add|scale_shift")
  for key in ("act",):
    if getattr(m, key) not in _ACTS:
      raise ValueError(f"model.{key}={getattr(m, key)!r}: choose {'|'.join(_ACTS)}")
  if m.time_embed_out_act != "none" and m.time_embed_out_act not in _ACTS:
    raise ValueError(f"model.time_embed_out_act={m.time_embed_out_act!r}: choose none|"
                     f"{'|'.join(_ACTS)}")
  if m.context_norm not in ("none", "group_norm"):
    raise ValueError(f"model.context_norm={m.context_norm!r}: choose none|group_norm")
  if m.context_pool not in ("none", "attention"):
    raise ValueError(f"model.context_pool={m.context_pool!r}: choose none|attention")
  uses_ctx = any(a in ("added_kv", "cross", "self_cross") for a in attn) or (
      m.mid_block and m.mid_attention in ("added_kv", "cross", "self_cross"))
  if (uses_ctx or m.context_pool != "none") and int(m.context_dim) <= 0:
    raise ValueError("model.context_dim must be > 0 for context attention / pooling")
  if not 0.0 <= float(m.dropout) < 1.0:
    raise ValueError(f"model.dropout={m.dropout} must be in [0, 1)")
  if float(m.skip_scale) <= 0 or float(m.res_out_scale) <= 0 or float(m.mid_out_scale) <= 0:
    raise ValueError("model.skip_scale / res_out_scale / mid_out_scale must be > 0")
  if int(m.mid_layers) < 0:
    raise ValueError(f"model.mid_layers={m.mid_layers} must be >= 0")
  if m.remat != "none" and m.remat not in layers.REMAT_POLICIES:
    raise ValueError(f"remat={m.remat!r}: choose none|{'|'.join(layers.REMAT_POLICIES)}")
  parse_extra_embeds(m.extra_embeds)


def unet_kwargs(model_cfg):
  """ConfigDict / dict of model keys -> UNet constructor kwargs (validated; unknown keys
  and bad values are one-line errors naming the key). Numerics (dtype, param_dtype,
  remat) are passed separately: UNet(**unet_kwargs(cfg), dtype=..., remat=...)."""
  cfg = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
  defaults = default_model_config()
  unknown = sorted(set(cfg) - set(defaults))
  if unknown:
    raise ValueError(f"unknown model key(s) {', '.join('model.' + k for k in unknown)}; "
                     f"known: {', '.join(sorted(defaults))}")
  kw = dict(defaults)
  kw.update(cfg)
  for key, v in kw.items():  # lists (from JSON) -> tuples (hashable module attributes)
    if isinstance(v, list):
      kw[key] = tuple(v)
  kw["block_channels"] = tuple(int(c) for c in kw["block_channels"])

  class _View:  # attribute access for validate()
    pass

  view = _View()
  view.__dict__.update(kw, remat="none")
  validate(view)
  return kw
