"""BSR-style degradation of a super-resolution stage's low-res input (DALL·E 2's 256 -> 1024
upsampler, appendix C: "a more diverse BSR degradation" than the first stage's blur).

The degradation model of BSRGAN (Zhang et al. 2021) strings random blurs, a random resize,
Gaussian noise and JPEG compression. Here it is a jit-able function of a key, with every
random choice drawn per example and static shapes throughout:

  1. blur the full-size image (probability blur_prob): a Gaussian kernel of blur_size taps,
     isotropic or, with probability aniso_prob, anisotropic (sigma_x, sigma_y, rotation);
  2. downsample to the stage's input size with a per-example method (antialiased bicubic,
     antialiased bilinear or nearest);
  3. a second blur and Gaussian noise (noise_prob; sigma ~ U[noise_sigma] of the [0, 1]
     range, grey with probability gray_noise_prob) in a per-example order;
  4. JPEG (jpeg_prob; quality ~ U{jpeg_quality}): 8-bit YCbCr, 4:2:0 chroma subsampling,
     8x8 orthonormal DCT, the standard quantisation tables scaled by quality as libjpeg
     does, 8-bit output. Only the entropy coding, which is lossless, is left out, so it
     decodes what libjpeg's encoder + decoder would (tests/test_degradation.py: against
     PIL's JPEG).

BSRGAN also shuffles the resize among the blurs and resizes to random intermediate sizes;
here the resize goes to the stage's size in one step (shapes must stay static under jit).

Shapes: B batch, H/W full size, h/w low-res size, C = 3 channels, K kernel taps, by/bx the
8x8 block rows/columns. Images in [-1, 1].
"""
import dataclasses
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

# ITU T.81 annex K.1: the example luminance and chrominance quantisation tables (row-major),
# which libjpeg scales by its quality setting.
_LUMA_Q = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    np.float32).reshape(8, 8)
_CHROMA_Q = np.array([
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32,
    np.float32).reshape(8, 8)
RESIZE_METHODS = ("bicubic", "bilinear", "nearest")


def dct_matrix(n=8):
  """The orthonormal DCT-II matrix D (n, n): coefficients = D @ block @ D.T (JPEG's FDCT)."""
  k = np.arange(n)[:, None]
  d = np.cos((2 * np.arange(n)[None, :] + 1) * k * np.pi / (2 * n)) * np.sqrt(2.0 / n)
  d[0] /= np.sqrt(2.0)
  return d.astype(np.float32)


def quant_tables(quality):
  """libjpeg's quality scaling of the annex K tables: quality (B,) in [1, 100] ->
  (luma (B, 8, 8), chroma (B, 8, 8)), entries in [1, 255]."""
  q = jnp.clip(jnp.asarray(quality, jnp.float32), 1, 100)
  scale = jnp.where(q < 50, jnp.floor(5000 / q), 200 - 2 * q)[:, None, None]
  def scaled(t):
    return jnp.clip(jnp.floor((t * scale + 50) / 100), 1, 255)
  return scaled(jnp.asarray(_LUMA_Q)), scaled(jnp.asarray(_CHROMA_Q))


def _rgb_to_ycbcr(x):  # JFIF, on [0, 255]
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  y = 0.299 * r + 0.587 * g + 0.114 * b
  cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
  cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
  return jnp.stack([y, cb, cr], -1)


def _ycbcr_to_rgb(x):
  y, cb, cr = x[..., 0], x[..., 1] - 128, x[..., 2] - 128
  return jnp.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)


def _pad_to(x_bhwc, multiple):
  """Edge-replicate the bottom/right to a multiple of `multiple` (as libjpeg pads its MCUs)."""
  h, w = x_bhwc.shape[1:3]
  ph, pw = -h % multiple, -w % multiple
  return jnp.pad(x_bhwc, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")


def _quantise_blocks(p_bhwc, table_bkkc):
  """Level-shifted planes (B, 8by, 8bx, c) -> the same after DCT, quantisation by
  table (B, 8, 8, c) (round half away from zero, as libjpeg) and inverse DCT."""
  b, h, w, c = p_bhwc.shape
  d = jnp.asarray(dct_matrix())
  blocks = p_bhwc.reshape(b, h // 8, 8, w // 8, 8, c)
  coef = jnp.einsum("ux,bixjyc,vy->biujvc", d, blocks, d)
  t = table_bkkc[:, None, :, None, :, :]
  q = jnp.sign(coef) * jnp.floor(jnp.abs(coef) / t + 0.5) * t
  return jnp.einsum("ux,biujvc,vy->bixjyc", d, q, d).reshape(b, h, w, c)


def jpeg(x_bhwc, quality, subsample=True):
  """JPEG compression + decompression of images in [-1, 1]: quality (B,) -> (B, H, W, 3)
  in [-1, 1] on the 8-bit grid. subsample: 4:2:0 chroma (libjpeg's and PIL's default),
  else 4:4:4."""
  if x_bhwc.shape[-1] != 3:
    raise ValueError(f"jpeg takes RGB images (B, H, W, 3), got shape {x_bhwc.shape}")
  b, h, w, _ = x_bhwc.shape
  rgb = jnp.round(jnp.clip((x_bhwc.astype(jnp.float32) + 1) * 127.5, 0, 255))
  ycc = jnp.clip(jnp.round(_rgb_to_ycbcr(rgb)), 0, 255)
  luma_t, chroma_t = quant_tables(quality)
  m = 16 if subsample else 8
  ycc = _pad_to(ycc, m)
  y = _quantise_blocks(ycc[..., :1] - 128, luma_t[..., None]) + 128
  chroma = ycc[..., 1:]
  if subsample:  # 2x2 means, then libjpeg's "fancy" (triangle) upsampling
    hp, wp = chroma.shape[1] // 2, chroma.shape[2] // 2
    chroma = chroma.reshape(b, hp, 2, wp, 2, 2).mean(axis=(2, 4))
    chroma = _quantise_blocks(chroma - 128, jnp.stack([chroma_t] * 2, -1)) + 128
    hh, ww = (h + 1) // 2, (w + 1) // 2  # the chroma planes' own size
    chroma = jax.image.resize(chroma[:, :hh, :ww], (b, 2 * hh, 2 * ww, 2), "linear",
                              antialias=False)
  else:
    chroma = _quantise_blocks(chroma - 128, jnp.stack([chroma_t] * 2, -1)) + 128
  ycc = jnp.concatenate([y[:, :h, :w], chroma[:, :h, :w]], -1)
  out = jnp.clip(jnp.round(_ycbcr_to_rgb(jnp.clip(jnp.round(ycc), 0, 255))), 0, 255)
  return out / 127.5 - 1


def gaussian_kernel_2d(sigma_x, sigma_y, theta, size):
  """Normalised 2-D Gaussian taps (B, K, K) with per-example standard deviations sigma_x,
  sigma_y (B,) along axes rotated by theta (B,) radians from the image's x axis."""
  if not (isinstance(size, (int, np.integer)) and size >= 1 and size % 2 == 1):
    raise ValueError(f"blur kernel size must be an odd int >= 1, got {size!r}")
  k = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  yy, xx = jnp.meshgrid(k, k, indexing="ij")
  c, s = jnp.cos(theta)[:, None, None], jnp.sin(theta)[:, None, None]
  u = c * xx + s * yy  # coordinates along the rotated axes
  v = -s * xx + c * yy
  w = jnp.exp(-0.5 * ((u / sigma_x[:, None, None]) ** 2 + (v / sigma_y[:, None, None]) ** 2))
  return w / jnp.sum(w, axis=(1, 2), keepdims=True)


def blur_2d(x_bhwc, kernel_bkk):
  """Each image convolved with its own kernel (mirrored borders, same size)."""
  size = kernel_bkk.shape[-1]
  r = size // 2
  if r and min(x_bhwc.shape[1:3]) <= r:
    raise ValueError(f"image {x_bhwc.shape[1:3]} too small for a {size}-tap blur")
  xp = jnp.pad(x_bhwc.astype(jnp.float32), ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
  ch = x_bhwc.shape[-1]

  def one(img_hwc, k_kk):
    rhs = jnp.broadcast_to(k_kk[:, :, None, None], (size, size, 1, ch))
    return jax.lax.conv_general_dilated(img_hwc[None], rhs, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=ch)[0]
  return jax.vmap(one)(xp, kernel_bkk)


@dataclasses.dataclass(frozen=True)
class BsrDegradation:
  """The random degradation (module docstring); sigmas of blurs in pixels of the image they
  apply to, noise_sigma in units of the [0, 1] range (BSRGAN's 2/255 .. 25/255)."""
  blur_prob: float = 0.5
  blur_sigma: Tuple[float, float] = (0.2, 2.8)
  aniso_prob: float = 0.5
  blur_size: int = 15
  noise_prob: float = 0.8
  noise_sigma: Tuple[float, float] = (2 / 255, 25 / 255)
  gray_noise_prob: float = 0.4
  jpeg_prob: float = 0.9
  jpeg_quality: Tuple[int, int] = (30, 95)

  def __post_init__(self):
    for name in ("blur_prob", "aniso_prob", "noise_prob", "gray_noise_prob", "jpeg_prob"):
      p = getattr(self, name)
      if not 0 <= p <= 1:
        raise ValueError(f"bsr {name}={p} must be a probability in [0, 1]")
    lo, hi = self.blur_sigma
    if not 0 < lo <= hi:
      raise ValueError(f"bsr blur_sigma={self.blur_sigma} must satisfy 0 < low <= high")
    lo, hi = self.noise_sigma
    if not 0 <= lo <= hi:
      raise ValueError(f"bsr noise_sigma={self.noise_sigma} must satisfy 0 <= low <= high")
    lo, hi = self.jpeg_quality
    if not 1 <= lo <= hi <= 100:
      raise ValueError(f"bsr jpeg_quality={self.jpeg_quality} must satisfy 1 <= low <= high "
                       "<= 100")
    if not (isinstance(self.blur_size, (int, np.integer)) and self.blur_size % 2 == 1):
      raise ValueError(f"bsr blur_size={self.blur_size!r} must be an odd int")

  def check_size(self, low_res_size):
    """The smallest input the blurs fit (their mirrored borders): named, before tracing."""
    if low_res_size <= self.blur_size // 2:
      raise ValueError(f"low-res size {low_res_size} is too small for the BSR degradation's "
                       f"{self.blur_size}-tap blur (needs > {self.blur_size // 2})")

  def _random_blur(self, rng, x_bhwc):
    if not self.blur_prob:  # (a switched-off step is not traced at all)
      return x_bhwc
    b = x_bhwc.shape[0]
    k_on, k_iso, k_sx, k_sy, k_theta = jax.random.split(rng, 5)
    lo, hi = self.blur_sigma
    sx = jax.random.uniform(k_sx, (b,), jnp.float32, lo, hi)
    aniso = jax.random.bernoulli(k_iso, float(self.aniso_prob), (b,))
    sy = jnp.where(aniso, jax.random.uniform(k_sy, (b,), jnp.float32, lo, hi), sx)
    theta = jax.random.uniform(k_theta, (b,), jnp.float32, 0, math.pi)
    blurred = blur_2d(x_bhwc, gaussian_kernel_2d(sx, sy, theta, self.blur_size))
    on = jax.random.bernoulli(k_on, float(self.blur_prob), (b, 1, 1, 1))
    return jnp.where(on, blurred, x_bhwc)

  def _random_noise(self, rng, x_bhwc):
    if not self.noise_prob:
      return x_bhwc
    b = x_bhwc.shape[0]
    k_on, k_sigma, k_gray, k_eps = jax.random.split(rng, 4)
    lo, hi = self.noise_sigma
    sigma = 2 * jax.random.uniform(k_sigma, (b, 1, 1, 1), jnp.float32, lo, hi)  # [-1, 1] units
    eps = jax.random.normal(k_eps, x_bhwc.shape, jnp.float32)
    gray = jax.random.bernoulli(k_gray, float(self.gray_noise_prob), (b, 1, 1, 1))
    eps = jnp.where(gray, eps[..., :1], eps)  # one value for every channel
    on = jax.random.bernoulli(k_on, float(self.noise_prob), (b, 1, 1, 1))
    return jnp.where(on, x_bhwc + sigma * eps, x_bhwc)

  def _random_resize(self, rng, x_bhwc, size):
    shape = (x_bhwc.shape[0], size, size, x_bhwc.shape[-1])
    outs = jnp.stack([jax.image.resize(x_bhwc, shape, "cubic", antialias=True),
                      jax.image.resize(x_bhwc, shape, "linear", antialias=True),
                      jax.image.resize(x_bhwc, shape, "nearest")])
    pick = jax.random.randint(rng, (x_bhwc.shape[0],), 0, len(RESIZE_METHODS))
    return jnp.take_along_axis(outs, pick[None, :, None, None, None], axis=0)[0]

  def __call__(self, rng, x_bhwc, size):
    """Full-size images (B, H, W, 3) in [-1, 1] -> degraded low-res (B, size, size, 3)."""
    self.check_size(size)
    k_blur1, k_resize, k_blur2, k_noise, k_order, k_jpeg, k_q = jax.random.split(rng, 7)
    b = x_bhwc.shape[0]
    x = self._random_blur(k_blur1, x_bhwc.astype(jnp.float32))
    x = self._random_resize(k_resize, x, size)
    out = self._random_noise(k_noise, self._random_blur(k_blur2, x))
    if self.blur_prob and self.noise_prob:  # the two in a per-example order
      noise_first = self._random_blur(k_blur2, self._random_noise(k_noise, x))
      swap = jax.random.bernoulli(k_order, 0.5, (b, 1, 1, 1))
      out = jnp.where(swap, noise_first, out)
    x = jnp.clip(out, -1, 1)
    if not self.jpeg_prob:
      return x
    lo, hi = self.jpeg_quality
    quality = jax.random.randint(k_q, (b,), lo, hi + 1)
    on = jax.random.bernoulli(k_jpeg, float(self.jpeg_prob), (b, 1, 1, 1))
    return jnp.where(on, jpeg(x, quality), x)
