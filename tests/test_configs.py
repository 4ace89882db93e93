"""Every shipped YAML in configs/ loads through train.py's loader and fits the model it names.

The YAML files hold run-time knobs only; the architecture comes from the checkpoint's config.json.
The full-size checkpoints are not here, so their config.json is written from the published values
(the fields that shape a run: widths, heads, vocabulary, context), and the run's own checks
(`loop.run`'s mesh, batch and length checks) are applied to the pair on the 8 fake CPU devices.
"""

import dataclasses
import glob
import json
import os

import pytest
import yaml

from bita_jax.cli.train import build_config, build_parser
from bita_jax.config import TrainConfig, to_dict
from bita_jax.io import hf
from bita_jax.sharding import check_mesh_fits, make_mesh
from bita_jax.training import loop as train_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))

LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
LLAMA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
}
LLAMA_13B = {
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_attention_heads": 40,
    "num_hidden_layers": 40,
}
# config.json of each model a config is written for (published values, the fields that matter here).
ARCHITECTURES = {
    "llama2_7b_chat": {**LLAMA, **LLAMA_7B, "vocab_size": 32000, "max_position_embeddings": 4096},
    "llama2_13b_chat": {**LLAMA, **LLAMA_13B, "vocab_size": 32000, "max_position_embeddings": 4096},
    "llama2_70b_chat": {
        **LLAMA,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "num_hidden_layers": 80,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "llama3_8b_instruct": {
        **LLAMA,
        **LLAMA_7B,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "bos_token_id": 128000,
        "eos_token_id": 128009,
    },
    # Vicuna v1.3 is LLaMA-1 fine-tuned: 2048 positions.
    "vicuna_7b": {**LLAMA, **LLAMA_7B, "vocab_size": 32000, "max_position_embeddings": 2048},
    "vicuna_13b": {**LLAMA, **LLAMA_13B, "vocab_size": 32000, "max_position_embeddings": 2048},
    "vicuna_33b": {
        **LLAMA,
        "hidden_size": 6656,
        "intermediate_size": 17920,
        "num_attention_heads": 52,
        "num_hidden_layers": 60,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
    },
}


def test_every_config_has_an_architecture():
    names = [os.path.splitext(os.path.basename(p))[0] for p in CONFIGS]
    assert names and sorted(set(names) - {"tiny_debug"}) == sorted(ARCHITECTURES)


def assert_frozen(obj):
    """obj and every dataclass inside it refuse assignment."""
    for field in dataclasses.fields(obj):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field.name, getattr(obj, field.name))
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            assert_frozen(value)


def assert_holds(loaded: dict, yaml_values: dict, where: str):
    """Every YAML value arrived in the config (lists as tuples, numbers as the field's type)."""
    for key, value in yaml_values.items():
        if isinstance(value, dict):
            assert_holds(loaded[key], value, f"{where}.{key}")
        else:
            assert loaded[key] == value, (f"{where}.{key}", loaded[key], value)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_shipped_config_loads_and_fits_its_model(path, tiny_checkpoint, tmp_path):
    name = os.path.splitext(os.path.basename(path))[0]
    if name == "tiny_debug":
        model_dir = tiny_checkpoint  # "a random tiny checkpoint is enough"
    else:
        model_dir = str(tmp_path / name)
        os.makedirs(model_dir)
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(ARCHITECTURES[name], f)
    argv = ["--config", path, "--model", model_dir, "--data", "d.jsonl", "--output", str(tmp_path / "run")]
    cfg = build_config(build_parser().parse_args(argv))

    assert isinstance(cfg, TrainConfig)
    assert_frozen(cfg)
    with open(path) as f:
        assert_holds(to_dict(cfg), yaml.safe_load(f), name)

    # What `loop.run` checks before loading weights, on this machine's 8 devices.
    model = hf.load_config(model_dir, dtype=train_loop.resolve_dtype(cfg.dtype), remat=cfg.remat)
    assert model.dtype == ("float32" if name == "tiny_debug" else "bfloat16")
    mesh = make_mesh(cfg.mesh)
    assert mesh.size == 8
    check_mesh_fits(model, mesh)
    micro = train_loop.check_batch(cfg, mesh)
    assert micro * cfg.optimizer.grad_accum == cfg.batch_size
    # A sequence's positions (prompt + response, masks included) stay within the model's context.
    assert cfg.data.max_length <= model.max_position_embeddings
