"""The trainer's mechanics on a toy task: sharding, memory, checkpoints, resume, NaN."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dalle_jax import parallel
from dalle_jax.tasks.base import get_task
from dalle_jax.train import checkpoint as ckpt_lib
from dalle_jax.train import loop
from dalle_jax.train.optimizers import OPTIMIZERS, make_optimizer
from tests import toy_task
from tests.toy_task import DIM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**mesh):
  c = toy_task.get_config()
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


def _setup(config, devices=None):
  task = get_task(config)
  mesh = parallel.make_mesh(config.mesh, devices)
  tx, scheds = make_optimizer(task.optimizer_groups(), task.param_labels, config.total_steps)
  return task, mesh, tx, scheds


def _run(config, n_steps, devices=None):
  task, mesh, tx, scheds = _setup(config, devices)
  batch_np = toy_task.ToyIterator(config.batch_size, 0)
  state, shardings = loop.create_state(task, tx, config, mesh, task.dummy_batch(config.batch_size))
  step = jax.jit(loop.make_train_step(task, tx, config, scheds, mesh))
  losses = []
  with parallel.mesh_context(mesh, config):
    for _ in range(n_steps):
      state, m = step(state, parallel.shard_batch(next(batch_np), mesh))
      losses.append(float(m["loss"]))
  return state, losses


def test_sharded_step_equals_single_device():
  single, l1 = _run(_config(data=1, fsdp=1, tensor=1), 3, devices=jax.devices()[:1])
  sharded, l8 = _run(_config(data=2, fsdp=2, tensor=2), 3)
  assert sharded.params["wi"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_fsdp_state_bytes_per_device():
  def state_bytes(**mesh):
    config = _config(**mesh)
    config.model.hidden = 512
    task, mesh_, tx, _ = _setup(config)
    dummy = task.dummy_batch(config.batch_size)
    _, shardings = loop.abstract_state(task, tx, config, mesh_, dummy)
    init = loop.make_init_fn(task, tx, config, dummy)
    rng = jax.random.key_data(jax.random.PRNGKey(0))
    fn = lambda r: parallel.unbox(init(jax.random.wrap_key_data(r)))
    with parallel.mesh_context(mesh_, config):
      compiled = jax.jit(fn, out_shardings=shardings).lower(rng).compile()
    return compiled.memory_analysis().output_size_in_bytes

  replicated = state_bytes(data=8, fsdp=1, tensor=1)
  fsdp = state_bytes(data=1, fsdp=8, tensor=1)
  assert fsdp <= 1.1 * replicated / 8, (fsdp, replicated)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_state_shards(name):
  """The sharded init traces for every optimizer (Adafactor's factored moments
  are smaller than their parameters: they must not inherit its sharding)."""
  config = _config(data=1, fsdp=8, tensor=1)
  config.optimizer.name = name
  task, mesh, tx, _ = _setup(config)
  dummy = task.dummy_batch(config.batch_size)
  _, shardings = loop.abstract_state(task, tx, config, mesh, dummy)
  init = loop.make_init_fn(task, tx, config, dummy)
  fn = lambda r: parallel.unbox(init(jax.random.wrap_key_data(r)))
  with parallel.mesh_context(mesh, config):
    jax.jit(fn, out_shardings=shardings).lower(jax.random.key_data(jax.random.PRNGKey(0)))
  assert shardings.params["wi"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_grad_accumulation_equals_full_batch():
  full, lf = _run(_config(data=8), 2)
  c = _config(data=8)
  c.batch_size = 16
  c.grad_accum_steps = 2
  acc, la = _run(c, 2)
  np.testing.assert_allclose(lf, la, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(acc.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_restore_onto_a_different_mesh_is_exact(tmp_path):
  config = _config(data=2, fsdp=2, tensor=2)
  config.total_steps = 4
  state = loop.train(config, str(tmp_path))
  saved = jax.tree.map(np.asarray, state)

  other = _config(data=1, fsdp=8, tensor=1)
  task, mesh, tx, _ = _setup(other)
  abstract, _ = loop.abstract_state(task, tx, other, mesh, task.dummy_batch(other.batch_size))
  step, restored, data_state = ckpt_lib.Checkpointer(str(tmp_path)).restore(abstract)
  assert step == 4 and data_state == {"index": 4 * config.batch_size}
  kernel = restored.params["wi"]["kernel"]
  assert kernel.sharding.shard_shape(kernel.shape) == (32 // 8, 64)
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_checkpoint_mismatch_names_parameter_and_shapes(tmp_path):
  config = _config(data=8)
  config.total_steps = 2
  loop.train(config, str(tmp_path))
  config.model.hidden = 48
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"params/wi/kernel.*\(32, 64\).*\(32, 48\)"):
    loop.train(config, str(tmp_path))


def test_damaged_latest_checkpoint_falls_back(tmp_path, caplog):
  config = _config(data=8)
  config.total_steps = 8
  loop.train(config, str(tmp_path))
  latest = tmp_path / "checkpoints" / "8" / "state"
  for f in latest.rglob("*"):
    if f.is_file() and "metadata" not in f.name:
      f.write_bytes(b"garbage")
  task, mesh, tx, _ = _setup(config)
  abstract, _ = loop.abstract_state(task, tx, config, mesh, task.dummy_batch(config.batch_size))
  step, state, _ = ckpt_lib.Checkpointer(str(tmp_path)).restore(abstract)
  assert step == 4
  assert "could not be restored" in caplog.text or "damaged" in caplog.text


def test_nan_stops_naming_the_step(tmp_path):
  config = _config(data=8)
  config.model.poison_step = 3
  with pytest.raises(loop.NonFiniteLossError, match="step 3"):
    loop.train(config, str(tmp_path / "stop"))
  config.nan_policy = "skip"
  state = loop.train(config, str(tmp_path / "skip"))
  assert int(state.step) == config.total_steps
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_ema_params_kept_and_loadable(tmp_path):
  config = _config(data=8)
  config.total_steps = 4
  config.ema_decay = 0.5
  state = loop.train(config, str(tmp_path))
  assert state.ema_params is not None
  cfg, variables = ckpt_lib.load_model(str(tmp_path))
  assert cfg.family == "tests.toy_task"
  np.testing.assert_array_equal(np.asarray(variables["params"]["wi"]["kernel"]),
                                np.asarray(state.ema_params["wi"]["kernel"]))
  # Straight into shards (only the parameters are read): every leaf split over
  # all 8 devices along a dimension they divide, values equal to the saved ones.
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))

  def spec(x):
    dims = [None] * x.ndim
    split = [i for i, n in enumerate(x.shape) if n % 8 == 0]
    if split:
      dims[split[0]] = "fsdp"
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*dims))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec(x)),
                        state.params)
  _, raw = ckpt_lib.load_model(str(tmp_path), use_ema=False, params_target=target)
  for got, want, t in zip(jax.tree.leaves(raw["params"]), jax.tree.leaves(state.params),
                          jax.tree.leaves(target)):
    assert got.sharding == t.sharding
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert any(len(g.sharding.device_set) == 8 and g.addressable_shards[0].data.size < g.size
             for g in jax.tree.leaves(raw["params"]))
  bad = jax.tree.map(lambda x: x, target)
  bad["wi"]["kernel"] = jax.ShapeDtypeStruct((3, 5), jnp.float32, sharding=spec(np.zeros((3, 5))))
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="wi/kernel"):
    ckpt_lib.load_model(str(tmp_path), params_target=bad)


# --- subprocess tests: the real command line ---------------------------------

def _env(devices=8, **extra):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env.update(extra)
  return env


def _cmd(workdir, *overrides):
  return [sys.executable, "train.py", "--config", "tests/toy_task.py", "--workdir", str(workdir),
          *overrides]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _wait_for_step(workdir, step, proc, timeout=120):
  t = time.time()
  while time.time() - t < timeout:
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and max(_losses(workdir), default=0) >= step:
      return
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.2)
  raise TimeoutError(f"run did not reach step {step}")


SLOW = ("--config.total_steps=30", "--config.checkpoint_every=5", "--config.eval_every=0",
        "--config.model.step_sleep=0.15")


def test_kill_and_resume_reproduces_uninterrupted_run(tmp_path):
  ref = tmp_path / "ref"
  subprocess.run(_cmd(ref, *SLOW[:3]), cwd=ROOT, env=_env(), check=True, capture_output=True)
  run = tmp_path / "run"
  proc = subprocess.Popen(_cmd(run, *SLOW), cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  _wait_for_step(run, 13, proc)
  proc.kill()  # SIGKILL: no chance to save
  proc.wait()
  assert max(_losses(run)) < 30
  subprocess.run(_cmd(run, *SLOW[:3]), cwd=ROOT, env=_env(), check=True, capture_output=True)
  ref_l, run_l = _losses(ref), _losses(run)
  assert sorted(run_l) == list(range(1, 31))
  np.testing.assert_allclose([run_l[s] for s in range(1, 31)], [ref_l[s] for s in range(1, 31)],
                             rtol=1e-6)


def test_unknown_config_key_is_named(tmp_path):
  r = subprocess.run(_cmd(tmp_path, "--config.batch_sise=8"), cwd=ROOT, env=_env(),
                     capture_output=True, text=True)
  assert r.returncode != 0
  assert "batch_sise" in r.stderr and "batch_size" in r.stderr
  assert "Traceback" not in r.stderr


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
  """Two 4-device processes == one 8-device process: losses, eval metrics and the
  previews (global arrays in, gathered images out, process 0 writes). Only
  process 1 gets SIGTERM, while saving step 4: both stop at the same step."""
  common = ("--config.total_steps=8", "--config.checkpoint_every=2", "--config.eval_every=3",
            "--config.preview_every=3")
  one = tmp_path / "one"
  subprocess.run(_cmd(one, *common), cwd=ROOT, env=_env(8), check=True, capture_output=True)
  two = tmp_path / "two"
  port = _free_port()
  procs = [subprocess.Popen(_cmd(two, *common, "--config.model.sigterm_on_save_step=4",
                                 "--config.model.sigterm_process=1"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=_env(4, DALLE_JAX_COORDINATOR=f"127.0.0.1:{port}",
                                     DALLE_JAX_NUM_PROCESSES="2", DALLE_JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  outs = [p.communicate(timeout=300)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  # Process 1's flag joins the all-reduce dispatched after step 4, read two steps later.
  stop = 4 + loop.MAX_STEPS_IN_FLIGHT
  assert all(f"preempted: checkpoint saved at step {stop}" in out for out in outs)
  assert sorted(int(d) for d in os.listdir(two / "checkpoints") if d.isdigit()) == [2, 4, 6]
  l1, l2 = _losses(one), _losses(two)
  assert sorted(l2) == list(range(1, stop + 1))
  np.testing.assert_allclose([l2[s] for s in l2], [l1[s] for s in l2], rtol=1e-5)
  evals = [{r["step"]: r["eval/loss"] for r in map(json.loads, open(w / "metrics.jsonl"))
            if "eval/loss" in r} for w in (one, two)]
  assert sorted(evals[1]) == [3, 6]
  np.testing.assert_allclose([evals[1][s] for s in (3, 6)], [evals[0][s] for s in (3, 6)], rtol=1e-5)
  for s in (3, 6):
    a, b = (np.asarray(Image.open(w / "previews" / f"pred_{s:06d}.png")) for w in (one, two))
    assert a.shape == (8, DIM, 3) and np.abs(a.astype(int) - b).max() <= 1
