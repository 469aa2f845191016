"""The unclip sampler against diffusers' UnCLIPScheduler (Karlo's prior, decoder and super-resolution
schedulers), step by step as UnCLIPPipeline drives it; Karlo's scheduler configs through from_dict;
inpainting by replacement (DALL-E 2's edits) on closed-form Gaussian denoisers; spherical interpolation.

Same approach as test_diffusion_samplers: a fixed smooth "denoiser" evaluated in numpy for both
sides, the reference run in float64 (its module's float32 read as float64) and as shipped, the same
per-step noise (ours: fold_in(rng, i); diffusers': a patched randn_tensor), every step compared,
then the compiled `sample` loop against the float64 trajectory.
"""
import functools
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
torch.set_num_threads(1)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dalle_jax.diffusion import interpolation, samplers, schedule  # noqa: E402
from dalle_jax.diffusion.schedule import SchedulerConfig  # noqa: E402
from tests.test_diffusion_samplers import _Float64  # noqa: E402

TOL = 1e-5  # ours (float32) vs diffusers' code in float64
# vs diffusers as shipped (float32): its last step's x0 coefficient beta_0 / (1 - abar_0) is
# 0.99947, not 1 (1 - abar_0 = 4.1e-5 cancels in float32), so the prior's +-5 ends 2.6e-3 short
TOL_F32 = 1e-3
RNG = jax.random.PRNGKey(17)
_MODULE = diffusers.schedulers.scheduling_unclip

# Karlo's three scheduler_config.json files (kakaobrain/karlo-v1-alpha, written by diffusers 0.12):
# no beta_schedule key, so the class default (the cosine schedule) applies.
KARLO_PRIOR = {"_class_name": "UnCLIPScheduler", "_diffusers_version": "0.12.0.dev0", "clip_sample": True,
               "clip_sample_range": 5.0, "num_train_timesteps": 1000, "prediction_type": "sample",
               "variance_type": "fixed_small_log"}
KARLO_DECODER = dict(KARLO_PRIOR, clip_sample_range=1.0, prediction_type="epsilon",
                     variance_type="learned_range")
KARLO_SUPER_RES = dict(KARLO_PRIOR, clip_sample_range=1.0, prediction_type="epsilon")


class Model:
  """x0_hat = scale tanh(x M + b(t)) over the last axis (any rank: (B, E) prior embeddings or
  (B, H, W, C) images), as eps or x0 with the reference's alphas_cumprod, plus a variance half."""

  def __init__(self, cfg, abar, channels, scale, seed):
    r = np.random.RandomState(seed)
    self.c, self.learned = channels, cfg.learned_variance
    n_out = 2 * channels if self.learned else channels
    # d x0_hat / dx as test_diffusion_samplers' ToyModel's whatever the width and scale (~1): float32
    # rounding is not amplified along a trajectory (the bias alone drives x0_hat past a clip range)
    self.m = (r.randn(channels, n_out) * 0.7 * np.sqrt(3 / channels) * 1.4 / scale).astype(np.float32)
    self.f = r.uniform(0.5, 3.0, n_out).astype(np.float32)
    self.abar, self.scale, self.prediction_type = np.asarray(abar, np.float64), scale, cfg.prediction_type

  def __call__(self, x, t, xp=np):
    col = lambda a: a.reshape(a.shape + (1,) * (x.ndim - 1))
    h = xp.tanh(x @ self.m + xp.sin(col(xp.asarray(t, xp.float32)) / 1000.0 * self.f * 6.0))
    x0 = self.scale * h[..., :self.c]
    a = col(xp.asarray(self.abar, xp.float32)[xp.asarray(t)])
    out = x0 if self.prediction_type == "sample" else (x - xp.sqrt(a) * x0) / xp.sqrt(1.0 - a)
    if self.learned:
      out = xp.concatenate([out, h[..., self.c:]], axis=-1)
    return out.astype(xp.float32)

  def jax_fn(self, x, t):
    return self(x, t, xp=jnp)


def _channels_first(a):
  return a if a.ndim == 2 else a.transpose(0, 3, 1, 2)


def _channels_last(a):
  return a if a.ndim == 2 else a.transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def _noises(shape, steps):
  draw = lambda i: jax.random.normal(jax.random.fold_in(RNG, i), shape, jnp.float32)
  return np.asarray(jax.jit(jax.vmap(draw))(jnp.arange(steps)))


def _reference(d, float64, monkeypatch):
  with monkeypatch.context() as m:
    if float64:
      m.setattr(_MODULE, "torch", _Float64(torch))
      m.setattr(_MODULE, "np", _Float64(np))
    return diffusers.UnCLIPScheduler.from_config(d)


def _reference_step(ref, float64, out, t, x, prev_t, noise, monkeypatch):
  dtype = torch.float64 if float64 else torch.float32
  tt = lambda a: torch.from_numpy(np.array(_channels_first(a))).to(dtype)
  with monkeypatch.context() as m:
    if float64:
      m.setattr(_MODULE, "torch", _Float64(torch))
      m.setattr(_MODULE, "np", _Float64(np))
    m.setattr(_MODULE, "randn_tensor", lambda *a, **k: tt(noise))
    y = ref.step(tt(out), int(t), tt(x), prev_timestep=prev_t).prev_sample
  return _channels_last(y.numpy())


def _run_case(d, shape, steps, scale, monkeypatch, seed=0):
  cfg = SchedulerConfig.from_dict(d)
  plan = samplers.make_plan(cfg, "unclip", steps)
  x_T = np.random.RandomState(seed + 1).randn(*shape).astype(np.float32)
  noises = _noises(shape, steps)
  model, x_ref, worst = None, {}, {}
  for f64, tol in ((True, TOL), (False, TOL_F32)):
    ref = _reference(d, f64, monkeypatch)
    ref.set_timesteps(steps)
    ts = ref.timesteps.numpy()
    np.testing.assert_array_equal(np.asarray(plan["t"]), ts)
    if model is None:
      model = Model(cfg, ref.alphas_cumprod.numpy(), shape[-1], scale, seed)
    x = x_T.astype(np.float64 if f64 else np.float32)
    worst[f64] = 0.0
    for i, t in enumerate(ts):
      tb = np.full((shape[0],), t, np.int32)
      out = model(x.astype(np.float32), tb)
      p = jax.tree.map(lambda a: a[i], plan)
      ours, _ = samplers.ddpm_step(cfg, p, jnp.asarray(x, jnp.float32), jnp.asarray(out),
                                   jnp.asarray(noises[i]))
      prev_t = None if i + 1 == len(ts) else ts[i + 1]  # as UnCLIPPipeline passes it
      x = _reference_step(ref, f64, out, t, x, prev_t, noises[i], monkeypatch)
      err = float(np.abs(np.asarray(ours) - x).max() / max(1.0, np.abs(x).max()))
      assert np.all(np.isfinite(x)) and err < tol, (i, int(t), f64, err)
      worst[f64] = max(worst[f64], err)
    x_ref[f64] = x
  x_loop = jax.jit(lambda x: samplers.sample(model.jax_fn, cfg, x, sampler="unclip", steps=steps,
                                             rng=RNG))(jnp.asarray(x_T))
  loop_err = float(np.abs(np.asarray(x_loop) - x_ref[True]).max() / max(1.0, np.abs(x_ref[True]).max()))
  print(f"unclip {shape} steps={steps}: one step f64 {worst[True]:.1e} f32 {worst[False]:.1e}, "
        f"loop {loop_err:.1e}")
  assert loop_err < TOL, loop_err
  return x_ref[True]


@pytest.mark.parametrize("name,d,shape,steps,scale", [
    # the prior: x0 ("sample") predictions of 16-d embeddings reaching +-7, clipped to +-5
    ("prior", KARLO_PRIOR, (3, 16), 25, 7.0),
    ("decoder", KARLO_DECODER, (2, 4, 4, 3), 10, 1.4),  # learned_range, clip to +-1
    ("super_res", KARLO_SUPER_RES, (2, 4, 4, 3), 7, 1.4),  # fixed_small_log
    # every timestep visited: beta from the table, not 1 - abar_t / abar_prev
    ("adjacent", dict(KARLO_DECODER, num_train_timesteps=20), (2, 4, 4, 3), 20, 1.4),
    # 999 -> 0 in one step: x0 predictions (an eps model's x0 at abar_999 = 2.4e-9 is float32 noise)
    ("two_steps", dict(KARLO_SUPER_RES, prediction_type="sample"), (2, 4, 4, 3), 2, 1.4),
])
def test_unclip_matches_diffusers(name, d, shape, steps, scale, monkeypatch):
  x = _run_case(d, shape, steps, scale, monkeypatch, seed=len(name))
  if name == "prior":  # the last step returns the clipped x0: clipping acted
    assert np.abs(x).max() == pytest.approx(5.0)


def test_karlo_configs_and_unclip_timesteps():
  prior = SchedulerConfig.from_dict(KARLO_PRIOR)
  assert (prior.beta_schedule, prior.prediction_type, prior.variance_type, prior.clip_sample_range) == (
      "squaredcos_cap_v2", "sample", "fixed_small_log", 5.0)
  ref = diffusers.UnCLIPScheduler.from_config(KARLO_DECODER)
  np.testing.assert_allclose(schedule.alphas_cumprod(SchedulerConfig.from_dict(KARLO_DECODER)),
                             ref.alphas_cumprod.numpy(), rtol=2e-5)
  assert SchedulerConfig.from_dict(KARLO_DECODER).variance_type == "learned_range"
  assert schedule.native_sampler(KARLO_PRIOR) == "unclip"
  assert schedule.native_sampler(json.loads(diffusers.DDIMScheduler().to_json_string())) == "ddim"
  assert schedule.native_sampler({}) is None
  # an older DPM-Solver config without timestep_spacing takes the class default (linspace)
  old_dpm = SchedulerConfig.from_dict({"_class_name": "DPMSolverMultistepScheduler"})
  assert old_dpm.timestep_spacing == "linspace"
  for n, k in [(1000, 10), (1000, 7), (1000, 25), (1000, 2), (100, 33), (50, 50)]:
    ref = diffusers.UnCLIPScheduler(num_train_timesteps=n)
    ref.set_timesteps(k)
    np.testing.assert_array_equal(schedule.timesteps(SchedulerConfig(num_train_timesteps=n), k, "unclip"),
                                  ref.timesteps.numpy(), err_msg=f"T={n} K={k}")
  # the unclip spacing ignores timestep_spacing / steps_offset, as UnCLIPScheduler does
  np.testing.assert_array_equal(schedule.timesteps(SchedulerConfig(timestep_spacing="trailing", steps_offset=1),
                                                   10, "unclip"), np.arange(999, -1, -111))
  with pytest.raises(ValueError, match="steps=1: the unclip sampler needs steps >= 2"):
    schedule.timesteps(prior, 1, "unclip")
  with pytest.raises(ValueError, match="eta=0.5 applies to the ddim sampler only, not unclip"):
    samplers.make_plan(prior, "unclip", 10, eta=0.5)
  with pytest.raises(ValueError, match="needs an rng"):
    samplers.sample(lambda x, t: x, prior, jnp.zeros((2, 4)), sampler="unclip", steps=4)


# --- inpainting by replacement (DALL-E 2's edits) -----------------------------

MU = np.array([0.4, -0.3, 0.1], np.float32)
SD = np.array([0.5, 0.8, 1.2], np.float32)


def _gaussian_model(cfg):
  """The exact eps-predictor of x0 ~ N(MU, SD^2), independent per value (diffusers' float32 abar)."""
  abar = jnp.asarray(schedule.alphas_cumprod(cfg), jnp.float32)
  mu, var = jnp.asarray(MU), jnp.asarray(SD) ** 2

  def model_fn(x_t, t):
    a = abar[t][:, None, None, None]
    x0 = mu + jnp.sqrt(a) * var / (a * var + 1 - a) * (x_t - jnp.sqrt(a) * mu)
    return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
  return model_fn


@pytest.mark.parametrize("sampler,steps", [("ddim", 20), ("dpmpp", 20), ("ddpm", 20), ("unclip", 20)])
def test_inpainting_keeps_known_region_exactly(sampler, steps):
  """The known region (left half) of the final sample is known_x0 bit for bit. With independent
  values the unknown region never sees the known one, so it is exactly the unconditional sample
  from the same x_T and rng (the known region's noise is a separate stream); deterministic
  samplers need no rng and repeat exactly."""
  cfg = SchedulerConfig(clip_sample=False, timestep_spacing="trailing")
  model = _gaussian_model(cfg)
  r = np.random.RandomState(20)
  x_T = r.randn(4, 6, 6, 3).astype(np.float32)
  known = r.uniform(-1, 1, x_T.shape).astype(np.float32)
  mask = np.zeros((4, 6, 6, 1), bool)
  mask[:, :, :3] = True
  rng = jax.random.PRNGKey(21) if sampler in ("ddpm", "unclip") else None
  run = jax.jit(lambda x, k, m: samplers.sample(model, cfg, x, sampler=sampler, steps=steps, rng=rng,
                                                known_x0=k, known_mask=m))
  edited = np.asarray(run(x_T, known, mask))
  np.testing.assert_array_equal(edited[:, :, :3], known[:, :, :3])
  free = np.asarray(jax.jit(lambda x: samplers.sample(model, cfg, x, sampler=sampler, steps=steps,
                                                      rng=rng))(x_T))
  np.testing.assert_allclose(edited[:, :, 3:], free[:, :, 3:], atol=1e-6)
  assert np.abs(edited[:, :, :3] - free[:, :, :3]).max() > 0.1
  if sampler == "ddim":
    np.testing.assert_array_equal(np.asarray(run(x_T, known, mask)), edited)
    # a float mask (nonzero = known) broadcast over the batch does the same
    np.testing.assert_array_equal(np.asarray(run(x_T, known, mask[:1].astype(np.float32))), edited)


def test_inpainting_unknown_region_marginal_and_correlated_pull():
  """Independent values: the unknown region follows the data marginal N(MU, SD^2) (DPM-Solver++,
  50 steps, exactly standardised x_T: < 0.5% on the std, 0.2% of SD on the mean). Correlated values
  (two channels, rho = 0.8, channel 0 known = 1.5): the unknown channel is pulled from the marginal
  N(0, 1) towards the conditional N(1.2, 0.36) but, replacement being no exact conditioning
  (the motivation for RePaint's resampling), not all the way: ancestral 100 steps measured mean
  0.74, std 0.68."""
  cfg = SchedulerConfig(clip_sample=False, timestep_spacing="linspace")
  z = np.random.RandomState(22).randn(64, 8, 8, 3)
  z[:, 4:] = (z[:, 4:] - z[:, 4:].mean((0, 1, 2))) / z[:, 4:].std((0, 1, 2))  # the unknown half
  a = schedule.alphas_cumprod(cfg)[999]
  x_T = (np.sqrt(a) * MU + np.sqrt(a * SD ** 2 + 1 - a) * z).astype(np.float32)
  mask = np.zeros((1, 8, 8, 1), np.float32)
  mask[:, :4] = 1
  out = np.asarray(jax.jit(lambda x: samplers.sample(_gaussian_model(cfg), cfg, x, sampler="dpmpp", steps=50,
                                                     known_x0=jnp.zeros_like(x), known_mask=mask))(x_T))
  unknown = out[:, 4:]
  assert np.all(np.abs(unknown.mean((0, 1, 2)) - MU) / SD < 2e-3), unknown.mean((0, 1, 2))
  assert np.all(np.abs(unknown.std((0, 1, 2)) / SD - 1) < 5e-3), unknown.std((0, 1, 2))

  rho, c = 0.8, 1.5
  abar = jnp.asarray(schedule.alphas_cumprod(cfg), jnp.float32)
  cov = jnp.array([[1.0, rho], [rho, 1.0]])

  def correlated(x, t):  # exact eps of x0 ~ N(0, cov) per pixel
    a = abar[t][:, None, None, None, None]
    m = jnp.sqrt(a) * cov @ jnp.linalg.inv(a * cov + (1 - a) * jnp.eye(2))
    x0 = jnp.einsum("bhwij,bhwj->bhwi", jnp.broadcast_to(m, x.shape[:3] + (2, 2)), x)
    return (x - jnp.sqrt(a[..., 0]) * x0) / jnp.sqrt(1 - a[..., 0])

  x_T = np.random.RandomState(23).randn(64, 8, 8, 2).astype(np.float32)
  known = np.zeros_like(x_T)
  known[..., 0] = c
  out = np.asarray(jax.jit(lambda x: samplers.sample(
      correlated, cfg, x, sampler="ddpm", steps=100, rng=jax.random.PRNGKey(24), known_x0=known,
      known_mask=np.array([1.0, 0.0], np.float32)))(x_T))
  assert np.all(out[..., 0] == c)
  mean, std = out[..., 1].mean(), out[..., 1].std()
  n = out[..., 1].size
  print(f"replacement, correlated: unknown mean {mean:.3f} std {std:.3f} (conditional {rho * c}, "
        f"{math.sqrt(1 - rho ** 2):.2f}; marginal 0, 1)")
  assert 0.5 * rho * c < mean < rho * c - 0.2, mean
  assert math.sqrt(1 - rho ** 2) < std < 1 - 5 / math.sqrt(2 * n), std


def test_inpainting_errors():
  cfg = SchedulerConfig()
  x = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(ValueError, match="both known_x0 and known_mask"):
    samplers.sample(lambda x, t: x, cfg, x, sampler="ddim", steps=4, known_x0=x)
  with pytest.raises(ValueError, match=r"known_x0 shape \(2, 4, 4, 1\) differs from x_T's \(2, 4, 4, 3\)"):
    samplers.sample(lambda x, t: x, cfg, x, sampler="ddim", steps=4, known_x0=x[..., :1], known_mask=x)
  with pytest.raises(ValueError, match=r"known_mask shape \(2, 5, 4, 1\) does not broadcast"):
    samplers.sample(lambda x, t: x, cfg, x, sampler="ddim", steps=4, known_x0=x,
                    known_mask=np.ones((2, 5, 4, 1)))


# --- spherical interpolation ----------------------------------------------------

def test_slerp_unit_vectors_endpoints_and_angles():
  r = np.random.RandomState(30)
  a, b = r.randn(2, 5, 16)
  a /= np.linalg.norm(a, axis=-1, keepdims=True)
  b /= np.linalg.norm(b, axis=-1, keepdims=True)
  t = np.linspace(0, 1, 9, dtype=np.float32)[:, None, None]  # (frames, 1, 1) against (5, 16)
  frames = np.asarray(jax.jit(interpolation.slerp)(a, b, t))
  assert frames.shape == (9, 5, 16)
  a32, b32 = a.astype(np.float32), b.astype(np.float32)
  np.testing.assert_array_equal(frames[0], a32)  # endpoints exact
  np.testing.assert_array_equal(frames[-1], b32)
  np.testing.assert_allclose(np.linalg.norm(frames, axis=-1), 1.0, atol=1e-6)  # stays on the sphere
  theta = np.arccos(np.sum(a * b, -1))  # the angle to a grows linearly, in the plane of a and b
  angle = np.arccos(np.clip(np.einsum("fbe,be->fb", frames.astype(np.float64), a), -1, 1))
  np.testing.assert_allclose(angle[1:], t[1:, :, 0] * theta, atol=1e-5)  # (arccos is ill-conditioned at 0)
  perp = b - np.sum(a * b, -1, keepdims=True) * a
  perp /= np.linalg.norm(perp, axis=-1, keepdims=True)
  np.testing.assert_allclose(frames, np.cos(t * theta[:, None]) * a + np.sin(t * theta[:, None]) * perp,
                             atol=2e-6)
  # orthogonal: the midpoint is (a + b) / sqrt 2
  e = np.eye(4, dtype=np.float32)
  np.testing.assert_allclose(interpolation.slerp(e[0], e[1], 0.5), (e[0] + e[1]) / np.sqrt(2), atol=1e-7)


def test_slerp_small_angles_fall_back_to_lerp_and_x_T():
  r = np.random.RandomState(31)
  a = r.randn(3, 8).astype(np.float32)
  for b in (a, a + 1e-6 * r.randn(3, 8).astype(np.float32), -a):  # equal, nearly parallel, opposite
    got = np.asarray(interpolation.slerp(a, b, 0.3))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, 0.7 * a + 0.3 * b, atol=1e-6)
  grad = jax.grad(lambda x: interpolation.slerp(a, x, 0.3).sum())(jnp.asarray(a))
  assert np.all(np.isfinite(np.asarray(grad)))
  # x_T of equal norm keep it over whole samples (axis=(1, 2, 3)); lerp would shrink the middle
  x0, x1 = r.randn(2, 1, 4, 4, 3).astype(np.float32)
  x1 *= np.linalg.norm(x0) / np.linalg.norm(x1)
  t = np.linspace(0, 1, 5, dtype=np.float32)[:, None, None, None]
  frames = np.asarray(interpolation.slerp(x0, x1, t, axis=(1, 2, 3)))
  assert frames.shape == (5, 4, 4, 3)
  np.testing.assert_allclose(np.linalg.norm(frames.reshape(5, -1), axis=1), np.linalg.norm(x0), rtol=1e-5)
  assert np.linalg.norm(0.5 * (x0 + x1)) < 0.9 * np.linalg.norm(x0)
  with pytest.raises(ValueError, match=r"slerp endpoints differ in shape: \(3, 8\) vs \(3, 7\)"):
    interpolation.slerp(a, a[:, :7], 0.5)
