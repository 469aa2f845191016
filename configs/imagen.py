"""The `imagen` presets for `--config configs/imagen.py:PRESET` (train.py, the tools).

They live in the library, dalle_jax/configs/imagen.py (its docstring lists the presets, the
commands to run and what to expect); this file only gives them a command-line path.
"""
from dalle_jax.configs.imagen import PRESETS, get_config  # noqa: F401
