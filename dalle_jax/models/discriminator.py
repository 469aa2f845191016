"""PatchGAN discriminator (pix2pix / taming's NLayerDiscriminator design).

    conv4x4/2 -> LeakyReLU(0.2)
    (n_layers - 1) x [conv4x4/2 -> norm -> LeakyReLU]   channels ndf * min(2^n, 8)
    conv4x4/1 -> norm -> LeakyReLU
    conv4x4/1 -> 1 logit per patch

Norm choice: 'batch' normalises with the statistics of the batch it is given
(taming's BatchNorm in training mode, without running averages: the
discriminator is only ever used in training), 'group', 'layer' or 'none'.
Weights start as in taming: conv N(0, 0.02), norm scale N(1, 0.02).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dalle_jax.models.vqgan import Conv

Dtype = Any
NORMS = ("batch", "group", "layer", "none")


class BatchStatNorm(nn.Module):
  """Per-channel normalisation over (B, H, W) of the current batch; no state."""
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x_bhwc):
    c = x_bhwc.shape[-1]
    x = x_bhwc.astype(jnp.float32)
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.var(x, axis=(0, 1, 2))
    scale = self.param("scale", nn.with_logical_partitioning(
        lambda k, s: 1.0 + 0.02 * jax.random.normal(k, s), ("norm",)), (c,))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (c,))
    return ((x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(x_bhwc.dtype)


def make_norm(kind, name):
  pinit = lambda init: nn.with_logical_partitioning(init, ("norm",))
  ones_ish = lambda k, s, d=jnp.float32: 1.0 + 0.02 * jax.random.normal(k, s, d)
  if kind == "batch":
    return BatchStatNorm(name=name)
  if kind == "group":
    gn = nn.GroupNorm(num_groups=32, dtype=jnp.float32, name=name,
                      scale_init=pinit(ones_ish), bias_init=pinit(nn.initializers.zeros))
    return lambda x: gn(x.astype(jnp.float32)).astype(x.dtype)
  if kind == "layer":
    ln = nn.LayerNorm(dtype=jnp.float32, name=name, scale_init=pinit(ones_ish),
                      bias_init=pinit(nn.initializers.zeros))
    return lambda x: ln(x.astype(jnp.float32)).astype(x.dtype)
  if kind == "none":
    return lambda x: x
  raise ValueError(f"disc.norm={kind!r}: choose one of {', '.join(NORMS)}")


class NLayerDiscriminator(nn.Module):
  """Images (B, H, W, 3) -> patch logits (B, H', W', 1) in f32."""
  ndf: int = 64
  n_layers: int = 3
  norm: str = "batch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc):
    init = nn.initializers.normal(0.02)
    use_bias = self.norm == "none"  # a following norm makes the bias redundant
    conv = lambda c, stride, name, bias=use_bias: Conv(
        c, 4, name, strides=stride, padding=((1, 1), (1, 1)), use_bias=bias, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=init)
    lrelu = lambda h: nn.leaky_relu(h, 0.2)
    h = lrelu(conv(self.ndf, 2, "conv_0", bias=True)(x_bhwc.astype(self.dtype)))
    for n in range(1, self.n_layers + 1):
      stride = 2 if n < self.n_layers else 1
      h = conv(self.ndf * min(2 ** n, 8), stride, f"conv_{n}")(h)
      h = lrelu(make_norm(self.norm, f"norm_{n}")(h))
    return conv(1, 1, "conv_out", bias=True)(h).astype(jnp.float32)


def hinge_d_loss(logits_real, logits_fake):
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def non_saturating_d_loss(logits_real, logits_fake):
  # -log sigmoid(real) - log(1 - sigmoid(fake)) = softplus(-real) + softplus(fake)
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def generator_loss(logits_fake, kind="hinge"):
  """Generator's adversarial loss: -E[D(G(z))] for hinge, -log sigmoid for non-saturating."""
  if kind == "hinge":
    return -jnp.mean(logits_fake)
  if kind == "non_saturating":
    return jnp.mean(jax.nn.softplus(-logits_fake))
  raise ValueError(f"loss.disc_loss={kind!r}: choose hinge or non_saturating")


def discriminator_loss(logits_real, logits_fake, kind="hinge"):
  if kind == "hinge":
    return hinge_d_loss(logits_real, logits_fake)
  if kind == "non_saturating":
    return non_saturating_d_loss(logits_real, logits_fake)
  raise ValueError(f"loss.disc_loss={kind!r}: choose hinge or non_saturating")
