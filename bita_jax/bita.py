"""The BiTA plug-in params: per-layer prompt prefix keys/values and mask-token embeddings.

They live in their own pytree, apart from the frozen base params, so only they get gradients and
optimizer state. The reference code stores the prompt tokens as one table [P, L * 2 * D]; here the
same numbers are kept as prefix keys and values [L, P, N, H] (D = N * H, one per query head), which
is a reshape of that table and lets the layer scan slice them per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bita_jax.config import BiTAConfig, ModelConfig

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


def init_adapter(model: ModelConfig, bita: BiTAConfig, rng: jax.Array) -> dict[str, jax.Array]:
    """Float32 adapter params drawn from N(0, init_std), as HF initialises the reference's tables."""
    shapes = adapter_shapes(model, bita)
    keys = jax.random.split(rng, len(shapes))
    return {
        name: bita.init_std * jax.random.normal(key, shape, jnp.float32)
        for key, (name, shape) in zip(keys, sorted(shapes.items()), strict=True)
    }


def abstract_adapter(model: ModelConfig, bita: BiTAConfig) -> dict[str, jax.ShapeDtypeStruct]:
    return {name: jax.ShapeDtypeStruct(s, jnp.float32) for name, s in adapter_shapes(model, bita).items()}


def mask_token_ids(model: ModelConfig, bita: BiTAConfig) -> jax.Array:
    """[M] ids of the mask tokens: V, V+1, ..., V+M-1."""
    return model.vocab_size + jnp.arange(bita.num_mask_tokens, dtype=jnp.int32)
