"""Discrete-time Gaussian diffusion for training: forward process, parameterisations, losses.

  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps            (q_sample)
  v   = sqrt(abar_t) eps - sqrt(1 - abar_t) x0             (Salimans & Ho)
  SNR = abar_t / (1 - abar_t)

The model predicts eps, x0 ("sample") or v (`prediction_type`); with
`variance_type="learned_range"` it returns 2C channels, the second half v in
[-1, 1] interpolating the log variance between the posterior's (clipped) and
beta_t (improved DDPM). Its loss is then the hybrid MSE + VLB, the VLB seeing the
mean only through a stop-gradient so it trains the variance alone.

Everything is a pure function of arrays; the model is any
`model_fn(x_t_bhwc, t_b int32) -> out_bhwc` (C or 2C channels).

Shapes: B batch, H height, W width, C image channels, T train timesteps.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr, ndtr

from dalle_jax.diffusion import schedule as schedule_lib

LOSS_WEIGHTINGS = ("mse", "min_snr")


def eps_x0_from_output(out, x_t, sqrt_abar, sqrt_one_minus_abar, prediction_type):
  """Model output (mean half) -> (eps, x0); the coefficients broadcast against x_t.

  The formulas and their order of operations are diffusers' (`step` of DDPM/DDIM).
  """
  if prediction_type == "epsilon":
    return out, (x_t - sqrt_one_minus_abar * out) / sqrt_abar
  if prediction_type == "sample":
    return (x_t - sqrt_abar * out) / sqrt_one_minus_abar, out
  if prediction_type == "v_prediction":
    return sqrt_abar * out + sqrt_one_minus_abar * x_t, sqrt_abar * x_t - sqrt_one_minus_abar * out
  raise ValueError(f"prediction_type={prediction_type!r} is not one of {schedule_lib.PREDICTION_TYPES}")


def split_output(out_bhwc, channels, learned_variance):
  """(mean half (B,H,W,C), variance half in [-1, 1] or None); checks the channel count."""
  want = 2 * channels if learned_variance else channels
  if out_bhwc.shape[-1] != want:
    raise ValueError(f"model output has {out_bhwc.shape[-1]} channels, expected {want} "
                     f"({'learned_range: 2 x ' if learned_variance else ''}{channels} image channels)")
  if learned_variance:
    return out_bhwc[..., :channels], out_bhwc[..., channels:]
  return out_bhwc, None


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale, bin_half_width=1.0 / 255):
  """log P(x) of data on 256 levels in [-1, 1] under N(mean, e^(2 log_scale)), elementwise.

  Each value owns the bin x +- 1/255; the two edge bins extend to -inf / +inf.
  """
  inv_std = jnp.exp(-log_scale)
  upper = inv_std * (x - mean + bin_half_width)
  lower = inv_std * (x - mean - bin_half_width)
  log_cdf_upper = log_ndtr(upper)
  log_sf_lower = log_ndtr(-lower)
  # the bin's mass from the nearer tail: 1 - 1 cancels in float32 beyond ~5 sigma
  mass = jnp.where(lower > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
  log_mass = jnp.log(jnp.maximum(mass, 1e-12))
  return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_sf_lower, log_mass))


def loss_by_quarter(loss_b, t_b, num_train_timesteps, quarters=4):
  """{"loss_t0".."loss_t3"}: the mean loss of this batch's rows in each quarter of the
  timestep range (0 where no row fell), to see which noise levels a model has learned."""
  q_b = jnp.minimum(t_b * quarters // num_train_timesteps, quarters - 1)
  out = {}
  for q in range(quarters):
    in_q = (q_b == q).astype(jnp.float32)
    out[f"loss_t{q}"] = jnp.sum(loss_b * in_q) / jnp.maximum(jnp.sum(in_q), 1.0)
  return out


def _mean_over_pixels(a_bhwc):
  return jnp.mean(a_bhwc, axis=tuple(range(1, a_bhwc.ndim)))


class Diffusion:
  """The training chain of a `SchedulerConfig` as float32 tables (computed in float64)."""

  def __init__(self, cfg: schedule_lib.SchedulerConfig):
    self.cfg = cfg
    self.num_timesteps = cfg.num_train_timesteps
    b = schedule_lib.betas(cfg)
    abar = np.cumprod(1.0 - b)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = b * (1.0 - abar_prev) / (1.0 - abar)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    self.betas = f32(b)
    self.alphas_cumprod = f32(abar)
    self.sqrt_abar = f32(np.sqrt(abar))
    self.sqrt_one_minus_abar = f32(np.sqrt(1.0 - abar))
    self.snr = f32(abar / (1.0 - abar))
    # q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, post_var); its variance is 0 at t=0, so
    # the log is clipped to t=1's value there (improved DDPM).
    self.posterior_x0_coef = f32(b * np.sqrt(abar_prev) / (1.0 - abar))
    self.posterior_xt_coef = f32((1.0 - abar_prev) * np.sqrt(1.0 - b) / (1.0 - abar))
    self.posterior_log_var_clipped = f32(np.log(np.append(post_var[1], post_var[1:])))
    self.log_betas = f32(np.log(b))

  @staticmethod
  def _at(table, t_b, ndim):
    return table[t_b].reshape((-1,) + (1,) * (ndim - 1))

  def q_sample(self, x0, t_b, noise):
    """x_t ~ q(x_t | x0) with the given noise."""
    return self._at(self.sqrt_abar, t_b, x0.ndim) * x0 + self._at(self.sqrt_one_minus_abar, t_b, x0.ndim) * noise

  def velocity(self, x0, t_b, noise):
    """The v target: sqrt(abar) eps - sqrt(1 - abar) x0."""
    return self._at(self.sqrt_abar, t_b, x0.ndim) * noise - self._at(self.sqrt_one_minus_abar, t_b, x0.ndim) * x0

  def model_output_to_eps_x0(self, out, x_t, t_b):
    """Model output -> (eps, x0) per prediction_type; learned_range uses the first C channels."""
    mean_out, _ = split_output(out, x_t.shape[-1], self.cfg.learned_variance)
    return eps_x0_from_output(mean_out, x_t, self._at(self.sqrt_abar, t_b, x_t.ndim),
                              self._at(self.sqrt_one_minus_abar, t_b, x_t.ndim), self.cfg.prediction_type)

  def loss_weights(self, t_b, weighting="mse", min_snr_gamma=5.0):
    """Per-example weight on the MSE of the predicted quantity.

    min_snr (Hang et al. 2023) weights every parameterisation to min(SNR, gamma) x the x0-MSE:
    eps-MSE = SNR x0-MSE, v-MSE = (SNR + 1) x0-MSE, hence the divisors.
    """
    if weighting not in LOSS_WEIGHTINGS:
      raise ValueError(f"weighting={weighting!r} is not one of {LOSS_WEIGHTINGS}")
    if weighting == "mse":
      return jnp.ones(t_b.shape, jnp.float32)
    snr = self.snr[t_b]
    clipped = jnp.minimum(snr, min_snr_gamma)
    return {"epsilon": clipped / snr, "sample": clipped, "v_prediction": clipped / (snr + 1.0)}[
        self.cfg.prediction_type]

  def vlb_bits_per_dim(self, out, x0, x_t, t_b):
    """Improved DDPM's L_t in bits/dim, (B,): KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0,
    the discretized Gaussian decoder NLL of x0 at t = 0. The mean enters through a stop-gradient."""
    if not self.cfg.learned_variance:
      raise ValueError("vlb_bits_per_dim needs variance_type='learned_range'")
    mean_out, var_out = split_output(out, x_t.shape[-1], True)
    _, x0_pred = eps_x0_from_output(
        jax.lax.stop_gradient(mean_out), x_t, self._at(self.sqrt_abar, t_b, x_t.ndim),
        self._at(self.sqrt_one_minus_abar, t_b, x_t.ndim), self.cfg.prediction_type)
    c0 = self._at(self.posterior_x0_coef, t_b, x_t.ndim)
    ct = self._at(self.posterior_xt_coef, t_b, x_t.ndim)
    min_log = self._at(self.posterior_log_var_clipped, t_b, x_t.ndim)
    max_log = self._at(self.log_betas, t_b, x_t.ndim)
    frac = (var_out + 1.0) / 2.0
    model_log_var = frac * max_log + (1.0 - frac) * min_log
    model_mean = c0 * x0_pred + ct * x_t
    kl = _mean_over_pixels(normal_kl(c0 * x0 + ct * x_t, min_log, model_mean, model_log_var))
    nll = -_mean_over_pixels(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var))
    return jnp.where(t_b == 0, nll, kl) / math.log(2.0)

  def training_loss(self, model_fn, x0_bhwc, rng, *, weighting="mse", min_snr_gamma=5.0,
                    learned_variance_weight=None):
    """(loss_b float32 (B,), t_b int32 (B,)) for t ~ U{0..T-1} and fresh noise.

    learned_range adds learned_variance_weight x L_t (bits/dim); the default T/1000 is
    improved DDPM's lambda = 0.001 on the full-chain VLB (T x E_t[L_t]).
    """
    t_rng, noise_rng = jax.random.split(rng)
    x0 = x0_bhwc.astype(jnp.float32)
    t_b = jax.random.randint(t_rng, (x0.shape[0],), 0, self.num_timesteps, jnp.int32)
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    x_t = self.q_sample(x0, t_b, noise)
    out = model_fn(x_t, t_b).astype(jnp.float32)
    mean_out, _ = split_output(out, x0.shape[-1], self.cfg.learned_variance)
    target = {"epsilon": noise, "sample": x0,
              "v_prediction": self.velocity(x0, t_b, noise)}[self.cfg.prediction_type]
    loss_b = self.loss_weights(t_b, weighting, min_snr_gamma) * _mean_over_pixels((mean_out - target) ** 2)
    if self.cfg.learned_variance:
      w = self.num_timesteps / 1000.0 if learned_variance_weight is None else learned_variance_weight
      loss_b = loss_b + w * self.vlb_bits_per_dim(out, x0, x_t, t_b)
    return loss_b, t_b
