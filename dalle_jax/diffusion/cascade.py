"""Conditioning a super-resolution stage on its low-resolution input, as pure functions.

Noise-conditioning augmentation (Imagen, DeepFloyd IF stage II): the (upsampled)
low-resolution image is noised to a level t_aug under an augmentation schedule,
  z = sqrt(abar_aug) x_lr + sqrt(1 - abar_aug) eps,
and t_aug is the stage's extra conditioning (IF passes it as `class_labels`
through a timestep embedding). Training draws a level per example, so the stage
learns to fix what the previous stage got wrong; sampling uses one fixed level
(IF: 250 of 1000 by default).

Blur augmentation (unCLIP's upsamplers): a separable Gaussian blur of the
conditioning image, its sigma drawn per example in training. `upsample_bicubic`
is unCLIP's resize of the low-res image to the stage's size.

`LowResConditioning` puts these together for a stage trained here: the full-size
image is downsampled to the stage's input size (`downsample`, antialiased
bicubic), blurred (training only, when switched on) or, instead of both, put through
the BSR degradation (diffusion/degradation.py; DALL·E 2's second upsampler), upsampled
back (bicubic), and noised at a random level in training or at a fixed level when
sampling.

Shapes: B batch, H height, W width, C channels, K blur taps, h/w low-res size.
"""
import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.diffusion import degradation as degradation_lib
from dalle_jax.diffusion import gaussian
from dalle_jax.diffusion.schedule import SchedulerConfig

def downsample(x_bhwc, size):
  """The stage's low-res input from a full-size image: an antialiased bicubic resize (the
  a = -0.5 cubic stretched over the reduction, as PIL's BICUBIC resize of a dataset image)."""
  h, w = (size, size) if isinstance(size, int) else size
  shape = (x_bhwc.shape[0], h, w, x_bhwc.shape[-1])
  return jax.image.resize(x_bhwc.astype(jnp.float32), shape, "bicubic", antialias=True)


def upsample_bicubic(x_bhwc, size):
  """unCLIP's (Karlo's) low-res upsampling: torch's interpolate(mode="bicubic", align_corners=False,
  antialias=True), i.e. the a = -0.5 cubic with weights renormalised at the borders, which is
  jax.image.resize's bicubic (IF's bilinear align_corners=True is convert/deepfloyd_if.py's)."""
  h, w = (size, size) if isinstance(size, int) else size
  shape = (x_bhwc.shape[0], h, w, x_bhwc.shape[-1])
  return jax.image.resize(x_bhwc.astype(jnp.float32), shape, "bicubic", antialias=True)


# IF stage II's `image_noising_scheduler`: DDPMScheduler(beta_schedule="squaredcos_cap_v2")
IF_NOISING = SchedulerConfig(beta_schedule="squaredcos_cap_v2")


class NoiseAugmentation:
  """q_sample of the conditioning image at a level in [0, max_level) of the augmentation
  schedule `cfg` (the stage's own, or a separate one as IF's); level 0 is the mildest noise."""

  def __init__(self, cfg: SchedulerConfig = IF_NOISING, max_level=None):
    self.diffusion = gaussian.Diffusion(cfg)
    n = cfg.num_train_timesteps
    self.max_level = n if max_level is None else max_level
    if not (isinstance(self.max_level, (int, np.integer)) and 1 <= self.max_level <= n):
      raise ValueError(f"max_level must be an int in [1, num_train_timesteps={n}], got {max_level!r}")

  def at_level(self, x_bhwc, level, noise_bhwc):
    """The image noised at `level` (an int for every row, or (B,) ints) -> (z, level_b int32)."""
    n = self.diffusion.num_timesteps
    if isinstance(level, (int, np.integer, np.ndarray)):  # (a traced level is the caller's to bound)
      bad = np.asarray(level)[(np.asarray(level) < 0) | (np.asarray(level) >= n)]
      if bad.size:
        raise ValueError(f"noise level {bad.ravel()[0]} must be in [0, {n}) "
                         "(the augmentation schedule's timesteps)")
    level_b = jnp.broadcast_to(jnp.asarray(level, jnp.int32), (x_bhwc.shape[0],))
    return self.diffusion.q_sample(x_bhwc.astype(jnp.float32), level_b, noise_bhwc), level_b

  def random(self, rng, x_bhwc):
    """Training: a level ~ U{0..max_level-1} and fresh noise per example -> (z, level_b int32)."""
    level_rng, noise_rng = jax.random.split(rng)
    level_b = jax.random.randint(level_rng, (x_bhwc.shape[0],), 0, self.max_level, jnp.int32)
    noise = jax.random.normal(noise_rng, x_bhwc.shape, jnp.float32)
    return self.at_level(x_bhwc, level_b, noise)


def gaussian_kernel(sigma, size):
  """Normalised taps exp(-k^2 / 2 sigma^2), k = -(size-1)/2 .. (size-1)/2: (size,) for a scalar
  sigma, (B, size) for sigma (B,)."""
  if not (isinstance(size, (int, np.integer)) and size >= 1 and size % 2 == 1):
    raise ValueError(f"blur kernel size must be an odd int >= 1, got {size!r}")
  k = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  sigma = jnp.asarray(sigma, jnp.float32)[..., None]
  w = jnp.exp(-0.5 * (k / sigma) ** 2)
  return w / jnp.sum(w, axis=-1, keepdims=True)


def gaussian_blur(x_bhwc, sigma, size=3):
  """Separable Gaussian blur over H and W with mirrored borders (a constant image stays constant);
  sigma a scalar or (B,) (one per example)."""
  r = size // 2
  w = gaussian_kernel(sigma, size)
  if w.ndim == 2 and w.shape[0] != x_bhwc.shape[0]:
    raise ValueError(f"blur sigma has {w.shape[0]} values for a batch of {x_bhwc.shape[0]}")
  if r and min(x_bhwc.shape[1:3]) <= r:
    raise ValueError(f"image {x_bhwc.shape[1:3]} too small for a {size}-tap blur")
  w_bk = jnp.broadcast_to(w, (x_bhwc.shape[0], size))
  x = x_bhwc.astype(jnp.float32)
  for axis in (1, 2):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = jnp.pad(x, pad, mode="reflect")
    n = x.shape[axis]
    taps = [jax.lax.slice_in_dim(xp, k, k + n, axis=axis) for k in range(size)]
    x = sum(w_bk[:, k].reshape((-1,) + (1,) * (x.ndim - 1)) * taps[k] for k in range(size))
  return x


def random_blur(rng, x_bhwc, sigma_range=(0.4, 0.6), size=3):
  """Training: gaussian_blur with sigma ~ U[sigma_range) per example."""
  lo, hi = sigma_range
  if not 0 < lo <= hi:
    raise ValueError(f"blur sigma_range must satisfy 0 < low <= high, got {sigma_range}")
  sigma = jax.random.uniform(rng, (x_bhwc.shape[0],), jnp.float32, lo, hi)
  return gaussian_blur(x_bhwc, sigma, size)


@dataclasses.dataclass(frozen=True)
class LowResConditioning:
  """What a super-resolution stage trained here is conditioned on (config.cascade).

  low_res_size: the stage's input size h (its output size H comes with the image). A stage
    that trains on crops of side H * f uses a copy with h * f (tasks/diffusion.py:
    crop_conditioning): each crop is its own low-res input, as the full image is at sampling.
  noise: the augmentation (None = the clean upsampled image, level 0).
  blur: blur the low-res image in training (unCLIP), sigma ~ U[blur_sigma), blur_size taps.
  bsr: a BsrDegradation making the low-res image in training (None: downsample + blur).
  """
  low_res_size: int
  noise: "NoiseAugmentation | None" = None
  blur: bool = False
  blur_sigma: Tuple[float, float] = (0.4, 0.6)
  blur_size: int = 3
  bsr: "degradation_lib.BsrDegradation | None" = None

  def _check_full(self, x_bhwc):
    if x_bhwc.shape[1] < self.low_res_size or x_bhwc.shape[2] < self.low_res_size:
      raise ValueError(f"image {x_bhwc.shape[1:3]} is smaller than the stage's low-res input "
                       f"size {self.low_res_size}")

  def low_res(self, x_bhwc):
    """Full-size images -> the stage's (B, h, h, C) input."""
    self._check_full(x_bhwc)
    return downsample(x_bhwc, self.low_res_size)

  def _check(self, low_res_bhwc):
    if tuple(low_res_bhwc.shape[1:3]) != (self.low_res_size,) * 2:
      raise ValueError(f"low-res image of size {tuple(low_res_bhwc.shape[1:3])}; this stage "
                       f"takes {self.low_res_size}x{self.low_res_size} (model.low_res_size)")

  def train(self, rng, x_bhwc):
    """Training: full-size x -> (conditioning image (B, H, W, C), level (B,) int32), the
    level drawn per example (0 without noise augmentation)."""
    k_blur, k_noise = jax.random.split(rng)
    if self.bsr is not None:  # it downsamples (with a random method) itself
      self._check_full(x_bhwc)
      lr = self.bsr(k_blur, x_bhwc, self.low_res_size)
    else:
      lr = self.low_res(x_bhwc)
      if self.blur:
        lr = random_blur(k_blur, lr, tuple(self.blur_sigma), self.blur_size)
    up = upsample_bicubic(lr, x_bhwc.shape[1:3])
    if self.noise is None:
      return up, jnp.zeros((x_bhwc.shape[0],), jnp.int32)
    return self.noise.random(k_noise, up)

  def sample(self, low_res_bhwc, size, level, noise_bhwc):
    """Sampling: the previous stage's (B, h, h, C) output -> (conditioning image at size,
    level (B,) int32) at the fixed `level` (ignored without noise augmentation)."""
    self._check(low_res_bhwc)
    up = upsample_bicubic(low_res_bhwc, size)
    if self.noise is None:
      return up, jnp.zeros((up.shape[0],), jnp.int32)
    if noise_bhwc.shape != up.shape:
      raise ValueError(f"noise of shape {noise_bhwc.shape}; the upsampled image is {up.shape}")
    return self.noise.at_level(up, level, noise_bhwc)
