"""Pure building blocks of the LLaMA model: RMSNorm, rotary embeddings, masked attention.

Dimension letters (used in every einsum and shape comment of the package):
  B batch, T query length, S key/cache length, D model width, F MLP width, N query heads,
  K key/value heads, G = N // K query heads per KV head, H head dim, V vocab, L layers,
  P BiTA prompt tokens, M BiTA mask tokens.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bita_jax.config import ModelConfig

# Finite, so a row that sees no key yields a uniform (ignored) distribution instead of NaN.
MASKED_SCORE = -1e30


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
    blocks: list[tuple[jax.Array, jax.Array, jax.Array]],
    prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Grouped-query attention over several key/value blocks with one joint softmax.

    Keeping blocks apart (the cache, the step's own tokens, the BiTA prefix) means the cache is
    never copied into a concatenated key tensor.

    Args:
      q: [B, T, K, G, H] queries, already scaled and rotated.
      blocks: sequence (k, v, mask) triples: k, v [B, S_i, K, H] and mask [B, T, S_i] bool.
      prefix: optional BiTA prefix (k, v, visible): k, v [P, K, G, H], one per query head and
        never rotated; visible [B, T] bool says which query rows may see it.

    Returns:
      [B, T, K, G, H] attention output in q's dtype.
    """
    scores = []
    for k, _, mask in blocks:
        s = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
        scores.append(jnp.where(mask[:, None, None], s, MASKED_SCORE))
    if prefix is not None:
        pk, _, visible = prefix
        s = jnp.einsum("btkgh,pkgh->bkgtp", q, pk, preferred_element_type=jnp.float32)
        scores.append(jnp.where(visible[:, None, None, :, None], s, MASKED_SCORE))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(q.dtype)
    out = jnp.zeros(q.shape, jnp.float32)
    start = 0
    for k, v, _ in blocks:
        p = probs[..., start : start + k.shape[1]]
        out += jnp.einsum("bkgts,bskh->btkgh", p, v, preferred_element_type=jnp.float32)
        start += k.shape[1]
    if prefix is not None:
        p = probs[..., start:]
        out += jnp.einsum("bkgtp,pkgh->btkgh", p, prefix[1], preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


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
