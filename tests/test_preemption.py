"""SIGTERM (preemption): saved once, honoured within a couple of steps, resumable.

The toy task sends the signal from inside the run, at a chosen moment: while
the trainer saves a periodic checkpoint (the race that used to save a step
twice), or while a slow device runs a given step (the host used to run up to
log_every steps ahead of it). Multi-process agreement on the stop step is
tested in test_trainer.test_two_processes_agree_with_one.
"""
import json
import os
import signal

import jax
import numpy as np

from dalle_jax.train import loop
from tests import toy_task


def _config(**overrides):
  c = toy_task.get_config()
  c.mesh.data = 8
  c.eval_every = 0
  for k, v in overrides.items():
    target = c
    *parents, leaf = k.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = v
  return c


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_sigterm_during_a_periodic_checkpoint_saves_once_and_resumes_exactly(tmp_path):
  ref = _config(total_steps=8, checkpoint_every=4)
  loop.train(ref, str(tmp_path / "ref"))

  run = str(tmp_path / "run")
  state = loop.train(_config(total_steps=8, checkpoint_every=4, **{"model.sigterm_on_save_step": 4}),
                     run)
  assert int(state.step) == 4  # stopped where the signal came, the step saved once
  assert _checkpoint_steps(run) == [4]
  loop.train(ref, run)  # the same command again: resumes at 4
  assert _checkpoint_steps(run) == [4, 8]
  want, got = _losses(str(tmp_path / "ref")), _losses(run)
  assert sorted(got) == list(range(1, 9))
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)],
                             rtol=1e-6)


class _InFlightProbe:
  """Wraps the jitted train step: before dispatching step `signal_step` it counts
  the dispatched steps whose outputs are not ready yet and sends SIGTERM."""

  def __init__(self, step_fn, signal_step):
    self.step_fn, self.signal_step = step_fn, signal_step
    self.losses, self.unfinished_at_signal = [], None

  def __call__(self, *args):
    if len(self.losses) + 1 == self.signal_step:
      self.unfinished_at_signal = sum(not x.is_ready() for x in self.losses)
      os.kill(os.getpid(), signal.SIGTERM)
    state, metrics = self.step_fn(*args)
    self.losses.append(metrics["loss"])
    return state, metrics


def test_sigterm_is_honoured_within_two_steps_of_the_device(tmp_path, monkeypatch):
  # Slow device, fast host, rare logs: an unbounded host dispatches far ahead,
  # and the checkpoint then waits for every step it queued.
  probes = []
  real_jit = jax.jit

  def jit(fn, **kw):
    compiled = real_jit(fn, **kw)
    if getattr(fn, "__name__", "") == "train_step":
      probes.append(_InFlightProbe(compiled, signal_step=12))
      return probes[-1]
    return compiled
  monkeypatch.setattr(jax, "jit", jit)
  config = _config(total_steps=40, log_every=100, checkpoint_every=100,
                   **{"model.device_work": 30})
  state = loop.train(config, str(tmp_path / "run"))
  probe, = probes
  assert int(state.step) == 12 and _checkpoint_steps(tmp_path / "run") == [12]
  # The checkpoint waited for at most 2 steps of device work after the signal.
  assert probe.unfinished_at_signal <= 2, probe.unfinished_at_signal
