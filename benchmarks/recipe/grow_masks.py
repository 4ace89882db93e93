"""Grow a trained adapter to more mask tokens without changing what its masks predict.

A mask row sees the prefix, the normal rows and only the earlier masks of its own group, so masks
appended at the end cannot change masks 1..M's predictions: the new ones start as copies of mask M's
embedding, every other array (prefix, low-rank updates) is kept.

    python benchmarks/recipe/grow_masks.py --adapter smollm2 --output runs/grown5 --masks 5
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from safetensors.numpy import load_file, save_file

from bita_jax.io.adapter_files import CONFIG_FILE, WEIGHTS_FILE, resolve_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="adapter directory (or a shipped adapter's name)")
    parser.add_argument("--output", required=True, help="directory for the grown adapter")
    parser.add_argument("--masks", type=int, required=True, help="mask tokens after growing")
    args = parser.parse_args()

    source = resolve_adapter(args.adapter)
    arrays = load_file(os.path.join(source, WEIGHTS_FILE))
    with open(os.path.join(source, CONFIG_FILE)) as f:
        config = json.load(f)
    masks = arrays["mask_embeddings"]  # [M, D]
    extra = args.masks - masks.shape[0]
    if extra < 0:
        parser.error(f"the adapter has {masks.shape[0]} masks; --masks {args.masks} would drop some")
    arrays["mask_embeddings"] = np.concatenate([masks, np.repeat(masks[-1:], extra, axis=0)], axis=0)
    config["bita"]["num_mask_tokens"] = args.masks
    os.makedirs(args.output, exist_ok=True)
    save_file(arrays, os.path.join(args.output, WEIGHTS_FILE))
    with open(os.path.join(args.output, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    print(f"{source}: {masks.shape[0]} -> {args.masks} masks in {args.output}")


if __name__ == "__main__":
    main()
