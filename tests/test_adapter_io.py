"""Adapter save/load round trip and refusal of adapters that do not fit the base model."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from bita_jax.bita import adapter as bita_adapter
from bita_jax.config import BiTAConfig, ConfigError, ModelConfig
from bita_jax.io import adapter_files


def test_round_trip_and_identity(tiny_checkpoint, tmp_path):
    model_cfg = ModelConfig.from_pretrained(tiny_checkpoint)
    bita_cfg = BiTAConfig(num_prompt_tokens=5, num_mask_tokens=4, prefix_dropout=0.0)
    params = bita_adapter.init_adapter(model_cfg, bita_cfg, jax.random.key(3))
    out = adapter_files.save_adapter(str(tmp_path / "adapter"), params, bita_cfg, tiny_checkpoint)
    loaded_cfg, loaded = adapter_files.load_adapter(out, model_cfg)
    assert loaded_cfg == bita_cfg
    for name, value in params.items():
        np.testing.assert_array_equal(loaded[name], np.asarray(value))
    meta = json.load(open(os.path.join(out, adapter_files.CONFIG_FILE)))
    # No path of the machine it was trained on: the adapter may be shipped (as the demo's is).
    assert "path" not in meta["base_model"] and tiny_checkpoint not in json.dumps(meta)
    assert len(meta["base_model"]["config_sha256"]) == 64


def test_refuses_mismatched_or_missing(tiny_checkpoint, tmp_path):
    model_cfg = ModelConfig.from_pretrained(tiny_checkpoint)
    bita_cfg = BiTAConfig(num_prompt_tokens=2)
    out = adapter_files.save_adapter(
        str(tmp_path / "a"),
        bita_adapter.init_adapter(model_cfg, bita_cfg, jax.random.key(0)),
        bita_cfg,
        tiny_checkpoint,
    )
    with pytest.raises(ConfigError, match="num_layers=2"):
        adapter_files.load_adapter(out, dataclasses.replace(model_cfg, num_layers=3))
    with pytest.raises(ConfigError, match="not found"):
        adapter_files.load_adapter(str(tmp_path / "nope"), model_cfg)
    os.remove(os.path.join(out, adapter_files.WEIGHTS_FILE))
    with pytest.raises(ConfigError, match="is missing"):
        adapter_files.load_adapter(out, model_cfg)
