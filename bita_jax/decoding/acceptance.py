"""Acceptance: how far a draft tree matches the tokens the base model emits ("sample, then match").

The policy (decoding/sampling.py: greedy or sampled) chooses the token the base model emits after
each verified row; the walk then follows the tree from the root into the child whose token equals
the chosen token, as far as it goes, and the token chosen at the last row reached is the bonus.
The walk is the same for every policy: with greedy choice it is greedy verification, and since a
choice depends only on its row's logits, seed, prompt and absolute position, BiTA's output equals
AR's under the same policy and seed (docs/sampling.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bita_jax.bita.tree import DraftTree


def walk(tree: DraftTree, node_tokens: jax.Array, chosen: jax.Array) -> tuple[jax.Array, jax.Array]:
    """How far the tree matches the chosen tokens, vectorised over the tree.

    A node is on the path when its token equals the token chosen at its parent's row and its
    parent is on the path. Mask siblings are distinct (top-R ranks), but the lookup chain may
    repeat a mask node's token, so two branches can be on the path: each is verified against the
    chosen tokens all the way, and the deepest one is taken (the first by node index among equals:
    a mask node before the lookup chain).

    Args:
      node_tokens: [B, N] the candidate tokens.
      chosen: [B, 1 + N] the tokens chosen at the root and node rows.

    Returns:
      stop [B] (0: the root, 1 + n: node n is the deepest accepted node) and the number of
      accepted drafts [B].
    """
    match = node_tokens == chosen[:, tree.parent + 1]  # [B, N]
    on_path = jnp.all(match[:, None, :] | ~jnp.asarray(tree.ancestors)[None], axis=-1)  # [B, N]
    depth = jnp.where(on_path, jnp.asarray(tree.level) + 1, 0)
    accepted = jnp.max(depth, axis=-1)
    stop = jnp.where(accepted > 0, jnp.argmax(depth, axis=-1) + 1, 0)
    return stop.astype(jnp.int32), accepted.astype(jnp.int32)
