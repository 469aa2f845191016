"""Sampler parity with the real diffusers schedulers, step by step, and closed-form checks.

The "model" is a fixed random smooth function of (x, t), evaluated in numpy for
both sides. Each case runs diffusers' scheduler loop and ours independently from
the same x_T and the same per-step noise (ours: fold_in(rng, i); diffusers gets the
identical arrays via variance_noise or a patched randn_tensor) and compares every
step's sample, then the one compiled `sample` loop's result.
"""
import functools
import inspect
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
torch.set_num_threads(1)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dalle_jax.diffusion import samplers  # noqa: E402
from dalle_jax.diffusion.schedule import SchedulerConfig  # noqa: E402

SHAPE = (2, 4, 4, 3)  # B H W C (DPM-Solver's learned_range slices 3 channels)
TOL = 1e-5  # ours (float32) vs diffusers' code in float64
TOL_F32 = 5e-4  # vs diffusers as shipped (float32): its own rounding reaches 1.6e-4 here
RNG = jax.random.PRNGKey(7)


class ToyModel:
  """A fixed smooth "denoiser": x0_hat = 1.4 tanh(x M + b(t)) (past +-1, so clipping and thresholding
  act), returned as eps / x0 / v with the reference's own alphas_cumprod, plus a variance half
  tanh(x M' + b'(t)) when learned. Like a trained model (unlike a raw random eps), its x0 does not
  scale with 1/alpha, so float32 rounding is not amplified along a trajectory. numpy or jax."""

  def __init__(self, cfg, alphas_cumprod, seed=0):
    r = np.random.RandomState(seed)
    c = SHAPE[-1]
    self.n_out = 2 * c if cfg.learned_variance else c
    self.m = (r.randn(c, self.n_out) * 0.7).astype(np.float32)
    self.f = r.uniform(0.5, 3.0, self.n_out).astype(np.float32)
    self.abar = np.asarray(alphas_cumprod, np.float64)
    self.prediction_type = cfg.prediction_type

  def __call__(self, x, t, xp=np):
    c = SHAPE[-1]
    bias = xp.sin(xp.asarray(t, xp.float32)[:, None, None, None] / 1000.0 * self.f * 6.0)
    h = xp.tanh(xp.einsum("bhwc,cd->bhwd", x, self.m) + bias)
    x0 = 1.4 * h[..., :c]
    a = xp.asarray(self.abar, xp.float32)[xp.asarray(t)][:, None, None, None]
    eps = (x - xp.sqrt(a) * x0) / xp.sqrt(1.0 - a)
    out = {"epsilon": eps, "sample": x0, "v_prediction": xp.sqrt(a) * eps - xp.sqrt(1.0 - a) * x0}[
        self.prediction_type]
    if self.n_out > c:
      out = xp.concatenate([out, h[..., c:]], axis=-1)
    return out.astype(xp.float32)

  def jax_fn(self, x, t):
    return self(x, t, xp=jnp)


class _Float64(types.ModuleType):
  """`torch` / `numpy` as seen by a diffusers scheduler module, with float32 meaning float64."""

  def __init__(self, mod):
    super().__init__(mod.__name__)
    self._mod = mod

  def __getattr__(self, name):
    return getattr(self._mod, "float64" if name == "float32" else name)


_SCHEDULER_MODULES = {
    "ddpm": ("DDPMScheduler", "scheduling_ddpm"), "ddim": ("DDIMScheduler", "scheduling_ddim"),
    "dpmpp": ("DPMSolverMultistepScheduler", "scheduling_dpmsolver_multistep")}


class Reference:
  """One diffusers scheduler run, in its native float32 or (float64=True) with every float32 of
  its module read as float64: the same code without its own rounding, which at some steps is
  larger than 1e-5 (DDIM at eta=1 on the cosine schedule: sqrt(1 - abar_prev - sigma^2) = 3.1e-4
  cancels to 3.5e-4 in float32; DPM-Solver's lambda differences multiply x0 ~ 1/alpha)."""

  def __init__(self, sampler, cfg, steps, float64, monkeypatch):
    cls_name, mod_name = _SCHEDULER_MODULES[sampler]
    self.sampler, self.monkeypatch = sampler, monkeypatch
    self.module = getattr(diffusers.schedulers, mod_name)
    self.dtype = torch.float64 if float64 else torch.float32
    self.float64 = float64
    self.use_clipped_model_output = cfg.use_clipped_model_output  # a step() argument there
    d = cfg.to_dict()
    if sampler == "dpmpp" and not cfg.learned_variance:
      d["variance_type"] = None
    cls = getattr(diffusers, cls_name)
    params = inspect.signature(cls.__init__).parameters
    with self._precision():
      self.scheduler = cls(**{k: v for k, v in d.items() if k in params})
      self.scheduler.set_timesteps(steps)

  def _precision(self):
    ctx = self.monkeypatch.context()
    m = ctx.__enter__()
    if self.float64:
      m.setattr(self.module, "torch", _Float64(torch))
      m.setattr(self.module, "np", _Float64(np))
    return _Exit(ctx)

  def step(self, out_nhwc, t, x_nhwc, noise_nhwc, eta):
    kw = {}
    if self.sampler == "ddpm":
      kw = {}
    elif self.sampler == "ddim":
      kw = dict(eta=eta, variance_noise=self._nchw(noise_nhwc) if eta > 0 else None,
                use_clipped_model_output=self.use_clipped_model_output)
    with self._precision():
      if self.sampler == "ddpm":
        self.monkeypatch.setattr(self.module, "randn_tensor", lambda *a, **k: self._nchw(noise_nhwc))
      y = self.scheduler.step(self._nchw(out_nhwc), int(t), self._nchw(x_nhwc), **kw).prev_sample
    return y.numpy().transpose(0, 2, 3, 1)

  def _nchw(self, a):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(self.dtype)


class _Exit:
  def __init__(self, ctx):
    self.ctx = ctx

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return self.ctx.__exit__(*exc)


@functools.lru_cache(maxsize=None)
def _noises(steps):
  """The noise `sample` draws at step i: normal(fold_in(RNG, i)), all steps in one call."""
  draw = lambda i: jax.random.normal(jax.random.fold_in(RNG, i), SHAPE, jnp.float32)
  return np.asarray(jax.jit(jax.vmap(draw))(jnp.arange(steps)))


def _run_case(sampler, cfg, steps, eta, monkeypatch, seed=0, ref_cfg=None):
  """Every step of ours (float32), fed the reference's x and model output, against diffusers' step:
  within TOL of its float64 run, within TOL_F32 of its float32 run (errors relative to max(1, |x|)).
  Then the free-running compiled loop (noise from fold_in(RNG, i)) against the float64 reference
  trajectory, within TOL. ref_cfg: the diffusers settings that mean the same as ours (default cfg)."""
  plan = samplers.make_plan(cfg, sampler, steps, eta)
  step = {"ddpm": samplers.ddpm_step, "ddim": samplers.ddim_step, "dpmpp": samplers.dpmpp_step}[sampler]
  step_fn = functools.partial(step, cfg)  # eager: cheaper than a compile per case
  x_T = np.random.RandomState(1).randn(*SHAPE).astype(np.float32)
  refs = {f64: Reference(sampler, ref_cfg or cfg, steps, f64, monkeypatch) for f64 in (True, False)}
  model = ToyModel(cfg, refs[True].scheduler.alphas_cumprod.numpy(), seed)
  worst, x_ref = {}, {}
  for f64, tol in ((True, TOL), (False, TOL_F32)):
    ref = refs[f64]
    np.testing.assert_array_equal(np.asarray(plan["t"]), ref.scheduler.timesteps.numpy())
    x = x_T.astype(np.float64 if f64 else np.float32)
    x0_prev = jnp.zeros(SHAPE, jnp.float32)
    worst[f64] = 0.0
    for i, t in enumerate(np.asarray(plan["t"])):
      tb = np.full((SHAPE[0],), t, np.int32)
      noise = _noises(32)[i]
      out = model(x.astype(np.float32), tb)
      p = jax.tree.map(lambda a: a[i], plan)
      extra = x0_prev if sampler == "dpmpp" else (jnp.asarray(noise) if sampler == "ddpm" or eta > 0 else None)
      ours, x0_prev = step_fn(p, jnp.asarray(x, jnp.float32), jnp.asarray(out), extra)
      x = ref.step(out, t, x, noise, eta)
      err = float(np.abs(np.asarray(ours) - x).max() / max(1.0, np.abs(x).max()))
      assert np.all(np.isfinite(x)) and err < tol, (i, int(t), f64, err)
      worst[f64] = max(worst[f64], err)
    x_ref[f64] = x
  x_loop = jax.jit(lambda x: samplers.sample(model.jax_fn, cfg, x, sampler=sampler, steps=steps,
                                             rng=RNG, eta=eta))(jnp.asarray(x_T))
  loop_err = float(np.abs(np.asarray(x_loop) - x_ref[True]).max())
  spread = float(np.abs(x_ref[False] - x_ref[True]).max())
  print(f"{sampler} steps={steps} eta={eta}: one step: f64 {worst[True]:.1e} f32 {worst[False]:.1e},"
        f" loop {loop_err:.1e} (diffusers f32 vs f64 {spread:.1e})")
  assert loop_err < TOL, (loop_err, spread)


DDPM_CASES = [  # (config, steps)
    (dict(timestep_spacing="leading", steps_offset=1), 10),  # clip_sample, fixed_small
    (dict(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True,
          dynamic_thresholding_ratio=0.95, sample_max_value=1.5, timestep_spacing="trailing"), 10),  # IF
    (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
          variance_type="fixed_large", clip_sample=False, timestep_spacing="linspace"), 8),
    (dict(beta_schedule="sigmoid", prediction_type="sample", variance_type="fixed_small_log",
          clip_sample_range=0.8, timestep_spacing="trailing"), 12),
    (dict(variance_type="fixed_large", timestep_spacing="leading", steps_offset=1, thresholding=True), 25),
]


@pytest.mark.parametrize("kw,steps", DDPM_CASES)
def test_ddpm_matches_diffusers(kw, steps, monkeypatch):
  cfg = SchedulerConfig(**kw)
  _run_case("ddpm", cfg, steps, 0.0, monkeypatch, seed=len(kw))


DDIM_CASES = [  # (config, steps, eta)
    (dict(timestep_spacing="leading", steps_offset=1), 10, 0.0),
    (dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", thresholding=True,
          dynamic_thresholding_ratio=0.9, sample_max_value=1.2, timestep_spacing="trailing"), 10, 1.0),
    (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="sample",
          timestep_spacing="linspace", set_alpha_to_one=False, clip_sample=False), 7, 0.5),
    (dict(timestep_spacing="trailing", clip_sample_range=1.5), 13, 0.0),
    # GLIDE's DDIM: eps re-derived from the clipped / thresholded x0 (diffusers'
    # step(use_clipped_model_output=True))
    (dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing",
          use_clipped_model_output=True), 10, 0.0),
    (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.2,
          timestep_spacing="leading", steps_offset=1, use_clipped_model_output=True), 8, 1.0),
]


@pytest.mark.parametrize("kw,steps,eta", DDIM_CASES)
def test_ddim_matches_diffusers(kw, steps, eta, monkeypatch):
  cfg = SchedulerConfig(**kw)
  _run_case("ddim", cfg, steps, eta, monkeypatch, seed=3 + len(kw))


DPM_CASES = [  # (config, steps)
    (dict(timestep_spacing="linspace"), 10),  # diffusers' defaults: final sigma 0 -> x0
    (dict(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True,
          dynamic_thresholding_ratio=0.95, sample_max_value=1.5, timestep_spacing="trailing"), 20),
    (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
          timestep_spacing="leading", steps_offset=1, final_sigmas_type="sigma_min"), 20),  # 2nd order last
    (dict(prediction_type="sample", timestep_spacing="linspace", final_sigmas_type="sigma_min"), 6),
    (dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, timestep_spacing="linspace",
          euler_at_final=True, final_sigmas_type="sigma_min"), 16),
]


@pytest.mark.parametrize("kw,steps", DPM_CASES)
def test_dpmpp_matches_diffusers(kw, steps, monkeypatch):
  cfg = SchedulerConfig(**kw)
  _run_case("dpmpp", cfg, steps, 0.0, monkeypatch, seed=5 + len(kw))


def test_dpmpp_clips_x0_with_use_clipped_model_output(monkeypatch):
  """With use_clipped_model_output, DPM-Solver++ honours clip_sample: the same steps as
  diffusers' DPM-Solver++ thresholding at sample_max_value = 1 (a static clip to [-1, 1])."""
  kw = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing")
  cfg = SchedulerConfig(**kw, clip_sample=True, use_clipped_model_output=True)
  ref = SchedulerConfig(**kw, clip_sample=False, thresholding=True, sample_max_value=1.0)
  _run_case("dpmpp", cfg, 12, 0.0, monkeypatch, seed=11, ref_cfg=ref)
