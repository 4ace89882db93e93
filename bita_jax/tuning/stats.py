"""Acceptance statistics of rank paths, and the best draft tree of every node budget (numpy only).

A drafting point s of a calibration sequence is a place where a mask group drafts: it sees the
source and target[:s], the base model's next token target[s] (the next step's root) is not visible
to it, and mask m drafts target[s + 1 + m]. ranks[s, m] is the rank of that true token among mask
m's logits (ties broken like `jax.lax.top_k`: the lower token id first); -1 where there is no such
token (the sequence ended) or the rank is >= max_rank (a miss).

Under greedy decoding a tree node, the rank path (c_0, ..., c_m), is accepted at s iff
ranks[s, j] == c_j for every j <= m. Two estimates of tau (tokens committed per step) follow:

  uniform:  1 + sum_{path in tree} P(path), P(path) = the fraction of all drafting points that
            follow it (docs/tuning.md; it maximises over trees of n nodes by taking the n most
            frequent paths).
  replayed: decoding replayed on the calibration sequences: a step at point s accepts the deepest
            matching tree path (a drafts), commits a + 1 tokens, and the next step drafts at
            s + a + 1. Decoding only drafts where steps land, and easy stretches are crossed in few
            steps, so this weights points as decoding does. On 6 demo prompts the statistics never
            saw it was 6-14% above the measured tau, the uniform estimate up to 36% (docs/tuning.md).

Lookup candidates come from the same calibration sequences (tuning/calibrate.lookup_runs): at
point s, lookup_runs[s] is how many of the tokens prompt lookup proposes after target[s] match the
target in a row (capped at MAX_LOOKUP). A hybrid tree accepts at s the deeper of its mask path and
min(run, n) lookup tokens, which is what the step's walk takes. Lookup nodes carry mask groups
(bita/tree.py), so every step has mask drafts whatever its last stop was and points stay
independent, as the replay assumes. (The replay's first step accepts nothing; a lookup chain
could already accept there, so hybrid and lookup-only taus are slightly underestimated.)

The stored form is the ranks themselves (per sequence, one character per rank) and the lookup
runs (one digit per point), from which both are computed.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import string
from typing import Any, Sequence

import numpy as np

from bita_jax.bita.tree import DraftTree
from bita_jax.errors import ConfigError

Path = tuple[int, ...]
MISS = -1
# One character per rank in the stored form: ranks 0..35, and '.' for a miss.
DIGITS = string.digits + string.ascii_lowercase
MISS_CHAR = "."
# Lookup runs are counted up to this many tokens; the candidates' chains are at most this long.
MAX_LOOKUP = 8
# Lookup chain lengths offered beside every mask tree, and alone.
LOOKUP_LENGTHS = (2, 4, 6, 8)


def _path_order(count: int, path: Path) -> tuple[int, int, Path]:
    """Most probable first; ties: shorter path, then lexicographic."""
    return (-count, len(path), path)


@dataclasses.dataclass(frozen=True, eq=False)
class AcceptanceStats:
    """Teacher-forcing ranks of calibration sequences, with misses folded to -1.

    Attributes:
      max_rank: R_max, ranks 0 .. R_max - 1 are tracked; higher ones are misses.
      sequences: per calibration sequence, ranks [A, M] int8 of its A drafting points in order
        (A = target length - 1: every point but the last token's).
      lookup_runs: per sequence, [A] int8 target tokens prompt lookup proposes right in a row at
        each point (0..MAX_LOOKUP); None: not calibrated (statistics written before lookup).
    """

    max_rank: int
    sequences: tuple[np.ndarray, ...]
    lookup_runs: tuple[np.ndarray, ...] | None = None

    def __post_init__(self):
        if not 1 <= self.max_rank <= len(DIGITS):
            raise ConfigError(f"max_rank must be in 1..{len(DIGITS)}, got {self.max_rank}")
        if not self.sequences or len({s.shape[1] for s in self.sequences}) != 1:
            raise ConfigError("acceptance statistics need sequences of ranks [A, M] with one M")
        if self.num_points == 0 or self.num_masks == 0:
            raise ConfigError("acceptance statistics need at least one drafting point and one mask")
        if self.lookup_runs is not None and [len(r) for r in self.lookup_runs] != [
            len(s) for s in self.sequences
        ]:
            raise ConfigError("lookup runs need one run per drafting point of every sequence")

    @classmethod
    def from_ranks(
        cls,
        ranks: np.ndarray | Sequence[np.ndarray],
        max_rank: int,
        lookup_runs: Sequence[np.ndarray] | None = None,
    ) -> "AcceptanceStats":
        """Args:
        ranks: one sequence's ranks [A, M], or a list of them; ranks outside [0, R_max) are misses.
        max_rank: R_max.
        lookup_runs: optional, per sequence [A] lookup runs (clipped to MAX_LOOKUP).
        """
        arrays = [np.asarray(ranks)] if isinstance(ranks, np.ndarray) else [np.asarray(r) for r in ranks]
        if any(r.ndim != 2 for r in arrays):
            raise ConfigError("ranks must be [A, M] arrays")
        folded = tuple(np.where((r >= 0) & (r < max_rank), r, MISS).astype(np.int8) for r in arrays)
        runs = None
        if lookup_runs is not None:
            runs = tuple(
                np.clip(np.asarray(r).reshape(-1), 0, MAX_LOOKUP).astype(np.int8) for r in lookup_runs
            )
        return cls(int(max_rank), folded, runs)

    @property
    def num_masks(self) -> int:
        return self.sequences[0].shape[1]

    @property
    def num_points(self) -> int:
        """E, drafting points over all sequences."""
        return sum(len(s) for s in self.sequences)

    @functools.cached_property
    def _points(self) -> np.ndarray:
        """[E, M] all sequences' ranks."""
        return np.concatenate(self.sequences)

    @functools.cached_property
    def counts(self) -> dict[Path, int]:
        """Rank path -> drafting points that follow it (paths with a nonzero count only)."""
        points = self._points
        followed = np.cumprod(points >= 0, axis=1).astype(bool)  # [E, M] path through mask m in range
        counts: dict[Path, int] = {}
        for m in range(self.num_masks):
            paths, n = np.unique(points[followed[:, m], : m + 1], axis=0, return_counts=True)
            counts.update({tuple(int(c) for c in p): int(k) for p, k in zip(paths, n, strict=True)})
        return counts

    # ---- the uniform estimate -----------------------------------------------------------------

    def probability(self, path: Path) -> float:
        """P(path accepted) at a uniformly drawn drafting point; 0 for paths never seen."""
        return self.counts.get(tuple(path), 0) / self.num_points

    def expected_tokens(self, tree: DraftTree) -> float:
        """Uniform tau(tree): 1 (the bonus token) + the sum of the nodes' acceptance probabilities
        (for a hybrid tree: + the mean drafts accepted over all points, mask and lookup overlap).

        Nodes with a rank >= max_rank count 0, so tau is a lower bound for such trees.
        """
        if tree.lookup:
            return 1.0 + float(self.accepted_drafts(tree).mean())
        return 1.0 + sum(self.probability(p) for p in tree.paths)

    # ---- the replayed estimate ----------------------------------------------------------------

    @functools.cached_property
    def _path_keys(self) -> np.ndarray:
        """[E, M] int64 code of each point's rank path through mask m (base R_max), -1 after a miss."""
        points = self._points.astype(np.int64)
        keys = np.empty_like(points)
        keys[:, 0] = points[:, 0]
        for m in range(1, self.num_masks):
            keys[:, m] = np.where(
                (keys[:, m - 1] >= 0) & (points[:, m] >= 0), keys[:, m - 1] * self.max_rank + points[:, m], -1
            )
        return keys

    def accepted_drafts(self, tree: DraftTree) -> np.ndarray:
        """[E] drafts the tree accepts at each point: the deepest tree path its ranks follow.

        The tree is ancestor-closed, so a followed path of length l implies its prefixes are followed.
        A lookup chain of n accepts min(run, n) where the mask path accepts less.
        """
        accepted = np.zeros(self.num_points, np.int64)
        for m in range(min(tree.mask_depth, self.num_masks)):
            level = [p for p in tree.paths if len(p) == m + 1 and max(p) < self.max_rank]
            codes = [functools.reduce(lambda k, c: k * self.max_rank + c, p, 0) for p in level]
            hit = np.isin(self._path_keys[:, m], codes)
            accepted = np.where(hit, m + 1, accepted)
        if tree.lookup:
            if self.lookup_runs is None:
                raise ConfigError("these statistics have no lookup runs: run `python -m bita_jax.tune` again")
            runs = np.concatenate(self.lookup_runs).astype(np.int64)
            accepted = np.maximum(accepted, np.minimum(runs, tree.lookup))
        return accepted

    def replayed_steps(self, tree: DraftTree) -> np.ndarray:
        """[num sequences] tree steps greedy decoding takes to produce each sequence's A + 1 tokens.

        The first step has no drafts (1 token); then a step at point s accepts a drafts, commits
        a + 1 tokens and hands over to point s + a + 1, until the last token is committed.
        """
        lengths = np.asarray([len(s) for s in self.sequences])  # A per sequence
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        accepted = self.accepted_drafts(tree)
        position = np.zeros_like(lengths)
        steps = np.ones_like(lengths)
        running = position < lengths
        while running.any():  # all sequences walk together: one iteration per step
            a = accepted[np.minimum(starts + position, self.num_points - 1)]
            position = np.where(running, position + a + 1, position)
            steps += running
            running = position < lengths
        return steps

    def replayed_tokens(self, tree: DraftTree) -> float:
        """Replayed tau: calibration tokens / replayed steps."""
        tokens = sum(len(s) + 1 for s in self.sequences)
        return tokens / float(self.replayed_steps(tree).sum())

    # ---- best trees --------------------------------------------------------------------------

    def ranked_paths(self, max_depth: int) -> list[Path]:
        """The observed paths of at most max_depth levels, most probable first (ties: shorter,
        then lexicographic). Every prefix of a path comes before it (a parent is at least as
        frequent as its child, and shorter)."""
        paths = [p for p in self.counts if len(p) <= max_depth]
        return sorted(paths, key=lambda p: _path_order(self.counts[p], p))

    def best_tree(self, num_nodes: int, max_depth: int) -> DraftTree:
        """The num_nodes most probable rank paths of at most max_depth levels, as a tree.

        Every node costs the same rows and a child is never more probable than its parent, so
        this maximises the uniform tau over all trees of num_nodes nodes and depth <= max_depth
        (Sequoia's program with free drafts). When fewer paths were observed, unobserved ones
        (P = 0) fill up in (length, lexicographic) order, which keeps the set ancestor-closed.
        """
        max_depth = min(max_depth, self.num_masks)
        total = sum(self.max_rank**m for m in range(1, max_depth + 1))
        if not 1 <= num_nodes <= total:
            raise ConfigError(
                f"a tree of depth <= {max_depth} over {self.max_rank} ranks has 1..{total} nodes"
            )
        chosen = self.ranked_paths(max_depth)[:num_nodes]
        if len(chosen) < num_nodes:
            seen = set(chosen)
            unseen = (
                p
                for m in range(1, max_depth + 1)
                for p in itertools.product(range(self.max_rank), repeat=m)
                if p not in seen
            )
            chosen += itertools.islice(unseen, num_nodes - len(chosen))
        return DraftTree.from_paths(chosen)

    def best_trees(self, max_rows: int) -> list[tuple[DraftTree, float]]:
        """(tree, replayed tau) candidates for the choice: for each depth cap 1..M and each budget n
        up to the observed paths, the best tree by the uniform estimate, if its step fits max_rows
        rows; duplicates dropped. With lookup runs, also each of those with a lookup chain of
        every LOOKUP_LENGTHS length, and the chains alone, where they fit. Sorted by rows, then tau
        descending."""
        found: dict[tuple[Path, ...], DraftTree] = {}
        for cap in range(1, self.num_masks + 1):
            ranked = self.ranked_paths(cap)
            for n in range(1, len(ranked) + 1):
                tree = DraftTree.from_paths(ranked[:n])
                if tree.num_rows > max_rows:
                    break  # rows grow with n at a fixed cap (depth never shrinks)
                found.setdefault(tree.paths, tree)
        trees = list(found.values())
        if self.lookup_runs is not None:
            hybrids = [t.with_lookup(n) for t in [DraftTree((), 1), *trees] for n in LOOKUP_LENGTHS]
            trees += [t for t in hybrids if t.num_rows <= max_rows]
        scored = [(tree, self.replayed_tokens(tree)) for tree in trees]
        return sorted(scored, key=lambda c: (c[0].num_rows, -c[1]))

    # ---- JSON ----------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: per sequence one string of A * M characters (rank digits 0-9a-z, '.' a miss)."""
        chars = np.asarray(list(DIGITS) + [MISS_CHAR])  # index -1 is the miss character
        out = {
            "max_rank": self.max_rank,
            "num_masks": self.num_masks,
            "sequences": ["".join(chars[s.reshape(-1)]) for s in self.sequences],
        }
        if self.lookup_runs is not None:
            out["lookup_runs"] = ["".join(DIGITS[r] for r in runs) for runs in self.lookup_runs]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AcceptanceStats":
        """Inverse of `to_json`; malformed input raises ConfigError."""
        value = {c: i for i, c in enumerate(DIGITS)} | {MISS_CHAR: MISS}
        try:
            num_masks = int(data["num_masks"])
            sequences = [
                np.asarray([value[c] for c in text], np.int8).reshape(-1, num_masks)
                for text in data["sequences"]
            ]
            runs = data.get("lookup_runs")
            if runs is not None:
                runs = [np.asarray([value[c] for c in text], np.int8) for text in runs]
            return cls.from_ranks(sequences, int(data["max_rank"]), runs)
        except (KeyError, TypeError, ValueError):
            raise ConfigError(
                "malformed acceptance statistics (expected max_rank, num_masks and rank strings)"
            ) from None
