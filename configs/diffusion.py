"""The `diffusion` presets for `--config configs/diffusion.py:PRESET` (train.py, the tools).

They live in the library, dalle_jax/configs/diffusion.py (its docstring lists the presets, the
commands to run and what to expect); this file only gives them a command-line path.
"""
from dalle_jax.configs.diffusion import PRESETS, get_config  # noqa: F401
