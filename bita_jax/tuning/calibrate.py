"""Teacher-forcing ranks for the acceptance statistics: one training-format forward per batch.

Every target offset s < len(target) - 1 is a drafting point: the training format's group at
offset s sees the source and target[:s] (what is committed when target[s] is the pending root),
and its mask k is labelled target[s + 1 + k], the token mask k drafts at decode time (none past
the target's end: rank -1). Each example's points are cut into sequences of at most `max_groups`
groups (bita/training_mask.build_sequence), padded to training/data.py's length buckets and a
fixed batch size, so each bucket compiles once.

Lookup runs come from the same calibration sequences: at every drafting point, how many of the
tokens prompt lookup proposes match the target in a row (the proposal is the decoding step's own,
decoding/lookup.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bita_jax.bita.training_mask import IGNORE, NORMAL, build_sequence
from bita_jax.config import DataConfig, ModelConfig
from bita_jax.decoding import lookup
from bita_jax.models.llama import LlamaModel
from bita_jax.training import data
from bita_jax.training.step import mask_row_forward
from bita_jax.tuning.stats import MAX_LOOKUP


def example_sequences(
    example: data.Example, vocab_size: int, num_masks: int, max_groups: int
) -> list[dict[str, np.ndarray]]:
    """Per-token arrays (build_sequence) of the example's drafting points 0 .. T - 2, at most
    max_groups per sequence; labels past the target's end are IGNORE."""
    target_len = len(example.target)
    # Padding the target lets build_sequence label every mask; those labels are then dropped.
    padded = np.asarray(example.target + (0,) * num_masks)
    offsets = np.arange(target_len - 1)
    out = []
    for start in range(0, len(offsets), max_groups):
        seq = build_sequence(
            np.asarray(example.source), padded, offsets[start : start + max_groups], vocab_size, num_masks
        )
        label_index = seq["positions"] - (len(example.source) - 1)  # mask k of group s: s + 1 + k
        past_end = (seq["group"] >= 0) & (label_index >= target_len)
        seq["labels"] = np.where(past_end, IGNORE, seq["labels"]).astype(np.int32)
        out.append(seq)
    return out


def mask_row_logits(
    model: LlamaModel, base: Any, adapter: dict[str, jax.Array], batch: dict[str, jax.Array], num_rows: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The training forward (`training.step.mask_row_forward`, without dropout) at the mask rows.

    Args:
      batch: [B, T] int32 arrays `tokens, positions, group, visible_end, labels` (bita/training_mask.py),
        each sequence's normal part within the first T - R slots.
      num_rows: R, the static number of mask rows gathered per sequence.

    Returns:
      logits [B, R, V] float32, labels [B, R] int32 and valid [B, R] bool of each sequence's
      mask rows in sequence order.
    """
    rows = mask_row_forward(model, base, adapter, batch, num_rows)
    return model.apply({"params": base}, rows.hidden, method="logits"), rows.labels, rows.valid


def label_ranks(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """[...] int32 rank of each label among logits [..., V], ties to the lower id (as lax.top_k)."""
    target = jnp.take_along_axis(logits, labels[..., None], axis=-1)  # [..., 1]
    vocab = jnp.arange(logits.shape[-1])
    ahead = (logits > target) | ((logits == target) & (vocab < labels[..., None]))
    return jnp.sum(ahead, axis=-1, dtype=jnp.int32)


@functools.lru_cache(maxsize=None)
def make_rank_fn(config: ModelConfig, num_rows: int) -> Callable:
    """Jitted `(base, adapter, batch [B, T]) -> ranks [B, R]` int32, -1 on rows without a label."""
    model = LlamaModel(config)

    def ranks(base, adapter, batch):
        logits, labels, valid = mask_row_logits(model, base, adapter, batch, num_rows)
        return jnp.where(valid, label_ranks(logits, jnp.where(valid, labels, 0)), -1)

    return jax.jit(ranks)


def teacher_forced_ranks(
    config: ModelConfig,
    params: Any,
    adapter: dict[str, Any],
    examples: list[data.Example],
    batch_size: int = 8,
    max_groups: int = 64,
    max_length: int = 2048,
) -> list[np.ndarray]:
    """Ranks of the true tokens after every drafting point of each example.

    Args:
      config: the base model's config (params in its dtype and layer layout).
      params: base params.
      adapter: BiTA adapter ({"prefix_keys", "prefix_values", "mask_embeddings"}).
      examples: calibration examples (e.g. `data.read_examples` of a decode.py jsonl), whose
        sources plus targets are at most max_length tokens.
      batch_size: sequences per forward (fixed: short batches are padded with empty rows).
      max_groups: G, drafting points per sequence; sequences are at most max_length + G * M tokens.
      max_length: the longest example, which sets training/data.py's length buckets.

    Returns:
      Per example, ranks [T - 1, M] int32 of drafting points 0 .. T - 2 (T: target length):
      unclipped (0 = the mask's argmax), -1 where the target has ended.
    """
    num_masks = adapter["mask_embeddings"].shape[0]
    sequences, owner = [], []  # owner[i]: the example sequence i belongs to
    for index, example in enumerate(examples):
        parts = example_sequences(example, config.vocab_size, num_masks, max_groups)
        sequences += parts
        owner += [index] * len(parts)
    buckets = data.default_buckets(DataConfig(max_length=max_length, max_groups=max_groups), num_masks)
    rank_fn = make_rank_fn(config, max_groups * num_masks)
    # Similar lengths share a batch (less padding); results go back to example order.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]["tokens"]))
    empty = {name: np.zeros((0,), np.int32) for name in data.BATCH_FIELDS}
    per_example: list[list[np.ndarray]] = [[] for _ in examples]
    per_sequence: dict[int, np.ndarray] = {}
    for start in range(0, len(order), batch_size):
        picks = order[start : start + batch_size]
        chunk = [sequences[i] for i in picks]
        # The normal parts first, then room for R mask rows (the split forward's layout).
        normal = max(int(np.sum(s["group"] == NORMAL)) for s in chunk)
        length = data.bucket_for(normal + max_groups * num_masks, buckets)
        batch = data.collate(chunk + [empty] * (batch_size - len(chunk)), length, config.pad_id)
        ranks = np.asarray(rank_fn(params, adapter, batch))  # [B, R]
        for row, i in enumerate(picks):
            per_sequence[i] = ranks[row, : int(np.sum(sequences[i]["group"] >= 0))]
    for i in range(len(sequences)):  # sequences are in example, then offset order
        per_example[owner[i]].append(per_sequence[i])
    return [np.concatenate(r + [np.zeros((0,), np.int32)]).reshape(-1, num_masks) for r in per_example]


@functools.lru_cache(maxsize=None)
def _make_runs_fn(num_tokens: int, vocab_size: int) -> Callable:
    """Jitted `(tokens [P, S], lengths [P], targets [P, n]) -> runs [P]`: how many of the tokens
    prompt lookup proposes after each history match its targets in a row."""

    def runs(tokens, lengths, targets):
        proposal = lookup.propose(tokens, lengths, num_tokens, vocab_size)
        return jnp.sum(jnp.cumprod(proposal == targets, axis=1), axis=1, dtype=jnp.int32)

    return jax.jit(runs)


def lookup_runs(examples: list[data.Example], vocab_size: int, num_tokens: int = MAX_LOOKUP,
                points_per_call: int = 256) -> list[np.ndarray]:  # fmt: skip
    """Per example, the lookup runs [T - 1] of its drafting points 0 .. T - 2 (T: target length).

    At point s the history is source + target[:s + 1] (target[s] is the pending token when the
    step that drafts target[s + 1 ...] runs), as in decoding; the proposal comes from the same
    on-device `decoding.lookup.propose` the tree step uses. Tokens past the target's end never
    match (pad -1), so runs stop there.
    """
    longest = max(len(e.source) + len(e.target) for e in examples)
    slots = -(-longest // 64) * 64  # one compile per 64 slots of history
    histories, lengths, targets, owner = [], [], [], []
    for index, example in enumerate(examples):
        sequence = np.full(slots + num_tokens, -1, np.int32)
        sequence[: len(example.source) + len(example.target)] = example.source + example.target
        for s in range(len(example.target) - 1):
            end = len(example.source) + s + 1
            histories.append(sequence[:slots])
            lengths.append(end)
            targets.append(sequence[end : end + num_tokens])
            owner.append(index)
    runs_fn = _make_runs_fn(num_tokens, vocab_size)
    runs = np.zeros(len(histories), np.int32)
    for start in range(0, len(histories), points_per_call):
        stop = min(start + points_per_call, len(histories))
        pad = points_per_call - (stop - start)  # fixed shapes: pad with copies of the last point
        pick = list(range(start, stop)) + [stop - 1] * pad
        out = runs_fn(np.stack([histories[i] for i in pick]), np.asarray([lengths[i] for i in pick]),
                      np.stack([targets[i] for i in pick]))  # fmt: skip
        runs[start:stop] = np.asarray(out)[: stop - start]
    owner = np.asarray(owner, np.int64)
    return [runs[owner == index] for index in range(len(examples))]
