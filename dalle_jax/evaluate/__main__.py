"""`python -m dalle_jax.evaluate SUBCOMMAND ...` (see dalle_jax/evaluate/cli.py)."""
from dalle_jax.evaluate.cli import main

if __name__ == "__main__":
  main()
