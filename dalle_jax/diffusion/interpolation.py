"""Spherical interpolation of CLIP embeddings and of x_T (unCLIP's interpolations and text diffs).

  slerp(a, b, t) = sin((1 - t) theta) / sin(theta) a + sin(t theta) / sin(theta) b,
  cos(theta) = <a, b> / (|a| |b|)

Unit vectors stay unit vectors along the arc, and Gaussian x_T of equal norm keep
their norm, where a linear interpolation would shrink both towards the middle. Where
theta is tiny (nearly parallel) or near pi (nearly opposite, where the arc is
undefined) it falls back to the linear interpolation.

Shapes: any; the dot product runs over `axis` (the last by default, e.g. (B, E)
embeddings; axis=(1, 2, 3) for a (B, H, W, C) x_T).
"""
import jax.numpy as jnp

# |cos theta| above this (theta or pi - theta < 1.4e-3 rad, about the smallest angle float32's cos
# resolves well): linear interpolation, which differs from the arc by ~theta^2 / 8 = 2.5e-7 there
_MAX_ABS_COS = 1.0 - 1e-6


def slerp(a, b, t, axis=-1):
  """Spherical interpolation from a (t = 0) to b (t = 1); t a scalar or an array that broadcasts
  against a and b with `axis` reduced to size 1 (e.g. t of shape (N, 1) for (N, E) frames)."""
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  if a.shape != b.shape:
    raise ValueError(f"slerp endpoints differ in shape: {a.shape} vs {b.shape}")
  t = jnp.asarray(t, jnp.float32)
  dot = lambda u, v: jnp.sum(u * v, axis=axis, keepdims=True)
  cos = jnp.clip(dot(a, b) / jnp.maximum(jnp.sqrt(dot(a, a) * dot(b, b)), 1e-30), -1.0, 1.0)
  arc = jnp.abs(cos) < _MAX_ABS_COS
  theta = jnp.arccos(jnp.where(arc, cos, 0.0))  # no inf / 0-by-0 in the branch not taken, nor its gradient
  wa = jnp.where(arc, jnp.sin((1.0 - t) * theta) / jnp.sin(theta), 1.0 - t)
  wb = jnp.where(arc, jnp.sin(t * theta) / jnp.sin(theta), t)
  out = wa * a + wb * b
  # the endpoints exactly (the compiled weights may round sin(theta) / sin(theta) off 1)
  return jnp.where(t == 0, a, jnp.where(t == 1, b, out))
