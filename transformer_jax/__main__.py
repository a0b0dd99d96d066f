import sys

from transformer_jax.cli import run

sys.exit(run())
