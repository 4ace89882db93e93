"""Prompt lookup and hybrid trees: on-device proposals equal a plain-Python reference; the hybrid row
layout; BiTA with lookup candidates (hybrid and lookup-only) equals AR token for token, greedy and
sampled, batch 1 and 3, random and trained adapters; one compile per shape."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bita_jax
from bita_jax import demo
from bita_jax.bita import adapter as bita_adapter
from bita_jax.bita.tree import DraftTree, parse_tree
from bita_jax.io.prompts import read_prompts
from bita_jax.config import BiTAConfig
from bita_jax.decoding import lookup, loop, runner
from bita_jax.decoding.sampling import GREEDY, Sampler
from bita_jax.errors import ConfigError
from bita_jax.io import hf
from tests.test_tree_decode import PROMPTS, assert_same_generation
from tests.tiny_checkpoint import make_tiny_checkpoint

BITA = BiTAConfig(num_prompt_tokens=4, num_mask_tokens=3)
NO_MATCH = 1000


def reference_proposal(history: list[int], n: int, max_ngram: int = lookup.MAX_NGRAM) -> list[int]:
    """Plain Python: the most recent earlier occurrence of the longest suffix n-gram (max_ngram..1),
    then what followed it, copied on as an overlapping copy; NO_MATCH without a match."""
    length = len(history)
    for g in range(max_ngram, 0, -1):
        suffix = history[length - g :] if g < length else None
        for start in range(length - g - 1, -1, -1):  # latest first, the suffix itself excluded
            if suffix is not None and history[start : start + g] == suffix:
                out = []
                for k in range(n):  # an overlapping copy: each token copies the one p back
                    known = start + g + k < length
                    out.append(history[start + g + k] if known else out[k - (length - start - g)])
                return out
    return [NO_MATCH] * n


def run_propose(histories, n, slots):
    tokens = np.random.default_rng(0).integers(0, 50, (len(histories), slots)).astype(np.int32)  # junk past L
    for b, h in enumerate(histories):
        tokens[b, : len(h)] = h
    lengths = np.asarray([len(h) for h in histories], np.int32)
    return np.asarray(lookup.propose(jnp.asarray(tokens), jnp.asarray(lengths), n, NO_MATCH))


def test_proposals_match_reference_on_random_histories():
    rng = np.random.default_rng(1)
    histories = [
        [5],  # one token: nothing earlier
        [1, 2, 3, 4, 5, 6],  # all distinct: no match
        [9, 4, 7, 8, 9],  # match at the very start (g = 1)
        [3, 3, 3, 3],  # a run: the copy repeats it
        [1, 2, 1, 2],  # "1 2" matches right before the end: period 2
        [7, 1, 2, 3, 9, 1, 2, 3, 5, 2, 3],  # no earlier "5 2 3": the 2-gram "2 3", latest at 6
        [4, 1, 2, 3, 8, 0, 1, 2, 3],  # g = 3, most recent earlier occurrence
        [6, 6, 1, 6, 6, 2, 6, 6],  # several occurrences: the most recent
    ]
    histories += [
        rng.integers(0, vocab, rng.integers(1, 40)).tolist() for vocab in (3, 5, 12, 40) for _ in range(12)
    ]
    for n in (1, 4, 7):
        got = run_propose(histories, n, 48)
        for b, h in enumerate(histories):
            assert got[b].tolist() == reference_proposal(h, n), (h, n)
    # the reference itself on hand-checked cases
    assert reference_proposal([1, 2, 3, 4, 5, 6], 2) == [NO_MATCH] * 2
    assert reference_proposal([9, 4, 7, 8, 9], 3) == [4, 7, 8]
    assert reference_proposal([3, 3, 3, 3], 3) == [3, 3, 3]
    assert reference_proposal([1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]
    assert reference_proposal([7, 1, 2, 3, 9, 1, 2, 3, 5, 2, 3], 2) == [5, 2]  # 2-gram "2 3" at 6
    assert reference_proposal([4, 1, 2, 3, 8, 0, 1, 2, 3], 2) == [8, 0]
    assert reference_proposal([6, 6, 1, 6, 6, 2, 6, 6], 1) == [2]


def test_history_is_prompt_then_generated():
    prompt = jnp.asarray([[1, 2, 3, 0], [4, 0, 0, 0]], jnp.int32)
    output = jnp.asarray([[7, 8, 0], [9, 9, 9]], jnp.int32)
    tokens, lengths = lookup.history(prompt, jnp.asarray([3, 1]), output, jnp.asarray([2, 3]))
    assert lengths.tolist() == [5, 4]
    assert tokens[0, :5].tolist() == [1, 2, 3, 7, 8] and tokens[1, :4].tolist() == [4, 9, 9, 9]


def test_hybrid_tree_layout():
    tree = parse_tree("upper:3+lookup:4", 3)
    assert (tree.num_mask_nodes, tree.num_nodes, tree.mask_depth, tree.depth) == (6, 10, 3, 4)
    assert tree.num_rows == 1 + 10 + 3 * 11 and tree.step_rows == 5
    assert tree.level.tolist() == [0, 0, 0, 1, 1, 2, 0, 1, 2, 3]
    assert tree.parent.tolist()[6:] == [-1, 6, 7, 8]
    assert tree.path_nodes[9].tolist() == [6, 7, 8, 9]
    assert tree.commit_rows[1 + 8].tolist() == [0, 7, 8, 9, 9]
    # lookup node 1's group (group 1 + 7) sees the root, lookup nodes 0 and 1 and its own masks
    rows = tree.group_rows(1 + 7)
    assert np.flatnonzero(tree.self_mask[rows[2]]).tolist() == [0, 7, 8, *rows[:3]]
    assert tree.position_offsets[rows].tolist() == [3, 4, 5]
    assert not tree.prefix_visible[: 1 + 10].any() and tree.prefix_visible[11:].all()
    only = parse_tree("lookup:4", 0)
    assert (only.num_rows, only.mask_depth, only.depth, only.draft_width) == (5, 0, 4, 0)
    assert np.array_equal(only.self_mask, np.tril(np.ones((5, 5), bool)))
    for t in (tree, only, parse_tree("[[0],[1],[0,0]]+lookup:2", 3), parse_tree("upper:2", 3)):
        assert parse_tree(t.spec, 3) == t
    for bad in ("lookup:0", "lookup:x", "upper:3+upper:2", "lookup:2+lookup:3", "lookup"):
        with pytest.raises(ConfigError):
            parse_tree(bad, 3)
    with pytest.raises(ConfigError, match="needs an adapter"):
        parse_tree("upper:3+lookup:2", 0)
    with pytest.raises(ConfigError):
        DraftTree((), 0)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    config = hf.load_config(tiny_checkpoint, scan_layers=False)
    return config, hf.load_params(tiny_checkpoint, config)


def random_adapter(config, seed):
    return bita_adapter.init_adapter(config, BITA, jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def ar_generate(config, max_new, sampler):
    return loop.make_ar_generate(config, max_new, sampler)


def lookup_accepted(state) -> int:
    return int(np.asarray(state.extra.accepted_lookup).sum())


@pytest.mark.parametrize("batch", [1, 3])
def test_hybrid_and_lookup_only_equal_ar_greedy(tiny, batch):
    """Random tiny models repeat themselves, so lookup candidates are accepted (checked)."""
    config, params = tiny
    prompts = PROMPTS[:batch]
    arrays = runner.pad_batch(prompts, 0, batch, config.pad_id)
    max_new = 40
    ar = ar_generate(config, max_new, GREEDY)(params, *arrays)
    from_lookup = 0
    for spec in ("upper:3+lookup:4", "[[0],[1],[0,0]]+lookup:6", "lookup:4"):
        tree = parse_tree(spec, 3)
        generate = loop.make_bita_generate(config, tree, max_new)
        for seed in range(2):
            weights = (params, random_adapter(config, seed) if tree.mask_depth else None)
            state = generate(weights, *arrays)
            assert_same_generation(ar, state)
            from_lookup += lookup_accepted(state)
        assert generate._cache_size() == 1  # one compile for all adapters
    assert from_lookup > 0


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """A tiny model with peaked next-token distributions, so sampled text repeats (lookup hits)."""
    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp("peaked")), seed=0, initializer_range=0.2)
    config = hf.load_config(path, scan_layers=False)
    return config, hf.load_params(path, config)


@pytest.mark.parametrize("batch", [1, 3])
def test_hybrid_and_lookup_only_equal_sampled_ar(peaked, batch):
    config, params = peaked
    sampler = Sampler(0.5, top_k=5)  # cool enough that the tiny model repeats itself now and then
    prompts = PROMPTS[:batch]
    max_new = 40
    from_lookup = 0
    for spec in ("upper:3+lookup:4", "lookup:4"):
        tree = parse_tree(spec, 3)
        generate = loop.make_bita_generate(config, tree, max_new, sampler)
        for seed in range(2):
            arrays = runner.pad_batch(prompts, 0, batch, config.pad_id, seed=seed)
            ar = ar_generate(config, max_new, sampler)(params, *arrays)
            greedy = ar_generate(config, max_new, GREEDY)(params, *arrays)
            assert not np.array_equal(ar.output, greedy.output)  # it does sample
            state = generate((params, random_adapter(config, seed) if tree.mask_depth else None), *arrays)
            assert_same_generation(ar, state)
            from_lookup += lookup_accepted(state)
        assert generate._cache_size() == 1  # new seeds do not recompile
    assert from_lookup > 0


@pytest.fixture(scope="module")
def demo_model():
    return bita_jax.load(demo.MODEL_DIR, adapter=demo.ADAPTER_DIR)


@pytest.mark.parametrize("batch", [1, 3])
def test_trained_adapter_hybrid_equals_ar(demo_model, batch):
    """The packaged demo adapter (trained): hybrid and lookup-only ids equal AR's, greedy and sampled."""
    texts = read_prompts(demo.DEMO_PROMPTS_FILE)[:batch]
    for sampling in ({}, {"temperature": 0.8, "top_k": 40, "seed": 3}):
        options = dict(max_new_tokens=32, batch_size=batch, **sampling)
        ar = demo_model.run(texts, mode="ar", **options)
        for mode, spec in (("bita", "upper:3+lookup:4"), ("lookup", "lookup:4")):
            run = demo_model.run(texts, mode=mode, tree=spec, **options)
            assert [g.output_ids for g in run.generations] == [g.output_ids for g in ar.generations]
            assert run.accepted_lookup.sum() > 0  # the demo's code repeats itself


def test_decode_cli_lookup_mode_needs_no_adapter():
    from bita_jax.cli import UserError
    from bita_jax.cli.decode import build_parser, decoding_mode

    parse = lambda *a: build_parser().parse_args(["--model", "M", "--prompt", "x", *a])  # noqa: E731
    assert decoding_mode(parse("--mode", "lookup", "--tree", "lookup:4")) == "lookup"
    with pytest.raises(UserError, match="needs no --adapter"):
        decoding_mode(parse("--mode", "lookup", "--adapter", "A"))
    with pytest.raises(UserError, match="--mode lookup"):
        decoding_mode(parse("--mode", "bita"))
