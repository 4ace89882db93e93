"""The adapter shipped in the package (bita_jax/adapters/smollm2) fits SmolLM2-135M-Instruct and
resolves by its short name, so `decode.py --model smollm2 --adapter smollm2` needs no path."""

import json
import os

import numpy as np

from bita_jax.bita.adapter import adapter_shapes
from bita_jax.config import ModelConfig
from bita_jax.io import adapter_files
from bita_jax.tuning.choice import load_store

# SmolLM2-135M-Instruct's published config.json (the fields the adapter's identity checks and shapes use).
SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 100000, "max_position_embeddings": 8192,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}  # fmt: skip


def test_shipped_smollm2_adapter_loads_for_smollm2(tmp_path):
    path = adapter_files.resolve_adapter("smollm2")
    assert os.path.isdir(path), path
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    model_cfg = ModelConfig.from_pretrained(str(tmp_path))
    bita_cfg, arrays = adapter_files.load_adapter(path, model_cfg)  # identity, shapes and finiteness checked
    assert {n: a.shape for n, a in arrays.items()} == adapter_shapes(model_cfg, bita_cfg)
    assert bita_cfg.lora_rank > 0 and any(np.abs(a).max() > 0 for n, a in arrays.items() if n.endswith("_b"))
    store = load_store(path)  # the tuned trees for --tree auto
    assert store is not None


def test_a_directory_named_like_a_shipped_adapter_is_taken_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("smollm2")
    assert adapter_files.resolve_adapter("smollm2") == "smollm2"
    assert adapter_files.resolve_adapter("other") == "other"
