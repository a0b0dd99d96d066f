"""The `transformer-jax` command line."""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print("transformer-jax: training is not wired up yet (see the open issue for the trainer).")
    return 0
