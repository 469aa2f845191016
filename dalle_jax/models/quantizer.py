"""Vector quantizer for VQGAN / VQ-VAE tokenizers.

Nearest-code lookup (distances in f32), straight-through gradients, codebook +
commitment losses, and the usual remedies against codebook collapse:

* `l2_normalize`: look up by cosine similarity on unit vectors (ViT-VQGAN).
* `codebook_dim`: factorised lookup — project the `embed_dim` latents down to a
  small space (e.g. 8–32) for the lookup and back up afterwards (ViT-VQGAN).
* `ema_decay > 0`: the codebook is not learned by gradients but tracked as an
  exponential moving average of the latents assigned to each code (VQ-VAE-2).
  The codebook then lives in the non-parameter collection 'vq_ema' and is
  updated when the module is called with `update=True` and 'vq_ema' mutable.
* `dead_code_threshold > 0` (EMA only): a code unused for that many updates is
  re-seeded with a random latent from the current batch (needs rng 'vq').

Shapes: B batch, H/W latent grid, N = B*H*W latents, D lookup dim, E embed_dim,
K codebook size.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dalle_jax.models import layers

Dtype = Any


def l2_normalize(x, axis=-1, eps=1e-6):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def nearest_code(z_nd, codebook_kd):
  """Index of the closest code (squared Euclidean distance, f32) for each row."""
  z_nd = z_nd.astype(jnp.float32)
  codebook_kd = codebook_kd.astype(jnp.float32)
  # |z - e|^2 = |z|^2 - 2 z.e + |e|^2; |z|^2 does not change the argmin.
  dist_nk = (-2.0 * jnp.einsum("nd,kd->nk", z_nd, codebook_kd,
                               precision=jax.lax.Precision.HIGHEST)
             + jnp.sum(codebook_kd ** 2, axis=-1)[None, :])
  return jnp.argmin(dist_nk, axis=-1).astype(jnp.int32)


def code_statistics(codes, num_codes):
  """(usage, perplexity, counts_k): fraction of codes used and exp(entropy)."""
  counts_k = jnp.zeros((num_codes,), jnp.float32).at[codes.reshape(-1)].add(1.0)
  probs_k = counts_k / jnp.maximum(jnp.sum(counts_k), 1.0)
  entropy = -jnp.sum(jnp.where(probs_k > 0, probs_k * jnp.log(jnp.maximum(probs_k, 1e-12)), 0.0))
  usage = jnp.mean((counts_k > 0).astype(jnp.float32))
  return usage, jnp.exp(entropy), counts_k


class VectorQuantizer(nn.Module):
  """z (B, H, W, E) -> (z_q straight-through (B, H, W, E), codes (B, H, W), aux)."""
  num_codes: int
  embed_dim: int
  codebook_dim: int = 0  # 0 = embed_dim (no factorisation)
  beta: float = 0.25  # commitment weight
  l2_normalize: bool = False
  ema_decay: float = 0.0  # > 0: EMA codebook in collection 'vq_ema'
  ema_eps: float = 1e-5
  dead_code_threshold: int = 0  # EMA updates unused before a code is restarted
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def lookup_dim(self):
    return self.codebook_dim or self.embed_dim

  @property
  def factorized(self):
    return self.lookup_dim != self.embed_dim

  def setup(self):
    if self.dead_code_threshold and not self.ema_decay:
      raise ValueError("quantizer.dead_code_threshold > 0 needs quantizer.ema_decay > 0 "
                       "(codes can only be re-seeded in the EMA codebook)")
    k, d = self.num_codes, self.lookup_dim
    if self.factorized:
      self.proj_in = layers.Dense(d, ("embed", "codebook_embed"), name="proj_in",
                                  dtype=jnp.float32, param_dtype=self.param_dtype)
      self.proj_out = layers.Dense(self.embed_dim, ("codebook_embed", "embed"), name="proj_out",
                                   dtype=self.dtype, param_dtype=self.param_dtype)
    # taming initialises codes U(-1/K, 1/K).
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -1.0 / self.num_codes, 1.0 / self.num_codes)
    if self.ema_decay:
      # Start from a unit-scale random codebook: EMA codes then move toward the latents.
      self.codebook_var = self.variable(
          "vq_ema", "codebook", lambda: jax.random.normal(self.make_rng("params"), (k, d)))
      self.cluster_size = self.variable("vq_ema", "cluster_size", jnp.ones, (k,), jnp.float32)
      self.embed_sum = self.variable("vq_ema", "embed_sum", lambda: self.codebook_var.value)
      self.unused_steps = self.variable("vq_ema", "unused_steps", jnp.zeros, (k,), jnp.int32)
    else:
      self.codebook_param = layers.param_with_axes(
          self, "codebook", init, (k, d), ("codebook", "codebook_embed"), self.param_dtype)

  def codebook(self):
    """(K, D) f32 codes in lookup space (unit norm when l2_normalize)."""
    cb = self.codebook_var.value if self.ema_decay else self.codebook_param
    cb = cb.astype(jnp.float32)
    return l2_normalize(cb) if self.l2_normalize else cb

  def _to_lookup(self, z_bhwe):
    z = z_bhwe.astype(jnp.float32)
    if self.factorized:
      z = self.proj_in(z)
    return l2_normalize(z) if self.l2_normalize else z

  def _from_lookup(self, zq_bhwd):
    if self.factorized:
      return self.proj_out(zq_bhwd.astype(self.dtype))
    return zq_bhwd

  def embed_codes(self, codes_bhw):
    """Codes -> quantized latents (B, H, W, E) as fed to the decoder."""
    zq = jnp.take(self.codebook(), codes_bhw, axis=0)
    return self._from_lookup(zq).astype(self.dtype)

  def __call__(self, z_bhwe, update=False):
    z_bhwd = self._to_lookup(z_bhwe)
    b, h, w, d = z_bhwd.shape
    codebook_kd = self.codebook()
    z_nd = z_bhwd.reshape(-1, d)
    codes_n = nearest_code(z_nd, codebook_kd)
    zq_bhwd = jnp.take(codebook_kd, codes_n, axis=0).reshape(b, h, w, d)

    sg = jax.lax.stop_gradient
    commitment = jnp.mean((z_bhwd - sg(zq_bhwd)) ** 2)
    codebook_loss = 0.0 if self.ema_decay else jnp.mean((sg(z_bhwd) - zq_bhwd) ** 2)
    # Straight-through: forward uses the code, backward copies the gradient to z.
    zq_st = z_bhwd + sg(zq_bhwd - z_bhwd)
    usage, perplexity, counts_k = code_statistics(codes_n, self.num_codes)

    if self.ema_decay and update and not self.is_initializing():
      self._ema_update(sg(z_nd), codes_n, counts_k)

    aux = {
        "vq_loss": codebook_loss + self.beta * commitment,
        "codebook_loss": codebook_loss,
        "commitment_loss": commitment,
        "codebook_usage": usage,
        "perplexity": perplexity,
    }
    return self._from_lookup(zq_st).astype(self.dtype), codes_n.reshape(b, h, w), aux

  def _ema_update(self, z_nd, codes_n, counts_k):
    decay = self.ema_decay
    k = self.num_codes
    sums_kd = jnp.zeros((k, z_nd.shape[-1]), jnp.float32).at[codes_n].add(z_nd)
    cluster = decay * self.cluster_size.value + (1 - decay) * counts_k
    embed_sum = decay * self.embed_sum.value + (1 - decay) * sums_kd
    # Laplace smoothing keeps rarely used codes from dividing by ~0.
    n = jnp.sum(cluster)
    smoothed = (cluster + self.ema_eps) / (n + k * self.ema_eps) * n
    codebook = embed_sum / smoothed[:, None]
    unused = jnp.where(counts_k > 0, 0, self.unused_steps.value + 1)

    if self.dead_code_threshold:
      dead_k = unused >= self.dead_code_threshold
      pick = jax.random.randint(self.make_rng("vq"), (k,), 0, z_nd.shape[0])
      fresh_kd = z_nd[pick]
      codebook = jnp.where(dead_k[:, None], fresh_kd, codebook)
      cluster = jnp.where(dead_k, 1.0, cluster)
      embed_sum = jnp.where(dead_k[:, None], fresh_kd, embed_sum)
      unused = jnp.where(dead_k, 0, unused)

    self.codebook_var.value = codebook
    self.cluster_size.value = cluster
    self.embed_sum.value = embed_sum
    self.unused_steps.value = unused.astype(jnp.int32)
