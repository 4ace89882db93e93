"""LLaMA in Flax Linen, pure-functional, with scanned or unrolled layers and an explicit KV cache.

The model never owns state: params come in, hidden states and the step's new keys/values come out.
The caller supplies the attention mask between the step's own tokens; committed tokens in the cache
are visible to every row up to each row's cache length. BiTA enters through `adapter`, a separate
pytree: mask-token embeddings (ids V..V+M-1) and per-layer prefix keys/values that only rows with
`prefix_visible` attend to, so rows without it compute exactly what the base model computes.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from bita_jax.config import ModelConfig
from bita_jax.kv_cache import KVCache
from bita_jax.layers import RMSNorm, apply_rope, attend, rope_inv_freq

Adapter = dict  # {"prefix_keys", "prefix_values": [L, P, N, H], "mask_embeddings": [M, D]}


def _init():
    return nn.initializers.normal(stddev=0.02)


def _weight(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
    """A weight in the config dtype, N(0, 0.02) at init, annotated with its logical axes."""
    dtype = jnp.dtype(module.config.dtype)
    return module.param(name, nn.with_logical_partitioning(_init(), axes), shape, dtype)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, layer_cache, layer_prefix, self_mask, cache_mask, prefix_visible):
        """x [B, T, D] -> ([B, T, D], (k, v) [B, T, K, H] of this step's tokens)."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        G = c.num_heads // c.num_kv_heads
        proj = functools.partial(_weight, self)
        wq = proj("q_proj", (c.hidden_size, c.num_heads, c.head_dim), ("embed", "q_heads", "head_dim"))
        wk = proj("k_proj", (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))
        wv = proj("v_proj", (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))
        wo = proj("o_proj", (c.num_heads, c.head_dim, c.hidden_size), ("q_heads", "head_dim", "embed"))

        inv_freq = rope_inv_freq(c)
        q = apply_rope(jnp.einsum("btd,dnh->btnh", x, wq), positions, inv_freq)  # [B, T, N, H]
        k = apply_rope(jnp.einsum("btd,dkh->btkh", x, wk), positions, inv_freq)  # [B, T, K, H]
        v = jnp.einsum("btd,dkh->btkh", x, wv)  # [B, T, K, H]
        q = (q * c.head_dim**-0.5).reshape(*q.shape[:2], c.num_kv_heads, G, c.head_dim)

        blocks = []
        if layer_cache is not None:
            blocks.append((layer_cache[0], layer_cache[1], cache_mask))
        blocks.append((k, v, self_mask))
        prefix = None
        if layer_prefix is not None:
            # The prefix has one key/value per query head; it is never rotated.
            pk, pv = (p.astype(dt).reshape(-1, c.num_kv_heads, G, c.head_dim) for p in layer_prefix)
            prefix = (pk, pv, prefix_visible)
        with jax.named_scope("attn"):
            out = attend(q, blocks, prefix)  # [B, T, K, G, H]
        # One contraction over N*H: with two contracting dims XLA:CPU transposes wo every step.
        out = out.reshape(*out.shape[:2], c.num_heads * c.head_dim)
        return jnp.einsum("btf,fd->btd", out, wo.reshape(-1, c.hidden_size)), (k, v)


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        """SwiGLU: [B, T, D] -> [B, T, D]."""
        c = self.config
        proj = functools.partial(_weight, self)
        gate = jnp.einsum(
            "btd,df->btf", x, proj("gate_proj", (c.hidden_size, c.intermediate_size), ("embed", "mlp"))
        )
        up = jnp.einsum(
            "btd,df->btf", x, proj("up_proj", (c.hidden_size, c.intermediate_size), ("embed", "mlp"))
        )
        down = proj("down_proj", (c.intermediate_size, c.hidden_size), ("mlp", "embed"))
        return jnp.einsum("btf,fd->btd", nn.silu(gate) * up, down)


class Block(nn.Module):
    """One decoder layer, called with (carry, per-layer inputs, broadcast inputs) by `nn.scan` or the loop."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, layer_cache, layer_prefix, positions, self_mask, cache_mask, prefix_visible):
        c = self.config
        dt = jnp.dtype(c.dtype)
        norm = lambda name: RMSNorm(c.rms_norm_eps, dt, dt, name=name)  # noqa: E731
        attn_out, new_kv = Attention(c, name="self_attn")(
            norm("input_layernorm")(x),
            positions,
            layer_cache,
            layer_prefix,
            self_mask,
            cache_mask,
            prefix_visible,
        )
        x = x + attn_out
        x = x + MLP(c, name="mlp")(norm("post_attention_layernorm")(x))
        x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
        return x, new_kv


class LlamaModel(nn.Module):
    """The LLaMA decoder. `__call__` returns final hidden states; `logits` applies the LM head."""

    config: ModelConfig

    def setup(self):
        c = self.config
        dt = jnp.dtype(c.dtype)
        self.embed_tokens = _weight(self, "embed_tokens", (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        block = nn.remat(Block, prevent_cse=False) if c.remat else Block
        if c.scan_layers:
            self.layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c)
        else:
            # Params "layers_0" ... "layers_{L-1}": each layer's weights are separate arrays, so
            # a decode step reads them in place. Slicing a stacked [L, ...] weight inside the
            # scan makes XLA:CPU copy the whole layer's weights every step.
            self.layers = [block(c) for _ in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, dt, dt)
        if not c.tie_word_embeddings:
            self.lm_head = _weight(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"))

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        self_mask: jax.Array,
        cache: KVCache | None = None,
        adapter: Adapter | None = None,
        prefix_visible: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Runs the decoder over one chunk of tokens.

        Args:
          tokens: [B, T] int32; ids >= V select BiTA mask embeddings (id V + k is mask k).
          positions: [B, T] int32 rotary positions.
          self_mask: [B, T, T] bool, which of this chunk's tokens each row sees.
          cache: committed tokens' keys/values; row b sees its first `cache.length[b]` slots.
          adapter: BiTA params (prefix keys/values [L, P, N, H], mask embeddings [M, D]).
          prefix_visible: [B, T] bool, rows that attend to the prefix (required with adapter).

        Returns:
          hidden [B, T, D] after the final norm, and (k, v) [L, B, T, K, H] of this chunk, for
          the caller to write into the cache.
        """
        c = self.config
        dt = jnp.dtype(c.dtype)
        x = jnp.take(self.embed_tokens, jnp.clip(tokens, 0, c.vocab_size - 1), axis=0)
        if adapter is not None:
            mask_emb = adapter["mask_embeddings"].astype(dt)
            extra = jnp.take(mask_emb, jnp.clip(tokens - c.vocab_size, 0, mask_emb.shape[0] - 1), axis=0)
            x = jnp.where((tokens >= c.vocab_size)[..., None], extra, x)
        x = nn.with_logical_constraint(x.astype(dt), ("batch", "seq", "embed"))

        layer_cache = cache_mask = None
        if cache is not None:
            layer_cache = (cache.k, cache.v)
            slots = jnp.arange(cache.max_len)
            cache_mask = jnp.broadcast_to(
                (slots[None, :] < cache.length[:, None])[:, None, :],
                (tokens.shape[0], tokens.shape[1], cache.max_len),
            )
        layer_prefix = None
        if adapter is not None:
            layer_prefix = (adapter["prefix_keys"], adapter["prefix_values"])
            if prefix_visible is None:
                raise ValueError("prefix_visible is required when an adapter is given")
        broadcast = (positions, self_mask, cache_mask, prefix_visible)
        if self.config.scan_layers:
            x, new_kv = self.layers(x, layer_cache, layer_prefix, *broadcast)
        else:
            x, new_kv = self._unrolled_layers(x, layer_cache, layer_prefix, broadcast)
        return self.norm(x), new_kv

    def _unrolled_layers(self, x, layer_cache, layer_prefix, broadcast):
        """The scan's computation as a Python loop; per-layer inputs are sliced off their L axis."""
        layer = lambda pair, i: None if pair is None else (pair[0][i], pair[1][i])  # noqa: E731
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            x, (k, v) = block(x, layer(layer_cache, i), layer(layer_prefix, i), *broadcast)
            new_k.append(k)
            new_v.append(v)
        return x, (jnp.stack(new_k), jnp.stack(new_v))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[..., D] -> [..., V] float32 logits."""
        if self.config.tie_word_embeddings:
            return jnp.einsum("...d,vd->...v", hidden, self.embed_tokens, preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", hidden, self.lm_head, preferred_element_type=jnp.float32)


def causal_mask(batch: int, length: int) -> jax.Array:
    """[B, T, T] lower-triangular mask for plain causal attention."""
    return jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))


def abstract_params(config: ModelConfig):
    """Param tree of `nn.LogicallyPartitioned` boxes around ShapeDtypeStructs (no memory)."""
    model = LlamaModel(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), tokens, tokens, causal_mask(1, 1))["params"]


def init_params(config: ModelConfig, rng: jax.Array):
    """Randomly initialised params (unboxed), N(0, 0.02) like HF's initializer_range."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(LlamaModel(config).init(rng, tokens, tokens, causal_mask(1, 1))["params"])
