"""`python -m bita_jax.cli.gguf FILE.gguf OUT_DIR [--dtype float32|bfloat16]`: a LLaMA GGUF file to a
Hugging Face checkpoint directory (the conversion is bita_jax/io/gguf.py's `convert`)."""

from __future__ import annotations

import argparse
import sys

from bita_jax.cli import run_main
from bita_jax.config import DTYPES
from bita_jax.io.gguf import convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bita_jax.cli.gguf", description=__doc__.splitlines()[0])
    parser.add_argument("gguf_file", help="a llama-architecture .gguf file")
    parser.add_argument("out_dir", help="output checkpoint directory (created)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights")
    args = parser.parse_args(argv)
    out = convert(args.gguf_file, args.out_dir, args.dtype)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
