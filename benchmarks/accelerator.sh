#!/usr/bin/env bash
# The accelerator suite in one command (benchmarks/accelerator.py --help): verification cost of
# LLaMA-2-7B/13B shapes, AR against the memory-bandwidth bound, the tuner and --tree auto on the demo.
#   bash benchmarks/accelerator.sh                       # on one GPU/TPU, within 10 minutes
#   bash benchmarks/accelerator.sh --small --output-dir /tmp/acc   # tiny shapes: a CPU check
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/accelerator.py "$@"
