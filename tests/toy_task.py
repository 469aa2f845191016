"""A tiny regression task for testing the trainer's mechanics (not a model family).

Data is a pure function of the example index, so iterator state is one integer
and every process can compute its own rows of any global batch.
"""
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.configs.common import base_config
from dalle_jax import parallel
from dalle_jax.models import layers
from dalle_jax.tasks.base import Task, to_uint8

DIM = 32


def get_config(arg=None):
  c = base_config()
  c.family = "tests.toy_task"
  c.total_steps = 12
  c.batch_size = 16
  c.log_every = 1
  c.eval_every = 6
  c.eval_batches = 1
  c.preview_every = 0
  c.checkpoint_every = 4
  c.dtype = "float32"
  c.optimizer.warmup_steps = 2
  c.optimizer.learning_rate = 1e-2
  c.model.hidden = 64
  c.model.poison_step = -1  # feed NaN inputs at this step (NaN tests)
  c.model.step_sleep = 0.0  # seconds per batch, so subprocess tests can kill mid-run
  # Preemption tests: the process sends itself SIGTERM while the trainer saves
  # this step (reading the iterator's state), only in process `sigterm_process`.
  c.model.sigterm_on_save_step = -1
  c.model.sigterm_process = 0
  # Slow devices: each step also runs this many 256x256 matmuls (no host
  # callback: those make CPU dispatch synchronous).
  c.model.device_work = 0
  return c


class ToyModel(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x_bd):
    h = layers.Dense(self.hidden, ("embed", "mlp"), use_bias=False, name="wi")(x_bd)
    h = nn.gelu(h)
    return layers.Dense(DIM, ("mlp", "embed"), use_bias=False, name="wo")(h)


def example(i):
  rng = np.random.default_rng(int(i))
  x = rng.standard_normal(DIM).astype(np.float32)
  return x, np.tanh(x[::-1] * 0.7).astype(np.float32)


class ToyIterator:
  def __init__(self, batch_size, start, poison_step=-1, sleep=0.0, sigterm_on_save_step=-1):
    self.batch_size, self.index, self.poison_step, self.sleep = batch_size, start, poison_step, sleep
    self.sigterm_on_save_step = sigterm_on_save_step
    self.pid, self.nproc = jax.process_index(), jax.process_count()

  def __next__(self):
    time.sleep(self.sleep)
    b = self.batch_size
    local = b // self.nproc
    ids = range(self.index + self.pid * local, self.index + (self.pid + 1) * local)
    xs, ys = zip(*(example(i) for i in ids))
    x = np.stack(xs)
    if self.poison_step >= 0 and self.index // b == self.poison_step:
      x = x * np.nan
    self.index += b
    return {"x": x, "y": np.stack(ys)}

  def get_state(self):
    if self.sigterm_on_save_step >= 0 and self.index == self.sigterm_on_save_step * self.batch_size:
      os.kill(os.getpid(), signal.SIGTERM)
    return {"index": self.index}

  def set_state(self, s):
    self.index = int(s["index"])


class ToyTask(Task):
  name = "toy"

  def make_iterator(self, split, batch_size, *, shuffle=True, repeat=True):
    start = 0 if split == "train" else 10 ** 6
    m = self.config.model
    if split != "train":
      return ToyIterator(batch_size, start)
    sigterm = m.sigterm_on_save_step if jax.process_index() == m.sigterm_process else -1
    return ToyIterator(batch_size, start, m.poison_step, m.step_sleep, sigterm)

  def dummy_batch(self, batch_size):
    return {"x": np.zeros((batch_size, DIM), np.float32), "y": np.zeros((batch_size, DIM), np.float32)}

  def model(self):
    return ToyModel(self.config.model.hidden)

  def init(self, rng, batch):
    return self.model().init(rng, batch["x"])

  def loss_fn(self, params, model_state, batch, rng, step):
    pred = self.model().apply({"params": params}, batch["x"])
    loss = jnp.mean(jnp.square(pred - batch["y"]))
    if self.config.model.device_work:  # + 0 * (busy work the loss waits for)
      a = jnp.full((256, 256), 1e-3) + batch["x"][0, 0]
      a = jax.lax.fori_loop(0, self.config.model.device_work, lambda _, a: jnp.tanh(a @ a), a)
      loss = loss + 0.0 * a[0, 0]
    return loss, ({"mae": jnp.mean(jnp.abs(pred - batch["y"]))}, model_state)

  def preview(self, params, model_state, batch, rng):
    """Predictions for the first 8 eval rows as an (8, 32, 3) image: global
    arrays in (a sharded batch), host uint8 out on every process."""
    pred = jax.jit(lambda p, x: jnp.tanh(self.model().apply({"params": p}, x[:8])))(
        params, batch["x"])
    return {"pred": np.repeat(to_uint8(parallel.to_host(pred))[..., None], 3, -1)}


TASK = ToyTask
