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
        dtype = jnp.dtype(dtype or config.compute_dtype)
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @classmethod
    def abstract(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        """Shape/dtype twin of `init` (no memory), for shardings and ahead-of-time compiles."""
        return jax.eval_shape(lambda: cls.init(config, batch, max_len, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def model_inputs(self, num_rows: int) -> dict[str, jax.Array]:
        """The model's `cache_kv` and `cache_length` [B, T] for a chunk of T = num_rows rows:
        every row sees its sequence's committed slots."""
        length = jnp.broadcast_to(self.length[:, None], (self.length.shape[0], num_rows))
        return {"cache_kv": (self.k, self.v), "cache_length": length}

    def commit(self, new_k: jax.Array, new_v: jax.Array, count: jax.Array) -> "KVCache":
        """Commits the first count[b] of R new rows [L, B, R, K, H] after each row b's length.

        All R rows are written (static shapes); the length advances by count [B], so rows past
        it stay invisible and the next commit overwrites them. count 0 leaves a row unchanged in
        effect (finished rows). The caller guarantees length + R <= S.

        One `dynamic_update_slice` per batch row, at a static row and that row's length: XLA
        updates a (donated) cache in place. The same write vmapped over the batch is a scatter,
        which the TPU compiler costs with whole-cache traffic (docs/performance-tpu.md).
        """

        def write_rows(buf, rows):  # buf [L, B, S, K, H], rows [L, B, R, K, H]
            rows = rows.astype(buf.dtype)
            for b in range(buf.shape[1]):
                start = (0, b, self.length[b], 0, 0)
                buf = jax.lax.dynamic_update_slice(buf, rows[:, b : b + 1], start)
            # Under a mesh, keep the cache on its logical sharding (a no-op without one).
            return nn.with_logical_constraint(buf, CACHE_AXES)

        return KVCache(
            k=write_rows(self.k, new_k),
            v=write_rows(self.v, new_v),
            length=self.length + count.astype(jnp.int32),
        )
