"""The train state: everything a step reads and writes, checkpointed as one tree."""
from typing import Any

import flax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # () int32, number of updates applied
  params: Any  # unboxed parameter tree (f32)
  opt_state: Any
  model_state: Any  # non-parameter collections the task keeps (e.g. EMA codebooks)
  ema_params: Any  # EMA of params, or None when config.ema_decay == 0
  rng: jnp.ndarray  # base key; each step folds in its step number
  nonfinite_step: jnp.ndarray  # () int32, first step whose loss/grad was NaN/inf, -1 if none
