"""Config checks that run before anything is built: the trainer's keys and every
shared string switch, in one place.

Each error is one line naming the key, its value and what is valid; the
command line prints it without a traceback (`cli.train_main`). Family-specific
keys are checked by their task's constructor; the trainer turns those errors
into ConfigError too.
"""
from dalle_jax.models import layers
from dalle_jax.train import optimizers


class ConfigError(ValueError):
  """A config the trainer cannot run with (printed as one line, no traceback)."""


DTYPES = ("float32", "bfloat16", "float16")

# Shared string switches: key -> valid values.
SWITCHES = {
    "nan_policy": ("stop", "skip"),  # a NaN/inf step: abort naming it | drop the update
    "remat": ("none",) + tuple(layers.REMAT_POLICIES),
    "dtype": DTYPES,
    "param_dtype": DTYPES,
}
OPTIMIZER_SWITCHES = {
    "name": tuple(optimizers.OPTIMIZERS),
    "schedule": optimizers.SCHEDULES,
}

# Integer keys -> smallest valid value (0 turns eval / previews off).
MINIMUMS = {
    "total_steps": 1, "batch_size": 1, "grad_accum_steps": 1, "log_every": 1,
    "checkpoint_every": 1, "keep_checkpoints": 1, "eval_every": 0, "eval_batches": 1,
    "preview_every": 0,
}


def _choice(key, value, valid):
  if value not in valid:
    raise ConfigError(f"config.{key}={value!r}: choose {' | '.join(map(str, valid))}")


def check_config(config):
  """The trainer's own keys and the shared switches."""
  for key, valid in SWITCHES.items():
    if key in config:
      _choice(key, config[key], valid)
  for key, lowest in MINIMUMS.items():
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
      raise ConfigError(f"config.{key}={value!r}: must be an integer >= {lowest}")
  if not 0.0 <= float(config.ema_decay) < 1.0:
    raise ConfigError(f"config.ema_decay={config.ema_decay!r}: must be in [0, 1) (0 turns it off)")
  if (config.init_from_include or config.init_from_exclude) and not config.init_from:
    raise ConfigError("config.init_from_include / init_from_exclude are set but config.init_from "
                      "(the checkpoint to fine-tune from) is empty")


def check_optimizers(config, groups):
  """Each optimizer group's switches, named by the config key that holds it."""
  for group, opt_cfg in groups.items():
    key = next((k for k in config.keys() if config[k] is opt_cfg), group)
    for name, valid in OPTIMIZER_SWITCHES.items():
      _choice(f"{key}.{name}", opt_cfg[name], valid)


def check_batch(config, mesh, batch_axis_size):
  """The global batch splits evenly over the data-parallel devices (and micro-batches)."""
  n, b, accum = batch_axis_size, config.batch_size, config.grad_accum_steps
  if b % (n * accum):
    need = f"{n} data-parallel devices" + (f" x {accum} micro-batches" if accum > 1 else "")
    raise ConfigError(f"config.batch_size={b} is not divisible by the {need} "
                      f"(mesh {dict(mesh.shape)}): use a multiple of {n * accum}")
