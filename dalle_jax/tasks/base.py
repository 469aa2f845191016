"""The contract between a model family and the family-agnostic trainer.

A task is the only place that knows a family's objective. The trainer
(`dalle_jax.train`) owns sharding, optimizers, accumulation, EMA, checkpoints,
metrics and the loop; it calls these methods:

* `preprocess(example) -> example` — per-example numpy transform applied by the
  input pipeline after image decoding (e.g. tokenise the caption).
* `make_iterator(split, batch_size, shuffle, repeat)` — the input pipeline
  (default: `dalle_jax.data.pipeline` over `config.data` with `preprocess`).
* `dummy_batch(batch_size) -> dict[str, np.ndarray]` — shapes/dtypes of one batch.
* `init(rng, batch) -> variables` — Flax variables {'params': ..., other
  collections}; parameters boxed with logical axis names. Called under
  `jax.eval_shape` first, then jitted with sharded outputs.
* `optimizer_groups() -> {group: optimizer ConfigDict}` and
  `param_labels(params) -> tree of group names` — several optimizers (a GAN's
  generator and discriminator) inside one step. Default: one group 'model'.
* `loss_fn(params, model_state, batch, rng, step) -> (loss, (metrics, model_state))`
  — pure and jittable; `model_state` holds the non-parameter collections
  (e.g. EMA codebooks). Gradients of `loss` w.r.t. *all* params are applied per
  group, so a GAN stops gradients between its two terms itself.
* `eval_fn(params, model_state, batch, rng) -> metrics` (scalars, averaged over
  eval batches by the trainer; jitted by it, inputs as for `loss_fn`).
* `preview(params, model_state, batch, rng) -> {name: uint8 (H, W, 3)}` — images
  the trainer writes as PNGs in the workdir. `batch` holds the eval batch as
  global jax.Arrays sharded like a train batch (each process contributed its
  rows; string fields dropped) and the parameters are sharded over every
  device, across processes: compute with jitted functions and bring results
  back with `parallel.to_host` (never np.asarray on a global array). Every
  process returns the same host numpy images; process 0 writes them.
* `flops_per_example()` / `tokens_per_example()` — optional, for MFU and tokens/s.
"""
import ml_collections
import numpy as np

import jax

from dalle_jax.data import images as images_lib


class Task:
  name = "task"

  def __init__(self, config: ml_collections.ConfigDict):
    # A copy: values a task resolves (e.g. vocabulary sizes from the data) land
    # here and in the recorded config.json, never in the caller's locked config.
    self.config = config.copy_and_resolve_references()

  # --- data -----------------------------------------------------------------
  def preprocess(self, example):
    return example

  def make_iterator(self, split, batch_size, *, shuffle=True, repeat=True):
    """Process-local batches with get_state()/set_state() (the trainer's input)."""
    from dalle_jax.data import pipeline
    return pipeline.make_iterator(self.config.data, split, batch_size, seed=self.config.seed,
                                  preprocess=self.preprocess, shuffle=shuffle, repeat=repeat)

  def dummy_batch(self, batch_size):
    raise NotImplementedError

  # --- model ----------------------------------------------------------------
  def init(self, rng, batch):
    raise NotImplementedError

  def optimizer_groups(self):
    return {"model": self.config.optimizer}

  def param_labels(self, params):
    return jax.tree.map(lambda _: "model", params)

  def loss_fn(self, params, model_state, batch, rng, step):
    raise NotImplementedError

  def eval_fn(self, params, model_state, batch, rng):
    loss, (metrics, _) = self.loss_fn(params, model_state, batch, rng, step=0)
    return dict(metrics, loss=loss)

  def preview(self, params, model_state, batch, rng):
    return {}

  def flops_per_example(self):
    return None

  def tokens_per_example(self):
    return None


def get_task(config) -> Task:
  """Imports `dalle_jax.tasks.<config.family>` and builds its `TASK` class."""
  import importlib
  # A dotted name is a module path (tasks defined outside the package, e.g. tests).
  name = config.family if "." in config.family else f"dalle_jax.tasks.{config.family}"
  try:
    module = importlib.import_module(name)
  except ModuleNotFoundError as e:
    raise ValueError(f"config.family={config.family!r} names no task module "
                     f"(dalle_jax/tasks/{config.family}.py): {e}") from e
  return module.TASK(config)


# One home for image utilities (data/images.py); kept here for the tasks' previews.
image_grid = images_lib.image_grid
to_uint8 = images_lib.to_uint8
