"""Fingerprints of a checkpoint and of an adapter: what an output records as having made it, so a
resumed run can refuse records made by another model (decode.py --resume).

A checkpoint's fingerprint hashes its config, its tokenizer files and, of each weight file, the size
and 16 blocks of 4 KiB spread evenly over it (the first holds the safetensors header): it tells two
checkpoints apart (a fine-tune changes nearly every block) without reading gigabytes of weights. An
edit confined to bytes between the sampled blocks goes unnoticed. An adapter is small: its two files
are hashed whole. Paths are not hashed: a moved or copied checkpoint keeps its fingerprint.
"""

from __future__ import annotations

import hashlib
import os

from bita_jax.errors import ConfigError
from bita_jax.io import adapter_files, hf

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
)
SAMPLED_BLOCKS = 16
BLOCK_BYTES = 4096
SHOWN_HEX = 16  # hex digits kept: 64 bits tell apart any checkpoints a user will ever compare


def _add_file(digest, path: str, sampled: bool) -> None:
    """Hashes the file's name and size, and its bytes: all of them, or SAMPLED_BLOCKS blocks."""
    size = os.path.getsize(path)
    digest.update(f"{os.path.basename(path)}:{size}\n".encode())
    with open(path, "rb") as f:
        if not sampled or size <= SAMPLED_BLOCKS * BLOCK_BYTES:
            digest.update(f.read())
            return
        for i in range(SAMPLED_BLOCKS):
            f.seek((size - BLOCK_BYTES) * i // (SAMPLED_BLOCKS - 1))
            digest.update(f.read(BLOCK_BYTES))


def model_fingerprint(model_dir: str) -> str:
    """Hex fingerprint of a Hugging Face checkpoint directory (see the module docstring)."""
    if not os.path.isdir(model_dir):
        raise ConfigError(f"model directory not found: {model_dir}")
    digest = hashlib.sha256()
    _add_file(digest, os.path.join(model_dir, "config.json"), sampled=False)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(model_dir, name)):
            _add_file(digest, os.path.join(model_dir, name), sampled=False)
    for path in sorted(set(hf.checkpoint_files(model_dir).values())):
        _add_file(digest, path, sampled=True)
    return digest.hexdigest()[:SHOWN_HEX]


def adapter_fingerprint(adapter_dir: str) -> str:
    """Hex fingerprint of an adapter directory's weights and config (not its trees.json)."""
    digest = hashlib.sha256()
    for name in (adapter_files.CONFIG_FILE, adapter_files.WEIGHTS_FILE):
        _add_file(digest, os.path.join(adapter_dir, name), sampled=False)
    return digest.hexdigest()[:SHOWN_HEX]
