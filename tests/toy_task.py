"""A tiny regression task for testing the trainer's mechanics (not a model family).

Data is a pure function of the example index, so iterator state is one integer
and every process can compute its own rows of any global batch.
"""
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs.common import base_config
from dalle_jax.models import layers
from dalle_jax.tasks.base import Task

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
  def __init__(self, batch_size, start, poison_step=-1, sleep=0.0):
    self.batch_size, self.index, self.poison_step, self.sleep = batch_size, start, poison_step, sleep
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
    return {"index": self.index}

  def set_state(self, s):
    self.index = int(s["index"])


class ToyTask(Task):
  name = "toy"

  def make_iterator(self, split, batch_size, *, shuffle=True, repeat=True):
    start = 0 if split == "train" else 10 ** 6
    train = split == "train"
    return ToyIterator(batch_size, start, self.config.model.poison_step if train else -1,
                       self.config.model.step_sleep if train else 0.0)

  def dummy_batch(self, batch_size):
    return {"x": np.zeros((batch_size, DIM), np.float32), "y": np.zeros((batch_size, DIM), np.float32)}

  def model(self):
    return ToyModel(self.config.model.hidden)

  def init(self, rng, batch):
    return self.model().init(rng, batch["x"])

  def loss_fn(self, params, model_state, batch, rng, step):
    pred = self.model().apply({"params": params}, batch["x"])
    loss = jnp.mean(jnp.square(pred - batch["y"]))
    return loss, ({"mae": jnp.mean(jnp.abs(pred - batch["y"]))}, model_state)


TASK = ToyTask
