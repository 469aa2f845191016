"""Training masks for GLIDE's inpainting layout (model.unet.inpaint): which pixels of a
training image the model is shown (the rest it must generate).

  keep = random_masks(rng, MaskConfig(...), b, h, w)    # (B, H, W, 1) f32, 1 = known
  x_in = unet.inpaint_input(x0, keep)                   # masked image ++ mask, the U-Net's
                                                        # extra input channels

Mask kinds (`config.inpaint.masks`):
  rectangle  an axis-aligned rectangle is unknown, each side a uniform fraction in
             [min_size, max_size] of the image's, placed uniformly
  half       the left, right, top or bottom half is unknown (outpainting)
  mixed      rectangle or half, equally likely
With probability `blank_prob` a row shows nothing (keep = 0 everywhere): the model keeps
generating from the caption alone. Pure functions, jittable; no I/O.

Shapes: B batch, H/W image height/width.
"""
import dataclasses

import jax
import jax.numpy as jnp

MASK_KINDS = ("rectangle", "half", "mixed")


@dataclasses.dataclass(frozen=True)
class MaskConfig:
  masks: str = "mixed"
  min_size: float = 0.25
  max_size: float = 0.75
  blank_prob: float = 0.1

  @classmethod
  def from_config(cls, cfg):
    """config.inpaint -> MaskConfig; one-line errors naming the bad key."""
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else (cfg or {}))
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"unknown key(s) {', '.join('config.inpaint.' + k for k in unknown)}")
    out = cls(**d)
    if out.masks not in MASK_KINDS:
      raise ValueError(f"config.inpaint.masks={out.masks!r}: choose {'|'.join(MASK_KINDS)}")
    if not 0.0 < out.min_size <= out.max_size <= 1.0:
      raise ValueError(f"config.inpaint.min_size={out.min_size}, max_size={out.max_size}: need "
                       "0 < min_size <= max_size <= 1 (fractions of the image side)")
    if not 0.0 <= out.blank_prob < 1.0:
      raise ValueError(f"config.inpaint.blank_prob={out.blank_prob} must be in [0, 1)")
    return out


def _rectangles(rng, cfg, b, h, w):
  """(B, H, W) bool: True inside a random rectangle per row."""
  k_h, k_w, k_y, k_x = jax.random.split(rng, 4)
  frac = lambda k: jax.random.uniform(k, (b,), minval=cfg.min_size, maxval=cfg.max_size)
  rh = jnp.clip(jnp.round(frac(k_h) * h), 1, h).astype(jnp.int32)
  rw = jnp.clip(jnp.round(frac(k_w) * w), 1, w).astype(jnp.int32)
  y0 = jnp.floor(jax.random.uniform(k_y, (b,)) * (h - rh + 1)).astype(jnp.int32)
  x0 = jnp.floor(jax.random.uniform(k_x, (b,)) * (w - rw + 1)).astype(jnp.int32)
  ys, xs = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  col = lambda v: v[:, None, None]
  return ((ys >= col(y0)) & (ys < col(y0 + rh)) & (xs >= col(x0)) & (xs < col(x0 + rw)))


def _halves(rng, b, h, w):
  """(B, H, W) bool: True on a random half (0 left, 1 right, 2 top, 3 bottom) per row."""
  side = jax.random.randint(rng, (b,), 0, 4)[:, None, None]
  ys, xs = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  return jnp.select([side == 0, side == 1, side == 2],
                    [jnp.broadcast_to(xs < w // 2, (b, h, w)),
                     jnp.broadcast_to(xs >= w // 2, (b, h, w)),
                     jnp.broadcast_to(ys < h // 2, (b, h, w))],
                    jnp.broadcast_to(ys >= h // 2, (b, h, w)))


def random_masks(rng, cfg, b, h, w):
  """keep (B, H, W, 1) float32, 1 = known pixel (see the module docstring)."""
  k_rect, k_half, k_kind, k_blank = jax.random.split(rng, 4)
  if cfg.masks == "rectangle":
    hole = _rectangles(k_rect, cfg, b, h, w)
  elif cfg.masks == "half":
    hole = _halves(k_half, b, h, w)
  else:
    use_rect = jax.random.bernoulli(k_kind, 0.5, (b,))[:, None, None]
    hole = jnp.where(use_rect, _rectangles(k_rect, cfg, b, h, w), _halves(k_half, b, h, w))
  blank = jax.random.bernoulli(k_blank, cfg.blank_prob, (b,))[:, None, None]
  hole = hole | blank
  return (~hole).astype(jnp.float32)[..., None]
