"""RMSNorm and rotary embeddings against the Hugging Face PyTorch modules; split attention against
one softmax over the concatenated keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from bita_jax.config import ModelConfig
from bita_jax.models.layers import MASKED_SCORE, RMSNorm, apply_rope, attend, rope_inv_freq
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


def single_softmax_attention(q, own, cache, prefix):
    """The reference: every key concatenated (cache, own rows, prefix) under one mask, one softmax."""
    (ck, cv, length), (k, v, mask), (pk, pv, visible) = cache, own, prefix
    B, T = q.shape[:2]
    P = pk.shape[0]
    cache_mask = np.arange(ck.shape[1])[None, None, :] < length[:, :, None]  # [B, T, S]
    scores = jnp.concatenate(
        [
            jnp.einsum("btkgh,bskh->bkgts", q, ck),
            jnp.einsum("btkgh,bskh->bkgts", q, k),
            jnp.einsum("btkgh,pkgh->bkgtp", q, pk),
        ],
        axis=-1,
    )
    full_mask = np.concatenate([cache_mask, mask, np.broadcast_to(visible[:, :, None], (B, T, P))], axis=-1)
    probs = jax.nn.softmax(jnp.where(full_mask[:, None, None], scores, MASKED_SCORE), axis=-1)
    S = ck.shape[1] + T
    out = jnp.einsum("bkgts,bskh->btkgh", probs[..., :S], jnp.concatenate([cv, v], axis=1))
    return out + jnp.einsum("bkgtp,pkgh->btkgh", probs[..., S:], pv)


@pytest.mark.parametrize("kernel", ["einsum", "pallas"])
def test_split_attention_equals_one_softmax(kernel):
    """Mixed cache lengths (0, partial, full), a random own-block mask, some rows seeing the prefix,
    one row seeing nothing at all (uniform over every key, as one softmax gives); the cache part
    by einsums and by the Pallas kernel (interpreted here), the cache's second layer attended."""
    rng = np.random.default_rng(0)
    B, T, S, P, K, G, H = 4, 6, 24, 5, 2, 3, 8
    f = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32) * 3)  # noqa: E731
    q, k, v = f(B, T, K, G, H), f(B, T, K, H), f(B, T, K, H)
    stacked_k, stacked_v, pk, pv = f(2, B, S, K, H), f(2, B, S, K, H), f(P, K, G, H), f(P, K, G, H)
    ck, cv = stacked_k[1], stacked_v[1]
    length = rng.integers(0, S + 1, size=(B, T)).astype(np.int32)
    length[0] = 0
    length[1] = S
    mask = rng.random((B, T, T)) < 0.5
    visible = rng.random((B, T)) < 0.5
    length[2, 3], mask[2, 3], visible[2, 3] = 0, False, False
    cache = (stacked_k, stacked_v, jnp.asarray(length), 1)
    own, prefix = (k, v, jnp.asarray(mask)), (pk, pv, jnp.asarray(visible))
    ours = attend(q, own, cache, prefix, kernel)
    expected = single_softmax_attention(q, own, (ck, cv, length), (pk, pv, visible))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=1e-5, atol=1e-5)
    # Gradients (training differentiates through the queries and the prefix) agree as well.
    weights = f(B, T, K, G, H)

    def grads(fn, cache, visible, **kw):
        loss = lambda q, pk, pv: (fn(q, own, cache, (pk, pv, visible), **kw) * weights).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, pk, pv)

    reference = grads(single_softmax_attention, (ck, cv, length), visible)
    for g_ours, g_ref in zip(grads(attend, cache, prefix[2], kernel=kernel), reference, strict=True):
        # float32: entries equal to 1e-5 of the tensor's largest gradient.
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-5 * np.abs(g_ref).max())
    # Without a cache or prefix (prefill), the own block alone is a plain masked softmax.
    causal = jnp.asarray(np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, T, T)))
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k)
    probs = jax.nn.softmax(jnp.where(causal[:, None, None], scores, MASKED_SCORE))
    np.testing.assert_allclose(
        np.asarray(attend(q, (k, v, causal))),
        np.asarray(jnp.einsum("bkgts,bskh->btkgh", probs, v)),
        rtol=1e-5,
        atol=1e-5,
    )
