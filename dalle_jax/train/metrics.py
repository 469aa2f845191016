"""Metric sinks: metrics.jsonl, TensorBoard event files (tensorboardX, no TF), console."""
import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np

from dalle_jax import paths


def _fmt_duration(s):
  s = int(s)
  return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class MetricWriter:
  """Writes one JSON object per logged step; only process 0 writes.

  A local metrics.jsonl is appended to. An object store has no append, so for a
  remote workdir the whole file is rewritten at each write (~200 bytes a logged
  step: 100k logged steps make a 20 MB upload each time), and TensorBoard
  events are written to a local directory and the event file uploaded after
  each flush (tensorboardX itself reaches no fsspec bucket).
  """

  def __init__(self, workdir, resume_step=0, enabled=True):
    self.enabled = enabled
    workdir = paths.resolve(workdir)
    self.path = workdir / "metrics.jsonl"
    self._remote = paths.is_remote(workdir)
    self._lines = []  # remote: everything the file holds (no append on a bucket)
    self._tb = self._tb_local = None
    if not enabled:
      return
    # A resumed run continues after its checkpoint: drop lines logged after it
    # by the killed run so the file reads as one uninterrupted run.
    if self.path.exists():
      lines = [l + "\n" for l in self.path.read_text().splitlines() if l.strip()]
      kept = [l for l in lines if json.loads(l).get("step", 0) <= resume_step]
      self._lines = kept
      if len(kept) != len(lines):
        paths.write_text(self.path, "".join(kept))
    try:
      from tensorboardX import SummaryWriter
    except ImportError:  # TensorBoard is optional; metrics.jsonl is the record
      logging.warning("tensorboardX not installed: no TensorBoard event files")
      return
    self._tb_remote = workdir / "tensorboard"
    if self._remote:
      self._tb_local = tempfile.mkdtemp(prefix="dalle_jax_tb_")
      logging.info("TensorBoard events for %s are written to %s and uploaded at each flush",
                   self._tb_remote, self._tb_local)
    self._tb = SummaryWriter(self._tb_local or os.fspath(self._tb_remote))

  def write(self, step, metrics):
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: float(v) for k, v in metrics.items()})
    line = json.dumps(row) + "\n"
    if self._remote:
      self._lines.append(line)
      self.path.write_text("".join(self._lines))
    else:
      with self.path.open("a") as f:
        f.write(line)
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and np.isfinite(v):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()
      self._upload_events()

  def _upload_events(self):
    if self._tb_local is None:
      return
    for name in os.listdir(self._tb_local):
      paths.copy(os.path.join(self._tb_local, name), self._tb_remote / name)

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._upload_events()
      if self._tb_local is not None:
        shutil.rmtree(self._tb_local, ignore_errors=True)


def console_line(step, total, metrics, elapsed, steps_done):
  # eval/* is printed on its own line; the console keeps the step line short.
  keys = ["loss"] + sorted(k for k in metrics if k != "loss" and not k.startswith("eval/")
                           and k != "steps_per_sec")
  parts = [f"step {step}/{total}"]
  for k in keys:
    if k in metrics:
      v = float(metrics[k])
      parts.append(f"{k}={v:.4g}")
  if steps_done > 0 and elapsed > 0:
    eta = (total - step) * elapsed / steps_done
    parts.append(f"eta {_fmt_duration(eta)}")
  return " | ".join(parts)


class Timer:
  """examples/s and step time between log points, excluding the first (compile) step."""

  def __init__(self):
    self.t0 = None
    self.steps = 0

  def start(self):
    self.t0 = time.perf_counter()
    self.steps = 0

  def tick(self):
    self.steps += 1

  def rate(self):
    dt = time.perf_counter() - self.t0
    return dt, self.steps


def peak_flops_per_device():
  """Peak FLOP/s of one device, for the MFU estimate (bf16 where it applies)."""
  import jax
  kind = jax.devices()[0].device_kind.lower()
  table = {"tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
           "tpu v6": 918e12, "h100": 989e12, "h200": 989e12, "a100": 312e12}
  for name, f in table.items():
    if name in kind:
      return f
  if jax.devices()[0].platform == "cpu":
    # 1024^2 is already compute-bound (within ~10% of 2048^2) at 1/16 of the
    # time: the 2048 rounds cost a loaded 2-core host 10+ s per training run.
    return measure_matmul_flops(n=1024, reps=2)
  return None


_MEASURED = {}


def measure_matmul_flops(n=2048, dtype="bfloat16", reps=4, rounds=3):
  """Measured matmul FLOP/s of this host (the CPU 'peak' for MFU): bf16 inputs
  with f32 accumulation by default.

  The best of `rounds` rounds of `reps` back-to-back n x n matmuls, after a
  warm-up round: a peak, so short-lived slowdowns of a shared host (and the
  first calls' page faults) don't inflate MFU. On CPU all fake devices share the
  same cores, so this is the whole host's rate.
  """
  if dtype in _MEASURED:
    return _MEASURED[dtype]
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  best = 0.0
  for r in range(rounds + 1):
    t = time.perf_counter()
    for _ in range(reps):
      f(a, a).block_until_ready()
    if r:  # round 0 warms up
      best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
  _MEASURED[dtype] = best
  return best
