"""The `dalle_mini` presets for `--config configs/dalle_mini.py:PRESET` (train.py, the tools).

They live in the library, dalle_jax/configs/dalle_mini.py (its docstring lists the presets, the
commands to run and what to expect); this file only gives them a command-line path.
"""
from dalle_jax.configs.dalle_mini import get_config  # noqa: F401
