"""BiTA's training format: one example as a multi-group sequence, and its attention mask.

One (source, target) example with group offsets s_0 < ... < s_{g-1} becomes one sequence of the
method's "efficient" format (docs/method.md sections 2.3-2.5):

    tokens   = source ++ target[:s_last + M] ++ g groups of the M mask ids V..V+M-1
    group    = -1 on normal tokens, j on the masks of group j
    visible  = (for the attention mask) normal row i: i + 1; mask of group j: S + s_j
    position = normal i: i; mask k of group j: S + s_j + k
    label    = mask k of group j: target[s_j + 1 + k]; -100 elsewhere

The normal part runs M tokens past s_last (no mask sees them: visibility stops at S + s_j) so that
every label's teacher row, the normal row S + s_j + k that predicts target[s_j + 1 + k], exists
(the soft-label loss, training/step.py).

`build_sequence` writes that metadata with numpy on the host. `attention_mask` turns it into the
[B, T, T] mask of one forward over the whole sequence; the train step instead runs the normal
tokens once as a causal prefill and only the mask rows with the adapter, under
`mask_row_visibility`, the mask rows' block of the same mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IGNORE = -100  # label of rows without a loss
NORMAL = -1  # `group` of normal (and padding) tokens


def build_sequence(
    source: np.ndarray, target: np.ndarray, offsets: np.ndarray, vocab_size: int, num_masks: int
) -> dict[str, np.ndarray]:
    """One example with the given group offsets -> per-token int32 arrays (module docstring).

    Args:
      source: [S] prompt ids; target: [T_target] response ids ending with EOS.
      offsets: [g] group start offsets into the target.

    Returns:
      `tokens, positions, group, visible_end, labels`, each of length S + s_last + g * M.
    """
    source = np.asarray(source, np.int32)
    target = np.asarray(target, np.int32)
    S, g, M = len(source), len(offsets), num_masks
    normal_len = S + (min(int(offsets[-1]) + M, len(target)) if g else len(target))
    normal = np.concatenate([source, target])[:normal_len]
    k = np.tile(np.arange(M), g)  # [g*M] offset of each mask within its group
    j = np.repeat(np.arange(g), M)  # [g*M] group of each mask
    visible = S + offsets[j]  # [g*M] normal tokens each mask sees
    return {
        "tokens": np.concatenate([normal, vocab_size + k]).astype(np.int32),
        "positions": np.concatenate([np.arange(normal_len), visible + k]).astype(np.int32),
        "group": np.concatenate([np.full(normal_len, NORMAL), j]).astype(np.int32),
        "visible_end": np.concatenate([np.arange(1, normal_len + 1), visible]).astype(np.int32),
        "labels": np.concatenate([np.full(normal_len, IGNORE), target[offsets[j] + 1 + k]]).astype(np.int32),
    }


def _own_group_earlier(
    q_group: jax.Array, q_positions: jax.Array, k_group: jax.Array, k_positions: jax.Array
) -> jax.Array:
    """[B, T, S]: key is a mask of the query's own group at a position <= the query's."""
    same_group = (q_group[:, :, None] == k_group[:, None, :]) & (q_group[:, :, None] != NORMAL)
    return same_group & (k_positions[:, None, :] <= q_positions[:, :, None])


def attention_mask(group: jax.Array, visible_end: jax.Array, positions: jax.Array) -> jax.Array:
    """[B, T, T] training attention mask from per-token metadata (docs/method.md section 2.4).

    Row q sees normal key s when s < visible_end[q] (normal rows: causal; mask rows: source plus
    target[:s_j]), and a mask row also sees the masks of its own group at positions <= its own.
    Groups never see each other; normal rows never see masks. Padding rows are normal rows.

    Args:
      group, visible_end, positions: [B, T] int32 (see `build_sequence`).
    """
    keys = jnp.arange(group.shape[1])
    sees_normal = (group[:, None, :] == NORMAL) & (keys[None, None, :] < visible_end[:, :, None])
    return sees_normal | _own_group_earlier(group, positions, group, positions)


def mask_row_visibility(
    group: jax.Array, visible_end: jax.Array, positions: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The mask rows' part of `attention_mask`, split into the prefill block and their own block.

    Args:
      group, visible_end, positions: [B, R] metadata of the mask rows (padding rows: group NORMAL).

    Returns:
      (cache_length [B, R]: the row sees the normal tokens' key slots s < cache_length, i.e.
      visible_end; self_mask [B, R, R]: own group, position <= own). Padding rows see no mask row
      and no mask row sees them.
    """
    return visible_end.astype(jnp.int32), _own_group_earlier(group, positions, group, positions)
