"""The slot engine (decoding/engine.py): an insert equals a fresh prefill; each prompt's ids equal
today's static loop whatever the arrival order, slot, neighbours and budgets (greedy and sampled, AR
and BiTA, 1/3/4 slots, f32 and bf16 exact); BiTA equals AR; no compile after warm-up."""

import dataclasses

import jax
import numpy as np
import pytest

from bita_jax.bita import adapter as bita_adapter
from bita_jax.bita.tree import parse_tree
from bita_jax.config import BiTAConfig
from bita_jax.decoding import engine as eng
from bita_jax.decoding import loop, runner
from bita_jax.decoding.sampling import Sampler
from bita_jax.io import hf
from bita_jax.models.llama import LlamaModel
from tests.tiny_checkpoint import make_tiny_checkpoint

BITA = BiTAConfig(num_prompt_tokens=4, num_mask_tokens=3)
# Mixed lengths (two prompt buckets) and budgets.
PROMPTS = [[1, 5, 9, 33], [1, 7, 8, 100, 101, 102, 40, 41, 42], [1, 77], [1] + list(range(50, 70)),
           [1, 3], [1, 200, 201], [1, 9, 9, 9, 9]]  # fmt: skip
BUDGETS = [9, 2, 14, 5, 1, 11, 7]
MAX_NEW = max(BUDGETS)
TREE = parse_tree("upper:4", 3)
TREES = {
    "ar": None,
    "bita": TREE,
    "hybrid": parse_tree("upper:3+lookup:4", 3),
    "lookup": parse_tree("lookup:4", 0),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("engine")), seed=0, initializer_range=0.2)


def load(path, dtype):
    """(config, params, adapter) of a tiny model with peaked logits; bf16 weights run the exact policy."""
    config = hf.load_config(path, scan_layers=False, dtype=dtype, activation_dtype="float32")
    params = hf.load_params(path, config)
    return config, params, bita_adapter.init_adapter(config, BITA, jax.random.key(1))


@pytest.fixture(scope="module")
def peaked(checkpoint):
    return load(checkpoint, "float32")


def static_ids(config, params, sampler, seed, tree=None, adapter=None):
    """Each prompt's ids from today's loop (loop.make_*_generate at batch 1), cut at its budget."""
    if tree is None:
        generate, weights = loop.make_ar_generate(config, MAX_NEW, sampler), params
    else:
        generate, weights = loop.make_bita_generate(config, tree, MAX_NEW, sampler), (params, adapter)
    out = []
    for i, (prompt, budget) in enumerate(zip(PROMPTS, BUDGETS)):
        state = generate(weights, *runner.pad_batch([prompt], i, 1, config.pad_id, seed))
        out.append(np.asarray(state.output[0, : int(state.num_generated[0])])[:budget].tolist())
    return out


def engine_ids(engine, weights, order, seed, batching="continuous"):
    """Runs the prompts in `order` (their indices keep keying their noise): ids per prompt."""
    ids = {}
    stats = eng.EngineStats(engine.slots)
    for events in engine.events(
        weights, [PROMPTS[i] for i in order], [BUDGETS[i] for i in order], list(order), seed, batching, stats
    ):
        for event in events:
            ids.setdefault(order[event.index], []).extend(event.token_ids)
            if event.generation is not None:
                assert event.generation.output_ids == ids[order[event.index]]
    assert stats.recompiles == 0
    return [ids[i] for i in range(len(PROMPTS))]


def make_engine(config, tree, sampler, slots):
    rows = 1 if tree is None else tree.step_rows
    max_len = loop.cache_length(32, MAX_NEW, rows)
    return eng.Engine(
        config, tree, sampler, slots=slots, max_len=max_len, max_new=MAX_NEW, max_prompt=32, chunk_steps=4
    )


def test_insert_equals_fresh_prefill(peaked):
    """Prompts inserted into slots hold exactly a fresh prefill of the same (padded) batch."""
    config, params, _ = peaked
    model = LlamaModel(config)
    engine = make_engine(config, None, Sampler(), 4)
    state = engine.warm_up(params, [16, 32])
    # Two prompts into slots 2 and 0 (padded to 4 rows; the padding rows' writes are dropped),
    # then one more into slot 3.
    group = [PROMPTS[1], PROMPTS[0]]
    state = engine._insert(state, params, *engine._insert_args(group, [5, 6], [0, 1], 3, [2, 0], 4))
    state = engine._insert(state, params, *engine._insert_args([PROMPTS[3]], [4], [7], 3, [3]))
    fresh = jax.jit(lambda p, t, n, s: loop.initial_state(model, p, t, n, s, 4, 1))
    fresh_group = fresh(params, *runner.pad_batch(group, 0, 4, config.pad_id, 3))
    fresh_one = fresh(params, *runner.pad_batch([PROMPTS[3]], 7, 1, config.pad_id, 3))
    gen = state.gen
    for slot, fresh, row, prompt in [(2, fresh_group, 0, group[0]), (0, fresh_group, 1, group[1]),
                                     (3, fresh_one, 0, PROMPTS[3])]:  # fmt: skip
        n = len(prompt) - 1
        for a, b in [(gen.cache.k, fresh.cache.k), (gen.cache.v, fresh.cache.v)]:
            np.testing.assert_array_equal(np.asarray(a[:, slot, :n]), np.asarray(b[:, row, :n]))
        assert int(gen.cache.length[slot]) == n and int(gen.pending[slot]) == prompt[-1]
        assert gen.streams[slot].tolist() == fresh.streams[row].tolist()
    assert gen.done.tolist() == [False, True, False, False]  # slot 1 stays free
    assert gen.num_generated.tolist() == [0, 0, 0, 0] and state.budget.tolist() == [6, 0, 5, 4]


SAMPLED = Sampler(0.8, top_p=0.9)


@pytest.mark.parametrize(
    "dtype, mode, sampler, slot_counts",
    [
        ("float32", "ar", Sampler(), (1, 4)),
        ("float32", "ar", SAMPLED, (3,)),
        ("float32", "bita", Sampler(), (3,)),
        ("float32", "bita", SAMPLED, (1, 4)),
        ("bfloat16", "bita", SAMPLED, (3,)),
        ("float32", "hybrid", Sampler(), (3,)),  # the lookup history is the slot's own prompt
        ("float32", "lookup", SAMPLED, (4,)),
    ],
)
def test_ids_equal_static_for_any_order_and_slots(checkpoint, peaked, dtype, mode, sampler, slot_counts):
    config, params, adapter = peaked if dtype == "float32" else load(checkpoint, dtype)
    tree = TREES[mode]
    adapter = adapter if mode in ("bita", "hybrid") else None
    weights = params if tree is None else (params, adapter)
    seed = 5
    expected = static_ids(config, params, sampler, seed, tree, adapter)
    if tree is not None:  # lossless: BiTA's ids are AR's
        assert expected == static_ids(config, params, sampler, seed)
    assert [len(ids) for ids in expected] == BUDGETS  # no EOS in this model's output
    rng = np.random.default_rng(0)
    for slots in slot_counts:
        engine = make_engine(config, tree, sampler, slots)
        orders = [list(range(len(PROMPTS))), list(rng.permutation(len(PROMPTS)))]
        for order in orders:
            assert engine_ids(engine, weights, order, seed) == expected, (slots, order)
        assert engine_ids(engine, weights, orders[1], seed, "static") == expected


def test_eos_inside_a_step_and_utilisation(peaked):
    """EOS inside an accepted block cuts the prompt there; continuous batching keeps slots busier."""
    config, params, adapter = peaked
    truth = static_ids(config, params, Sampler(), 0)
    eos = truth[0][3]
    config = dataclasses.replace(config, eos_token_ids=(eos,), pad_token_id=config.pad_id)
    expected = static_ids(config, params, Sampler(), 0)
    assert expected[0][-1] == eos and len(expected[0]) == 4
    engine = make_engine(config, TREE, Sampler(), 3)
    assert engine_ids(engine, (params, adapter), list(range(len(PROMPTS))), 0) == expected
    stats = {}
    for batching in eng.BATCHING:
        stats[batching] = eng.EngineStats(3)
        for _ in engine.events(
            (params, adapter), PROMPTS, BUDGETS, list(range(len(PROMPTS))), 0, batching, stats[batching]
        ):
            pass
    assert stats["continuous"].steps < stats["static"].steps
    assert stats["continuous"].utilisation > stats["static"].utilisation
    assert stats["continuous"].recompiles == stats["static"].recompiles == 0
