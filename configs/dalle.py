"""The `dalle` presets for `--config configs/dalle.py:PRESET` (train.py, the tools).

They live in the library, dalle_jax/configs/dalle.py (its docstring lists the presets, the
commands to run and what to expect); this file only gives them a command-line path.
"""
from dalle_jax.configs.dalle import get_config  # noqa: F401
