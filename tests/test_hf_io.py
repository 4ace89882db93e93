"""HF checkpoint I/O: round trips, sharded and bf16 checkpoints, loading onto a device mesh."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec
from transformers import LlamaForCausalLM

from bita_jax import sharding
from bita_jax.config import ConfigError, MeshConfig
from bita_jax.io import hf
from bita_jax.models.llama import abstract_params
from tests.conftest import VARIANTS


def torch_state(path: str) -> dict[str, torch.Tensor]:
    return dict(LlamaForCausalLM.from_pretrained(path, dtype="auto").state_dict())


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_gives_identical_tensors(tiny_checkpoints, tmp_path, variant):
    path = tiny_checkpoints[variant]
    config = hf.load_config(path)
    params = hf.load_params(path, config)
    with open(os.path.join(path, "config.json")) as f:
        source_config = json.load(f)
    hf.save_params(params, config, str(tmp_path / "given"), hf_config=source_config)
    hf.save_params(params, config, str(tmp_path / "built"))  # config.json built from ModelConfig
    assert "lm_head" not in params if config.tie_word_embeddings else "lm_head" in params
    original = torch_state(path)
    for out in ("given", "built"):
        assert_same_state(original, torch_state(str(tmp_path / out)))
        assert hf.load_config(str(tmp_path / out)) == config


def test_unrolled_layers_hold_the_stacked_slices(tiny_checkpoint, tmp_path):
    stacked = hf.load_params(tiny_checkpoint, hf.load_config(tiny_checkpoint))
    config = hf.load_config(tiny_checkpoint, scan_layers=False)
    unrolled = hf.load_params(tiny_checkpoint, config)
    assert "layers" not in unrolled and f"layers_{config.num_layers - 1}" in unrolled
    for i in range(config.num_layers):
        layer = jax.tree.map(lambda x, i=i: x[i], stacked["layers"])
        for a, b in zip(jax.tree.leaves(layer), jax.tree.leaves(unrolled[f"layers_{i}"]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    hf.save_params(unrolled, config, str(tmp_path / "out"))
    assert_same_state(torch_state(tiny_checkpoint), torch_state(str(tmp_path / "out")))


def test_sharded_bf16_checkpoint_round_trip(tiny_checkpoint, tmp_path):
    model = LlamaForCausalLM.from_pretrained(tiny_checkpoint).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "sharded" / hf.INDEX_FILE)
    config = hf.load_config(str(tmp_path / "sharded"), dtype="bfloat16")
    params = hf.load_params(str(tmp_path / "sharded"), config)
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
    hf.save_params(params, config, str(tmp_path / "out"))
    assert_same_state(dict(model.state_dict()), torch_state(str(tmp_path / "out")))

    # The same bf16 checkpoint loaded in float32 holds exactly the bf16 values.
    params32 = hf.load_params(str(tmp_path / "sharded"), hf.load_config(str(tmp_path / "sharded")))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params32), strict=True):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))


def test_loading_onto_a_mesh_gives_the_same_values(tiny_checkpoint):
    config = hf.load_config(tiny_checkpoint)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    shardings = sharding.tree_shardings(abstract_params(config), mesh)
    placed = hf.load_params(tiny_checkpoint, config, shardings)
    plain = hf.load_params(tiny_checkpoint, config)
    targets = dict(jax.tree_util.tree_leaves_with_path(shardings))
    for path, value in jax.tree_util.tree_leaves_with_path(placed):
        assert value.sharding == targets[path], path
    assert placed["layers"]["self_attn"]["q_proj"].sharding.spec == PartitionSpec(
        None, "fsdp", "tensor", None
    )
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_checkpoints_are_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="model directory not found"):
        hf.load_config(str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    config = hf.load_config(str(broken))
    os.remove(broken / "model.safetensors")
    with pytest.raises(ConfigError, match="no model.safetensors"):
        hf.load_params(str(broken), config)
    wider = hf.load_config(tiny_checkpoint, hidden_size=config.hidden_size * 2)
    with pytest.raises(ConfigError, match="does not match config"):
        hf.load_params(tiny_checkpoint, wider)
