"""Held-out measurements of an adapter during training: mask accuracy per offset and replayed tau.

Both come from one teacher-forced pass (tuning/calibrate.py) over the first drafting points of a
fixed held-out set, so points on a learning curve are comparable across steps and runs.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from bita_jax.bita.tree import DraftTree
from bita_jax.config import ModelConfig
from bita_jax.training import data
from bita_jax.tuning.calibrate import teacher_forced_ranks
from bita_jax.tuning.stats import AcceptanceStats

MAX_RANK = 8  # ranks tracked for the replay; upper:K trees use ranks < K


def first_points(examples: list[data.Example], num_points: int) -> list[data.Example]:
    """The examples with targets cut to num_points + 1 tokens: drafting points 0 .. num_points - 1."""
    return [data.Example(e.source, e.target[: num_points + 1]) for e in examples]


def mask_accuracy(ranks: list[np.ndarray]) -> list[float]:
    """Per mask offset, the share of drafting points whose true token is the mask's argmax
    (points where the target has ended, rank -1, excluded)."""
    points = np.concatenate(ranks)  # [E, M]
    return [float(np.mean(points[points[:, m] >= 0, m] == 0)) for m in range(points.shape[1])]


def rank_summary(
    ranks: list[np.ndarray], trees: dict[str, DraftTree], lookup_runs: list[np.ndarray] | None = None
) -> dict[str, Any]:
    """{"mask_acc": [M], "tau": {name: replayed tau}} of teacher-forced ranks [A, M] per example;
    trees with a lookup chain need the examples' `lookup_runs` [A] (tuning.calibrate.lookup_runs)."""
    stats = AcceptanceStats.from_ranks(ranks, MAX_RANK, lookup_runs)
    return {
        "mask_acc": [round(a, 4) for a in mask_accuracy(ranks)],
        "tau": {name: round(stats.replayed_tokens(tree), 4) for name, tree in trees.items()},
    }


def heldout_evaluator(
    config: ModelConfig,
    base: Any,
    examples: list[data.Example],
    trees: dict[str, DraftTree],
    num_points: int = 64,
) -> Callable[[Any], dict[str, Any]]:
    """`evaluate(adapter) -> {"mask_acc": [M], "tau": {name: replayed tau}}` on held-out examples.

    Each example contributes its first num_points drafting points (one training-format sequence of
    num_points groups), which keeps an evaluation to one forward per example.
    """
    cut = first_points(examples, num_points)
    longest = max(len(e.source) + len(e.target) for e in cut)

    def evaluate(adapter) -> dict[str, Any]:
        ranks = teacher_forced_ranks(config, base, adapter, cut, max_groups=num_points, max_length=longest)
        return rank_summary(ranks, trees)

    return evaluate
