"""One BiTA tree step: verify the current draft tree and draft the next one in a single forward pass.

The step input per row is [pending token, N candidate nodes, N + 1 groups of Dt mask tokens]
(layout in tree.py). The pending token and the nodes never see the BiTA prefix or any mask row,
so their logits are exactly the base model's: accepting a node whose token equals the base
model's argmax after its parent is plain greedy decoding, several tokens at a time. Shapes depend
only on (batch, tree, cache length), so one compile serves a whole generation.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from bita_jax.kv_cache import KVCache
from bita_jax.llama import Adapter, LlamaModel
from bita_jax.tree import DraftTree


@flax.struct.dataclass
class TreeStepResult:
    """What one tree step produced (B batch, Dt tree depth, R draft width, N nodes).

    Attributes:
      new_tokens: [B, Dt + 1] the accepted drafts then the bonus token, pad after.
      accepted: [B] int32 drafts accepted (0..Dt); the step commits accepted + 1 tokens.
      bonus: [B] the base model's next token after the accepted path (the next pending token).
      drafts: [B, Dt, R] top-R tokens of each mask of the deepest accepted node's group.
      cache: the cache with the pending token and the accepted path written at each row's length
        (not advanced: the caller advances rows that are still generating).
      verify_logits: [B, 1 + N, V] float32 logits of the root and node rows.
      draft_logits: [B, Dt, V] float32 logits of the drafting group's masks.
    """

    new_tokens: jax.Array
    accepted: jax.Array
    bonus: jax.Array
    drafts: jax.Array
    cache: KVCache
    verify_logits: jax.Array
    draft_logits: jax.Array


def placeholder_drafts(tree: DraftTree, batch: int, vocab_size: int) -> jax.Array:
    """[B, Dt, R] first-step drafts: mask id V, which no argmax over the V real tokens can match."""
    return jnp.full((batch, tree.depth, tree.draft_width), vocab_size, jnp.int32)


def step_inputs(
    tree: DraftTree, vocab_size: int, length: jax.Array, pending: jax.Array, drafts: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Tokens [B, T], positions [B, T], self mask [B, T, T] and prefix visibility [B, T] of a step.

    Node n holds drafts[level[n], rank[n]]; mask k of every group is token V + k; rows are placed
    after the cache length, which is the pending token's position.
    """
    batch = pending.shape[0]
    node_tokens = drafts[:, tree.level, tree.rank]  # [B, N]
    masks = jnp.tile(vocab_size + jnp.arange(tree.depth, dtype=jnp.int32), tree.num_nodes + 1)
    tokens = jnp.concatenate(
        [pending[:, None], node_tokens, jnp.broadcast_to(masks, (batch, masks.shape[0]))], axis=1
    ).astype(jnp.int32)
    positions = length[:, None] + jnp.asarray(tree.position_offsets)[None, :]
    rows = tree.num_rows
    self_mask = jnp.broadcast_to(jnp.asarray(tree.self_mask), (batch, rows, rows))
    prefix_visible = jnp.broadcast_to(jnp.asarray(tree.prefix_visible), (batch, rows))
    return tokens, positions, self_mask, prefix_visible


def accept(tree: DraftTree, node_tokens: jax.Array, predicted: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy acceptance, vectorised over the tree.

    A node is valid when its token and every ancestor's token equal the base model's argmax after
    their parents. Sibling tokens are distinct (top-R ranks), so the valid nodes form one chain.

    Args:
      node_tokens: [B, N] the candidate tokens.
      predicted: [B, 1 + N] argmax of the root and node rows.

    Returns:
      deepest valid node [B] (0 when none) and the number of accepted drafts [B] (0 when none).
    """
    match = node_tokens == predicted[:, tree.parent + 1]  # [B, N]
    valid = jnp.all(match[:, None, :] | ~jnp.asarray(tree.ancestors)[None], axis=-1)  # [B, N]
    score = jnp.where(valid, jnp.asarray(tree.level) + 1, 0)
    return jnp.argmax(score, axis=-1), jnp.max(score, axis=-1)


def tree_step(
    model: LlamaModel,
    tree: DraftTree,
    params,
    adapter: Adapter,
    cache: KVCache,
    pending: jax.Array,
    drafts: jax.Array,
) -> TreeStepResult:
    """Verifies the tree built from drafts [B, Dt, R] after pending [B] and drafts the next tree."""
    config = model.config
    depth = tree.depth
    tokens, positions, self_mask, prefix_visible = step_inputs(
        tree, config.vocab_size, cache.length, pending, drafts
    )
    hidden, (k, v) = model.apply(
        {"params": params},
        tokens,
        positions,
        self_mask,
        cache=cache,
        adapter=adapter,
        prefix_visible=prefix_visible,
    )
    num_verify = 1 + tree.num_nodes
    verify_logits = model.apply({"params": params}, hidden[:, :num_verify], method="logits")
    predicted = jnp.argmax(verify_logits, axis=-1).astype(jnp.int32)  # [B, 1 + N]
    node_tokens = tokens[:, 1:num_verify]
    deepest, accepted = accept(tree, node_tokens, predicted)
    has_path = accepted > 0
    bonus = jnp.take_along_axis(predicted, jnp.where(has_path, deepest + 1, 0)[:, None], axis=1)[:, 0]

    path = jnp.asarray(tree.path_nodes)[deepest]  # [B, Dt]
    path_tokens = jnp.take_along_axis(node_tokens, path, axis=1)
    slot = jnp.arange(depth + 1)[None, :]
    padded = jnp.pad(path_tokens, ((0, 0), (0, 1)), constant_values=config.pad_id)
    new_tokens = jnp.where(slot < accepted[:, None], padded, config.pad_id)
    new_tokens = jnp.where(slot == accepted[:, None], bonus[:, None], new_tokens)

    # Always write Dt + 1 rows (pending, then the path); the length counter hides the unused ones.
    rows = jnp.concatenate([jnp.zeros_like(path[:, :1]), 1 + path], axis=1)[None, :, :, None, None]
    cache = cache.write(jnp.take_along_axis(k, rows, axis=2), jnp.take_along_axis(v, rows, axis=2))

    group = jnp.where(has_path, deepest + 1, 0)
    group_rows = 1 + tree.num_nodes + group[:, None] * depth + jnp.arange(depth)[None, :]  # [B, Dt]
    group_hidden = jnp.take_along_axis(hidden, group_rows[:, :, None], axis=1)  # [B, Dt, D]
    draft_logits = model.apply({"params": params}, group_hidden, method="logits")
    next_drafts = jax.lax.top_k(draft_logits, tree.draft_width)[1].astype(jnp.int32)
    return TreeStepResult(
        new_tokens=new_tokens,
        accepted=accepted.astype(jnp.int32),
        bonus=bonus,
        drafts=next_drafts,
        cache=cache,
        verify_logits=verify_logits,
        draft_logits=draft_logits,
    )
