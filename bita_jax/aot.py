"""`python -m bita_jax.aot`: compiles the decode and train steps for a TPU topology on this host and
prints per-chip memory, bytes and flops (bita_jax/cli/aot.py)."""

import sys

from bita_jax.cli import run_main
from bita_jax.cli.aot import main

if __name__ == "__main__":
    sys.exit(run_main(main))
