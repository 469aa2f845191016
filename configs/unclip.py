"""The `unclip` presets for `--config configs/unclip.py:PRESET` (train.py, the tools).

They live in the library, dalle_jax/configs/unclip.py (its docstring lists the presets, the
commands to run and what to expect); this file only gives them a command-line path.
"""
from dalle_jax.configs.unclip import PRESETS, get_config  # noqa: F401
