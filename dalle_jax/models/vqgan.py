"""VQGAN image tokenizer (taming-transformers architecture family), Flax Linen.

    image (B, H, W, 3) in [-1, 1]
      -> Encoder (conv_in, `len(ch_mult)` levels of ResnetBlocks [+ attention]
         with a stride-2 downsample between levels, mid res/attn/res, norm, conv_out)
      -> quant_conv (z_channels -> embed_dim) -> VectorQuantizer -> codes (B, h, w)
      -> post_quant_conv (embed_dim -> z_channels)
      -> Decoder (mirror image, nearest-neighbour 2x upsampling + conv) -> image

Downsampling factor f = 2 ** (len(ch_mult) - 1): f16 with ch_mult (1,1,2,2,4)
turns 256² images into 16×16 codes (DALL·E mini), f8 into 32×32 (DALL·E).

Submodule and parameter names follow taming's layout (encoder/down_0/block_1/
norm1, decoder/up_4/attn_0/q, ...) so checkpoints convert by renaming only.
Convolution kernels are (kh, kw, in, out) with logical names
('conv_height', 'conv_width', 'conv_in', 'conv_out'); norms ('norm',).
Parameters are f32; `dtype` sets the compute dtype (bf16 by default in configs);
group norms, attention softmax and the quantizer's distances run in f32.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dalle_jax.models import layers
from dalle_jax.models.quantizer import VectorQuantizer

Dtype = Any
CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
ACT_AXES = ("batch", "height", "width", "channels")


def Conv(features, kernel_size, name, strides=1, padding="SAME", use_bias=True,
         dtype=jnp.float32, param_dtype=jnp.float32,
         kernel_init=nn.initializers.lecun_normal()):
  """nn.Conv with logically named kernel (kh, kw, in, out) and bias (out,)."""
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(strides, strides), padding=padding,
      use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init, CONV_AXES),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


def conv2d(x_bhwc, kernel_hwio, bias_o=None, padding="SAME"):
  """Stride-1 convolution with an explicit kernel (for last-layer gradients)."""
  y = jax.lax.conv_general_dilated(
      x_bhwc, kernel_hwio.astype(x_bhwc.dtype), (1, 1), padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y if bias_o is None else y + bias_o.astype(y.dtype)


def GroupNorm(groups, epsilon, dtype, param_dtype, name):
  """GroupNorm computed in f32 (output cast back to the compute dtype)."""
  norm = nn.GroupNorm(
      num_groups=groups, epsilon=epsilon, dtype=jnp.float32, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))
  return lambda x: norm(x.astype(jnp.float32)).astype(dtype)


class _Base(nn.Module):
  """Shared numerics attributes for the conv blocks."""
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def conv(self, features, kernel_size, name, **kw):
    return Conv(features, kernel_size, name, dtype=self.dtype, param_dtype=self.param_dtype, **kw)

  def norm(self, name):
    return GroupNorm(self.norm_groups, self.norm_eps, self.dtype, self.param_dtype, name)


class ResnetBlock(_Base):
  """x + conv(swish(norm(conv(swish(norm(x)))))); 1x1 shortcut when channels change."""
  out_channels: int = 0

  @nn.compact
  def __call__(self, x_bhwc):
    c_out = self.out_channels or x_bhwc.shape[-1]
    h = nn.swish(self.norm("norm1")(x_bhwc))
    h = self.conv(c_out, 3, "conv1")(h)
    h = nn.swish(self.norm("norm2")(h))
    h = self.conv(c_out, 3, "conv2")(h)
    if x_bhwc.shape[-1] != c_out:
      x_bhwc = self.conv(c_out, 1, "nin_shortcut")(x_bhwc)
    return layers.constrain(x_bhwc + h, ACT_AXES)


class AttnBlock(_Base):
  """Single-head self-attention over all H*W positions (1x1 conv projections)."""

  @nn.compact
  def __call__(self, x_bhwc):
    b, hgt, wid, c = x_bhwc.shape
    h = self.norm("norm")(x_bhwc)
    q = self.conv(c, 1, "q")(h).reshape(b, hgt * wid, c)
    k = self.conv(c, 1, "k")(h).reshape(b, hgt * wid, c)
    v = self.conv(c, 1, "v")(h).reshape(b, hgt * wid, c)
    logits_bqk = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
    probs_bqk = jax.nn.softmax(logits_bqk * (c ** -0.5), axis=-1).astype(self.dtype)
    out = jnp.einsum("bqk,bkc->bqc", probs_bqk, v).reshape(b, hgt, wid, c)
    return layers.constrain(x_bhwc + self.conv(c, 1, "proj_out")(out), ACT_AXES)


class Downsample(_Base):
  """Stride-2 3x3 conv after padding one row/column at the bottom/right (taming)."""

  @nn.compact
  def __call__(self, x_bhwc):
    x_bhwc = jnp.pad(x_bhwc, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return self.conv(x_bhwc.shape[-1], 3, "conv", strides=2, padding="VALID")(x_bhwc)


class Upsample(_Base):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

  @nn.compact
  def __call__(self, x_bhwc):
    x_bhwc = jnp.repeat(jnp.repeat(x_bhwc, 2, axis=1), 2, axis=2)
    return self.conv(x_bhwc.shape[-1], 3, "conv")(x_bhwc)


class MidBlock(_Base):
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    kw = dict(norm_groups=self.norm_groups, norm_eps=self.norm_eps, dtype=self.dtype,
              param_dtype=self.param_dtype)
    res = nn.remat(ResnetBlock) if self.remat else ResnetBlock
    x = res(**kw, name="block_1")(x)
    x = AttnBlock(**kw, name="attn_1")(x)
    return res(**kw, name="block_2")(x)


class Level(_Base):
  """One resolution level: `num_blocks` ResnetBlocks (each followed by attention
  when `attn`), then an optional down- or upsample."""
  out_channels: int = 0
  num_blocks: int = 2
  attn: bool = False
  resample: str = "none"  # none | down | up
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    kw = dict(norm_groups=self.norm_groups, norm_eps=self.norm_eps, dtype=self.dtype,
              param_dtype=self.param_dtype)
    res = nn.remat(ResnetBlock) if self.remat else ResnetBlock
    for j in range(self.num_blocks):
      x = res(**kw, out_channels=self.out_channels, name=f"block_{j}")(x)
      if self.attn:
        x = AttnBlock(**kw, name=f"attn_{j}")(x)
    if self.resample == "down":
      x = Downsample(**kw, name="downsample")(x)
    elif self.resample == "up":
      x = Upsample(**kw, name="upsample")(x)
    return x


class Encoder(_Base):
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  resolution: int = 256
  z_channels: int = 256
  remat: bool = False

  @nn.compact
  def __call__(self, x_bhwc):
    kw = dict(norm_groups=self.norm_groups, norm_eps=self.norm_eps, dtype=self.dtype,
              param_dtype=self.param_dtype)
    n = len(self.ch_mult)
    h = self.conv(self.ch, 3, "conv_in")(x_bhwc.astype(self.dtype))
    for i in range(n):
      res = self.resolution // 2 ** i
      h = Level(**kw, out_channels=self.ch * self.ch_mult[i], num_blocks=self.num_res_blocks,
                attn=res in self.attn_resolutions, resample="down" if i < n - 1 else "none",
                remat=self.remat, name=f"down_{i}")(h)
    h = MidBlock(**kw, remat=self.remat, name="mid")(h)
    h = nn.swish(self.norm("norm_out")(h))
    return self.conv(self.z_channels, 3, "conv_out")(h)


class Decoder(_Base):
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  resolution: int = 256
  out_channels: int = 3
  remat: bool = False

  @nn.compact
  def __call__(self, z_bhwc, return_hidden=False):
    """Returns images (B, H, W, out) in f32 [and the input of conv_out]."""
    kw = dict(norm_groups=self.norm_groups, norm_eps=self.norm_eps, dtype=self.dtype,
              param_dtype=self.param_dtype)
    n = len(self.ch_mult)
    h = self.conv(self.ch * self.ch_mult[-1], 3, "conv_in")(z_bhwc.astype(self.dtype))
    h = MidBlock(**kw, remat=self.remat, name="mid")(h)
    for i in reversed(range(n)):
      res = self.resolution // 2 ** i
      h = Level(**kw, out_channels=self.ch * self.ch_mult[i], num_blocks=self.num_res_blocks + 1,
                attn=res in self.attn_resolutions, resample="up" if i > 0 else "none",
                remat=self.remat, name=f"up_{i}")(h)
    h = nn.swish(self.norm("norm_out")(h))
    out = self.conv(self.out_channels, 3, "conv_out")(h).astype(jnp.float32)
    return (out, h) if return_hidden else out


class VQGAN(nn.Module):
  """Encoder -> vector quantizer -> decoder. Images in and out are in [-1, 1]
  (`zero_one_range` converts for models trained on [0, 1], e.g. DALL·E mini's).

  Call with `update_codebook=True` and mutable=['vq_ema'] (and rngs={'vq': key}
  for dead-code restarts) to update an EMA codebook.
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  resolution: int = 256
  in_channels: int = 3
  z_channels: int = 256
  embed_dim: int = 256
  n_embed: int = 16384
  norm_groups: int = 32
  norm_eps: float = 1e-6
  zero_one_range: bool = False
  # quantizer
  codebook_dim: int = 0
  beta: float = 0.25
  l2_normalize: bool = False
  ema_decay: float = 0.0
  dead_code_threshold: int = 0
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def downsample_factor(self):
    return 2 ** (len(self.ch_mult) - 1)

  def setup(self):
    if self.resolution % self.downsample_factor:
      raise ValueError(f"model.resolution={self.resolution} is not divisible by the "
                       f"downsampling factor {self.downsample_factor} of ch_mult={self.ch_mult}")
    arch = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution,
                norm_groups=self.norm_groups, norm_eps=self.norm_eps, remat=self.remat,
                dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(**arch, z_channels=self.z_channels)
    self.decoder = Decoder(**arch, out_channels=self.in_channels)
    conv = lambda c, name: Conv(c, 1, name, dtype=self.dtype, param_dtype=self.param_dtype)
    self.quant_conv = conv(self.embed_dim, "quant_conv")
    self.post_quant_conv = conv(self.z_channels, "post_quant_conv")
    self.quantize = VectorQuantizer(
        num_codes=self.n_embed, embed_dim=self.embed_dim, codebook_dim=self.codebook_dim,
        beta=self.beta, l2_normalize=self.l2_normalize, ema_decay=self.ema_decay,
        dead_code_threshold=self.dead_code_threshold, dtype=self.dtype,
        param_dtype=self.param_dtype)

  def encode(self, x_bhwc, update_codebook=False):
    """Images (B, H, W, C) in [-1, 1] -> (quantized (B, h, w, E), codes (B, h, w), vq_metrics)."""
    if self.zero_one_range:
      x_bhwc = (x_bhwc + 1.0) * 0.5
    z = self.quant_conv(self.encoder(x_bhwc))
    return self.quantize(z, update=update_codebook)

  def decode(self, quant_bhwe, return_hidden=False):
    """Quantized latents -> images in [-1, 1] (f32) [, decoder's last hidden]."""
    out = self.decoder(self.post_quant_conv(quant_bhwe), return_hidden=True)
    img, hidden = out
    if self.zero_one_range:
      img = img * 2.0 - 1.0
    return (img, hidden) if return_hidden else img

  def decode_codes(self, codes_bhw):
    """Codes (B, h, w) int -> images (B, h*f, w*f, C) in [-1, 1]."""
    return self.decode(self.quantize.embed_codes(codes_bhw))

  def __call__(self, x_bhwc, update_codebook=False, return_hidden=False):
    """Returns (reconstruction, aux) with aux = vq metrics/losses + 'codes'
    (+ 'hidden', the decoder's input to its last conv, when return_hidden)."""
    quant, codes, aux = self.encode(x_bhwc, update_codebook=update_codebook)
    recon, hidden = self.decode(quant, return_hidden=True)
    aux = dict(aux, codes=codes)
    if return_hidden:
      aux["hidden"] = hidden
    return recon, aux


MODEL_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "in_channels",
              "z_channels", "embed_dim", "n_embed", "norm_groups", "norm_eps", "zero_one_range")
QUANTIZER_KEYS = ("codebook_dim", "beta", "l2_normalize", "ema_decay", "dead_code_threshold")


def vqgan_from_config(config, dtype=None):
  """Builds VQGAN from a full config (config.model, config.model.quantizer, dtypes)."""
  m = config.model
  kw = {k: m[k] for k in MODEL_KEYS}
  kw["ch_mult"] = tuple(kw["ch_mult"])
  kw["attn_resolutions"] = tuple(kw["attn_resolutions"])
  kw.update({k: m.quantizer[k] for k in QUANTIZER_KEYS})
  return VQGAN(**kw, remat=config.get("remat", "none") != "none",
               dtype=layers.dtype_from_name(dtype or config.get("dtype", "float32")),
               param_dtype=layers.dtype_from_name(config.get("param_dtype", "float32")))
