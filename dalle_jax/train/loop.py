"""The family-agnostic trainer: sharded init, pure train step, loop, resume.

    state = init (abstract -> shardings -> jit with out_shardings)
    for step: state, metrics = train_step(state, batch)   # donated, sharded
              log / eval / preview / checkpoint / SIGTERM

The task (`dalle_jax.tasks.<family>`) supplies the objective; everything here
is shared by all families.
"""
import collections
import logging
import os
import re
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P
from PIL import Image

from dalle_jax import parallel, paths
from dalle_jax.data import pipeline
from dalle_jax.evaluate import periodic
from dalle_jax.models import scan_layout
from dalle_jax.tasks.base import get_task
from dalle_jax.train import checkpoint as ckpt_lib
from dalle_jax.train import metrics as metrics_lib
from dalle_jax.train import validation
from dalle_jax.train.optimizers import global_norm, make_optimizer
from dalle_jax.train.state import TrainState
from dalle_jax.train.validation import ConfigError

# The host runs at most this many steps ahead of the devices: after dispatching
# step n it waits for step n - 2, so the devices always have the next step
# queued (no throughput lost) and a SIGTERM is honoured within a couple of steps
# (not up to log_every steps later, which a spot VM's 30 s notice may not allow).
MAX_STEPS_IN_FLIGHT = 2


class NonFiniteLossError(RuntimeError):
  pass


# --- state --------------------------------------------------------------------

def _split_variables(variables):
  variables = dict(variables)
  params = variables.pop("params")
  return params, variables


def _drop_reshaped_boxes(opt_state):
  """Optimizer-state leaves that kept a parameter's logical names but not its
  rank (Adafactor's factored row/column moments) lose them: small, replicated."""
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  reshaped = lambda x: is_box(x) and hasattr(x.value, "ndim") and x.value.ndim != len(x.names)
  return jax.tree.map(lambda x: x.value if reshaped(x) else x, opt_state, is_leaf=is_box)


def make_init_fn(task, tx, config, batch):
  """init(rng) -> boxed TrainState (logical names kept for shardings)."""
  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    params, model_state = _split_variables(task.init(init_rng, batch))
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state=_drop_reshaped_boxes(tx.init(params)),
        model_state=model_state,
        ema_params=params if config.ema_decay > 0 else None,
        rng=jax.random.key_data(state_rng), nonfinite_step=jnp.full((), -1, jnp.int32))
  return init


def create_state(task, tx, config, mesh, batch):
  """Abstract init -> NamedShardings from logical names -> jitted sharded init."""
  boxed_init = make_init_fn(task, tx, config, batch)
  rng = jax.random.key_data(jax.random.PRNGKey(config.seed))
  init = lambda r: parallel.unbox(boxed_init(jax.random.wrap_key_data(r)))
  with parallel.mesh_context(mesh, config):
    abstract_boxed = jax.eval_shape(lambda r: boxed_init(jax.random.wrap_key_data(r)), rng)
    shardings = parallel.logical_shardings(abstract_boxed, mesh, parallel.rules_from_config(config))
    state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings


def abstract_state(task, tx, config, mesh, batch):
  """ShapeDtypeStructs with shardings, for restore (no allocation)."""
  boxed_init = make_init_fn(task, tx, config, batch)
  rng = jax.random.key_data(jax.random.PRNGKey(config.seed))
  with parallel.mesh_context(mesh, config):
    abstract_boxed = jax.eval_shape(lambda r: boxed_init(jax.random.wrap_key_data(r)), rng)
    shardings = parallel.logical_shardings(abstract_boxed, mesh, parallel.rules_from_config(config))
  abstract = parallel.unbox(abstract_boxed)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings), shardings


# --- step ---------------------------------------------------------------------

def make_train_step(task, tx, config, schedules, mesh):
  """Pure `train_step(state, batch) -> (state, metrics)`; rng = fold_in(state.rng, step)."""
  accum = int(config.grad_accum_steps)
  grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)
  batch_axes = tuple(a for a in parallel.BATCH_AXES if a in mesh.shape)

  def micro_batches(batch):
    # Row j*accum + i goes to micro-batch i, so every device keeps its share.
    def split(x):
      x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
      spec = jax.sharding.PartitionSpec(None, batch_axes, *([None] * (x.ndim - 2)))
      return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
    return jax.tree.map(split, batch)

  def compute_grads(state, batch, rng):
    if accum == 1:
      (loss, (metrics, model_state)), grads = grad_fn(
          state.params, state.model_state, batch, rng, state.step)
      return loss, metrics, model_state, grads

    def body(carry, xs):
      grads_acc, model_state = carry
      mb, i = xs
      (loss, (metrics, model_state)), grads = grad_fn(
          state.params, model_state, mb, jax.random.fold_in(rng, i), state.step)
      grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32) / accum, grads_acc, grads)
      return (grads_acc, model_state), (loss, metrics)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    (grads, model_state), (losses, metrics) = jax.lax.scan(
        body, (zeros, state.model_state), (micro_batches(batch), jnp.arange(accum)))
    return losses.mean(), jax.tree.map(jnp.mean, metrics), model_state, grads

  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, metrics, model_state, grads = compute_grads(state, batch, rng)
    grad_norm = global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state.params, updates)
    ema = state.ema_params
    if ema is not None:
      d = config.ema_decay
      ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                        model_state=model_state, ema_params=ema)
    # A NaN/inf step never reaches the parameters: keep the old state, record
    # the step, and let the host stop ("stop") or carry on ("skip").
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state.replace(step=state.step + 1))
    first_bad = jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step)
    new = new.replace(nonfinite_step=first_bad)
    out = dict(metrics, loss=loss, grad_norm=grad_norm)
    for name, sched in schedules.items():
      out["learning_rate" if len(schedules) == 1 else f"learning_rate_{name}"] = sched(state.step)
    if len(schedules) > 1:
      out["learning_rate"] = out[f"learning_rate_{next(iter(schedules))}"]
    return new, out

  return train_step


def make_eval_step(task):
  def eval_step(params, model_state, batch, rng):
    return task.eval_fn(params, model_state, batch, rng)
  return eval_step


# --- loop ---------------------------------------------------------------------

class Preemption:
  """SIGTERM -> one stop step that every process agrees on.

  The handler only sets a flag. With several processes each step also
  dispatches a tiny all-reduce (any) of every process's flag behind the train
  step, and the host reads it MAX_STEPS_IN_FLIGHT steps later, when that step
  has finished anyway: all processes read the same value after the same step,
  without an extra synchronisation. One process reads its flag directly.
  """

  def __init__(self, mesh):
    self.requested = False
    self._mesh = mesh
    self._flags = collections.deque()  # multi-process: all-reduced flags, oldest first
    if jax.process_count() > 1:
      self._sharding = jax.sharding.NamedSharding(mesh, P(tuple(mesh.axis_names)))  # 1 per device
      self._any = jax.jit(jnp.any, out_shardings=parallel.replicated(mesh))
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. inside a test runner thread)
      self._old = None

  def _handle(self, signum, frame):
    if not self.requested:
      logging.warning("SIGTERM received: saving a checkpoint and exiting")
    self.requested = True

  def should_stop(self):
    """Called once per step by every process: True when all stop after this step."""
    if jax.process_count() == 1:
      return self.requested
    flag = self.requested
    flags = jax.make_array_from_callback((self._mesh.size,), self._sharding,
                                         lambda _: np.array([flag]))
    self._flags.append(self._any(flags))
    if len(self._flags) <= MAX_STEPS_IN_FLIGHT:
      return False
    return bool(parallel.to_host(self._flags.popleft()))

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _snapshot_tokenizer(config, workdir):
  """Copies the text tokenizer into WORKDIR/tokenizer/ so the workdir is self-contained.

  Returns the config to record, whose text.path points at the copy (relative, so
  `checkpoint.load_model` resolves it wherever the workdir is moved).
  """
  if "text" not in config:
    return config
  from dalle_jax.data import tokenizers
  text = config.text
  src = text.path
  if not src and text.tokenizer == "sentencepiece":
    tokenizers.get_tokenizer(text, config.data)  # trains and caches it if needed
    src = tokenizers.cached_sentencepiece_path(text, config.data)
  if not src or not paths.resolve(src).exists():
    return config
  src = paths.resolve(src)
  name = os.path.basename(os.path.normpath(os.fspath(src)))
  dst = workdir / "tokenizer" / name
  if jax.process_index() == 0 and src != dst:
    paths.copy(src, dst)
  recorded = ml_collections.ConfigDict(config.to_dict())
  recorded.text.path = f"tokenizer/{name}"
  return recorded


def _write_config(config, workdir):
  if jax.process_index() != 0:
    return
  workdir.mkdir(parents=True, exist_ok=True)
  config = _snapshot_tokenizer(config, workdir)
  paths.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))


def _save_previews(images, workdir, step):
  if jax.process_index() != 0 or not images:
    return
  out_dir = workdir / "previews"
  out_dir.mkdir(parents=True, exist_ok=True)
  for name, img in images.items():
    with (out_dir / f"{name}_{step:06d}.png").open("wb") as f:
      Image.fromarray(np.asarray(img, np.uint8)).save(f, format="PNG")


def _prepare(config):
  """(task, mesh, train iterator): every check of the config, before config.json
  is written or anything is compiled; a problem is a one-line ConfigError."""
  validation.check_config(config)
  try:
    mesh = parallel.make_mesh(config.mesh)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  validation.check_batch(config, mesh, parallel.batch_axis_size(mesh))
  try:
    task = get_task(config)  # works on its own copy: resolved values land in task.config
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise ConfigError(str(e).strip("'\"")) from e
  validation.check_optimizers(task.config, task.optimizer_groups())
  if config.get("init_from"):
    for key in ("init_from_include", "init_from_exclude"):
      try:
        re.compile(config[key])
      except re.error as e:
        raise ConfigError(f"config.{key}={config[key]!r} is not a regular expression: {e}") from None
    try:
      ckpt_lib.read_config(config.init_from)
    except FileNotFoundError as e:
      raise ConfigError(f"config.init_from: {e}") from None
  try:
    train_iter = task.make_iterator(config.data.train_split, config.batch_size,
                                    shuffle=config.data.shuffle)
  except (FileNotFoundError, ValueError) as e:
    if str(e).startswith("data."):  # a data.* key the pipeline checked: named as it is
      raise ConfigError(f"config.{e}") from None
    raise ConfigError(f"config.data.dataset={config.data.dataset!r}: {e}") from e
  return task, mesh, train_iter


def _init_from(config, abstract_params, mesh):
  """The parameters config.init_from selects (include/exclude regexes), restored
  straight into their shards and checked (a mismatch is named) before the model
  compiles; the others stay abstract, to be filled by the fresh init.

  A checkpoint whose layer Stacks have the other layout (per-layer vs scanned,
  scan_layers) is read in its own layout, sharded as XLA propagates the run's
  shardings through the conversion, and converted on device
  (models.scan_layout.to_layout); include/exclude then match the run's names.
  """
  path, inc, exc = config.init_from, config.init_from_include, config.init_from_exclude
  saved = ckpt_lib.params_metadata(path)
  if scan_layout.same_layout(saved, abstract_params):
    return ckpt_lib.load_params(path, abstract_params, include=inc, exclude=exc)
  to_saved = lambda t: scan_layout.to_layout(t, like=saved)
  try:
    saved_abstract = jax.eval_shape(to_saved, abstract_params)
  except ValueError as e:
    raise ckpt_lib.CheckpointMismatchError(f"init_from {path} (layer layout converted): {e}") from None
  with parallel.mesh_context(mesh, config):
    saved_shardings = jax.jit(to_saved).lower(abstract_params).compile().output_shardings
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        saved_abstract, saved_shardings)
  loaded = ckpt_lib.load_params(path, target)
  shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
  with parallel.mesh_context(mesh, config):
    converted = jax.jit(lambda t: scan_layout.to_layout(t, like=abstract_params),
                        out_shardings=shardings)(loaded)
  logging.info("init_from %s: converted between scanned and per-layer layouts", path)
  inc, exc = re.compile(inc) if inc else None, re.compile(exc) if exc else None
  picked = []
  def pick(key_path, new, fresh):
    name = "/".join(str(getattr(k, "key", k)) for k in key_path)
    if (inc is None or inc.search(name)) and not (exc and exc.search(name)):
      picked.append(name)
      return new
    return fresh
  out = jax.tree_util.tree_map_with_path(pick, converted, abstract_params)
  if not picked:
    raise ckpt_lib.CheckpointMismatchError(
        f"init_from {path}: no model parameter matches include={config.init_from_include!r} / "
        f"exclude={config.init_from_exclude!r}")
  return out


def _merge_params(state, loaded):
  params = jax.tree.map(lambda l, p: l if isinstance(l, jax.Array) else p, loaded, state.params)
  return state.replace(params=params, ema_params=params if state.ema_params is not None else None)


def train(config, workdir, *, max_steps=None):
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  max_steps: stop after this many steps in this call (tests); total_steps
  still sets the schedule. Returns the final TrainState.
  """
  task, mesh, train_iter = _prepare(config)
  ahead = int(config.data.get("prefetch_to_device", 0))
  if ahead:  # batches sharded onto the mesh by a thread while the step computes
    train_iter = pipeline.prefetch_to_device(train_iter, mesh, size=ahead)
  preempt = Preemption(mesh)  # before compiling: an early SIGTERM also ends cleanly
  try:
    return _train(task, mesh, train_iter, preempt, paths.resolve(workdir), max_steps)
  finally:
    preempt.restore()
    if ahead:
      train_iter.close()  # stops the thread


def _train(task, mesh, train_iter, preempt, workdir, max_steps):
  config = task.config
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(),
               jax.process_count())

  tx, schedules = make_optimizer(task.optimizer_groups(), task.param_labels, config.total_steps)
  dummy = task.dummy_batch(config.batch_size)
  abstract, shardings = abstract_state(task, tx, config, mesh, dummy)

  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                               async_save=config.async_checkpoints)
  start_step, state, data_state = ckpt.restore(abstract)
  if state is None:
    loaded = _init_from(config, abstract.params, mesh) if config.get("init_from") else None
    state, _ = create_state(task, tx, config, mesh, dummy)
    start_step = 0
    if loaded is not None:
      state = _merge_params(state, loaded)
      logging.info("fine-tuning from %s (fresh optimizer)", config.init_from)
    logging.info("initialised a new model in %s", workdir)
  else:
    logging.info("resumed %s from step %d", workdir, start_step)
    if data_state:
      train_iter.set_state(data_state)
  gen_metrics = periodic.PeriodicMetrics.from_config(task, mesh)  # None unless eval_metrics.every
  _write_config(config, workdir)  # after every check, so a rejected run leaves no trace
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info("parameters: %.2fM", n_params / 1e6)

  train_step = make_train_step(task, tx, config, schedules, mesh)
  with parallel.mesh_context(mesh, config):
    # The batch arrives already sharded over the batch axes (parallel.shard_batch).
    p_train_step = jax.jit(train_step, in_shardings=(shardings, None),
                           out_shardings=(shardings, None), donate_argnums=(0,))
  # Eval metrics come back replicated: readable on every process.
  p_eval_step = jax.jit(make_eval_step(task), out_shardings=parallel.replicated(mesh))

  writer = metrics_lib.MetricWriter(workdir, resume_step=start_step,
                                    enabled=jax.process_index() == 0)
  flops = task.flops_per_example()
  tokens = task.tokens_per_example()
  peak = metrics_lib.peak_flops_per_device() if flops else None
  end_step = config.total_steps if max_steps is None else min(config.total_steps, start_step + max_steps)
  timer = metrics_lib.Timer()
  run_start = time.perf_counter()
  step = start_step
  pending = []  # metrics since the last log, still on device
  in_flight = collections.deque()  # losses of dispatched steps not yet waited for
  saved_step = start_step if data_state is not None else None

  def save(step):
    nonlocal saved_step
    if step == saved_step:  # e.g. SIGTERM right after a periodic checkpoint: saved once
      return
    _raise_if_nonfinite(state, config)
    ckpt.save(step, state, train_iter.get_state())
    saved_step = step

  try:
    while step < end_step:
      batch = next(train_iter)
      if not isinstance(train_iter, pipeline.DevicePrefetch):  # else already on the mesh
        batch = parallel.shard_batch(batch, mesh)
      with parallel.mesh_context(mesh, config):
        state, m = p_train_step(state, batch)
      step += 1
      pending.append(m)
      in_flight.append(m["loss"])
      if len(in_flight) > MAX_STEPS_IN_FLIGHT:
        jax.block_until_ready(in_flight.popleft())
      if step == start_step + 1:
        jax.block_until_ready(m)
        timer.start()  # exclude compilation from throughput
        pending = [m]
      else:
        timer.tick()
      eval_due = bool(config.eval_every) and (step % config.eval_every == 0 or step == end_step)
      gen_due = gen_metrics is not None and gen_metrics.due(step, end_step)
      log_due = step % config.log_every == 0 or step == end_step or eval_due or gen_due
      if config.nan_policy == "stop" and log_due:
        _raise_if_nonfinite(state, config)
      if log_due:
        extra = _evaluate(task, p_eval_step, state, config, mesh, step) if eval_due else {}
        if gen_due:  # FID / CLIP score of the task's samples (dalle_jax/evaluate/periodic.py)
          extra.update(gen_metrics(_eval_params(state), step))
        _log(writer, pending, step, config, timer, flops, tokens, peak, run_start, start_step, extra)
        pending = []
      if config.preview_every and (step % config.preview_every == 0 or step == end_step):
        _preview(task, state, config, mesh, workdir, step)
      if step % config.checkpoint_every == 0 or step == end_step:
        save(step)
      if preempt.should_stop():
        if pending:
          _log(writer, pending, step, config, timer, flops, tokens, peak, run_start, start_step, {})
        save(step)  # a no-op when the signal came during this step's periodic checkpoint
        ckpt.wait()
        logging.warning("preempted: checkpoint saved at step %d", step)
        break
  finally:
    ckpt.close()
    writer.close()
  return state


def _raise_if_nonfinite(state, config):
  bad = int(jax.device_get(state.nonfinite_step))
  if bad >= 0 and config.nan_policy == "stop":
    raise NonFiniteLossError(
        f"loss or gradient became NaN/inf at step {bad}; the update was not applied. "
        "Lower optimizer.learning_rate, check the data, or set --config.nan_policy=skip")


def _log(writer, pending, step, config, timer, flops, tokens, peak, run_start, start_step, extra):
  ms = jax.device_get(pending)
  avg = {k: float(np.mean([m[k] for m in ms])) for k in ms[-1]}
  avg["learning_rate"] = float(ms[-1]["learning_rate"])
  dt, n = timer.rate()
  if n > 0 and dt > 0:
    steps_per_sec = n / dt
    avg["steps_per_sec"] = steps_per_sec
    avg["examples_per_sec"] = steps_per_sec * config.batch_size
    if tokens:
      avg["tokens_per_sec"] = avg["examples_per_sec"] * tokens
    if flops and peak:
      n_dev = 1 if jax.devices()[0].platform == "cpu" else jax.device_count()
      avg["mfu"] = avg["examples_per_sec"] * flops / (peak * n_dev)
    timer.start()
  else:
    avg["examples_per_sec"] = 0.0
  avg.update(extra)
  writer.write(step, avg)
  elapsed = time.perf_counter() - run_start
  if jax.process_index() == 0:
    print(metrics_lib.console_line(step, config.total_steps, avg, elapsed, step - start_step), flush=True)


def _eval_params(state):
  return state.ema_params if state.ema_params is not None else state.params


def _evaluate(task, p_eval_step, state, config, mesh, step):
  it = task.make_iterator(config.data.eval_split, config.batch_size, shuffle=False)
  rng = jax.random.PRNGKey(config.seed + 1)
  results = []
  with parallel.mesh_context(mesh, config):
    for i in range(config.eval_batches):
      batch = parallel.shard_batch(next(it), mesh)
      results.append(p_eval_step(_eval_params(state), state.model_state, batch,
                                 jax.random.fold_in(rng, i)))
  results = jax.tree.map(parallel.to_host, results)
  avg = {f"eval/{k}": float(np.mean([r[k] for r in results])) for k in results[0]}
  if jax.process_index() == 0:
    print(f"eval step {step}: " + " | ".join(f"{k[5:]}={v:.4g}" for k, v in avg.items()), flush=True)
  return avg


def _preview(task, state, config, mesh, workdir, step):
  """task.preview gets the eval batch as global arrays (sharded like a train
  batch) and returns host uint8 images on every process; process 0 writes them."""
  it = task.make_iterator(config.data.eval_split, config.batch_size, shuffle=False)
  with parallel.mesh_context(mesh, config):
    batch = parallel.shard_batch(next(it), mesh)
    images = task.preview(_eval_params(state), state.model_state, batch,
                          jax.random.PRNGKey(config.seed + 2))
  _save_previews(images, workdir, step)
