"""The KV cache: an explicit pytree passed into and returned from every decoding step."""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from bita_jax.config import ModelConfig

# Logical axis names of the cache's k/v arrays, resolved to mesh axes by sharding.py's rules.
CACHE_AXES = ("layers", "cache_batch", "cache_seq", "cache_kv_heads", "cache_head_dim")


@flax.struct.dataclass
class KVCache:
    """Keys/values of committed tokens, left-aligned per row.

    Attributes:
      k, v: [L, B, S, K, H]; row b's slots [0, length[b]) hold committed tokens.
      length: [B] int32, committed tokens per row.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = jnp.dtype(dtype or config.dtype)
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @classmethod
    def abstract(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        """Shape/dtype twin of `init` (no memory), for shardings and ahead-of-time compiles."""
        return jax.eval_shape(lambda: cls.init(config, batch, max_len, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def write(self, new_k: jax.Array, new_v: jax.Array) -> "KVCache":
        """Writes rows [L, B, R, K, H] into slots [length[b], length[b] + R) of each row b.

        The length is not advanced: the caller decides how many of the R rows are committed, and
        rows past that are overwritten by the next write. The caller guarantees length + R <= S.
        """

        def put(buf, rows, start):  # buf [L, S, K, H], rows [L, R, K, H]
            return jax.lax.dynamic_update_slice(buf, rows.astype(buf.dtype), (0, start, 0, 0))

        def write_rows(buf, rows):
            # Under a mesh, keep the cache on its logical sharding (a no-op without one).
            out = jax.vmap(put, in_axes=(1, 1, 0), out_axes=1)(buf, rows, self.length)
            return nn.with_logical_constraint(out, CACHE_AXES)

        return self.replace(k=write_rows(self.k, new_k), v=write_rows(self.v, new_v))

    def advance(self, n: jax.Array) -> "KVCache":
        """Commits n [B] more tokens per row."""
        return self.replace(length=self.length + n.astype(jnp.int32))
