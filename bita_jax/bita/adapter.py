"""The BiTA adapter: per-layer prompt prefix keys/values and mask-token embeddings.

Everything about the adapter lives here: its shapes, init, logical axes and mesh placement, the
mask token ids, how mask ids become embeddings, prefix dropout, and the forward pass of the base
model with the adapter plugged in. The adapter is its own pytree, apart from the frozen base
params, so only it gets gradients and optimizer state. The reference code stores the prompt tokens
as one table [P, L * 2 * D]; here the same numbers are prefix keys and values [L, P, N, H]
(D = N * H, one per query head), a reshape of that table that the layers slice per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from bita_jax.config import BiTAConfig, ModelConfig
from bita_jax.models.llama import KeysValues, LlamaModel
from bita_jax.sharding import LOGICAL_AXIS_RULES, Rules, logical_sharding

Adapter = dict  # {"prefix_keys", "prefix_values": [L, P, N, H], "mask_embeddings": [M, D]}

ADAPTER_AXES = {
    "prefix_keys": ("layers", "prompt", "q_heads", "head_dim"),
    "prefix_values": ("layers", "prompt", "q_heads", "head_dim"),
    "mask_embeddings": ("mask", "embed"),
}


def adapter_shapes(model: ModelConfig, bita: BiTAConfig) -> dict[str, tuple[int, ...]]:
    prefix = (model.num_layers, bita.num_prompt_tokens, model.num_heads, model.head_dim)
    return {
        "prefix_keys": prefix,
        "prefix_values": prefix,
        "mask_embeddings": (bita.num_mask_tokens, model.hidden_size),
    }


def init_adapter(model: ModelConfig, bita: BiTAConfig, rng: jax.Array) -> Adapter:
    """Float32 adapter params drawn from N(0, init_std), as HF initialises the reference's tables."""
    shapes = adapter_shapes(model, bita)
    keys = jax.random.split(rng, len(shapes))
    return {
        name: bita.init_std * jax.random.normal(key, shape, jnp.float32)
        for key, (name, shape) in zip(keys, sorted(shapes.items()), strict=True)
    }


def init_from_text(
    model: LlamaModel, params, bita: BiTAConfig, tokens: jax.Array, rng: jax.Array
) -> Adapter:
    """An adapter that starts where the frozen model's own activations are, instead of near zero.

    The prefix keys/values are the model's keys/values [L, P, K, H] on real text, at P positions
    spread evenly over it, each KV head repeated for its G query heads; mask k is the input
    embedding of a token drawn from the text. Random N(0, 0.02) starts are far smaller than real
    keys and values (order 1), so a short run spends its first steps only growing them.

    Args:
      tokens: [T] ids of real text, T >= 1.
    """
    cfg = model.config
    positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)[None]
    causal = positions[:, :, None] >= positions[:, None, :]  # [1, T, T]
    embeds = model.apply({"params": params}, tokens[None], method="embed")
    _, (k, v) = model.apply({"params": params}, embeds, positions, causal)  # [L, 1, T, K, H]
    picks = jnp.round(jnp.linspace(0, tokens.shape[0] - 1, bita.num_prompt_tokens)).astype(jnp.int32)
    per_query_head = lambda x: jnp.repeat(x[:, 0, picks], cfg.num_heads // cfg.num_kv_heads, axis=2)  # noqa: E731
    drawn = jax.random.randint(rng, (bita.num_mask_tokens,), 0, tokens.shape[0])  # [M] positions
    return {
        "prefix_keys": per_query_head(k).astype(jnp.float32),
        "prefix_values": per_query_head(v).astype(jnp.float32),
        "mask_embeddings": embeds[0, drawn].astype(jnp.float32),
    }


def abstract_adapter(model: ModelConfig, bita: BiTAConfig) -> dict[str, jax.ShapeDtypeStruct]:
    return {name: jax.ShapeDtypeStruct(s, jnp.float32) for name, s in adapter_shapes(model, bita).items()}


def adapter_shardings(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> dict[str, NamedSharding]:
    """The adapter's shardings on a mesh, from its logical axes and the rules table."""
    return {name: logical_sharding(axes, mesh, rules) for name, axes in ADAPTER_AXES.items()}


def place_adapter(adapter: Adapter, mesh: Mesh | None) -> Adapter:
    """Puts the adapter's arrays on the mesh by their logical axes (default device without a mesh)."""
    if mesh is None:
        return {name: jax.device_put(x) for name, x in adapter.items()}
    return jax.device_put(adapter, {name: adapter_shardings(mesh)[name] for name in adapter})


def mask_token_ids(vocab_size: int, num_masks: int) -> jax.Array:
    """[M] ids of the mask tokens: V, V+1, ..., V+M-1 (mask k is id V + k)."""
    return vocab_size + jnp.arange(num_masks, dtype=jnp.int32)


def embed(model: LlamaModel, params, tokens: jax.Array, adapter: Adapter) -> jax.Array:
    """[B, T] ids -> [B, T, D] embeddings; mask id V + k takes the adapter's mask embedding k."""
    vocab = model.config.vocab_size
    mask_emb = adapter["mask_embeddings"].astype(model.config.compute_dtype)
    base = model.apply({"params": params}, tokens, method="embed")
    masks = jnp.take(mask_emb, tokens - vocab, axis=0, mode="clip")
    return jnp.where((tokens >= vocab)[..., None], masks, base)


def prefix(adapter: Adapter) -> KeysValues:
    """The prompt tokens as the model's prefix keys/values [L, P, N, H]."""
    return adapter["prefix_keys"], adapter["prefix_values"]


def forward(
    model: LlamaModel,
    params,
    adapter: Adapter,
    tokens: jax.Array,
    positions: jax.Array,
    self_mask: jax.Array,
    prefix_visible: jax.Array,
    **cache,
) -> tuple[jax.Array, KeysValues]:
    """The base model with the adapter plugged in: mask embeddings in, prefix seen by prefix_visible rows.

    Args:
      tokens: [B, T] ids, mask ids V + k included; positions [B, T]; self_mask [B, T, T].
      prefix_visible: [B, T] bool, the rows that see the prompt prefix (mask rows).
      cache: optional `cache_kv` and `cache_length` as in `LlamaModel.__call__`.

    Returns:
      hidden [B, T, D] and the chunk's keys/values [L, B, T, K, H].
    """
    return model.apply(
        {"params": params},
        embed(model, params, tokens, adapter),
        positions,
        self_mask,
        prefix=prefix(adapter),
        prefix_visible=prefix_visible,
        **cache,
    )


def drop_prefix(adapter: Adapter, rate: float, rng: jax.Array) -> Adapter:
    """Dropout on the whole prefix tensor (keys and values), as the reference does in training."""
    if rate == 0.0:
        return adapter
    out = dict(adapter)
    for name, key in zip(("prefix_keys", "prefix_values"), jax.random.split(rng), strict=True):
        keep = jax.random.bernoulli(key, 1.0 - rate, adapter[name].shape)
        out[name] = jnp.where(keep, adapter[name] / (1.0 - rate), 0.0)
    return out
