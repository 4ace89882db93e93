"""LLaMA in Flax Linen, pure-functional, with scanned or unrolled layers.

The model never owns state: params come in, hidden states and the chunk's new keys/values come out.
The caller supplies every mask: between the chunk's own tokens, a length per row into the committed
keys/values it passes in (a KV cache's arrays), and which rows see an optional prefix of extra
keys/values (BiTA's prompt tokens, never rotated). The model takes embeddings, so callers choose what
each row holds (`embed` looks up token ids; BiTA swaps in its mask embeddings, see bita/adapter.py).
Rows that see no prefix compute exactly what the base model computes.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from bita_jax.config import ModelConfig
from bita_jax.models.layers import RMSNorm, apply_rope, attend, low_rank_update, rope_inv_freq

KeysValues = tuple[jax.Array, jax.Array]  # (k, v), each [L, ...] with a leading layer axis
# Per linear map name (q_proj, ..., down_proj), low-rank factors (A [L, I, r], B [L, r, O]).
LowRank = dict[str, tuple[jax.Array, jax.Array]]


def _init():
    return nn.initializers.normal(stddev=0.02)


def _weight(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
    """A weight stored in the config's `dtype`, N(0, 0.02) at init, annotated with its logical axes,
    read in the compute dtype (the one place where weights meet the activations' dtype)."""
    param = module.param(
        name, nn.with_logical_partitioning(_init(), axes), shape, jnp.dtype(module.config.dtype)
    )
    return param.astype(module.config.compute_dtype)


def _with_update(y: jax.Array, x: jax.Array, name: str, layer_lora, rows) -> jax.Array:
    """y = x W of linear map `name`, plus its low-rank update on `rows` when the layer has one."""
    if layer_lora is None:
        return y
    a, b = layer_lora[name]
    return y + low_rank_update(x, a, b, rows).reshape(y.shape)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(
        self, x, positions, layer_cache, layer_prefix, self_mask, cache_length, prefix_visible,
        layer_lora=None,
    ):  # fmt: skip
        """x [B, T, D] -> ([B, T, D], (k, v) [B, T, K, H] of this step's tokens).

        layer_cache: None or (k, v, layer): the cache k, v [L, B, S, K, H] and this layer's index.

        layer_lora: this layer's low-rank updates (A [I, r], B [r, O] per map), applied only on the
        prefix_visible rows.
        """
        c = self.config
        dt = jnp.dtype(c.compute_dtype)
        G = c.num_heads // c.num_kv_heads
        proj = functools.partial(_weight, self)
        wq = proj("q_proj", (c.hidden_size, c.num_heads, c.head_dim), ("embed", "q_heads", "head_dim"))
        wk = proj("k_proj", (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))
        wv = proj("v_proj", (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))
        wo = proj("o_proj", (c.num_heads, c.head_dim, c.hidden_size), ("q_heads", "head_dim", "embed"))

        inv_freq = rope_inv_freq(c)
        linear = lambda w, name: _with_update(  # noqa: E731
            jnp.einsum("btd,dnh->btnh", x, w), x, name, layer_lora, prefix_visible
        )
        q = apply_rope(linear(wq, "q_proj"), positions, inv_freq)  # [B, T, N, H]
        k = apply_rope(linear(wk, "k_proj"), positions, inv_freq)  # [B, T, K, H]
        v = linear(wv, "v_proj")  # [B, T, K, H]
        q = (q * c.head_dim**-0.5).reshape(*q.shape[:2], c.num_kv_heads, G, c.head_dim)

        cache = None if layer_cache is None else (*layer_cache[:2], cache_length, layer_cache[2])
        prefix = None
        if layer_prefix is not None:
            # The prefix has one key/value per query head; it is never rotated.
            pk, pv = (p.astype(dt).reshape(-1, c.num_kv_heads, G, c.head_dim) for p in layer_prefix)
            prefix = (pk, pv, prefix_visible)
        with jax.named_scope("attn"):
            out = attend(q, (k, v, self_mask), cache, prefix, c.attention_kernel)  # [B, T, K, G, H]
        # One contraction over N*H: with two contracting dims XLA:CPU transposes wo every step.
        out = out.reshape(*out.shape[:2], c.num_heads * c.head_dim)
        y = jnp.einsum("btf,fd->btd", out, wo.reshape(-1, c.hidden_size))
        return _with_update(y, out, "o_proj", layer_lora, prefix_visible), (k, v)


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, layer_lora=None, rows=None):
        """SwiGLU: [B, T, D] -> [B, T, D]; layer_lora's updates on `rows` [B, T] as in Attention."""
        c = self.config
        proj = functools.partial(_weight, self)
        linear = lambda x, w, name: _with_update(  # noqa: E731
            jnp.einsum("bti,io->bto", x, w), x, name, layer_lora, rows
        )
        widen = (c.hidden_size, c.intermediate_size)
        gate = linear(x, proj("gate_proj", widen, ("embed", "mlp")), "gate_proj")
        up = linear(x, proj("up_proj", widen, ("embed", "mlp")), "up_proj")
        down = proj("down_proj", (c.intermediate_size, c.hidden_size), ("mlp", "embed"))
        return linear(nn.silu(gate) * up, down, "down_proj")


class Block(nn.Module):
    """One decoder layer, called with (carry, per-layer inputs, broadcast inputs) by `nn.scan` or the loop."""

    config: ModelConfig
    # Unrolled: this layer's index into the whole cache [L, B, S, K, H] (read in place, not sliced
    # into a copy: a kernel's operand must be a whole buffer). None: the cache given is this
    # layer's own [B, S, K, H] (`nn.scan` slices it).
    cache_layer: int | None = None

    @nn.compact
    def __call__(
        self, x, layer_cache, layer_prefix, layer_lora, positions, self_mask, cache_length, prefix_visible
    ):
        c = self.config
        norm = lambda name: RMSNorm(c.rms_norm_eps, c.compute_dtype, c.dtype, name=name)  # noqa: E731
        if layer_cache is not None and self.cache_layer is None:
            layer_cache = tuple(a[None] for a in layer_cache)  # [1, B, S, K, H], layer 0
        attn_out, new_kv = Attention(c, name="self_attn")(
            norm("input_layernorm")(x),
            positions,
            (*layer_cache, self.cache_layer or 0) if layer_cache is not None else None,
            layer_prefix,
            self_mask,
            cache_length,
            prefix_visible,
            layer_lora,
        )
        x = x + attn_out
        x = x + MLP(c, name="mlp")(norm("post_attention_layernorm")(x), layer_lora, prefix_visible)
        x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
        return x, new_kv


class LlamaModel(nn.Module):
    """The LLaMA decoder. `__call__` returns final hidden states; `logits` applies the LM head."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.embed_tokens = _weight(self, "embed_tokens", (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        block = nn.remat(Block, prevent_cse=False) if c.remat else Block
        if c.scan_layers:
            self.layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, 0, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c)
        else:
            # Params "layers_0" ... "layers_{L-1}": each layer's weights are separate arrays, so
            # a decode step reads them in place. Slicing a stacked [L, ...] weight inside the
            # scan makes XLA:CPU copy the whole layer's weights every step.
            self.layers = [block(c, cache_layer=i) for i in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, c.compute_dtype, c.dtype)
        if not c.tie_word_embeddings:
            self.lm_head = _weight(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"))

    def embed(self, tokens: jax.Array) -> jax.Array:
        """[B, T] ids -> [B, T, D] embeddings in the compute dtype.

        Ids outside [0, V) are clipped rather than filled with NaN: a NaN row would reach every
        row through the attention's zero-weighted sums (0 * NaN).
        """
        return jnp.take(self.embed_tokens, tokens, axis=0, mode="clip")

    def __call__(
        self,
        embeds: jax.Array,
        positions: jax.Array,
        self_mask: jax.Array,
        cache_kv: KeysValues | None = None,
        cache_length: jax.Array | None = None,
        prefix: KeysValues | None = None,
        prefix_visible: jax.Array | None = None,
        mask_lora: LowRank | None = None,
    ) -> tuple[jax.Array, KeysValues]:
        """Runs the decoder over one chunk of rows.

        Args:
          embeds: [B, T, D] input embeddings (see `embed`).
          positions: [B, T] int32 rotary positions.
          self_mask: [B, T, T] bool, which of this chunk's rows each row sees.
          cache_kv: committed keys/values (k, v) [L, B, S, K, H], rotated, from earlier chunks.
          cache_length: [B, T] int32, row t sees committed slots s < cache_length[b, t] (required
            with cache_kv).
          prefix: extra keys/values (k, v) [L, P, N, H], one per query head, never rotated.
          prefix_visible: [B, T] bool, rows that attend to the prefix (required with prefix).
          mask_lora: optional low-rank updates of the linear maps, applied on prefix_visible rows only.

        Returns:
          hidden [B, T, D] after the final norm, and (k, v) [L, B, T, K, H] of this chunk, for
          the caller to commit to its cache.
        """
        if (cache_kv is None) != (cache_length is None) or (prefix is None) != (prefix_visible is None):
            raise ValueError("cache_kv needs cache_length and prefix needs prefix_visible")
        if mask_lora is not None and prefix_visible is None:
            raise ValueError("mask_lora needs prefix_visible (the rows it applies to)")
        x = nn.with_logical_constraint(embeds.astype(self.config.compute_dtype), ("batch", "seq", "embed"))
        broadcast = (positions, self_mask, cache_length, prefix_visible)
        if self.config.scan_layers:
            x, new_kv = self.layers(x, cache_kv, prefix, mask_lora, *broadcast)
        else:
            x, new_kv = self._unrolled_layers(x, cache_kv, prefix, mask_lora, broadcast)
        return self.norm(x), new_kv

    def _unrolled_layers(self, x, layer_cache, layer_prefix, mask_lora, broadcast):
        """The scan's computation as a Python loop; per-layer inputs are sliced off their L axis."""
        layer = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            # The cache goes whole (block i reads its layer in place, see Block.cache_layer).
            per_layer = (layer_cache, layer(layer_prefix, i), layer(mask_lora, i))
            x, (k, v) = block(x, *per_layer, *broadcast)
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


def forward(
    model: LlamaModel, params, tokens: jax.Array, positions: jax.Array, self_mask: jax.Array, **kwargs
) -> tuple[jax.Array, KeysValues]:
    """The base model over token ids [B, T]: `embed`, then the decoder (kwargs as in `__call__`)."""
    embeds = model.apply({"params": params}, tokens, method="embed")
    return model.apply({"params": params}, embeds, positions, self_mask, **kwargs)


def _init_model(model: LlamaModel, rng: jax.Array):
    tokens = jnp.zeros((1, 1), jnp.int32)
    embeds = jnp.zeros((1, 1, model.config.hidden_size), model.config.compute_dtype)
    return model.init(rng, embeds, tokens, causal_mask(1, 1))["params"]


def abstract_params(config: ModelConfig):
    """Param tree of `nn.LogicallyPartitioned` boxes around ShapeDtypeStructs (no memory)."""
    return jax.eval_shape(functools.partial(_init_model, LlamaModel(config)), jax.random.key(0))


def init_params(config: ModelConfig, rng: jax.Array):
    """Randomly initialised params (unboxed), N(0, 0.02) like HF's initializer_range."""
    return nn.unbox(_init_model(LlamaModel(config), rng))
