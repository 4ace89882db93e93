"""`python -m bita_jax.tune`: the tree tuner's command line (bita_jax/cli/tune.py, bita_jax/tuning/)."""

import sys

from bita_jax.cli import run_main
from bita_jax.cli.tune import main

if __name__ == "__main__":
    sys.exit(run_main(main))
