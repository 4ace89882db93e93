"""Pure building blocks of the LLaMA model: RMSNorm, rotary embeddings, split masked attention.

Dimension letters (used in every einsum and shape comment of the package):
  B batch, T query length, S key/cache length, D model width, F MLP width, N query heads,
  K key/value heads, G = N // K query heads per KV head, H head dim, V vocab, L layers,
  P BiTA prompt tokens, M BiTA mask tokens.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bita_jax.config import ModelConfig
from bita_jax.models.cache_attention import MASKED_SCORE, cache_part, masked_exp

__all__ = ["MASKED_SCORE", "RMSNorm", "apply_rope", "attend", "low_rank_update", "rope_inv_freq"]


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 as Hugging Face LLaMA does."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype before multiplying by the weight.
        return scale.astype(self.dtype) * x32.astype(self.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] with the checkpoint's rope scaling (none, linear, llama3)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = dict(config.rope_scaling or ())
    if config.rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif config.rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates x [B, T, heads, H] by positions [B, T] in HF's rotate_half layout."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attend(
    q: jax.Array,
    own: tuple[jax.Array, jax.Array, jax.Array],
    cache: tuple[jax.Array, jax.Array, jax.Array, int] | None = None,
    prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    kernel: str = "auto",
) -> jax.Array:
    """Grouped-query attention over the cache, the step's own rows and the BiTA prefix, one softmax.

    The three parts are attended to separately and merged by log-sum-exp (each part's max m_i,
    sum of exponentials l_i and unnormalised output o_i; out = sum_i e^(m_i - m) o_i /
    sum_i e^(m_i - m) l_i with m the largest m_i), which equals one softmax over the
    concatenated keys within float rounding. The cache part needs only a length per row: its
    mask is an iota compare fused into the scores, never a [B, T, S] tensor, and no [.., S + T + P]
    score tensor is concatenated. The own block's mask (causal, the draft tree) covers only T x T.
    On TPU the cache part is one Pallas kernel that keeps its scores on chip (`cache_attention`).
    (`jax.nn.dot_product_attention(..., key_value_seq_lengths=..., return_residual=True)` is the
    same computation off GPU, but it rounds its log-sum-exp and its normalised output to the input
    dtype, which in bfloat16 would make the merge inexact.)

    Args:
      q: [B, T, K, G, H] queries, already scaled and rotated.
      own: this chunk's (k, v, mask): k, v [B, T, K, H], mask [B, T, T] bool.
      cache: optional committed (k, v, length, layer): k, v [L, B, S, K, H] of which layer `layer`
        (a Python int) is attended; row t of sequence b sees slots s < length[b, t], length [B, T]
        int32.
      prefix: optional BiTA prefix (k, v, visible): k, v [P, K, G, H], one per query head and
        never rotated; visible [B, T] bool says which query rows may see it.
      kernel: the cache part's implementation (`ModelConfig.attention_kernel`).

    Returns:
      [B, T, K, G, H] attention output in q's dtype.
    """

    def scores(spec, k):
        return jnp.einsum(spec, q, k, preferred_element_type=jnp.float32)

    def values(spec, e, v):
        return jnp.einsum(spec, e.astype(q.dtype), v, preferred_element_type=jnp.float32)

    k, v, mask = own
    m, e, total = masked_exp(scores("btkgh,bskh->bkgts", k), mask[:, None, None])
    parts = [(m, total, values("bkgts,bskh->btkgh", e, v))]
    if cache is not None:
        parts.append(cache_part(q, *cache, kernel=kernel))
    if prefix is not None:
        k, v, visible = prefix
        m, e, total = masked_exp(scores("btkgh,pkgh->bkgtp", k), visible[:, None, None, :, None])
        parts.append((m, total, values("bkgtp,pkgh->btkgh", e, v)))
    top = functools.reduce(jnp.maximum, [m for m, _, _ in parts])
    out, denominator = 0.0, 0.0
    for m, total, o in parts:
        w = jnp.exp(m - top)  # [B, K, G, T, 1]
        out += jnp.einsum("bkgt,btkgh->btkgh", w[..., 0], o)
        denominator += w * total
    return (out / jnp.einsum("bkgt->btkg", denominator[..., 0])[..., None]).astype(q.dtype)


def low_rank_update(x: jax.Array, a: jax.Array, b: jax.Array, rows: jax.Array) -> jax.Array:
    """A low-rank update (x A)(B) / (sqrt(I) r) on the chosen rows, exactly zero on the others.

    A is stored N(0, 1) and B (zero at init) unscaled; the fixed 1 / (sqrt(I) r) keeps each entry of
    A and B order one, so an Adam step of the prompt tokens' learning rate moves the update by about
    that rate, whatever I and r are. `where`, not a product, keeps other rows bit-identical (and free
    of a NaN that a product would spread).

    Args:
      x: [B, T, I] inputs of a linear map; a [I, r]; b [r, O]; rows: [B, T] bool.

    Returns:
      [B, T, O] in x's dtype.
    """
    scale = 1.0 / (a.shape[0] ** 0.5 * a.shape[1])
    low = jnp.einsum("bti,ir->btr", x, a.astype(x.dtype), preferred_element_type=jnp.float32)
    update = jnp.einsum("btr,ro->bto", low * scale, b.astype(jnp.float32))
    return jnp.where(rows[..., None], update, 0.0).astype(x.dtype)
