"""Cascade conditioning: noise-conditioning augmentation against diffusers' add_noise with DeepFloyd
IF stage II's image_noising_scheduler, Gaussian blur against scipy, unCLIP's bicubic upsampling
against torch."""
import json
import math

import numpy as np
import pytest
from scipy import ndimage

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
torch.set_num_threads(1)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dalle_jax.diffusion import cascade, samplers, schedule  # noqa: E402
from dalle_jax.diffusion.schedule import SchedulerConfig  # noqa: E402
from tests.test_diffusion_samplers import _Float64  # noqa: E402

nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))
nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)


# --- noise-conditioning augmentation ----------------------------------------

def test_noise_augmentation_equals_if_pipelines_add_noise():
  """IF stage II noises the upsampled low-res image with image_noising_scheduler.add_noise at
  noise_level (250 by default) and passes the level as class_labels: same values and levels."""
  ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")  # IF's image_noising_scheduler
  cfg = SchedulerConfig.from_dict(json.loads(ref.to_json_string()))
  with pytest.MonkeyPatch.context() as m:  # its code in float64 (float32 drifts 5e-6 at level 250)
    module = diffusers.schedulers.scheduling_ddpm
    m.setattr(module, "torch", _Float64(torch))
    m.setattr(module, "np", _Float64(np))
    ref64 = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
  assert cfg == cascade.IF_NOISING
  aug = cascade.NoiseAugmentation()
  r = np.random.RandomState(0)
  x = r.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
  noise = r.randn(*x.shape).astype(np.float32)
  for level in (250, np.array([0, 1, 500, 999])):
    z, level_b = jax.jit(aug.at_level)(x, level, noise) if np.ndim(level) else aug.at_level(x, level, noise)
    levels = torch.from_numpy(np.broadcast_to(level, (4,)).copy()).long()
    want = ref64.add_noise(nchw(x).double(), nchw(noise).double(), levels)
    np.testing.assert_allclose(z, nhwc(want), atol=1e-6)
    np.testing.assert_allclose(z, nhwc(ref.add_noise(nchw(x), nchw(noise), levels)), atol=1e-5)
    np.testing.assert_array_equal(level_b, np.broadcast_to(level, (4,)))
    assert level_b.dtype == jnp.int32
  with pytest.raises(ValueError, match=r"noise level 1000 must be in \[0, 1000\)"):
    aug.at_level(x, 1000, noise)
  with pytest.raises(ValueError, match="noise level -1"):
    aug.at_level(x, np.array([3, -1, 0, 0]), noise)
  with pytest.raises(ValueError, match="max_level must be an int in \\[1, num_train_timesteps=1000\\]"):
    cascade.NoiseAugmentation(max_level=0)


def test_random_noise_augmentation_levels_and_marginals():
  """Training draws level ~ U{0..max_level-1} and fresh noise per example: every row of a constant
  image c is N(sqrt(abar) c, 1 - abar) at its own level (mean and std within 5 standard errors)."""
  aug = cascade.NoiseAugmentation(max_level=300)
  c = 0.7
  x = jnp.full((256, 8, 8, 3), c, jnp.float32)
  z, level = jax.jit(aug.random)(jax.random.PRNGKey(1), x)
  z, level = np.asarray(z), np.asarray(level)
  assert level.min() >= 0 and level.max() < 300 and len(np.unique(level)) > 150
  assert abs(level.mean() - 149.5) < 5 * 300 / math.sqrt(12 * 256)
  abar = schedule.alphas_cumprod(cascade.IF_NOISING)[level]
  n = z[0].size
  std = np.sqrt(1 - abar)
  np.testing.assert_array_less(np.abs(z.mean((1, 2, 3)) - np.sqrt(abar) * c), 5 * std / math.sqrt(n))
  np.testing.assert_array_less(np.abs(z.std((1, 2, 3)) / std - 1), 5 / math.sqrt(2 * n))


# --- blur ---------------------------------------------------------------------

def test_gaussian_blur_against_scipy_and_constants():
  r = np.random.RandomState(2)
  x = r.randn(3, 9, 7, 2).astype(np.float32)
  sigma = np.array([0.4, 0.6, 1.5], np.float32)
  for size in (3, 5):
    k = np.asarray(cascade.gaussian_kernel(sigma, size))
    assert k.shape == (3, size)
    np.testing.assert_allclose(k.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(k, k[:, ::-1], rtol=1e-6)  # symmetric
    got = np.asarray(jax.jit(lambda x, s: cascade.gaussian_blur(x, s, size))(x, sigma))
    for b in range(3):  # scipy's "mirror" = reflection about the edge pixel
      want = ndimage.gaussian_filter(x[b].astype(np.float64), sigma[b], mode="mirror", radius=size // 2,
                                     axes=(0, 1))
      np.testing.assert_allclose(got[b], want, atol=2e-6, err_msg=f"size={size} sigma={sigma[b]}")
    # a scalar sigma is every row's
    np.testing.assert_allclose(cascade.gaussian_blur(x, 0.6, size)[1], got[1], atol=1e-7)
  const = np.full((2, 6, 5, 3), -0.37, np.float32)
  np.testing.assert_allclose(cascade.gaussian_blur(const, 0.9, 5), const, atol=1e-7)
  with pytest.raises(ValueError, match="odd int"):
    cascade.gaussian_kernel(0.6, 4)
  with pytest.raises(ValueError, match="3 values for a batch of 2"):
    cascade.gaussian_blur(const, sigma, 3)
  with pytest.raises(ValueError, match="too small for a 5-tap blur"):
    cascade.gaussian_blur(const[:, :2], 0.6, 5)


def test_random_blur_sigma_per_example_in_range():
  """A centred impulse keeps w_0(sigma) at its centre, decreasing in sigma: each row's lies between
  the blurs at the range's ends, and the rows differ."""
  x = np.zeros((64, 5, 5, 1), np.float32)
  x[:, 2, 2] = 1.0
  got = np.asarray(cascade.random_blur(jax.random.PRNGKey(3), x, (0.4, 0.8)))[:, 2, 2, 0]
  hi = float(cascade.gaussian_blur(x[:1], 0.4)[0, 2, 2, 0])
  lo = float(cascade.gaussian_blur(x[:1], 0.8)[0, 2, 2, 0])
  assert np.all((got > lo) & (got < hi)) and got.std() > 0.1 * (hi - lo), (lo, hi, got)
  with pytest.raises(ValueError, match="sigma_range"):
    cascade.random_blur(jax.random.PRNGKey(3), x, (0.0, 0.5))


def test_upsample_bicubic_equals_unclip_pipelines_interpolate():
  """UnCLIPPipeline upsamples the decoder's image with F.interpolate(bicubic, align_corners=False,
  antialias=True) before the super-resolution stages."""
  x = np.random.RandomState(4).uniform(-1, 1, (2, 8, 6, 3)).astype(np.float32)
  for size in (32, (16, 24), 8):
    hw = [size, size] if isinstance(size, int) else list(size)
    want = torch.nn.functional.interpolate(nchw(x), size=hw, mode="bicubic", align_corners=False,
                                           antialias=True)
    got = cascade.upsample_bicubic(x, size)
    assert got.shape == (2, *hw, 3)
    np.testing.assert_allclose(got, nhwc(want), atol=1e-6, err_msg=str(size))
