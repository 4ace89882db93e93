"""AR or BiTA decoding from a Hugging Face LLaMA checkpoint; `python decode.py --help` for options.

With no arguments it runs the packaged demo (BiTA vs AR on held-out prompts). The command line
lives in bita_jax/cli/decode.py, over the Python API (bita_jax.load / Model.generate).
"""

import sys

from bita_jax.cli import run_main
from bita_jax.cli.decode import main

if __name__ == "__main__":
    sys.exit(run_main(main))
