"""Tree tuning: acceptance statistics by hand, best trees against brute force, the AR fallback,
trees.json round trips, and teacher-forcing ranks against a direct forward per drafting point."""

import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax.bita import adapter as bita_adapter
from bita_jax.bita.tree import DraftTree
from bita_jax.config import BiTAConfig
from bita_jax.errors import ConfigError, UserError
from bita_jax.io import hf
from bita_jax.models.llama import LlamaModel
from bita_jax.training import data
from bita_jax.tuning import calibrate, step_cost
from bita_jax.tuning.choice import Choice, ChoiceKey, StepCosts, TreeStore, choose, load_store, save_store
from bita_jax.tuning.stats import AcceptanceStats

# Six drafting points, three masks; with max_rank 3 the rank 5 and the -1 are misses.
HAND_RANKS = np.array(
    [
        [0, 0, 1],
        [0, 1, 0],
        [0, 0, 0],
        [1, 0, 0],
        [0, 0, 5],
        [2, -1, 0],
    ]
)
HAND_COUNTS = {
    (0,): 4,
    (1,): 1,
    (2,): 1,
    (0, 0): 3,
    (0, 1): 1,
    (1, 0): 1,
    (0, 0, 1): 1,
    (0, 1, 0): 1,
    (0, 0, 0): 1,
    (1, 0, 0): 1,
}


def test_counts_and_probabilities_by_hand():
    stats = AcceptanceStats.from_ranks(HAND_RANKS, max_rank=3)
    assert (stats.num_points, stats.max_rank, stats.num_masks) == (6, 3, 3)
    assert stats.counts == HAND_COUNTS
    assert stats.probability((0, 0)) == pytest.approx(3 / 6)
    assert stats.probability((2, 0)) == 0.0  # the -1 after rank 2 is a miss
    assert stats.probability((0, 0, 5)) == 0.0  # beyond max_rank


def test_tau_by_hand():
    stats = AcceptanceStats.from_ranks(HAND_RANKS, max_rank=3)
    tree = DraftTree.from_paths([(0,), (1,), (0, 0), (0, 0, 0), (0, 0, 1)])
    assert stats.expected_tokens(tree) == pytest.approx(1 + (4 + 1 + 3 + 1 + 1) / 6)
    # A rank beyond max_rank adds nothing.
    assert stats.expected_tokens(DraftTree.from_paths([(0,), (3,)])) == pytest.approx(1 + 4 / 6)


def test_ties_prefer_shorter_then_lexicographic():
    stats = AcceptanceStats.from_ranks(np.array([[1, 5], [0, 0]]), max_rank=3)
    assert stats.counts == {(0,): 1, (1,): 1, (0, 0): 1}
    assert stats.best_tree(1, 2).paths == ((0,),)
    assert stats.best_tree(2, 2).paths == ((0,), (1,))
    assert stats.best_tree(3, 2).paths == ((0,), (1,), (0, 0))
    # Unobserved paths fill up in (length, lexicographic) order.
    assert stats.best_tree(5, 2).paths == ((0,), (1,), (2,), (0, 0), (0, 1))


def all_paths(max_rank: int, depth: int) -> list[tuple[int, ...]]:
    return [p for m in range(1, depth + 1) for p in itertools.product(range(max_rank), repeat=m)]


def brute_force_best_count(stats: AcceptanceStats, num_nodes: int, depth: int) -> int:
    """Largest summed count over every ancestor-closed set of num_nodes paths of <= depth levels."""
    best = -1
    for nodes in itertools.combinations(all_paths(stats.max_rank, depth), num_nodes):
        chosen = set(nodes)
        if all(len(p) == 1 or p[:-1] in chosen for p in nodes):
            best = max(best, sum(stats.counts.get(p, 0) for p in nodes))
    return best


def skewed_ranks(rng: np.random.Generator, points: int, masks: int) -> np.ndarray:
    """Ranks 0..3 (3 is a miss at max_rank 3), rank 0 likeliest, a later mask likelier to hit after a hit."""
    ranks = rng.choice(4, size=(points, masks), p=[0.45, 0.25, 0.18, 0.12])
    repeat = rng.random((points, masks)) < 0.3
    ranks[:, 1:] = np.where(repeat[:, 1:], ranks[:, :-1], ranks[:, 1:])
    return ranks


@pytest.mark.parametrize("masks,max_nodes,points", [(2, 5, 40), (3, 4, 60), (3, 4, 4)])
def test_best_tree_matches_brute_force(masks, max_nodes, points):
    rng = np.random.default_rng(masks * 100 + points)
    stats = AcceptanceStats.from_ranks(skewed_ranks(rng, points, masks), max_rank=3)
    for depth in range(1, masks + 1):
        for n in range(1, min(max_nodes, len(all_paths(3, depth))) + 1):
            tree = stats.best_tree(n, depth)
            assert tree.num_nodes == n and tree.depth <= depth
            got = sum(stats.counts.get(p, 0) for p in tree.paths)
            assert got == brute_force_best_count(stats, n, depth), (depth, n, tree.paths)


def test_best_trees_are_the_budget_optima_within_rows():
    rng = np.random.default_rng(7)
    stats = AcceptanceStats.from_ranks(skewed_ranks(rng, 200, 3), max_rank=3)
    candidates = stats.best_trees(max_rows=40)
    assert len({c[0].paths for c in candidates}) == len(candidates)
    for tree, tau in candidates:
        assert tree.num_rows <= 40
        assert tau == stats.replayed_tokens(tree)
        best = stats.best_tree(tree.num_nodes, tree.depth)
        assert stats.expected_tokens(tree) == pytest.approx(stats.expected_tokens(best))
    # Every budget of every depth cap that fits is offered.
    for cap in (1, 2, 3):
        for n in range(1, len(stats.ranked_paths(cap)) + 1):
            tree = stats.best_tree(n, cap)
            if tree.num_rows <= 40:
                assert tree.paths in {c[0].paths for c in candidates}


def test_replayed_steps_by_hand():
    # A step at point s accepts a drafts and hands over to s + a + 1; the first step has no drafts.
    ranks = np.array([[0, 0], [5, 5], [0, 1], [0, 1], [2, 2], [1, -1]])
    stats = AcceptanceStats.from_ranks([ranks, np.zeros((0, 2), int)], max_rank=3)
    chain = DraftTree.from_paths([(0,), (0, 0)])
    np.testing.assert_array_equal(stats.accepted_drafts(chain), [2, 0, 1, 1, 0, 0])
    # s=0 accepts 2 -> s=3 accepts 1 -> s=5 accepts 0 -> 6 = A: 1 + 3 steps; the empty sequence: 1.
    np.testing.assert_array_equal(stats.replayed_steps(chain), [4, 1])
    assert stats.replayed_tokens(chain) == pytest.approx((7 + 1) / (4 + 1))
    wide = DraftTree.from_paths([(0,), (1,), (2,), (2, 2)])
    np.testing.assert_array_equal(stats.accepted_drafts(wide), [1, 0, 1, 1, 2, 1])
    # s=0 -> 2 -> 4 -> 7: 1 + 3 steps.
    np.testing.assert_array_equal(stats.replayed_steps(wide), [4, 1])
    # The uniform estimate weighs all six points: 1 + (0,) 3/6 + (1,) 1/6 + (2,) 1/6 + (2, 2) 1/6.
    assert stats.expected_tokens(wide) == pytest.approx(1 + 6 / 6)


def test_statistics_json_round_trip():
    rng = np.random.default_rng(1)
    sequences = [rng.integers(-1, 40, size=(n, 3)) for n in (5, 0, 9)]
    stats = AcceptanceStats.from_ranks(sequences, max_rank=36)
    text = json.dumps(stats.to_json())
    loaded = AcceptanceStats.from_json(json.loads(text))
    assert loaded.max_rank == 36 and loaded.counts == stats.counts
    for got, want in zip(loaded.sequences, sequences, strict=True):
        np.testing.assert_array_equal(got, np.where(want < 36, want, -1))
    assert len(text) < 200  # one character per rank


# ---- choice -------------------------------------------------------------------------------


def costs(tree_over_ar: float, batch_size: int = 4) -> StepCosts:
    """AR step 0.01 s; tree steps of 4 and 20 rows at tree_over_ar and 2 * tree_over_ar x AR."""
    return StepCosts(batch_size, 0.01, (4, 20), (0.01 * tree_over_ar, 0.02 * tree_over_ar))


def test_predicted_speed_and_interpolation():
    chain = DraftTree.from_paths([(0,)])  # 4 rows
    wide = DraftTree.from_paths([(0,), (1,), (0, 0)])  # 1 + 3 + 2 * 4 = 12 rows
    choice = choose([(chain, 1.5), (wide, 1.9)], costs(1.2))
    wide_seconds = 0.012 + (0.024 - 0.012) * (12 - 4) / (20 - 4)
    assert choice.best_tree.tree == chain  # 4 * 1.5 / 0.012 = 500 > 4 * 1.9 / 0.018 = 422
    assert choice.best_tree.tokens_per_s == pytest.approx(4 * 1.5 / 0.012)
    assert choice.ar.tokens_per_s == pytest.approx(4 / 0.01)
    assert costs(1.2).tree_step_seconds(12) == pytest.approx(wide_seconds)
    assert choice.tree == chain and choice.speedup == pytest.approx(1.25)


def test_ar_unless_a_tree_wins_by_the_margin():
    chain = DraftTree.from_paths([(0,)])
    assert choose([(chain, 1.5)], costs(1.5)).tree is None  # predicted 1.0x AR
    assert choose([(chain, 1.5)], costs(1.45)).tree is None  # 1.034x < 1.05
    assert choose([(chain, 1.5)], costs(1.4)).tree == chain  # 1.071x
    assert choose([(chain, 1.5)], costs(1.4), margin=0.1).tree is None
    assert choose([], costs(1.0)).tree is None
    too_big = DraftTree.upper_triangle(5, 3)  # more rows than measured: not a candidate
    assert choose([(too_big, 3.0)], costs(1.0)).best_tree is None


def test_trees_json_round_trip(tmp_path):
    assert load_store(str(tmp_path)) is None
    stats = AcceptanceStats.from_ranks(HAND_RANKS, max_rank=3)
    chain = DraftTree.from_paths([(0,), (0, 0)])
    store = (
        TreeStore(stats)
        .with_choice("cpu", "float32", choose([(chain, 1.8)], costs(1.2, batch_size=1)))
        .with_choice("cpu", "float32", choose([(chain, 1.8)], costs(3.0, batch_size=8)))
        .with_choice("NVIDIA H200", "bfloat16", choose([(chain, 1.8)], costs(1.0, batch_size=1)))
    )
    save_store(str(tmp_path), store)
    loaded = load_store(str(tmp_path))
    assert loaded.choices == store.choices and loaded.to_json() == store.to_json()
    assert loaded.lookup("cpu", "float32", 1).tree == chain
    assert loaded.lookup("cpu", "float32", 8).tree is None  # AR
    assert isinstance(loaded.lookup("NVIDIA H200", "bfloat16", 1), Choice)
    assert loaded.lookup("cpu", "bfloat16", 1) is None
    assert loaded.lookup("cpu", "float32", 2) is None
    (tmp_path / "trees.json").write_text('{"format_version": 1, "choices": [{"dtype": 3}]}')
    with pytest.raises(UserError, match="trees.json"):
        load_store(str(tmp_path))


def test_choices_are_keyed_by_sampling_precision_and_chat_with_chat_the_only_fallback(tmp_path):
    stats = AcceptanceStats.from_ranks(HAND_RANKS, max_rank=3)
    chain = DraftTree.from_paths([(0,), (0, 0)])
    greedy = choose([(chain, 1.8)], costs(1.2, batch_size=1))  # the chain: 1.8 / 1.2
    sampled_chat = choose([(chain, 1.1)], costs(1.2, batch_size=1))  # AR
    store = TreeStore(stats).with_choice("cpu", "float32", greedy)
    store = store.with_choice("cpu", "float32", sampled_chat, sampling="sampled", chat=True)
    save_store(str(tmp_path), store)
    loaded = load_store(str(tmp_path))
    assert set(loaded.choices) == {
        ChoiceKey("cpu", "float32", 1),
        ChoiceKey("cpu", "float32", 1, sampling="sampled", precision="exact", chat=True),
    }
    key = ChoiceKey("cpu", "float32", 1)
    assert loaded.resolve(key) == (key, greedy)
    # chat the other way is the one fallback
    assert loaded.resolve(key._replace(chat=True)) == (key, greedy)
    sampled = key._replace(sampling="sampled")
    assert loaded.resolve(sampled) == (sampled._replace(chat=True), sampled_chat)
    assert loaded.resolve(sampled._replace(chat=True)) == (sampled._replace(chat=True), sampled_chat)
    # a greedy choice is never taken for sampling, nor one for another precision, dtype or batch
    assert TreeStore(stats).with_choice("cpu", "float32", greedy).resolve(sampled) is None
    for other in [key._replace(precision="fast"), key._replace(dtype="bfloat16"), key._replace(batch_size=2)]:
        assert loaded.resolve(other) is None


def test_trees_json_written_before_the_key_grew_reads_as_greedy_exact_without_chat():
    """The packaged demo's trees.json has no sampling, precision or chat in its choices."""
    from bita_jax import demo

    with open(f"{demo.ADAPTER_DIR}/trees.json") as f:
        raw = json.load(f)
    assert raw["choices"] and not any({"sampling", "precision", "chat"} & set(c) for c in raw["choices"])
    store = load_store(demo.ADAPTER_DIR)
    assert set(store.choices) == {
        ChoiceKey(c["device_kind"], c["dtype"], c["batch_size"], "greedy", "exact", False)
        for c in raw["choices"]
    }
    assert store.lookup("cpu", "float32", 1) is not None
    assert store.lookup("cpu", "float32", 1, sampling="sampled") is None
    assert TreeStore.from_json(store.to_json()).choices == store.choices


def test_unknown_sampling_or_precision_in_trees_json_is_refused(tmp_path):
    store = TreeStore(AcceptanceStats.from_ranks(HAND_RANKS, max_rank=3))
    store = store.with_choice("cpu", "float32", choose([], costs(1.0)))
    data = store.to_json()
    data["choices"][0]["sampling"] = "beam"
    (tmp_path / "trees.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="sampling or precision"):
        load_store(str(tmp_path))


# ---- calibration and step cost on a tiny checkpoint -----------------------------------------

BITA = BiTAConfig(num_prompt_tokens=4, num_mask_tokens=3, init_std=1.0)


DIRECT_LEN = 32  # fixed length of the direct forwards (one compile); rows after a point's own are unseen


@functools.lru_cache(maxsize=None)
def direct_mask_logits(config):
    """Jitted forward of one right-padded sequence [1, DIRECT_LEN] -> the M logits rows after n."""
    model = LlamaModel(config)

    def run(params, adapter, tokens, n):
        rows = jnp.arange(DIRECT_LEN)
        causal = rows[None, :] <= rows[:, None]  # padding rows come last, so no real row sees them
        hidden, _ = bita_adapter.forward(
            model, params, adapter, tokens, rows[None], causal[None], (rows >= n)[None]
        )
        mask_hidden = jax.lax.dynamic_slice_in_dim(hidden[0], n, BITA.num_mask_tokens)
        return model.apply({"params": params}, mask_hidden, method="logits")

    return jax.jit(run)


def direct_ranks(config, params, adapter, example: data.Example, offset: int) -> np.ndarray:
    """[M] ranks for one drafting point from its own sequence: source + target[:offset], then the
    M masks (causal among themselves, seeing every normal token and the prefix); ranked by a
    stable sort, so ties go to the lower id."""
    M = BITA.num_mask_tokens
    normal = list(example.source) + list(example.target[:offset])
    n = len(normal)
    tokens = np.full((1, DIRECT_LEN), config.pad_id, np.int32)
    tokens[0, : n + M] = normal + [config.vocab_size + k for k in range(M)]
    logits = np.asarray(direct_mask_logits(config)(params, adapter, tokens, n))  # [M, V]
    labels = list(example.target[offset + 1 : offset + 1 + M])
    labels += [-1] * (M - len(labels))  # past the target's end: no label, rank -1
    rank = lambda row, y: np.flatnonzero(np.argsort(-row, kind="stable") == y)[0] if y >= 0 else -1  # noqa: E731
    return np.array([rank(row, y) for row, y in zip(logits, labels, strict=True)])


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    config = hf.load_config(tiny_checkpoint)
    params = hf.load_params(tiny_checkpoint, config)
    return config, params, bita_adapter.init_adapter(config, BITA, jax.random.key(3))


def test_teacher_forced_ranks_match_direct_forwards(tiny):
    config, params, adapter = tiny
    rng = np.random.default_rng(0)
    examples = [
        data.Example(tuple(rng.integers(3, 320, size=s)), tuple(rng.integers(3, 320, size=t)))
        for s, t in [(5, 12), (9, 4), (3, 8), (7, 3), (4, 6)]
    ]
    # max_groups 4 cuts the first example into 3 sequences; 9 sequences in batches of 2.
    ranks = calibrate.teacher_forced_ranks(
        config, params, adapter, examples, batch_size=2, max_groups=4, max_length=32
    )
    assert [r.shape for r in ranks] == [(len(ex.target) - 1, BITA.num_mask_tokens) for ex in examples]
    for ex, got in zip(examples, ranks, strict=True):
        expected = np.stack([direct_ranks(config, params, adapter, ex, s) for s in range(len(ex.target) - 1)])
        np.testing.assert_array_equal(got, expected)
    ranks = np.concatenate(ranks)
    assert len(np.unique(ranks)) > 10  # a random model ranks its labels anywhere in the vocab


def test_step_cost_ladder_runs_the_decode_steps(tiny):
    config, params, adapter = tiny
    trees = step_cost.ladder_trees(num_masks=3, max_rows=25)
    assert [t.num_rows for t in trees] == [2, 4, 9, 20]
    assert all(t.depth <= 3 for t in trees)
    (measured,) = step_cost.measure_step_costs(
        config, params, adapter, [2], trees[:3], prompt_len=8, max_new_tokens=8, repeats=1
    )
    assert measured.batch_size == 2 and measured.tree_rows == (2, 4, 9)
    assert measured.ar_seconds > 0 and all(s > 0 for s in measured.tree_seconds)


# ---- lookup candidates ---------------------------------------------------------------------


def test_hybrid_replay_by_hand():
    # Mask chain accepts [2, 0, 1, 1, 0, 0]; lookup runs [0, 3, 0, 4, 1, 0].
    ranks = np.array([[0, 0], [5, 5], [0, 1], [0, 1], [2, 2], [1, -1]])
    runs = np.array([0, 3, 0, 4, 1, 0])
    stats = AcceptanceStats.from_ranks([ranks], max_rank=3, lookup_runs=[runs])
    chain = DraftTree.from_paths([(0,), (0, 0)])
    np.testing.assert_array_equal(stats.accepted_drafts(chain.with_lookup(2)), [2, 2, 1, 2, 1, 0])
    np.testing.assert_array_equal(stats.accepted_drafts(DraftTree((), 4)), runs)
    # s=0 accepts 2 -> s=3 accepts 2 -> s=6 = A: 1 + 2 steps.
    np.testing.assert_array_equal(stats.replayed_steps(chain.with_lookup(2)), [3])
    assert stats.expected_tokens(chain.with_lookup(2)) == pytest.approx(1 + 8 / 6)
    loaded = AcceptanceStats.from_json(json.loads(json.dumps(stats.to_json())))
    np.testing.assert_array_equal(loaded.lookup_runs[0], runs)
    candidates = {tree for tree, _ in stats.best_trees(60)}
    assert DraftTree((), 4) in candidates and any(t.paths and t.lookup == 4 for t in candidates)
    with pytest.raises(ConfigError):  # statistics without lookup runs cannot score a lookup chain
        AcceptanceStats.from_ranks([ranks], max_rank=3).accepted_drafts(DraftTree((), 2))


def test_lookup_runs_count_the_matching_proposals():
    # source 5 6 7 8, target 5 6 7 9 5 6: at s = 0 (history ... 8 5) the lookup proposes 6 7 8 5 ...
    example = data.Example((5, 6, 7, 8), (5, 6, 7, 9, 5, 6))
    (runs,) = calibrate.lookup_runs([example], vocab_size=16, num_tokens=4)
    # s=0: "8 5" unseen, "5" at 0 -> 6 7 8 5 vs 6 7 9 5 -> 2; s=1: "5 6" at 0 -> 7 8 .. vs 7 9 -> 1;
    # s=2: "5 6 7" at 0 -> 8 vs 9 -> 0; s=3: "9" unseen -> 0; s=4: "9 5" no, "5" at 4 -> 6 ... vs 6 -> 1.
    np.testing.assert_array_equal(runs, [2, 1, 0, 0, 1])
