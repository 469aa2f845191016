"""train.py's input checks: one-line errors naming the key and the valid values,
raised before anything is compiled or written (no config.json for a rejected run)."""
import os
import subprocess
import sys

import pytest

from dalle_jax.configs import vqgan as vqgan_configs
from dalle_jax.tasks.base import get_task
from dalle_jax.train import checkpoint as ckpt_lib
from dalle_jax.train import loop
from dalle_jax.train.validation import ConfigError
from tests import toy_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toy(**kw):
  c = toy_task.get_config()
  for key, value in kw.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def _unbuilt_dataset(tmp_path):
  c = vqgan_configs.get_config("shapes")
  c.data.dataset, c.data.data_dir = "image_text_folder/mine", str(tmp_path / "data")
  return c


@pytest.mark.parametrize("make,match", [
    (lambda t: _toy(**{"mesh.data": 3}), r"config.mesh .*3 devices but 8 are available"),
    (lambda t: _toy(batch_size=12), r"config.batch_size=12 is not divisible by the 8 data-parallel"),
    (lambda t: _toy(batch_size=16, grad_accum_steps=4), r"config.batch_size=16 .*x 4 micro-batches"),
    (lambda t: _toy(**{"optimizer.name": "adam"}), r"config.optimizer.name='adam': choose adamw \|"),
    (lambda t: _toy(**{"optimizer.schedule": "cos"}), r"config.optimizer.schedule='cos': choose cosine"),
    (lambda t: _toy(log_every=0), r"config.log_every=0: must be an integer >= 1"),
    (lambda t: _toy(checkpoint_every=0), r"config.checkpoint_every=0: must be an integer >= 1"),
    (lambda t: _toy(nan_policy="skp"), r"config.nan_policy='skp': choose stop \| skip"),
    (lambda t: _toy(remat="ful"), r"config.remat='ful': choose none \| full \| dots"),
    (lambda t: _toy(dtype="bf16"), r"config.dtype='bf16': choose float32 \| bfloat16"),
    (lambda t: _toy(ema_decay=1.0), r"config.ema_decay=1.0: must be in \[0, 1\)"),
    (lambda t: _toy(init_from=str(t / "nowhere")), r"config.init_from: .*nowhere.*no config.json"),
    (lambda t: _toy(init_from=str(t), init_from_include="("), r"config.init_from_include='\('"),
    (lambda t: _toy(family="nosuchfamily"), r"config.family='nosuchfamily' names no task"),
    (_unbuilt_dataset, r"config.data.dataset='image_text_folder/mine'.* is not built.*Build it with"),
])
def test_bad_config_is_named_before_anything_is_written(tmp_path, make, match):
  (tmp_path / "config.json").write_text("{}")  # for the init_from regex case
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=match):
    loop.train(make(tmp_path), str(workdir))
  assert not workdir.exists()


def test_tasks_work_on_a_copy_of_the_locked_config():
  config = _toy()
  config.lock()
  task = get_task(config)
  task.config.model.hidden = 7  # what a task resolving values from its data does
  assert config.model.hidden == 64


def _train_cli(workdir, *overrides):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "train.py", "--config", "tests/toy_task.py", "--workdir",
                         str(workdir), *overrides], cwd=ROOT, env=env, capture_output=True, text=True)


def test_cli_errors_are_one_line(tmp_path):
  r = _train_cli(tmp_path / "typo", "--config.nan_policy=skp")
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1] == "error: config.nan_policy='skp': choose stop | skip"
  assert not (tmp_path / "typo").exists()

  # Every checkpoint damaged: a clear message, not a traceback (and not a fresh start).
  config = _toy(total_steps=4)
  loop.train(config, str(tmp_path / "damaged"))
  for f in (tmp_path / "damaged" / "checkpoints").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  r = _train_cli(tmp_path / "damaged", "--config.total_steps=4")
  assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert "error: all 1 checkpoints in" in r.stderr and "are damaged (steps 4" in r.stderr
  with pytest.raises(ckpt_lib.DamagedCheckpointError):
    loop.train(config, str(tmp_path / "damaged"))
