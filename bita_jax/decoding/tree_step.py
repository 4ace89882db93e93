"""One BiTA tree step: verify the current draft tree and draft the next one in a single forward pass.

The step input per row is [pending token, N candidate nodes, N + 1 groups of Dm mask tokens]
(layout and row indices in bita/tree.py); the candidates are the mask nodes' drafts and the lookup
chain's proposal (decoding/lookup.py). The pending token and the nodes never see the BiTA
prefix or any mask row, so their logits are exactly the base model's: accepting a node whose token
equals the token the policy chooses after its parent is plain decoding, several tokens at a time,
whichever source proposed it. A lookup-only tree has no mask rows and runs the bare base model
(no adapter). Shapes depend only on (batch, tree, cache length), so one compile serves a whole
generation.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from bita_jax.bita import adapter as bita_adapter
from bita_jax.bita.adapter import Adapter
from bita_jax.bita.tree import DraftTree
from bita_jax.decoding.acceptance import walk
from bita_jax.decoding.cache import KVCache
from bita_jax.decoding.lookup import no_match_proposals
from bita_jax.decoding.sampling import Sampler
from bita_jax.models.llama import LlamaModel, forward


@flax.struct.dataclass
class TreeStepResult:
    """What one tree step produced (B batch, Dt tree depth, R draft width, N nodes).

    Attributes:
      new_tokens: [B, Dt + 1] the accepted drafts then the bonus token, pad after.
      accepted: [B] int32 drafts accepted (0..Dt); the step commits accepted + 1 tokens.
      bonus: [B] the token chosen after the accepted path (the next pending token).
      drafts: [B, Dm, R] top-R tokens of each mask of the deepest accepted node's group.
      commit_k, commit_v: [L, B, Dt + 1, K, H] keys/values of the pending token and the accepted
        path, for the caller to commit (accepted + 1 of them, for rows still generating).
      verify_logits: [B, 1 + N, V] float32 logits of the root and node rows.
      draft_logits: [B, Dm, V] float32 logits of the drafting group's masks.
      stop: [B] int32 the step's stop (0: the root, 1 + n: node n), for per-source statistics.
    """

    new_tokens: jax.Array
    accepted: jax.Array
    bonus: jax.Array
    drafts: jax.Array
    commit_k: jax.Array
    commit_v: jax.Array
    verify_logits: jax.Array
    draft_logits: jax.Array
    stop: jax.Array


def placeholder_drafts(tree: DraftTree, batch: int, vocab_size: int) -> jax.Array:
    """[B, Dm, R] first-step drafts: mask id V, which no choice over the V real tokens can match."""
    return jnp.full((batch, tree.mask_depth, tree.draft_width), vocab_size, jnp.int32)


def step_inputs(
    tree: DraftTree,
    vocab_size: int,
    length: jax.Array,
    pending: jax.Array,
    drafts: jax.Array,
    proposals: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Tokens [B, T], positions [B, T], self mask [B, T, T] and prefix visibility [B, T] of a step.

    Mask node n holds drafts[level[n], rank[n]], lookup node j proposals[j]; each group holds the
    Dm mask ids; rows are placed after the cache length, which is the pending token's position.
    """
    batch = pending.shape[0]
    node_tokens = drafts[:, tree.mask_level, tree.rank]  # [B, N_m]
    masks = jnp.tile(bita_adapter.mask_token_ids(vocab_size, tree.mask_depth), tree.num_nodes + 1)
    tokens = jnp.concatenate(
        [pending[:, None], node_tokens, proposals, jnp.broadcast_to(masks, (batch, masks.shape[0]))],
        axis=1,
    ).astype(jnp.int32)
    positions = length[:, None] + jnp.asarray(tree.position_offsets)[None, :]
    rows = tree.num_rows
    self_mask = jnp.broadcast_to(jnp.asarray(tree.self_mask), (batch, rows, rows))
    prefix_visible = jnp.broadcast_to(jnp.asarray(tree.prefix_visible), (batch, rows))
    return tokens, positions, self_mask, prefix_visible


def tree_step(
    model: LlamaModel,
    tree: DraftTree,
    policy: Sampler,
    params,
    adapter: Adapter,
    cache: KVCache,
    pending: jax.Array,
    drafts: jax.Array,
    streams: jax.Array,
    proposals: jax.Array | None = None,
) -> TreeStepResult:
    """Verifies the tree built from drafts [B, Dm, R] and proposals after pending [B] and drafts
    the next tree.

    Args:
      policy: the Sampler that chooses the emitted tokens (greedy or sampled).
      adapter: the BiTA adapter (unused, may be None, for a lookup-only tree).
      streams: [B, 2] int32 (seed, prompt index) of each row: the policy's noise key.
      proposals: [B, n] int32 the lookup chain's tokens (decoding/lookup.py); None: no match.
    """
    config = model.config
    batch = pending.shape[0]
    if proposals is None:
        proposals = no_match_proposals(batch, tree.lookup, config.vocab_size)
    tokens, positions, self_mask, prefix_visible = step_inputs(
        tree, config.vocab_size, cache.length, pending, drafts, proposals
    )
    cache_inputs = cache.model_inputs(tree.num_rows)
    if tree.mask_depth:
        hidden, (k, v) = bita_adapter.forward(
            model, params, adapter, tokens, positions, self_mask, prefix_visible, **cache_inputs
        )
    else:  # lookup only: the bare base model (no-match ids V are clipped, and never accepted)
        hidden, (k, v) = forward(model, params, tokens, positions, self_mask, **cache_inputs)
    verify = tree.num_verify_rows
    verify_logits = model.apply({"params": params}, hidden[:, :verify], method="logits")
    # A row at position p chooses the token at p + 1.
    chosen = policy.choose(verify_logits, positions[:, :verify] + 1, streams)  # [B, 1 + N]
    node_tokens = tokens[:, 1:verify]
    stop, accepted = walk(tree, node_tokens, chosen)
    bonus = jnp.take_along_axis(chosen, stop[:, None], axis=1)[:, 0]

    path_tokens = jnp.take_along_axis(node_tokens, jnp.asarray(tree.stop_path)[stop], axis=1)  # [B, Dt]
    slot = jnp.arange(tree.depth + 1)[None, :]
    padded = jnp.pad(path_tokens, ((0, 0), (0, 1)), constant_values=config.pad_id)
    new_tokens = jnp.where(slot < accepted[:, None], padded, config.pad_id)
    new_tokens = jnp.where(slot == accepted[:, None], bonus[:, None], new_tokens)

    commit_rows = jnp.asarray(tree.commit_rows)[stop][None, :, :, None, None]  # [1, B, Dt + 1, 1, 1]
    group_rows = jnp.asarray(tree.drafting_rows)[stop]  # [B, Dm]
    group_hidden = jnp.take_along_axis(hidden, group_rows[:, :, None], axis=1)  # [B, Dm, D]
    draft_logits = model.apply({"params": params}, group_hidden, method="logits")
    if tree.mask_depth:
        next_drafts = jax.lax.top_k(draft_logits, tree.draft_width)[1].astype(jnp.int32)
    else:
        next_drafts = placeholder_drafts(tree, batch, config.vocab_size)  # [B, 0, 0]
    return TreeStepResult(
        new_tokens=new_tokens,
        accepted=accepted,
        bonus=bonus,
        drafts=next_drafts,
        commit_k=jnp.take_along_axis(k, commit_rows, axis=2),
        commit_v=jnp.take_along_axis(v, commit_rows, axis=2),
        verify_logits=verify_logits,
        draft_logits=draft_logits,
        stop=stop,
    )
