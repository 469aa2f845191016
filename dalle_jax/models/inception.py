"""InceptionV3 as FID uses it (pytorch-fid's FID variant of the 2015-12-05 TF graph), Flax Linen.

    image x_bhwc (B, 299, 299, 3), already resized and scaled to about [-1, 1]
      -> stem: Conv2d_1a..4a with two 3x3/2 max-pools               (B, 35, 35, 192)
      -> Mixed_5b/5c/5d (A blocks) -> Mixed_6a (B)                   (B, 17, 17, 768)
      -> Mixed_6b..6e (C blocks) -> Mixed_7a (D)                     (B, 8, 8, 1280)
      -> Mixed_7b, Mixed_7c (E blocks)                               (B, 8, 8, 2048)
      -> global average pool -> pool_bc (B, 2048)  (FID's "pool3" features)
      -> fc -> logits_bk (B, 1008)                                   (the IS head)

The FID variant differs from torchvision's ImageNet InceptionV3 where the TF graph does: the
average-pool branches of the A, C and first E block exclude the padding from the mean
(count_include_pad=False), and the last E block's pool branch is a 3x3 max-pool. Every conv is
bias-free and followed by an inference BatchNorm (eps 1e-3) and a ReLU.

Submodules are named as torchvision's / pytorch-fid's modules (Mixed_6b/branch7x7_2/conv,
.../bn) so a state dict converts by renaming (dalle_jax.convert.inception). BatchNorm keeps its
running statistics as parameters (`mean`, `var`): the network is only ever evaluated.

Shapes: b batch, h/w spatial, c channels, k the 1008 classes (0 and 1001-1007 are unused).
Parameters carry logical names ('conv_height', 'conv_width', 'conv_in', 'conv_out'; 'norm';
'embed', 'classes'); activations ('batch', 'height', 'width', 'channels'), so a batch sharded over
the mesh's data axes stays sharded through the network. Parameters are f32; `dtype` sets the
compute dtype (f32 by default: FID is sensitive to feature precision; f32 convolutions run at
HIGHEST precision so TPUs do not drop to bf16 passes; float64 works under jax.enable_x64).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
ACT_AXES = ("batch", "height", "width", "channels")
BN_EPS = 1e-3
NUM_CLASSES = 1008
POOL_DIM = 2048


def _param(module, name, init, axes, shape):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class Conv(nn.Module):
  """Bias-free 2-D convolution with torch's symmetric zero padding; kernel (kh, kw, in, out)."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)  # (pad_h, pad_w), as torch's Conv2d
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc):
    kernel = _param(self, "kernel", nn.initializers.lecun_normal(), CONV_AXES,
                    (*self.kernel, x_bhwc.shape[-1], self.features))
    ph, pw = self.padding
    # f32 means f32: TPUs would otherwise multiply f32 convs in bf16 passes.
    precision = jax.lax.Precision.HIGHEST if self.dtype == jnp.float32 else None
    return jax.lax.conv_general_dilated(
        x_bhwc.astype(self.dtype), kernel.astype(self.dtype), (self.strides,) * 2,
        ((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)


class BatchNorm(nn.Module):
  """Inference BatchNorm from stored statistics: (x - mean) / sqrt(var + eps) * scale + bias."""
  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x_bhwc):
    c = x_bhwc.shape[-1]
    scale = _param(self, "scale", nn.initializers.ones, ("norm",), (c,))
    bias = _param(self, "bias", nn.initializers.zeros, ("norm",), (c,))
    mean = _param(self, "mean", nn.initializers.zeros, ("norm",), (c,))
    var = _param(self, "var", nn.initializers.ones, ("norm",), (c,))
    # Centre first, as torch does: x*mul - mean*mul would cancel when |mean| >> std.
    mul = scale * jax.lax.rsqrt(var + self.eps)
    dt = x_bhwc.dtype
    return (x_bhwc - mean.astype(dt)) * mul.astype(dt) + bias.astype(dt)


class ConvBN(nn.Module):
  """torchvision's BasicConv2d: conv -> BatchNorm -> ReLU."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc):
    y = Conv(self.features, self.kernel, self.strides, self.padding, self.dtype, name="conv")(x_bhwc)
    return nn.relu(BatchNorm(name="bn")(y))


def avg_pool_3x3(x_bhwc):
  """3x3/1 average pool over the unpadded neighbours only (the TF graph's SAME average pool)."""
  return nn.avg_pool(x_bhwc, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3(x_bhwc, stride):
  pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
  return nn.max_pool(x_bhwc, (3, 3), (stride, stride), pad)


def _constrain(x_bhwc):
  return nn.with_logical_constraint(x_bhwc, ACT_AXES)


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg-pool-1x1 (pool_features)."""
  pool_features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cb = lambda f, k, p, name: ConvBN(f, k, 1, p, self.dtype, name=name)
    b1 = cb(64, (1, 1), (0, 0), "branch1x1")(x)
    b5 = cb(48, (1, 1), (0, 0), "branch5x5_1")(x)
    b5 = cb(64, (5, 5), (2, 2), "branch5x5_2")(b5)
    b3 = cb(64, (1, 1), (0, 0), "branch3x3dbl_1")(x)
    b3 = cb(96, (3, 3), (1, 1), "branch3x3dbl_2")(b3)
    b3 = cb(96, (3, 3), (1, 1), "branch3x3dbl_3")(b3)
    bp = cb(self.pool_features, (1, 1), (0, 0), "branch_pool")(avg_pool_3x3(x))
    return _constrain(jnp.concatenate([b1, b5, b3, bp], axis=-1))


class InceptionB(nn.Module):
  """Mixed_6a, the 35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | max-pool 3x3/2."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(384, (3, 3), 2, dtype=self.dtype, name="branch3x3")(x)
    bd = ConvBN(64, (1, 1), dtype=self.dtype, name="branch3x3dbl_1")(x)
    bd = ConvBN(96, (3, 3), 1, (1, 1), self.dtype, name="branch3x3dbl_2")(bd)
    bd = ConvBN(96, (3, 3), 2, dtype=self.dtype, name="branch3x3dbl_3")(bd)
    return _constrain(jnp.concatenate([b3, bd, max_pool_3x3(x, 2)], axis=-1))


class InceptionC(nn.Module):
  """Mixed_6b..6e: factorised 7x7 convolutions (1x7 and 7x1) with `channels_7x7` inside."""
  channels_7x7: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding)
    cb = lambda f, kp, name: ConvBN(f, kp[0], 1, kp[1], self.dtype, name=name)
    one = ((1, 1), (0, 0))
    b1 = cb(192, one, "branch1x1")(x)
    b7 = cb(c7, one, "branch7x7_1")(x)
    b7 = cb(c7, row, "branch7x7_2")(b7)
    b7 = cb(192, col, "branch7x7_3")(b7)
    bd = cb(c7, one, "branch7x7dbl_1")(x)
    bd = cb(c7, col, "branch7x7dbl_2")(bd)
    bd = cb(c7, row, "branch7x7dbl_3")(bd)
    bd = cb(c7, col, "branch7x7dbl_4")(bd)
    bd = cb(192, row, "branch7x7dbl_5")(bd)
    bp = cb(192, one, "branch_pool")(avg_pool_3x3(x))
    return _constrain(jnp.concatenate([b1, b7, bd, bp], axis=-1))


class InceptionD(nn.Module):
  """Mixed_7a, the 17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max-pool 3x3/2."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cb = lambda f, k, s, p, name: ConvBN(f, k, s, p, self.dtype, name=name)
    b3 = cb(192, (1, 1), 1, (0, 0), "branch3x3_1")(x)
    b3 = cb(320, (3, 3), 2, (0, 0), "branch3x3_2")(b3)
    b7 = cb(192, (1, 1), 1, (0, 0), "branch7x7x3_1")(x)
    b7 = cb(192, (1, 7), 1, (0, 3), "branch7x7x3_2")(b7)
    b7 = cb(192, (7, 1), 1, (3, 0), "branch7x7x3_3")(b7)
    b7 = cb(192, (3, 3), 2, (0, 0), "branch7x7x3_4")(b7)
    return _constrain(jnp.concatenate([b3, b7, max_pool_3x3(x, 2)], axis=-1))


class InceptionE(nn.Module):
  """Mixed_7b/7c: split 1x3 / 3x1 branches; `max_pool` picks the FID graph's last-block pool."""
  max_pool: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cb = lambda f, k, p, name: ConvBN(f, k, 1, p, self.dtype, name=name)
    b1 = cb(320, (1, 1), (0, 0), "branch1x1")(x)
    b3 = cb(384, (1, 1), (0, 0), "branch3x3_1")(x)
    b3 = jnp.concatenate([cb(384, (1, 3), (0, 1), "branch3x3_2a")(b3),
                          cb(384, (3, 1), (1, 0), "branch3x3_2b")(b3)], axis=-1)
    bd = cb(448, (1, 1), (0, 0), "branch3x3dbl_1")(x)
    bd = cb(384, (3, 3), (1, 1), "branch3x3dbl_2")(bd)
    bd = jnp.concatenate([cb(384, (1, 3), (0, 1), "branch3x3dbl_3a")(bd),
                          cb(384, (3, 1), (1, 0), "branch3x3dbl_3b")(bd)], axis=-1)
    pooled = max_pool_3x3(x, 1) if self.max_pool else avg_pool_3x3(x)
    bp = cb(192, (1, 1), (0, 0), "branch_pool")(pooled)
    return _constrain(jnp.concatenate([b1, b3, bd, bp], axis=-1))


class Head(nn.Module):
  """The 1008-class fc layer in f32: (pool @ kernel + bias, pool @ kernel)."""

  @nn.compact
  def __call__(self, pool_bc):
    kernel = _param(self, "kernel", nn.initializers.lecun_normal(), ("embed", "classes"),
                    (pool_bc.shape[-1], NUM_CLASSES))
    bias = _param(self, "bias", nn.initializers.zeros, ("classes",), (NUM_CLASSES,))
    unbiased_bk = jnp.dot(pool_bc, kernel, precision=jax.lax.Precision.HIGHEST)
    return unbiased_bk + bias, unbiased_bk


class InceptionV3(nn.Module):
  """x_bhwc (B, 299, 299, 3) -> {'pool': (B, 2048), 'logits': (B, 1008), 'logits_unbiased'}.

  All outputs are f32. 'logits_unbiased' is pool @ fc.kernel without the bias: the original
  Inception Score code (and torch-fidelity, guided-diffusion's evaluator) take the softmax of
  that product, read off the TF graph's 'softmax/logits/MatMul'.
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc):
    d = self.dtype
    x = _constrain(x_bhwc.astype(d))
    x = ConvBN(32, (3, 3), 2, dtype=d, name="Conv2d_1a_3x3")(x)
    x = ConvBN(32, (3, 3), dtype=d, name="Conv2d_2a_3x3")(x)
    x = ConvBN(64, (3, 3), 1, (1, 1), d, name="Conv2d_2b_3x3")(x)
    x = max_pool_3x3(x, 2)
    x = ConvBN(80, (1, 1), dtype=d, name="Conv2d_3b_1x1")(x)
    x = ConvBN(192, (3, 3), dtype=d, name="Conv2d_4a_3x3")(x)
    x = _constrain(max_pool_3x3(x, 2))
    x = InceptionA(32, d, name="Mixed_5b")(x)
    x = InceptionA(64, d, name="Mixed_5c")(x)
    x = InceptionA(64, d, name="Mixed_5d")(x)
    x = InceptionB(d, name="Mixed_6a")(x)
    x = InceptionC(128, d, name="Mixed_6b")(x)
    x = InceptionC(160, d, name="Mixed_6c")(x)
    x = InceptionC(160, d, name="Mixed_6d")(x)
    x = InceptionC(192, d, name="Mixed_6e")(x)
    x = InceptionD(d, name="Mixed_7a")(x)
    x = InceptionE(False, d, name="Mixed_7b")(x)
    x = InceptionE(True, d, name="Mixed_7c")(x)
    pool_bc = jnp.mean(x.astype(jnp.promote_types(d, jnp.float32)), axis=(1, 2))
    pool_bc = nn.with_logical_constraint(pool_bc, ("batch", "embed"))
    logits_bk, unbiased_bk = Head(name="fc")(pool_bc)
    return {"pool": pool_bc, "logits": logits_bk, "logits_unbiased": unbiased_bk}
