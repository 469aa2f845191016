"""Config presets, shared keys, overrides and the unknown-key error."""
import importlib

import pytest

from dalle_jax import cli

FAMILIES = {
    "vqgan": ("shapes", "f8_8192", "f16_16384"),
    "dalle": ("shapes", "small", "paper"),
    "dalle_mini": ("shapes", "mini", "mega"),
    "clip": ("shapes", "vit_b32", "vit_b16", "vit_l14"),
    "unclip": ("shapes", "unclip", "karlo", "shapes_decoder", "unclip_decoder", "karlo_decoder"),
}
SHARED = ("seed", "total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every",
          "keep_checkpoints", "mesh", "data.dataset", "data.data_dir", "data.image_size",
          "optimizer.name", "optimizer.learning_rate", "model", "family")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_preset_loads_with_the_shared_keys(family):
  module = importlib.import_module(f"configs.{family}")
  for preset in FAMILIES[family]:
    config = module.get_config(preset)
    keys = cli.flat_keys(config)
    missing = [k for k in SHARED if k not in keys]
    assert not missing, f"{family}:{preset} lacks {missing}"
    assert config.family and importlib.import_module(
        config.family if "." in config.family else f"dalle_jax.tasks.{config.family}")
  with pytest.raises(ValueError, match="unknown preset"):
    module.get_config("no_such_preset")


def test_override_and_unknown_key(monkeypatch):
  cli.check_override_keys(["--config", "configs/vqgan.py:shapes", "--config.batch_size=4",
                           "--config.optimizer.learning_rate=0.1"])
  with pytest.raises(SystemExit, match=r"unknown config key 'optimizer.learnin_rate'.*optimizer.learning_rate"):
    cli.check_override_keys(["--config=configs/vqgan.py:shapes", "--config.optimizer.learnin_rate=1"])
  with pytest.raises(SystemExit, match="unknown preset"):
    cli.check_override_keys(["--config=configs/vqgan.py:nope"])


def test_locked_config_rejects_new_keys():
  from dalle_jax.configs import vqgan
  config = vqgan.get_config("shapes")
  config.lock()
  config.batch_size = 8
  with pytest.raises(AttributeError):
    config.batch_sise = 8
