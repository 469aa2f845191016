"""Samplers compiled as one loop: DDPM ancestral, DDIM (eta), DPM-Solver++(2M), UnCLIP.

Each sampler is a host-side plan (per-step coefficients over the respaced
timesteps, computed in float64 from the `SchedulerConfig`, then float32) and a
pure single-step function; `sample` scans the step over the plan, calling the
model once per step. The steps follow diffusers' `DDPMScheduler`,
`DDIMScheduler`, `DPMSolverMultistepScheduler` (algorithm dpmsolver++,
solver_order 2, midpoint) and `UnCLIPScheduler` (Karlo's prior, decoder and
super-resolution, stepped as `UnCLIPPipeline` does) step for step, including
their quirks:
  - DDPM respaced: beta_t = 1 - abar_t / abar_prev over the visited timesteps;
    noise is added whenever the timestep (not the step index) is > 0.
  - DDIM: the previous timestep is t - T // K whatever the spacing; before t=0
    abar is 1 (set_alpha_to_one) or abar_0.
  - DPM-Solver++: first order on the first step and on the last one (lower_order_final
    with K < 15, euler_at_final, or final_sigmas_type "zero" which returns x0 there);
    x0 is thresholded when `thresholding`, never clipped (diffusers' DPM-Solver
    has no clip_sample; thresholding with sample_max_value=1 is static clipping).
  - UnCLIP: DDPM ancestral over its own spacing (T-1 .. 0); between adjacent
    timesteps it takes beta_t from the table, otherwise 1 - abar_t / abar_prev.
    Its last step is always t = 0, where Karlo's super-resolution swaps in its
    second U-Net (super_res_last): a model_fn can switch on t == 0.

`sample(..., known_x0=, known_mask=)` inpaints by replacement (DALL-E 2's edits,
RePaint without resampling): after every step the known region is set to
q_sample(known_x0) at the noise level the sampler has reached, and to known_x0
itself after the last step.

  x0 processing (DDPM/DDIM): dynamic thresholding if `thresholding`, else static
  clip to +-clip_sample_range if `clip_sample`. With `use_clipped_model_output`
  DDIM's eps is re-derived from the processed x0 and DPM-Solver++ clips as well.

Shapes: B batch, H height, W width, C image channels, K steps.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.diffusion import gaussian
from dalle_jax.diffusion import schedule as schedule_lib
from dalle_jax.diffusion.schedule import SchedulerConfig


# --- x0 processing -----------------------------------------------------------

def dynamic_threshold(x0_bhwc, ratio, max_value):
  """Imagen's dynamic thresholding as diffusers does it: per sample s = quantile(|x0|, ratio)
  clamped to [1, max_value]; x0 clipped to +-s and divided by s."""
  flat = x0_bhwc.reshape(x0_bhwc.shape[0], -1)
  s = jnp.clip(jnp.quantile(jnp.abs(flat), ratio, axis=1), 1.0, max_value)[:, None]
  return (jnp.clip(flat, -s, s) / s).reshape(x0_bhwc.shape)


def static_clip(x0_bhwc, clip_range=1.0):
  return jnp.clip(x0_bhwc, -clip_range, clip_range)


def process_x0(cfg: SchedulerConfig, x0_bhwc, *, allow_clip=True):
  """The config's x0 treatment: dynamic thresholding, else (allow_clip) static clipping, else none."""
  if cfg.thresholding:
    return dynamic_threshold(x0_bhwc, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
  if cfg.clip_sample and allow_clip:
    return static_clip(x0_bhwc, cfg.clip_sample_range)
  return x0_bhwc


def _col(a, ndim):
  """A per-example or scalar coefficient, broadcast against (B, H, W, C)."""
  return jnp.reshape(a, jnp.shape(a) + (1,) * (ndim - jnp.ndim(a)))


def _f32(d):
  return {k: jnp.asarray(v, jnp.int32 if k == "t" else jnp.float32) for k, v in d.items()}


# --- DDPM ancestral ----------------------------------------------------------

def ddpm_plan(cfg: SchedulerConfig, steps: int):
  """Per-step tables (K,) for DDPM respaced to `steps` timesteps."""
  ts = schedule_lib.timesteps(cfg, steps, "ddpm")
  abar = schedule_lib.alphas_cumprod(cfg)
  a_t = abar[ts]
  a_prev = np.append(abar[ts[1:]], 1.0)
  return _ancestral_plan(cfg, ts, a_t, a_prev, 1.0 - a_t / a_prev)  # the respaced chain's beta


def unclip_plan(cfg: SchedulerConfig, steps: int):
  """Per-step tables (K,) for UnCLIPScheduler as UnCLIPPipeline steps it (prev_timestep = the
  next visited timestep, None -> t - 1 = -1 on the last, where abar_prev is 1). Its beta is the
  table's beta_t between adjacent timesteps (K = T), the respaced 1 - abar_t / abar_prev otherwise;
  its step is DDPM's (the learned_range log variance is unclamped there; posterior variances
  of a t > 0 step are far above DDPM's 1e-20 clamp)."""
  ts = schedule_lib.timesteps(cfg, steps, "unclip")
  b = schedule_lib.betas(cfg)
  abar = np.cumprod(1.0 - b)
  prev = np.append(ts[1:], ts[-1] - 1)
  a_t = abar[ts]
  a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], 1.0)
  beta_t = np.where(prev == ts - 1, b[ts], 1.0 - a_t / a_prev)
  return _ancestral_plan(cfg, ts, a_t, a_prev, beta_t)


def _ancestral_plan(cfg, ts, a_t, a_prev, beta_t):
  post_var = np.maximum((1.0 - a_prev) / (1.0 - a_t) * beta_t, 1e-20)  # diffusers' clamp
  if cfg.variance_type in ("fixed_small", "fixed_small_log"):
    std = np.sqrt(post_var)
  else:  # fixed_large (and fixed_large_log: std sqrt(beta); diffusers' step takes sqrt(log beta) -> NaN)
    std = np.sqrt(beta_t)
  return _f32(dict(
      t=ts, sqrt_abar=np.sqrt(a_t), sqrt_one_minus_abar=np.sqrt(1.0 - a_t),
      x0_coef=np.sqrt(a_prev) * beta_t / (1.0 - a_t),
      xt_coef=np.sqrt(1.0 - beta_t) * (1.0 - a_prev) / (1.0 - a_t),
      std=std, min_log=np.log(post_var), max_log=np.log(beta_t),
      noise_mask=(ts > 0).astype(np.float64), **_next_level(a_prev)))


def _next_level(abar_next):
  """The noise level x reaches after each step, for inpainting: clean after the last step."""
  abar_next = np.append(abar_next[:-1], 1.0)
  return dict(sqrt_abar_next=np.sqrt(abar_next), sqrt_one_minus_abar_next=np.sqrt(1.0 - abar_next))


def ddpm_step(cfg: SchedulerConfig, p, x_bhwc, out_bhwc, noise_bhwc):
  """One ancestral step with the step's plan row `p` -> (x_prev, x0)."""
  mean_out, var_out = gaussian.split_output(out_bhwc, x_bhwc.shape[-1], cfg.learned_variance)
  nd = x_bhwc.ndim
  _, x0 = gaussian.eps_x0_from_output(mean_out, x_bhwc, _col(p["sqrt_abar"], nd),
                                      _col(p["sqrt_one_minus_abar"], nd), cfg.prediction_type)
  x0 = process_x0(cfg, x0)
  mean = _col(p["x0_coef"], nd) * x0 + _col(p["xt_coef"], nd) * x_bhwc
  if cfg.learned_variance:
    frac = (var_out + 1.0) / 2.0
    std = jnp.exp(0.5 * (frac * _col(p["max_log"], nd) + (1.0 - frac) * _col(p["min_log"], nd)))
  else:
    std = _col(p["std"], nd)
  return mean + _col(p["noise_mask"], nd) * std * noise_bhwc, x0


# --- DDIM --------------------------------------------------------------------

def ddim_plan(cfg: SchedulerConfig, steps: int, eta: float = 0.0):
  ts = schedule_lib.timesteps(cfg, steps, "ddim")
  abar = schedule_lib.alphas_cumprod(cfg)
  prev = ts - cfg.num_train_timesteps // len(ts)  # diffusers: fixed stride, whatever the spacing
  final = 1.0 if cfg.set_alpha_to_one else abar[0]
  a_t = abar[ts]
  a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
  var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
  std = eta * np.sqrt(var)
  return _f32(dict(
      t=ts, sqrt_abar=np.sqrt(a_t), sqrt_one_minus_abar=np.sqrt(1.0 - a_t),
      sqrt_abar_prev=np.sqrt(a_prev), dir_coef=np.sqrt(np.maximum(1.0 - a_prev - std ** 2, 0.0)),
      std=std, **_next_level(a_prev)))


def ddim_step(cfg: SchedulerConfig, p, x_bhwc, out_bhwc, noise_bhwc):
  """x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - std^2) eps + std noise -> (x_prev, x0).
  eps is the model's (derived before x0 is clipped), as diffusers' default, or with
  use_clipped_model_output the one the processed x0 implies (GLIDE's DDIM)."""
  mean_out, _ = gaussian.split_output(out_bhwc, x_bhwc.shape[-1], cfg.learned_variance)
  nd = x_bhwc.ndim
  eps, x0 = gaussian.eps_x0_from_output(mean_out, x_bhwc, _col(p["sqrt_abar"], nd),
                                        _col(p["sqrt_one_minus_abar"], nd), cfg.prediction_type)
  x0 = process_x0(cfg, x0)
  if cfg.use_clipped_model_output:
    eps = (x_bhwc - _col(p["sqrt_abar"], nd) * x0) / _col(p["sqrt_one_minus_abar"], nd)
  x_prev = _col(p["sqrt_abar_prev"], nd) * x0 + _col(p["dir_coef"], nd) * eps
  if noise_bhwc is not None:
    x_prev = x_prev + _col(p["std"], nd) * noise_bhwc
  return x_prev, x0


# --- DPM-Solver++(2M) --------------------------------------------------------

def dpmpp_plan(cfg: SchedulerConfig, steps: int):
  """x_next = a x + b x0_i + c (x0_i - x0_{i-1}) per step (c = 0 on first-order steps).

  The difference is formed first, as in diffusers' D1: where lambda steps shrink fast
  (cosine schedule), b(1 + c/b) and -c would be large and cancel in float32.
  """
  ts = schedule_lib.timesteps(cfg, steps, "dpmpp")
  k = len(ts)
  abar = schedule_lib.alphas_cumprod(cfg)
  alpha = np.sqrt(abar[ts])
  sigma = np.sqrt(1.0 - abar[ts])
  if cfg.final_sigmas_type == "zero":
    alpha_n, sigma_n = np.append(alpha[1:], 1.0), np.append(sigma[1:], 0.0)
  else:  # sigma_min: end at t = 0's noise level
    alpha_n, sigma_n = np.append(alpha[1:], np.sqrt(abar[0])), np.append(sigma[1:], np.sqrt(1 - abar[0]))
  lam = np.log(alpha) - np.log(sigma)
  with np.errstate(divide="ignore"):
    lam_n = np.log(alpha_n) - np.log(sigma_n)  # +inf at a zero final sigma
  h = lam_n - lam
  a = sigma_n / sigma
  b = -alpha_n * np.expm1(-h)  # = alpha_n at a zero final sigma: x_next = x0
  first = np.zeros(k, bool)
  first[0] = True
  first[-1] |= (cfg.euler_at_final or (cfg.lower_order_final and k < 15)
                or cfg.final_sigmas_type == "zero")
  r0 = np.ones(k)
  r0[1:] = (lam[1:] - lam[:-1]) / np.where(np.isfinite(h[1:]), h[1:], 1.0)  # h_{i-1} / h_i
  c = np.where(first, 0.0, 0.5 * b / r0)
  return _f32(dict(t=ts, sqrt_abar=alpha, sqrt_one_minus_abar=sigma, a=a, b=b, c=c,
                   **_next_level(alpha_n ** 2)))


def dpmpp_step(cfg: SchedulerConfig, p, x_bhwc, out_bhwc, x0_prev_bhwc):
  """One multistep update; x0_prev is the previous step's (processed) x0 -> (x_next, x0)."""
  mean_out, _ = gaussian.split_output(out_bhwc, x_bhwc.shape[-1], cfg.learned_variance)
  nd = x_bhwc.ndim
  _, x0 = gaussian.eps_x0_from_output(mean_out, x_bhwc, _col(p["sqrt_abar"], nd),
                                      _col(p["sqrt_one_minus_abar"], nd), cfg.prediction_type)
  x0 = process_x0(cfg, x0, allow_clip=cfg.use_clipped_model_output)
  x_next = (_col(p["a"], nd) * x_bhwc + _col(p["b"], nd) * x0
            + _col(p["c"], nd) * (x0 - x0_prev_bhwc))
  return x_next, x0


# --- the loop ----------------------------------------------------------------

_ANCESTRAL = ("ddpm", "unclip")  # stepped by ddpm_step


def make_plan(cfg: SchedulerConfig, sampler: str, steps: int, eta: float = 0.0):
  """Validated per-step tables for `sampler` (errors name the setting before any tracing)."""
  if sampler not in schedule_lib.SAMPLERS:
    raise ValueError(f"sampler={sampler!r} is not one of {', '.join(schedule_lib.SAMPLERS)}")
  if not isinstance(eta, (int, float)) or eta < 0:
    raise ValueError(f"eta must be a float >= 0, got {eta!r}")
  if eta and sampler != "ddim":
    raise ValueError(f"eta={eta} applies to the ddim sampler only, not {sampler}")
  if sampler == "ddpm":
    return ddpm_plan(cfg, steps)
  if sampler == "unclip":
    return unclip_plan(cfg, steps)
  if sampler == "ddim":
    return ddim_plan(cfg, steps, eta)
  return dpmpp_plan(cfg, steps)


def replace_known(x_bhwc, known_x0_bhwc, known_mask, sqrt_abar, sqrt_one_minus_abar, noise_bhwc):
  """x with its known region (mask != 0) set to q_sample(known_x0) at level abar (exactly
  known_x0 where abar is 1)."""
  nd = x_bhwc.ndim
  known = _col(sqrt_abar, nd) * known_x0_bhwc + _col(sqrt_one_minus_abar, nd) * noise_bhwc
  return jnp.where(known_mask != 0, known, x_bhwc)


def _check_known(x_T, known_x0, known_mask):
  if (known_x0 is None) != (known_mask is None):
    raise ValueError("inpainting needs both known_x0 and known_mask (or neither)")
  if known_x0 is None:
    return None, None
  known_x0 = jnp.asarray(known_x0, jnp.float32)
  known_mask = jnp.asarray(known_mask)
  if known_x0.shape != x_T.shape:
    raise ValueError(f"known_x0 shape {known_x0.shape} differs from x_T's {x_T.shape}")
  try:
    np.broadcast_shapes(known_mask.shape, x_T.shape)
  except ValueError:
    raise ValueError(f"known_mask shape {known_mask.shape} does not broadcast to x_T's "
                     f"{x_T.shape}") from None
  return known_x0, known_mask


def sample(model_fn: Callable, cfg: SchedulerConfig, x_T_bhwc, *, sampler: str = "ddim",
           steps: int, rng=None, eta: float = 0.0,
           progress: Optional[Callable[[int], None]] = None, known_x0=None, known_mask=None):
  """Runs the sampler from x_T in one `lax.scan`; returns x0 (float32, (B, H, W, C)).

  model_fn(x_bhwc, t_b int32) -> (B, H, W, C) or (B, H, W, 2C) with learned_range.
  Step i draws its noise from fold_in(rng, i) (DDPM, UnCLIP, DDIM with eta > 0); DDIM at eta=0
  and DPM-Solver++ are deterministic in x_T. `progress(i)` runs on the host after step i.

  Inpainting: with known_x0 (B, H, W, C) and known_mask (broadcastable to it; nonzero = known),
  the known region of x_T and of every step's result is replaced by q_sample(known_x0) at the
  level reached (the first timestep's for x_T; the last step leaves known_x0 exactly). Its noise
  is x_T for x_T, then fresh per step (fold_in(fold_in(rng, i), 1)) for the stochastic samplers;
  for the deterministic ones it stays x_T, so an edit is a deterministic function of x_T.
  Any array shape works (e.g. (B, E) embeddings); (B, H, W, C) is named for images.
  """
  plan = make_plan(cfg, sampler, steps, eta)
  stochastic = sampler in _ANCESTRAL or (sampler == "ddim" and eta > 0)
  if stochastic and rng is None:
    raise ValueError(f"sampler={sampler!r} (eta={eta}) needs an rng")
  x_T = jnp.asarray(x_T_bhwc, jnp.float32)
  known_x0, known_mask = _check_known(x_T, known_x0, known_mask)
  batch = x_T.shape[0]
  x_init = x_T
  if known_x0 is not None:  # x_T is itself the N(0, 1) draw for the first level
    x_init = replace_known(x_T, known_x0, known_mask, plan["sqrt_abar"][0],
                           plan["sqrt_one_minus_abar"][0], x_T)

  def body(carry, xs):
    x, x0_prev = carry
    i, p = xs
    out = model_fn(x, jnp.broadcast_to(p["t"], (batch,))).astype(jnp.float32)
    noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32) if stochastic else None
    if sampler in _ANCESTRAL:
      x, x0 = ddpm_step(cfg, p, x, out, noise)
    elif sampler == "ddim":
      x, x0 = ddim_step(cfg, p, x, out, noise)
    else:
      x, x0 = dpmpp_step(cfg, p, x, out, x0_prev)
    if known_x0 is not None:
      known_noise = x_T
      if stochastic:
        known_rng = jax.random.fold_in(jax.random.fold_in(rng, i), 1)  # apart from the step's noise
        known_noise = jax.random.normal(known_rng, x.shape, jnp.float32)
      x = replace_known(x, known_x0, known_mask, p["sqrt_abar_next"], p["sqrt_one_minus_abar_next"],
                        known_noise)
    if progress is not None:
      jax.debug.callback(progress, i)
    return (x, x0), None

  k = plan["t"].shape[0]
  (x, _), _ = jax.lax.scan(body, (x_init, jnp.zeros_like(x_T)), (jnp.arange(k, dtype=jnp.int32), plan))
  return x
