"""RMSNorm and rotary embeddings against the Hugging Face PyTorch modules."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from bita_jax.config import ModelConfig
from bita_jax.models.layers import RMSNorm, apply_rope, rope_inv_freq
from tests.conftest import VARIANTS
from tests.tiny_checkpoint import TINY_LLAMA

TOL = 1e-5


def test_rmsnorm_matches_hf():
    rng = np.random.RandomState(0)
    x = rng.randn(2, 5, 64).astype(np.float32) * 3
    scale = rng.randn(64).astype(np.float32)
    ref = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(scale))
        expected = ref(torch.from_numpy(x)).numpy()
    ours = RMSNorm(1e-5, jnp.float32, jnp.float32).apply({"params": {"scale": scale}}, x)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rope_matches_hf(variant):
    hf = LlamaConfig(**{**TINY_LLAMA, **VARIANTS[variant]})
    config = ModelConfig.from_hf_config(hf.to_dict())
    assert config.rope_type == hf.rope_parameters["rope_type"]
    rng = np.random.RandomState(1)
    positions = np.stack([np.arange(0, 300, 10), rng.randint(0, 512, 30)]).astype(np.int32)  # [B, T]
    q = rng.randn(2, 30, 4, 16).astype(np.float32)  # [B, T, N, H]
    k = rng.randn(2, 30, 2, 16).astype(np.float32)  # [B, T, K, H]

    rotary = LlamaRotaryEmbedding(hf)
    with torch.no_grad():
        cos, sin = rotary(torch.from_numpy(q), torch.from_numpy(positions).long())
        # HF rotates [B, heads, T, H]; ours is [B, T, heads, H].
        q_ref, k_ref = apply_rotary_pos_emb(
            torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2), cos, sin
        )
    np.testing.assert_allclose(rope_inv_freq(config), rotary.inv_freq.numpy(), rtol=TOL, atol=0)
    inv_freq = rope_inv_freq(config)
    np.testing.assert_allclose(
        np.asarray(apply_rope(jnp.asarray(q), positions, inv_freq)),
        q_ref.transpose(1, 2).numpy(),
        rtol=TOL,
        atol=TOL,
    )
    np.testing.assert_allclose(
        np.asarray(apply_rope(jnp.asarray(k), positions, inv_freq)),
        k_ref.transpose(1, 2).numpy(),
        rtol=TOL,
        atol=TOL,
    )
