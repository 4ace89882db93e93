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
from bita_jax.models.llama import KeysValues, LlamaModel, LowRank
from bita_jax.sharding import LOGICAL_AXIS_RULES, Rules, logical_sharding

# {"prefix_keys", "prefix_values": [L, P, N, H], "mask_embeddings": [M, D]}, and with
# bita.lora_rank = r > 0 "lora_<map>_a" [L, I, r] and "lora_<map>_b" [L, r, O] per linear map.
Adapter = dict

LORA_MAPS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ADAPTER_AXES = {
    "prefix_keys": ("layers", "prompt", "q_heads", "head_dim"),
    "prefix_values": ("layers", "prompt", "q_heads", "head_dim"),
    "mask_embeddings": ("mask", "embed"),
    # The low-rank factors are small: replicated.
    **{f"lora_{m}_{f}": ("layers", None, None) for m in LORA_MAPS for f in "ab"},
}


def lora_dims(model: ModelConfig) -> dict[str, tuple[int, int]]:
    """(I, O) of each linear map the mask rows' low-rank updates apply to."""
    D, F = model.hidden_size, model.intermediate_size
    q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    dims = {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D)}
    return {**dims, "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}


def adapter_shapes(model: ModelConfig, bita: BiTAConfig) -> dict[str, tuple[int, ...]]:
    prefix = (model.num_layers, bita.num_prompt_tokens, model.num_heads, model.head_dim)
    shapes = {
        "prefix_keys": prefix,
        "prefix_values": prefix,
        "mask_embeddings": (bita.num_mask_tokens, model.hidden_size),
    }
    r, L = bita.lora_rank, model.num_layers
    for name, (i, o) in (lora_dims(model).items() if r else ()):
        shapes[f"lora_{name}_a"], shapes[f"lora_{name}_b"] = (L, i, r), (L, r, o)
    return shapes


def init_lora(model: ModelConfig, bita: BiTAConfig, rng: jax.Array) -> Adapter:
    """The low-rank factors at init: A ~ N(0, 1), B = 0, so the update starts at exactly zero."""
    shapes = {n: s for n, s in adapter_shapes(model, bita).items() if n.startswith("lora_")}
    if not shapes:  # lora_rank 0: the paper's adapter
        return {}
    keys = jax.random.split(rng, len(shapes))
    draw = lambda name, key, shape: (  # noqa: E731
        jax.random.normal(key, shape, jnp.float32) if name.endswith("_a") else jnp.zeros(shape, jnp.float32)
    )
    named = zip(keys, sorted(shapes.items()), strict=True)
    return {name: draw(name, key, shape) for key, (name, shape) in named}


def init_adapter(model: ModelConfig, bita: BiTAConfig, rng: jax.Array) -> Adapter:
    """Float32 adapter params: prompt and mask tokens drawn from N(0, init_std), as HF initialises the
    reference's tables; low-rank factors by `init_lora`."""
    shapes = {n: s for n, s in adapter_shapes(model, bita).items() if not n.startswith("lora_")}
    keys = jax.random.split(rng, len(shapes))
    tokens = {
        name: bita.init_std * jax.random.normal(key, shape, jnp.float32)
        for key, (name, shape) in zip(keys, sorted(shapes.items()), strict=True)
    }
    return {**tokens, **init_lora(model, bita, jax.random.fold_in(rng, 1))}


def init_at_mean_embedding(model: LlamaModel, params, bita: BiTAConfig, rng: jax.Array) -> Adapter:
    """`init_adapter`'s draw with the mean of the model's input embeddings added to each mask embedding.

    A mask row then starts as an average token, an input like those the frozen layers were trained
    on. A random (or zero) mask embedding is a direction no token has, scaled to full size by the
    first RMSNorm; in a model with sharp positional heads (tests/test_training.py's) it sends each
    head of the mask row to an arbitrary relative position with a saturated softmax, whose gradient
    cannot move it: which mask offsets then learn depends on the seed.
    """
    adapter = init_adapter(model.config, bita, rng)
    table_mean = lambda m: jnp.mean(m.embed_tokens, axis=0, dtype=jnp.float32)  # noqa: E731  [D]
    mean = model.apply({"params": params}, method=table_mean)
    return {**adapter, "mask_embeddings": adapter["mask_embeddings"] + mean}  # [M, D] + [D]


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
        **init_lora(cfg, bita, jax.random.fold_in(rng, 1)),
    }


def abstract_adapter(model: ModelConfig, bita: BiTAConfig) -> dict[str, jax.ShapeDtypeStruct]:
    return {name: jax.ShapeDtypeStruct(s, jnp.float32) for name, s in adapter_shapes(model, bita).items()}


def adapter_shardings(
    adapter: Adapter, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES
) -> dict[str, NamedSharding]:
    """The shardings of an adapter's (or abstract adapter's) arrays on a mesh, from their logical
    axes and the rules table (the low-rank factors only where the adapter has them)."""
    return {name: logical_sharding(ADAPTER_AXES[name], mesh, rules) for name in adapter}


def place_adapter(adapter: Adapter, mesh: Mesh | None) -> Adapter:
    """Puts the adapter's arrays on the mesh by their logical axes (default device without a mesh)."""
    if mesh is None:
        return {name: jax.device_put(x) for name, x in adapter.items()}
    return jax.device_put(adapter, adapter_shardings(adapter, mesh))


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


def mask_lora(adapter: Adapter) -> LowRank | None:
    """The mask rows' low-rank updates {map: (A [L, I, r], B [L, r, O])}, None without them."""
    if "lora_q_proj_a" not in adapter:
        return None
    return {m: (adapter[f"lora_{m}_a"], adapter[f"lora_{m}_b"]) for m in LORA_MAPS}


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
    """The base model with the adapter plugged in: mask embeddings in, prefix seen by prefix_visible rows
    and the low-rank updates (if any) applied on them only, so other rows compute what the base model does.

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
        mask_lora=mask_lora(adapter),
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
