"""The trained BiTA adapter on disk: `adapter.safetensors` plus `adapter_config.json`.

The json records P, M, prefix dropout and the identity of the base model the adapter was trained
on (the dimensions the adapter's shapes depend on, and a hash of its config.json; not its path,
which would only name a directory of the machine it was trained on), so decode.py can refuse an
adapter that does not fit the model it is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from safetensors.numpy import load_file, save_file

from bita_jax.bita.adapter import adapter_shapes
from bita_jax.config import BiTAConfig, ModelConfig, from_dict, read_json, to_dict
from bita_jax.errors import ConfigError

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT_VERSION = 1
# Base-model fields the adapter's shapes and token ids depend on.
IDENTITY_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim")
# Adapters shipped in this package (bita_jax/adapters/NAME), named like the short model name
# (io/gguf.SHORT_NAMES) of the model they were trained for.
SHIPPED_ADAPTERS = ("smollm2",)


def resolve_adapter(name: str) -> str:
    """An adapter directory for `name`: a directory as given, or a shipped adapter's short name."""
    if name not in SHIPPED_ADAPTERS or os.path.isdir(name):
        return name
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "adapters", name)


def base_model_identity(base_model_dir: str) -> dict[str, Any]:
    """Shape-relevant dimensions and config.json sha256 of the base model."""
    model_cfg = ModelConfig.from_pretrained(base_model_dir)
    identity: dict[str, Any] = {name: getattr(model_cfg, name) for name in IDENTITY_FIELDS}
    with open(os.path.join(base_model_dir, "config.json"), "rb") as f:
        identity["config_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return identity


def save_adapter(
    out_dir: str,
    adapter_params: dict[str, jax.Array],
    bita_cfg: BiTAConfig,
    base_model_dir: str,
) -> str:
    """Writes the adapter (float32 safetensors) and its json config to out_dir; returns out_dir.

    Multi-host: every process must call this (gathering a sharded array is collective); only
    process 0 writes.
    """
    # Adapter arrays are small; gathering a sharded one across hosts is a collective.
    arrays = {
        name: np.asarray(multihost_utils.process_allgather(value, tiled=True), np.float32)
        for name, value in adapter_params.items()
    }
    if jax.process_index() != 0:
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    save_file(arrays, os.path.join(out_dir, WEIGHTS_FILE))
    meta = {
        "format_version": FORMAT_VERSION,
        "bita": to_dict(bita_cfg),
        "base_model": base_model_identity(base_model_dir),
    }
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return out_dir


def load_adapter(adapter_dir: str, model_cfg: ModelConfig) -> tuple[BiTAConfig, dict[str, np.ndarray]]:
    """Reads an adapter written by `save_adapter` and checks that it fits `model_cfg`.

    Returns:
      (BiTAConfig, {"prefix_keys", "prefix_values": [L, P, N, H], "mask_embeddings": [M, D]}
      float32 numpy arrays).

    Raises:
      ConfigError: missing files, or an adapter trained for a model with other dimensions.
    """
    config_path = os.path.join(adapter_dir, CONFIG_FILE)
    weights_path = os.path.join(adapter_dir, WEIGHTS_FILE)
    if not os.path.isdir(adapter_dir):
        raise ConfigError(f"adapter directory not found: {adapter_dir}")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise ConfigError(f"not a BiTA adapter directory: {path} is missing")
    meta = read_json(config_path)
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("bita"), dict)
        or not isinstance(meta.get("base_model"), dict)
    ):
        raise ConfigError(f"{config_path}: expected objects 'bita' and 'base_model'")
    bita_cfg = from_dict(BiTAConfig, meta["bita"], "adapter_config.bita")
    base = meta["base_model"]
    for name in IDENTITY_FIELDS:
        if base.get(name) != getattr(model_cfg, name):
            raise ConfigError(
                f"adapter {adapter_dir} was trained for a base model with {name}={base.get(name)}, "
                f"but the model has {name}={getattr(model_cfg, name)}"
            )
    params = _read_weights(weights_path)
    expected = adapter_shapes(model_cfg, bita_cfg)
    if set(params) != set(expected):
        raise ConfigError(f"{weights_path}: tensors {sorted(params)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        if params[name].shape != shape:
            raise ConfigError(f"{weights_path}: {name} has shape {params[name].shape}, expected {shape}")
        if not np.isfinite(params[name]).all():
            raise ConfigError(f"{weights_path}: {name} holds NaN or inf values")
    return bita_cfg, {name: value.astype(np.float32) for name, value in params.items()}


def _read_weights(path: str) -> dict[str, np.ndarray]:
    """The adapter's tensors; a corrupted or truncated file raises ConfigError."""
    from safetensors import SafetensorError

    try:
        return load_file(path)
    except SafetensorError as e:
        raise ConfigError(f"{path} is corrupted or truncated ({e})") from None


def warn_if_other_base(adapter_dir: str, model_dir: str) -> None:
    """Warns when the adapter's recorded base config.json sha256 differs from the model's.

    The dimensions were already checked by `load_adapter`; equal dimensions with another hash may be
    a re-saved copy of the same model (json bytes change) or a different model of the same shape,
    whose drafts the adapter would not predict (acceptance drops, outputs stay exact).
    """
    recorded = read_json(os.path.join(adapter_dir, CONFIG_FILE))["base_model"].get("config_sha256")
    actual = base_model_identity(model_dir)["config_sha256"]
    if recorded not in (None, actual):
        warnings.warn(
            f"adapter {adapter_dir} was trained on a base model whose config.json differs from "
            f"{model_dir}/config.json (sha256 {str(recorded)[:12]} vs {actual[:12]}): "
            "drafts may rarely be accepted",
            stacklevel=2,
        )
