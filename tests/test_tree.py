"""Draft-tree topology and the step's static mask/positions, checked against the method's rules."""

import numpy as np
import pytest

from bita_jax.bita.tree import DraftTree, parse_tree
from bita_jax.config import ConfigError


def test_upper_triangle_structure():
    tree = parse_tree("upper:5", num_masks=3)
    assert tree.num_nodes == 12 and tree.depth == 3 and tree.draft_width == 5
    assert tree.num_rows == 1 + 12 + 3 * 13
    # Level by level, rank within a level (method 3.1 flattened order).
    assert tree.level.tolist() == [0] * 5 + [1] * 4 + [2] * 3
    assert tree.rank.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
    # Only the rank-0 trunk has children.
    assert tree.parent.tolist() == [-1] * 5 + [0] * 4 + [5] * 3
    assert tree.path_nodes[10].tolist() == [0, 5, 10]
    assert tree.path_nodes[3].tolist() == [3, 3, 3]
    assert parse_tree("upper:5", num_masks=4).num_nodes == 14


def test_worked_example_positions():
    """Method 3.3, M=3, K=5, L=4: the root x_3 sits at 3 (= cache length)."""
    tree = parse_tree("upper:5", num_masks=3)
    pos = 3 + tree.position_offsets
    trunk = [0, 5, 9]
    assert pos[0] == 3
    assert pos[1 + np.asarray(trunk)].tolist() == [4, 5, 6]
    assert pos[tree.group_rows(0)].tolist() == [4, 5, 6]
    assert pos[tree.group_rows(1 + 2)].tolist() == [5, 6, 7]  # a level-0 node
    assert pos[tree.group_rows(1 + 6)].tolist() == [6, 7, 8]  # a level-1 node
    assert pos[tree.group_rows(1 + 11)].tolist() == [7, 8, 9]  # a level-2 node


def _rule_mask(tree: DraftTree) -> np.ndarray:
    """The method's visibility table, written row by row from the rule text."""
    n, depth = tree.num_nodes, tree.depth
    rows = tree.num_rows
    mask = np.zeros((rows, rows), bool)
    mask[0, 0] = True
    for node, path in enumerate(tree.paths):
        mask[1 + node, 0] = True
        for other, q in enumerate(tree.paths):
            mask[1 + node, 1 + other] = path[: len(q)] == q
    for group in range(n + 1):
        owner = tree.paths[group - 1] if group else ()
        for k in range(depth):
            row = 1 + n + group * depth + k
            mask[row, 0] = True
            for other, q in enumerate(tree.paths):
                mask[row, 1 + other] = len(q) <= len(owner) and owner[: len(q)] == q
            for j in range(k + 1):
                mask[row, 1 + n + group * depth + j] = True
    return mask


@pytest.mark.parametrize("spec", ["upper:5", "upper:2", "chain", "[[0],[1],[0,0],[0,1],[1,0],[0,0,2]]"])
def test_mask_matches_rules(spec):
    tree = parse_tree(spec, num_masks=3)
    np.testing.assert_array_equal(tree.self_mask, _rule_mask(tree))
    # Positions are "visible step rows - 1", continuing after the root.
    np.testing.assert_array_equal(tree.position_offsets, tree.self_mask.sum(1) - 1)
    assert tree.prefix_visible.sum() == tree.depth * (tree.num_nodes + 1)
    assert not tree.prefix_visible[: 1 + tree.num_nodes].any()


def test_chain_and_paths():
    chain = parse_tree("chain", num_masks=4)
    assert chain.paths == ((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0))
    assert chain.parent.tolist() == [-1, 0, 1, 2]
    # Order-independent, hashable (closed over by jitted steps).
    a = DraftTree.from_paths([[0, 1], [0], [1]])
    assert a == DraftTree.from_paths([[1], [0], [0, 1]]) and hash(a) == hash(DraftTree.from_paths(a.paths))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("upper:x", "upper:K"),
        ("upper:0", "width >= 1"),
        ("[[0],[1,0]]", "no parent"),
        ("[[0],[0]]", "repeated"),
        ("[[-1]]", "ranks >= 0"),
        ("[]", "at least one node"),
        ("[[0],[0,0],[0,0,0],[0,0,0,0]]", "exceeds"),
        ("{1: 2}", "expected upper:K"),
        ("[1, 2]", "JSON list of paths"),
        ("[[0]", "not a JSON list"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_tree(spec, num_masks=3)
