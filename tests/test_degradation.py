"""BSR degradation (dalle_jax/diffusion/degradation.py): JPEG against PIL's libjpeg, the
anisotropic blur against scipy, the random degradation's contract, and its config wiring
into an SR stage (config.cascade.bsr)."""
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from dalle_jax.configs import unclip as unclip_configs
from dalle_jax.diffusion import degradation as dg
from dalle_jax.tasks import diffusion as diffusion_task


def _textured(h, w, seed=0):
  """A smooth pattern + pixel noise on the 8-bit grid (uint8 (h, w, 3))."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  img = np.stack([128 + 100 * np.sin(xx / 7 + c) * np.cos(yy / 5 - c) for c in range(3)], -1)
  return np.clip(np.round(img + rng.normal(0, 12, (h, w, 3))), 0, 255).astype(np.uint8)


def _pil_jpeg(img, quality, subsampling):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
  return Image.open(buf)


def _ours(img, quality, subsample):
  x = jnp.asarray(img[None] / 127.5 - 1, jnp.float32)
  return (np.asarray(dg.jpeg(x, jnp.array([quality]), subsample=subsample))[0] + 1) * 127.5


@pytest.mark.parametrize("quality", [10, 30, 50, 75, 100])
def test_quant_tables_are_libjpegs(quality):
  """The scaled tables equal the ones PIL's libjpeg writes into the file (natural order)."""
  tables = _pil_jpeg(np.zeros((8, 8, 3), np.uint8), quality, 0).quantization
  luma, chroma = dg.quant_tables(jnp.array([quality]))
  np.testing.assert_array_equal(np.asarray(luma[0]), np.reshape(tables[0], (8, 8)))
  np.testing.assert_array_equal(np.asarray(chroma[0]), np.reshape(tables[1], (8, 8)))


@pytest.mark.parametrize("quality,subsampling,shape,mean_tol,max_tol", [
    (20, 0, (40, 56), 0.1, 3),  # 4:4:4: what libjpeg decodes, up to its integer DCT
    (50, 0, (40, 56), 0.35, 6),
    (30, 2, (40, 56), 1.2, 40),  # 4:2:0: libjpeg's integer chroma means / upsampling
    (75, 2, (21, 27), 1.5, 40),  # odd size: MCU padding and the chroma planes' own size
])
def test_jpeg_decodes_what_pil_decodes(quality, subsampling, shape, mean_tol, max_tol):
  img = _textured(*shape)
  ref = np.asarray(_pil_jpeg(img, quality, subsampling).convert("RGB"), np.float64)
  ours = _ours(img, quality, subsample=subsampling == 2)
  assert ours.shape == img.shape
  np.testing.assert_allclose(ours, np.round(ours), atol=1e-3)  # the 8-bit grid
  err = np.abs(ours - ref)
  compression = np.abs(img - ref).mean()  # what JPEG changed: > 5 levels here
  assert compression > 5
  assert err.mean() < mean_tol and err.mean() < 0.2 * compression, (err.mean(), compression)
  assert err.max() <= max_tol


def test_anisotropic_kernel_and_blur_match_scipy():
  sx, sy, theta = 1.7, 0.6, 0.9
  k = np.asarray(dg.gaussian_kernel_2d(jnp.array([sx]), jnp.array([sy]), jnp.array([theta]),
                                       15))[0]
  # the density of N(0, R diag(sx^2, sy^2) R^T) on the integer grid, (x, y) = (column, row)
  r = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  inv = np.linalg.inv(r @ np.diag([sx ** 2, sy ** 2]) @ r.T)
  yy, xx = np.mgrid[-7:8, -7:8]
  p = np.stack([xx, yy], -1)
  ref = np.exp(-0.5 * np.einsum("...i,ij,...j->...", p, inv, p))
  ref /= ref.sum()
  np.testing.assert_allclose(k, ref, atol=1e-7)
  img = np.random.default_rng(1).uniform(-1, 1, (20, 24, 3)).astype(np.float32)
  out = np.asarray(dg.blur_2d(jnp.asarray(img[None]), jnp.asarray(k[None])))[0]
  want = np.stack([ndimage.correlate(img[..., c], ref, mode="mirror") for c in range(3)], -1)
  np.testing.assert_allclose(out, want, atol=1e-5)


def _image_batch(b=6, size=32):
  x = np.stack([_textured(size, size, seed=i) for i in range(b)]) / 127.5 - 1
  return jnp.asarray(x, jnp.float32)


def test_degradation_is_random_per_example_and_reproducible():
  x = _image_batch()
  deg = jax.jit(dg.BsrDegradation(), static_argnums=2)
  a, b = deg(jax.random.PRNGKey(0), x, 16), deg(jax.random.PRNGKey(0), x, 16)
  c = deg(jax.random.PRNGKey(1), x, 16)
  assert a.shape == (6, 16, 16, 3) and float(jnp.abs(a).max()) <= 1
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(jnp.abs(a - c).mean()) > 0.01
  # every example degraded differently from the plain bicubic downsample
  plain = jax.image.resize(x, (6, 16, 16, 3), "cubic", antialias=True)
  per_example = np.asarray(jnp.abs(a - plain).mean(axis=(1, 2, 3)))
  assert (per_example > 1e-3).all() and per_example.std() > 1e-3, per_example


def test_only_the_resize_is_one_of_three_methods():
  """With every other step switched off each example is one of the three downsamples, and
  over a batch of 32 all three occur."""
  off = dg.BsrDegradation(blur_prob=0, noise_prob=0, jpeg_prob=0)
  x = _image_batch(32, 16)
  y = np.asarray(off(jax.random.PRNGKey(3), x, 8))
  shape = (32, 8, 8, 3)
  methods = [np.asarray(jax.image.resize(x, shape, "cubic", antialias=True)),
             np.asarray(jax.image.resize(x, shape, "linear", antialias=True)),
             np.asarray(jax.image.resize(x, shape, "nearest"))]
  which = [[i for i, m in enumerate(methods) if np.allclose(y[n], np.clip(m[n], -1, 1),
                                                            atol=1e-6)] for n in range(32)]
  assert all(len(w) == 1 for w in which), which
  assert {w[0] for w in which} == {0, 1, 2}


def test_noise_levels_and_grey_noise():
  """Noise alone on a flat grey image: each example's std lies in 2 x noise_sigma (the
  [-1, 1] range), grey noise (same value in every channel) for about gray_noise_prob."""
  deg = dg.BsrDegradation(blur_prob=0, noise_prob=1, jpeg_prob=0, noise_sigma=(0.02, 0.08))
  x = jnp.zeros((64, 32, 32, 3))
  y = np.asarray(deg(jax.random.PRNGKey(4), x, 32))
  std = y.reshape(64, -1).std(axis=1)
  assert ((std > 0.04 * 0.85) & (std < 0.16 * 1.15)).all(), std
  grey = np.abs(y - y[..., :1]).max(axis=(1, 2, 3)) == 0
  assert 10 <= grey.sum() <= 45  # 0.4 of 64, binomial


def test_bad_settings_and_sizes_are_named():
  with pytest.raises(ValueError, match="bsr jpeg_prob=1.5 must be a probability"):
    dg.BsrDegradation(jpeg_prob=1.5)
  with pytest.raises(ValueError, match=r"bsr jpeg_quality=\(0, 90\)"):
    dg.BsrDegradation(jpeg_quality=(0, 90))
  with pytest.raises(ValueError, match="low-res size 6 is too small for the BSR"):
    dg.BsrDegradation()(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), 6)
  with pytest.raises(ValueError, match=r"jpeg takes RGB images"):
    dg.jpeg(jnp.zeros((1, 8, 8, 1)), jnp.array([50]))


def test_sr_stage_with_bsr():
  """config.cascade.bsr: the stage's training input is the degraded low-res image, bicubically
  upsampled; the paper's preset has it; clashes and sizes are one-line errors naming keys."""
  c = unclip_configs.get_config("shapes_sr32")
  c.cascade.blur, c.cascade.bsr = False, True
  sr = diffusion_task.low_res_conditioning(c)
  assert sr.bsr == dg.BsrDegradation()
  # (a lighter degradation for the exact check: the same code path, less to compile)
  sr = dataclasses.replace(sr, bsr=dg.BsrDegradation(blur_prob=0, jpeg_prob=0))
  x = _image_batch(4, 32)
  up, level = jax.jit(sr.train)(jax.random.PRNGKey(0), x)
  assert up.shape == x.shape and not np.asarray(level).any()
  low = sr.bsr(jax.random.split(jax.random.PRNGKey(0))[0], x, 16)
  np.testing.assert_allclose(
      np.asarray(up), np.asarray(jax.image.resize(low, x.shape, "cubic", antialias=True)),
      atol=1e-5)
  c.cascade.blur = True
  with pytest.raises(ValueError, match="config.cascade.bsr and config.cascade.blur are "):
    diffusion_task.low_res_conditioning(c)
  c.cascade.blur, c.model.low_res_size = False, 4
  with pytest.raises(ValueError, match="config.model.low_res_size=4 is too small for "
                                       "config.cascade.bsr"):
    diffusion_task.low_res_conditioning(c)
  c.model.low_res_size, c.data.crop_size = 16, 8  # the crop's low-res side: 4
  with pytest.raises(ValueError, match="config.data.crop_size=8: the crop's low-res side 4"):
    diffusion_task.crop_conditioning(c, diffusion_task.low_res_conditioning(c))
  paper = unclip_configs.get_config("unclip_sr1024")
  assert diffusion_task.crop_conditioning(paper, diffusion_task.low_res_conditioning(paper)
                                          ).bsr is not None
