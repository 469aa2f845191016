"""Train any dalle_jax family.

  python train.py --config configs/vqgan.py:shapes --workdir workdirs/vqgan [--config.key=value ...]

Re-running the same command resumes from the latest checkpoint in --workdir.
"""
from absl import app, flags
from ml_collections import config_flags

from dalle_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/FAMILY.py:PRESET", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and previews.", required=True)
cli.define_distributed_flags()


def main(argv):
  cli.train_main(argv, _CONFIG)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_with_suggestions)
