"""The `clip` presets for `--config configs/clip.py:PRESET` (train.py, the tools).

They live in the library, dalle_jax/configs/clip.py (its docstring lists the presets, the
commands to run and what to expect); this file only gives them a command-line path.
"""
from dalle_jax.configs.clip import PRESETS, get_config  # noqa: F401
