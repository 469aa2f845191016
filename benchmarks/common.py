"""Helpers shared by the benchmarks: timing, result tables, ratio lines, trainer steps.

Conventions every benchmark follows:
  * `timeit` excludes compilation (warm-up calls) and returns the MEDIAN seconds
    per call, blocking on JAX outputs so asynchronous dispatch isn't timed.
  * `ratio_line` prints one line containing the word "ratio"; `run_all` copies
    those lines into its summary. A ratio > 1 always means "ours is better".
  * `trainer_step` builds the train step exactly as `dalle_jax.train.loop.train`
    does (task from config, optimizer, sharded state, donated jitted step), so
    benchmarked step times are the trainer's.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- timing ---------------------------------------------------------------------

def block(out):
  """Waits for every JAX array in `out` (other leaves, e.g. torch tensors, pass)."""
  import jax  # pylint: disable=g-import-not-at-top
  for leaf in jax.tree.leaves(out):
    if hasattr(leaf, "block_until_ready"):
      leaf.block_until_ready()
  return out


def timeit_with_output(fn, *args, warmup=1, reps=3, stat=statistics.median):
  """(stat (default median) of the seconds per call of fn(*args), the last call's output).

  stat=min gives the best run: robust to a shared host's slow phases."""
  out = None
  for _ in range(warmup):
    out = block(fn(*args))
  times = []
  for _ in range(max(reps, 1)):
    t = time.perf_counter()
    out = block(fn(*args))
    times.append(time.perf_counter() - t)
  return stat(times), out


def timeit(fn, *args, warmup=1, reps=3, stat=statistics.median):
  """Median (or `stat`) seconds per call of fn(*args) after `warmup` untimed calls."""
  return timeit_with_output(fn, *args, warmup=warmup, reps=reps, stat=stat)[0]


# --- formatting -----------------------------------------------------------------

def fmt_bytes(n):
  n = float(n)
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024


def fmt_seconds(s):
  return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def print_table(rows, headers, title=None):
  """Prints rows (sequences; floats shown with 4 significant digits) as aligned columns."""
  cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  body = [[cell(v) for v in r] for r in rows]
  widths = [max(len(str(h)), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
  if title:
    print(title)
  line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths)))
  print(line([str(h) for h in headers]))
  print("  ".join("-" * w for w in widths))
  for r in body:
    print(line(r))
  sys.stdout.flush()


def ratio_line(name, ours, theirs, *, ours_label="ours", theirs_label="ref", fmt=fmt_seconds,
               lower_is_better=True, extra=""):
  """Prints `name: ours X | ref Y | ratio R.RRx` with R > 1 meaning ours is better; returns R.

  ours/theirs are costs (seconds, bytes) when lower_is_better, else rates (images/s).
  """
  ratio = (theirs / ours if lower_is_better else ours / theirs) if ours and theirs else float("nan")
  print(f"{name}: {ours_label} {fmt(ours)} | {theirs_label} {fmt(theirs)} | "
        f"ratio {ratio:.2f}x{' ' + extra if extra else ''}", flush=True)
  return ratio


# --- compiled-program statistics --------------------------------------------------

def cost_flops(compiled_or_lowered):
  """XLA's FLOP count of a lowered/compiled computation (None if unavailable)."""
  try:
    cost = compiled_or_lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def temp_bytes(compiled):
  """Peak temporary (activation/workspace) bytes XLA allocates for one call."""
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


# --- the trainer's step -------------------------------------------------------------

class TrainerStep:
  """The trainer's jitted, donated train step for `config` with its live state.

  Built like `dalle_jax.train.loop.train`: task from config, optimizer groups,
  abstract state -> shardings, sharded init, `make_train_step` jitted with
  in/out shardings and the state donated.
  """

  def __init__(self, config, batch=None, seed=0):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from dalle_jax import parallel  # pylint: disable=g-import-not-at-top
    from dalle_jax.tasks.base import get_task  # pylint: disable=g-import-not-at-top
    from dalle_jax.train import loop  # pylint: disable=g-import-not-at-top
    from dalle_jax.train.optimizers import make_optimizer  # pylint: disable=g-import-not-at-top

    self.config = config
    self.task = task = get_task(config)
    self.mesh = mesh = parallel.make_mesh(config.mesh)
    self._parallel = parallel
    tx, schedules = make_optimizer(task.optimizer_groups(), task.param_labels, config.total_steps)
    dummy = task.dummy_batch(config.batch_size)
    if batch is None:  # random data of the dummy batch's shapes/dtypes
      rng = np.random.default_rng(seed)
      batch = {k: (rng.uniform(-1, 1, v.shape).astype(v.dtype) if v.dtype.kind == "f"
                   else np.ones_like(v) if v.dtype == bool else rng.integers(0, 8, v.shape).astype(v.dtype))
               for k, v in dummy.items()}
    self.abstract, shardings = loop.abstract_state(task, tx, config, mesh, dummy)
    step_fn = loop.make_train_step(task, tx, config, schedules, mesh)
    with parallel.mesh_context(mesh, config):
      self.jitted = jax.jit(step_fn, in_shardings=(shardings, None),
                            out_shardings=(shardings, None), donate_argnums=(0,))
      self.batch = parallel.shard_batch(batch, mesh)
      t = time.perf_counter()
      self.lowered = self.jitted.lower(self.abstract, self.batch)
      self.compiled = self.lowered.compile()
      self.compile_s = time.perf_counter() - t
    self._shardings = shardings
    self._tx = tx
    self.state = None

  @property
  def temp_bytes(self):
    return temp_bytes(self.compiled)

  @property
  def xla_flops(self):
    """FLOPs per step from XLA's cost model of the compiled step."""
    return cost_flops(self.compiled) or cost_flops(self.lowered)

  def init_state(self):
    from dalle_jax.train import loop  # pylint: disable=g-import-not-at-top
    self.state, _ = loop.create_state(self.task, self._tx, self.config, self.mesh,
                                      self.task.dummy_batch(self.config.batch_size))
    return self.state

  def step(self):
    """One donated step on the fixed batch (state threaded through); returns metrics."""
    if self.state is None:
      self.init_state()
    with self._parallel.mesh_context(self.mesh, self.config):
      self.state, metrics = self.compiled(self.state, self.batch)
    return metrics

  def time(self, warmup=1, reps=3, stat=statistics.median):
    return timeit(self.step, warmup=warmup, reps=reps, stat=stat)

  def release(self):
    self.state = None
