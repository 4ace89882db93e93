"""Acceptance: which token the base model emits at each verified row, and how far a tree matches.

A policy turns verify logits into the token the base model emits at each row (`choose`); the walk
then follows the tree from the root into the child whose token equals the emitted token, as far as
it goes. The walk is the same for every policy: with greedy choice it is greedy verification, and a
policy whose choice at a row depends only on that row's logits and absolute position keeps BiTA's
output identical to AR's under the same policy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bita_jax.bita.tree import DraftTree


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Greedy decoding: the emitted token is the argmax of the logits."""

    def choose(self, logits: jax.Array, positions: jax.Array, streams: jax.Array) -> jax.Array:
        """Tokens [B, T] int32 emitted after rows with logits [B, T, V].

        Args:
          logits: [B, T, V] float32.
          positions: [B, T] absolute positions of the tokens being chosen (unused by greedy).
          streams: [B] the prompt index of each row in the caller's input (unused by greedy).
        """
        del positions, streams
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


GREEDY = Greedy()


def walk(tree: DraftTree, node_tokens: jax.Array, chosen: jax.Array) -> tuple[jax.Array, jax.Array]:
    """How far the tree matches the chosen tokens, vectorised over the tree.

    A node is on the path when its token equals the token chosen at its parent's row and its
    parent is on the path. Sibling tokens are distinct (top-R ranks), so the path is one chain.

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
