"""Static draft-tree topology and the fixed row layout of one tree-decoding step, as numpy constants.

A tree has mask nodes and, optionally, a lookup chain. A mask node is a path of ranks
(c_0, ..., c_m): it holds the c_m-th most likely token of mask m of the drafting group, and its
parent is (c_0, ..., c_{m-1}) (the root, i.e. the pending token, for level 0). Every prefix of a
path must itself be a path. The lookup chain (`lookup` = n nodes) holds the n tokens that
prompt lookup (decoding/lookup.py) proposes after the pending token: lookup node j sits at level
j, its parent is lookup node j - 1 (the root for j = 0). Mask nodes come first, then the chain.

One step feeds T = 1 + N + Dm * (N + 1) rows (N nodes of both kinds, Dm = depth of the mask nodes):
  row 0             the root (the pending token),
  rows 1 .. N       the N candidate nodes (mask nodes level by level, then by path; then lookup),
  then N + 1 groups of Dm mask tokens: group 0 drafts after the root, group 1 + n after node n.
Groups only need Dm masks: mask k of a group sees masks 0..k, so later masks change nothing.
Lookup nodes carry mask groups like mask nodes: a step that stops deep in the lookup chain then
drafts the next step's mask nodes from its own group, which has seen the accepted chain, so the
learned drafts never skip a step (the alternative, no groups there, saves N_lookup * Dm rows but
leaves the step after every lookup stop to lookup alone, and the tuner's replay, tuning/stats.py,
could no longer treat steps independently). A lookup-only tree (no mask nodes) has no groups:
it needs no adapter.
A step ends in one of N + 1 "stops": the root (stop 0, no draft accepted) or node n (stop 1 + n,
the deepest accepted node). The stop indexes its verify row, its commit rows and its drafting
group alike, so this module owns every row index a step needs.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np

from bita_jax.errors import ConfigError

DEFAULT_TREE = "upper:5"
# Rows one tree step may compute. Each row costs about one AR step's compute, and the step's
# attention mask is [T, T]: useful trees have tens of nodes (the demo's widest, 124 rows), while
# one of ~15000 nodes (upper:5000, 60000 rows) compiles for minutes and then runs out of memory.
MAX_TREE_ROWS = 4096


def _is_rank(c) -> bool:
    """An integer rank >= 0 (numpy integers included; bools and floats such as 0.5 are not ranks)."""
    return isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 0


@dataclasses.dataclass(frozen=True)
class DraftTree:
    """A static draft tree (hashable, so it can be closed over by jitted steps).

    Attributes:
      paths: the mask nodes as rank tuples, sorted level by level, then lexicographically.
      lookup: n, the length of the lookup chain (0: none).
    """

    paths: tuple[tuple[int, ...], ...]
    lookup: int = 0

    def __post_init__(self):
        if not _is_rank(self.lookup):
            raise ConfigError(f"lookup chain length must be an integer >= 0, got {self.lookup!r}")
        if not self.paths and not self.lookup:
            raise ConfigError("a draft tree needs at least one node")
        known = set(self.paths)
        if len(known) != len(self.paths):
            raise ConfigError("draft tree has a repeated path")
        for p in self.paths:
            if not p or any(not _is_rank(c) for c in p):
                raise ConfigError(f"draft tree path {list(p)} must be a non-empty list of integer ranks >= 0")
            if len(p) > 1 and p[:-1] not in known:
                raise ConfigError(f"draft tree path {list(p)} has no parent path {list(p[:-1])}")
        if list(self.paths) != sorted(self.paths, key=lambda p: (len(p), p)):
            raise ConfigError("draft tree paths must be sorted by level, then path (use from_paths)")
        if self.num_rows > MAX_TREE_ROWS:
            raise ConfigError(
                f"draft tree of {self.num_nodes} nodes needs {self.num_rows} rows per step; "
                f"at most {MAX_TREE_ROWS} are supported"
            )

    @classmethod
    def from_paths(cls, paths, lookup: int = 0) -> "DraftTree":
        """Builds a tree from any iterable of rank sequences, in any order (plus a lookup chain)."""
        tuples = []
        for p in paths:
            ranks = tuple(p) if hasattr(p, "__iter__") and not isinstance(p, str) else ()
            if not ranks or not all(_is_rank(c) for c in ranks):
                raise ConfigError(f"draft tree path {p!r} must be a non-empty list of integer ranks >= 0")
            tuples.append(tuple(int(c) for c in ranks))
        return cls(tuple(sorted(tuples, key=lambda p: (len(p), p))), lookup)

    @classmethod
    def upper_triangle(cls, width: int, levels: int) -> "DraftTree":
        """The reference tree: level m holds the top (width - m) tokens; only rank 0 has children."""
        if width < 1 or levels < 1:
            raise ConfigError(f"upper-triangle tree needs width >= 1 and levels >= 1, got {width}, {levels}")
        paths = [(0,) * m + (c,) for m in range(min(width, levels)) for c in range(width - m)]
        return cls.from_paths(paths)

    def with_lookup(self, lookup: int) -> "DraftTree":
        """The same mask nodes with a lookup chain of `lookup` nodes."""
        return DraftTree(self.paths, lookup)

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def num_mask_nodes(self) -> int:
        """N_m, the mask nodes (node indices 0 .. N_m - 1; the lookup chain follows)."""
        return len(self.paths)

    @property
    def num_nodes(self) -> int:
        """N, mask and lookup nodes."""
        return len(self.paths) + self.lookup

    @property
    def mask_depth(self) -> int:
        """Dm: levels of the mask nodes, the masks per group (0 for a lookup-only tree)."""
        return max((len(p) for p in self.paths), default=0)

    @property
    def depth(self) -> int:
        """Dt: levels of the tree, the most drafts one step can accept."""
        return max(self.mask_depth, self.lookup)

    @property
    def draft_width(self) -> int:
        """R: top-R tokens kept per mask, enough for the largest rank in the tree (0 without masks)."""
        return max((max(p) for p in self.paths), default=-1) + 1

    @property
    def num_rows(self) -> int:
        """T = 1 + N + Dm (N + 1) rows per step."""
        return 1 + self.num_nodes + self.mask_depth * (self.num_nodes + 1)

    @property
    def step_rows(self) -> int:
        """Rows one step may commit to the cache: the pending token plus the accepted path."""
        return self.depth + 1

    # ---- node constants ----------------------------------------------------------------------

    @functools.cached_property
    def level(self) -> np.ndarray:
        """[N] level (0-based) of each node: the draft position after the root it proposes."""
        return np.asarray([len(p) - 1 for p in self.paths] + list(range(self.lookup)), np.int32)

    @functools.cached_property
    def mask_level(self) -> np.ndarray:
        """[N_m] level of each mask node: it holds a token of mask `level`."""
        return self.level[: self.num_mask_nodes]

    @functools.cached_property
    def rank(self) -> np.ndarray:
        """[N_m] rank of each mask node's token among its mask's drafts."""
        return np.asarray([p[-1] for p in self.paths], np.int32)

    @functools.cached_property
    def is_lookup(self) -> np.ndarray:
        """[N] bool: the node belongs to the lookup chain."""
        return np.arange(self.num_nodes) >= self.num_mask_nodes

    @functools.cached_property
    def parent(self) -> np.ndarray:
        """[N] parent node index, -1 for children of the root."""
        index = {p: i for i, p in enumerate(self.paths)}
        chain = [self.num_mask_nodes + j - 1 if j else -1 for j in range(self.lookup)]
        return np.asarray([index.get(p[:-1], -1) for p in self.paths] + chain, np.int32)

    @functools.cached_property
    def ancestors(self) -> np.ndarray:
        """[N, N] bool: ancestors[n, j] iff node j is n or an ancestor of n (root excluded)."""
        out = np.eye(self.num_nodes, dtype=bool)
        for n in range(self.num_nodes):  # parents come before children
            if self.parent[n] >= 0:
                out[n] |= out[self.parent[n]]
        return out

    @functools.cached_property
    def path_nodes(self) -> np.ndarray:
        """[N, Dt] node indices from level 0 down to n; entries past n's level repeat n."""
        out = np.zeros((self.num_nodes, self.depth), np.int32)
        for n in range(self.num_nodes):
            on_path = np.flatnonzero(self.ancestors[n])  # ascending index = ascending level
            out[n] = np.concatenate([on_path, np.full(self.depth - len(on_path), n)])
        return out

    # ---- step layout -------------------------------------------------------------------------

    def group_rows(self, group: int) -> np.ndarray:
        """[Dm] rows of mask group `group` (0 = root's group, 1 + n = node n's group)."""
        return 1 + self.num_nodes + group * self.mask_depth + np.arange(self.mask_depth)

    @property
    def num_verify_rows(self) -> int:
        """1 + N: the root and node rows, whose logits are exactly the base model's."""
        return 1 + self.num_nodes

    @functools.cached_property
    def stop_path(self) -> np.ndarray:
        """[1 + N, Dt] node indices from level 0 down to each stop; entries past it repeat it.

        The root's row is filler (node 0's path): its accepted count of 0 hides it.
        """
        return np.concatenate([self.path_nodes[:1], self.path_nodes]).astype(np.int32)

    @functools.cached_property
    def commit_rows(self) -> np.ndarray:
        """[1 + N, Dt + 1] step rows a step commits for each stop: the root, then the accepted path.

        Rows past the accepted count are filler that the cache length hides.
        """
        return np.concatenate([np.zeros((1 + self.num_nodes, 1), np.int32), 1 + self.stop_path], axis=1)

    @functools.cached_property
    def drafting_rows(self) -> np.ndarray:
        """[1 + N, Dm] rows of the mask group that drafts the next tree after each stop."""
        return np.stack([self.group_rows(stop) for stop in range(1 + self.num_nodes)]).astype(np.int32)

    @functools.cached_property
    def self_mask(self) -> np.ndarray:
        """[T, T] bool: which of the step's rows each row attends to (method section 3.3).

        The root sees itself; node n sees the root and anc(n); mask k of a group sees the root,
        the path of its owner node (none for group 0) and masks 0..k of its own group.
        """
        n_nodes, depth = self.num_nodes, self.mask_depth
        mask = np.zeros((self.num_rows, self.num_rows), bool)
        mask[:, 0] = True
        mask[1 : 1 + n_nodes, 1 : 1 + n_nodes] = self.ancestors
        group_causal = np.tril(np.ones((depth, depth), bool))
        for group in range(n_nodes + 1):
            rows = self.group_rows(group)
            mask[np.ix_(rows, rows)] = group_causal
            if group:
                mask[np.ix_(rows, 1 + np.flatnonzero(self.ancestors[group - 1]))] = True
        return mask

    @functools.cached_property
    def position_offsets(self) -> np.ndarray:
        """[T] int32 positions relative to the root's (= the cache length).

        Node at level m -> 1 + m; mask k of group 0 -> 1 + k; of a level-m node's group -> 2 + m + k,
        i.e. every row sits at (visible step rows - 1), continuing the committed sequence.
        """
        offsets = [0] + [1 + int(m) for m in self.level]
        offsets += [1 + k for k in range(self.mask_depth)]
        for m in self.level:
            offsets += [2 + int(m) + k for k in range(self.mask_depth)]
        return np.asarray(offsets, np.int32)

    @functools.cached_property
    def prefix_visible(self) -> np.ndarray:
        """[T] bool: only mask rows attend to the BiTA prefix, so root and nodes stay the base model."""
        return np.arange(self.num_rows) >= 1 + self.num_nodes

    def check_vocab(self, vocab_size: int) -> None:
        """Refuses ranks at or beyond the vocabulary (a mask has only V drafts to rank)."""
        if self.draft_width > vocab_size:
            raise ConfigError(
                f"draft tree rank {self.draft_width - 1} is beyond the model's vocabulary "
                f"of {vocab_size} tokens"
            )

    @property
    def spec(self) -> str:
        """A --tree spec that parse_tree turns back into this tree (JSON paths, "+lookup:n")."""
        parts = [json.dumps([list(p) for p in self.paths])] if self.paths else []
        return "+".join(parts + ([f"lookup:{self.lookup}"] if self.lookup else []))

    def describe(self) -> str:
        nodes = f"{self.num_nodes} nodes" if not self.lookup else (
            f"{self.num_mask_nodes} mask + {self.lookup} lookup nodes"
        )
        return f"{nodes}, depth {self.depth}, {self.num_rows} rows per step"


def parse_tree(spec: str | DraftTree, num_masks: int) -> DraftTree:
    """Parses a --tree spec for an adapter with `num_masks` mask tokens (0: no adapter).

    Specs: "upper:K" (reference upper-triangle tree of width K over min(K, M) levels), "chain"
    (one rank-0 node per level, M levels), a JSON list of paths such as "[[0], [1], [0, 0]]",
    "lookup:n" (a prompt-lookup chain of n nodes, no adapter needed), or a mask spec and a lookup
    chain joined by "+", such as "upper:3+lookup:4". A DraftTree is taken as it is, checked as
    the tree of its spec would be.
    """
    if isinstance(spec, DraftTree):
        if spec.mask_depth and num_masks < 1:
            raise ConfigError(
                f"tree {spec.spec!r} drafts with mask tokens: it needs an adapter (lookup:n does not)"
            )
        return _check_depth(spec, num_masks)
    parts = [part.strip() for part in spec.strip().split("+")]
    lookups = [p for p in parts if p.startswith("lookup:")]
    masks = [p for p in parts if not p.startswith("lookup:")]
    if len(lookups) > 1 or len(masks) > 1:
        raise ConfigError(f"bad tree spec {spec!r}: at most one mask tree and one lookup:n, joined by +")
    lookup = 0
    if lookups:
        try:
            lookup = int(lookups[0].split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"bad tree spec {spec!r}: expected lookup:n with an integer n") from None
        if lookup < 1:
            raise ConfigError(f"bad tree spec {spec!r}: lookup:n needs n >= 1")
    if not masks:
        return DraftTree((), lookup)
    if num_masks < 1:
        raise ConfigError(
            f"tree {masks[0]!r} drafts with mask tokens: it needs an adapter (lookup:n does not)"
        )
    return _parse_mask_tree(masks[0], num_masks).with_lookup(lookup)


def _parse_mask_tree(spec: str, num_masks: int) -> DraftTree:
    """The mask part of a --tree spec (upper:K, chain, JSON paths)."""
    spec = spec.strip()
    if spec == "chain":
        tree = DraftTree.from_paths([(0,) * (m + 1) for m in range(num_masks)])
    elif spec.startswith("upper:"):
        try:
            width = int(spec.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"bad tree spec {spec!r}: expected upper:K with an integer K") from None
        tree = DraftTree.upper_triangle(width, num_masks)
    elif spec.startswith("["):
        try:
            paths = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ConfigError(f"bad tree spec: not a JSON list of paths ({e.msg})") from None
        if not isinstance(paths, list) or not all(isinstance(p, list) for p in paths):
            raise ConfigError("bad tree spec: expected a JSON list of paths (lists of ranks)")
        tree = DraftTree.from_paths(paths)
    else:
        raise ConfigError(
            f"bad tree spec {spec!r}: expected upper:K, chain, a JSON list of paths or lookup:n"
        )
    return _check_depth(tree, num_masks)


def _check_depth(tree: DraftTree, num_masks: int) -> DraftTree:
    """The tree, if the adapter's num_masks mask tokens reach its depth of mask drafts."""
    if tree.mask_depth > num_masks:
        raise ConfigError(
            f"draft tree depth {tree.mask_depth} exceeds the adapter's {num_masks} mask tokens"
        )
    return tree
