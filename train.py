"""Trains a BiTA adapter on a frozen LLaMA checkpoint; `python train.py --help` for options.

The command line lives in bita_jax/cli/train.py; the training loop in bita_jax/training/.
"""

import sys

from bita_jax.cli import run_main
from bita_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(run_main(main))
