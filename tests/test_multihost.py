"""VQGAN and CLIP previews (and CLIP's sharded eval loss) across two processes.

The trainer hands `task.preview` / `task.eval_fn` the eval batch as global
arrays (each process contributes its rows) and parameters sharded over every
device; previews come back as whole host images on every process. Two 4-device
processes on loopback must produce what one 8-device process does. (The
trainer's own side, with SIGTERM agreement: test_trainer.test_two_processes_agree_with_one.)

Run as a worker: python -m tests.test_multihost OUT.npz (with DALLE_JAX_* env).
"""
import os
import subprocess
import sys

import jax
import numpy as np

from dalle_jax.configs import clip as clip_configs
from dalle_jax.configs import vqgan as vqgan_configs
from dalle_jax import parallel
from dalle_jax.tasks.base import get_task
from dalle_jax.train import loop
from dalle_jax.train.optimizers import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 16


def _config(family):
  """The family's shapes preset, made smaller still (compilation is the cost)."""
  if family == "vqgan":
    c = vqgan_configs.get_config("shapes")
    c.model = vqgan_configs.model_config(ch=16, ch_mult=(1, 2), num_res_blocks=1,
                                         attn_resolutions=(), resolution=16, z_channels=8,
                                         embed_dim=8, n_embed=32)
    c.model.norm_groups = 4
    c.data.image_size = 16
  else:
    c = clip_configs.get_config("shapes")
    c.model.vision.update(image_size=16, width=32, layers=1, heads=2, mlp_dim=64)
    c.model.text.update(width=32, layers=1, heads=2, mlp_dim=64, max_len=8)
    c.model.embed_dim = 32
    c.data.image_size = 16
  c.mesh.data, c.mesh.fsdp = 2, -1  # parameters split over devices of both processes
  return c


def _global_batch(task, seed=0):
  rng = np.random.default_rng(seed)
  batch = task.dummy_batch(BATCH)
  batch["image"] = rng.uniform(-1, 1, batch["image"].shape).astype(np.float32)
  if "text_ids" in batch:
    batch["text_ids"] = rng.integers(4, 60, batch["text_ids"].shape).astype(np.int32)
  return batch


def _sharded_variables(task, config, mesh):
  """(params, model_state) placed with the trainer's shardings, filled from a
  seeded numpy draw (a compiled random init costs far more on a busy CPU)."""
  tx, _ = make_optimizer(task.optimizer_groups(), task.param_labels, config.total_steps)
  dummy = task.dummy_batch(BATCH)
  _, shardings = loop.abstract_state(task, tx, config, mesh, dummy)
  variables = parallel.unbox(jax.eval_shape(task.init, jax.random.PRNGKey(0), dummy))
  rng = np.random.default_rng(0)

  def place(x, sharding):
    fan_in = int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1
    full = (rng.normal(0, 1, x.shape) / np.sqrt(fan_in)).astype(x.dtype)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: full[index])
  params = jax.tree.map(place, variables.pop("params"), shardings.params)
  return params, jax.tree.map(place, variables, shardings.model_state)


def family_outputs(family):
  """{name: array} of one family's preview images and eval metrics, on every process."""
  config = _config(family)
  task = get_task(config)
  mesh = parallel.make_mesh(config.mesh)
  params, model_state = _sharded_variables(task, config, mesh)
  # This process's rows of the global batch, as the input pipeline gives them.
  n = BATCH // jax.process_count()
  local = {k: v[jax.process_index() * n:(jax.process_index() + 1) * n]
           for k, v in _global_batch(task).items()}
  eval_step = jax.jit(loop.make_eval_step(task), out_shardings=parallel.replicated(mesh))
  with parallel.mesh_context(mesh, config):
    batch = parallel.shard_batch(local, mesh)
    images = task.preview(params, model_state, batch, jax.random.PRNGKey(1))
    out = {f"{family}/{k}": np.asarray(v) for k, v in images.items()}
    if family == "clip":  # the sharded contrastive loss over the global batch
      metrics = eval_step(params, model_state, batch, jax.random.PRNGKey(2))
      out.update({f"{family}/eval/{k}": parallel.to_host(v) for k, v in metrics.items()})
  return out


def test_previews_and_eval_on_two_processes_equal_one(tmp_path):
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", DALLE_JAX_COORDINATOR=f"127.0.0.1:{port}",
               DALLE_JAX_NUM_PROCESSES="2", DALLE_JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, "-m", "tests.test_multihost",
                                   str(tmp_path / f"out{i}.npz")], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  outs = [p.communicate(timeout=300)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]

  want = {**family_outputs("vqgan"), **family_outputs("clip")}  # one process, 8 devices
  assert {"vqgan/reconstructions", "clip/similarity", "clip/eval/loss"} <= set(want)
  for i in range(2):  # every process gets the whole images and the same metrics
    got = dict(np.load(tmp_path / f"out{i}.npz"))
    assert set(got) == set(want)
    for k, v in want.items():
      if v.dtype == np.uint8:
        assert got[k].shape == v.shape and np.abs(got[k].astype(int) - v).max() <= 1, k
      else:
        np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-5, err_msg=k)


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


if __name__ == "__main__":
  parallel.initialize_distributed()
  assert jax.process_count() == 2
  results = {**family_outputs("vqgan"), **family_outputs("clip")}
  np.savez(sys.argv[1], **results)
