"""Noise schedules and inference timesteps, as diffusers' schedulers define them.

`SchedulerConfig` is what a checkpoint carries (keys and meanings as diffusers'
`scheduler_config.json`); `betas` / `alphas_cumprod` are the training chain in
float64; `timesteps` is the respaced chain each sampler visits, step for step the
one diffusers' `set_timesteps` gives (DPM-Solver spaces K+1 points and drops the
last, DDPM/DDIM space K, UnCLIP spaces K points from T-1 down to 0 whatever
`timestep_spacing` says: 999, 888, ..., 0 for K = 10).

Shapes: T num_train_timesteps, K inference steps.
"""
import dataclasses
import math

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned_range")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
SAMPLERS = ("ddpm", "ddim", "dpmpp", "unclip")
# diffusers scheduler class -> the sampler that reproduces it
NATIVE_SAMPLERS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim",
                   "DPMSolverMultistepScheduler": "dpmpp", "UnCLIPScheduler": "unclip"}

# scheduler_config.json keys that configure a diffusers scheduler class rather than
# the chain the model was trained on; `--sampler` decides these here.
_IGNORED_KEYS = {
    # DPM-Solver: `dpmpp` is always DPM-Solver++(2M), midpoint form (diffusers' defaults).
    "solver_order", "algorithm_type", "solver_type",
    # UnCLIPScheduler / PNDM / Euler bookkeeping without an effect on these samplers.
    "skip_prk_steps", "set_alpha_to_one_for_prk", "timestep_type", "interpolation_type",
    "use_dynamic_shifting", "time_shift_type", "flow_shift", "predict_x0", "disable_corrector", "solver_p",
}
# Class defaults that differ from SchedulerConfig's (DDPMScheduler's), applied to keys a
# scheduler_config.json leaves out, as diffusers' from_config does: Karlo's UnCLIPScheduler
# configs carry no beta_schedule (the class only supports the cosine one).
_CLASS_DEFAULTS = {
    "UnCLIPScheduler": dict(beta_schedule="squaredcos_cap_v2", variance_type="fixed_small_log"),
    "DPMSolverMultistepScheduler": dict(timestep_spacing="linspace"),
}
# Keys accepted only at the value that keeps the chain a plain discrete VP chain.
_REQUIRED_DEFAULTS = {
    "trained_betas": None, "rescale_betas_zero_snr": False, "use_karras_sigmas": False,
    "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
    "use_flow_sigmas": False, "sigma_min": None, "sigma_max": None, "shift_terminal": None,
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """A checkpoint's diffusion settings; `from_dict` reads diffusers' scheduler_config.json."""
  num_train_timesteps: int = 1000
  beta_schedule: str = "linear"
  beta_start: float = 1e-4
  beta_end: float = 0.02
  prediction_type: str = "epsilon"
  variance_type: str = "fixed_small"
  clip_sample: bool = True  # DDPM/DDIM only; diffusers' DPM-Solver never clips (use thresholding)
  clip_sample_range: float = 1.0
  thresholding: bool = False
  dynamic_thresholding_ratio: float = 0.995
  sample_max_value: float = 1.0  # thresholding with sample_max_value=1 is static clipping to [-1, 1]
  timestep_spacing: str = "leading"
  steps_offset: int = 0
  set_alpha_to_one: bool = True  # DDIM: alpha_cumprod "before" t=0 is 1 (else alphas_cumprod[0])
  # DPM-Solver++ (diffusers' DPMSolverMultistepScheduler defaults)
  lower_order_final: bool = True
  euler_at_final: bool = False
  final_sigmas_type: str = "zero"
  lambda_min_clipped: float = -math.inf
  # Sampling with a clipped / thresholded x0 stays self-consistent (GLIDE, guided-diffusion):
  # DDIM re-derives eps from the processed x0 (diffusers' step(use_clipped_model_output=True))
  # and DPM-Solver++ clips x0 too when clip_sample. Off = diffusers' defaults (parity); on is
  # what guided sampling of a clipped model needs: at guidance 3 the raw x0 lies far outside
  # [-1, 1], and DDIM mixing the clipped x0 with the unclipped eps drifts off the data.
  use_clipped_model_output: bool = False

  def __post_init__(self):
    _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
    _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
    _check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
    _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
    _check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
    if not (isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 2):
      raise ValueError(f"num_train_timesteps must be an int >= 2, got {self.num_train_timesteps!r}")
    if self.beta_schedule != "squaredcos_cap_v2" and not 0 < self.beta_start <= self.beta_end < 1:
      raise ValueError(f"beta_start/beta_end must satisfy 0 < beta_start <= beta_end < 1, got "
                       f"{self.beta_start}, {self.beta_end}")
    if not 0 < self.dynamic_thresholding_ratio <= 1:
      raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {self.dynamic_thresholding_ratio}")
    if self.sample_max_value < 1:
      raise ValueError(f"sample_max_value must be >= 1, got {self.sample_max_value}")
    if self.clip_sample_range <= 0:
      raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")
    if self.steps_offset < 0:
      raise ValueError(f"steps_offset must be >= 0, got {self.steps_offset}")

  @classmethod
  def from_dict(cls, d):
    """Reads a diffusers scheduler_config.json dict (DDPM, DDIM, DPM-Solver, UnCLIP, PNDM keys);
    keys it leaves out take its `_class_name`'s defaults (see `native_sampler`)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = dict(_CLASS_DEFAULTS.get(d.get("_class_name"), {}))
    for key, value in d.items():
      if key in fields:
        if key == "variance_type" and value is None:  # DPM-Solver: None = a fixed-variance model
          continue
        kw[key] = value
      elif key in _REQUIRED_DEFAULTS:
        if value not in (None, False):
          raise ValueError(f"scheduler config: {key}={value!r} is not supported "
                           f"(only {_REQUIRED_DEFAULTS[key]!r})")
      elif key not in _IGNORED_KEYS and not key.startswith("_"):  # _class_name, _diffusers_version, ...
        raise ValueError(f"scheduler config: unknown key {key!r}")
    return cls(**kw)

  def to_dict(self):
    return dataclasses.asdict(self)

  def replace(self, **kw):
    unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise ValueError(f"SchedulerConfig has no field(s) {sorted(unknown)}")
    return dataclasses.replace(self, **kw)  # __post_init__ validates

  @property
  def learned_variance(self):
    return self.variance_type == "learned_range"


def native_sampler(d):
  """The sampler that reproduces a scheduler_config.json dict's `_class_name`, or None."""
  return NATIVE_SAMPLERS.get(d.get("_class_name"))


def _check_choice(key, value, choices):
  if value not in choices:
    raise ValueError(f"{key}={value!r} is not one of {', '.join(choices)}")


def betas(cfg: SchedulerConfig) -> np.ndarray:
  """beta_t for t = 0..T-1, float64."""
  n = cfg.num_train_timesteps
  if cfg.beta_schedule == "linear":
    return np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float64)
  if cfg.beta_schedule == "scaled_linear":  # latent diffusion: linear in sqrt(beta)
    return np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=np.float64) ** 2
  if cfg.beta_schedule == "sigmoid":  # GeoDiff
    s = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, n, dtype=np.float64)))
    return s * (cfg.beta_end - cfg.beta_start) + cfg.beta_start
  # squaredcos_cap_v2: improved DDPM's cosine alpha_bar, each beta capped at 0.999
  alpha_bar = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
  i = np.arange(n, dtype=np.float64)
  return np.minimum(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
  """alpha_bar_t = prod_{s<=t} (1 - beta_s), float64 (T,)."""
  return np.cumprod(1.0 - betas(cfg))


def _last_timestep(cfg):
  """T, or fewer where diffusers' DPM-Solver clips lambda(t) from below (lambda_min_clipped)."""
  if cfg.lambda_min_clipped == -math.inf:
    return cfg.num_train_timesteps
  ac = alphas_cumprod(cfg)
  lam = 0.5 * np.log(ac) - 0.5 * np.log1p(-ac)
  return cfg.num_train_timesteps - int(np.searchsorted(lam[::-1], cfg.lambda_min_clipped))


def timesteps(cfg: SchedulerConfig, num_steps: int, sampler: str) -> np.ndarray:
  """The K training timesteps a sampler visits, descending, int64 (K,)."""
  _check_choice("sampler", sampler, SAMPLERS)
  n = cfg.num_train_timesteps
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= n:
    raise ValueError(f"steps must be an int in [1, num_train_timesteps={n}], got {num_steps!r}")
  k = int(num_steps)
  spacing = cfg.timestep_spacing
  if sampler in ("ddpm", "ddim"):
    if spacing == "linspace":
      ts = np.linspace(0, n - 1, k).round()[::-1]
    elif spacing == "leading":
      ts = (np.arange(k) * (n // k)).round()[::-1] + cfg.steps_offset
    else:
      ts = np.round(np.arange(n, 0, -n / k)) - 1
    return _checked(ts.astype(np.int64), cfg, k, sampler)
  if sampler == "unclip":  # Karlo: K points from T-1 to 0 (no spacing / offset options)
    if k < 2:
      raise ValueError(f"steps={k}: the unclip sampler needs steps >= 2 (it spans T-1 .. 0)")
    return _checked((np.arange(k) * ((n - 1) / (k - 1))).round()[::-1].astype(np.int64), cfg, k, sampler)
  # DPM-Solver spaces K+1 points up to the (lambda-clipped) last timestep and drops t=0.
  last = _last_timestep(cfg)
  if spacing == "linspace":
    ts = np.linspace(0, last - 1, k + 1).round()[::-1][:-1]
  elif spacing == "leading":
    ts = (np.arange(k + 1) * (last // (k + 1))).round()[::-1][:-1] + cfg.steps_offset
  else:
    ts = np.arange(last, 0, -n / k).round() - 1
  return _checked(ts.astype(np.int64), cfg, k, sampler)


def _checked(ts, cfg, k, sampler):
  if ts[0] >= cfg.num_train_timesteps or ts[-1] < 0:
    raise ValueError(f"steps={k} with timestep_spacing={cfg.timestep_spacing!r}, steps_offset="
                     f"{cfg.steps_offset} gives timesteps outside [0, {cfg.num_train_timesteps})")
  if np.any(np.diff(ts) >= 0):
    raise ValueError(f"steps={k} is too many for {sampler} with timestep_spacing="
                     f"{cfg.timestep_spacing!r} (timesteps repeat)")
  return ts
