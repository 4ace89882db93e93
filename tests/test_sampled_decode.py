"""Lossless sampling: BiTA's sampled output equals AR's for the same seed (random adapters, EOS inside
the tree, max_new_tokens mid-step), its joint distribution matches AR's over independent seeds
(chi-square, with a planted bug that the test rejects), and outputs do not depend on batch size or
slot; temperature 0 is greedy."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import bita_jax
from bita_jax.bita import adapter as bita_adapter
from bita_jax.bita.tree import parse_tree
from bita_jax.config import BiTAConfig
from bita_jax.decoding import loop, runner
from bita_jax.decoding.sampling import Sampler
from bita_jax.io import adapter_files, hf
from bita_jax.models.llama import LlamaModel
from tests.test_tree_decode import PROMPTS, assert_same_generation, oracle_drafts
from tests.tiny_checkpoint import make_tiny_checkpoint

BITA = BiTAConfig(num_prompt_tokens=4, num_mask_tokens=3)
SAMPLERS = [Sampler(0.8, top_p=0.9), Sampler(1.0, top_k=20)]
P_THRESHOLD = 1e-3


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """(config, params, model dir) of a tiny model with peaked next-token distributions (logit std ~1.8),
    so sampled continuations repeat often enough to compare distributions; unrolled layers."""
    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp("peaked")), seed=0, initializer_range=0.2)
    config = hf.load_config(path, scan_layers=False)
    return config, hf.load_params(path, config), path


def adapter(config, seed):
    return bita_adapter.init_adapter(config, BITA, jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def ar_generate(config, max_new, sampler):
    return loop.make_ar_generate(config, max_new, sampler)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=str)
@pytest.mark.parametrize("batch", [1, 3])
def test_sampled_bita_equals_sampled_ar_random_adapters(peaked, sampler, batch):
    config, params, _ = peaked
    prompts = PROMPTS[:batch]
    max_new = 30
    generate = loop.make_bita_generate(config, parse_tree("upper:5", 3), max_new, sampler)
    for seed in range(2):
        batch_arrays = runner.pad_batch(prompts, 0, batch, config.pad_id, seed=seed)
        ar = ar_generate(config, max_new, sampler)(params, *batch_arrays)
        greedy = ar_generate(config, max_new, Sampler())(params, *batch_arrays)
        assert not np.array_equal(ar.output, greedy.output)  # it does sample
        for adapter_seed in range(2):
            assert_same_generation(ar, generate((params, adapter(config, adapter_seed)), *batch_arrays))
    assert generate._cache_size() == 1  # new seeds and adapters do not recompile


@pytest.mark.parametrize("eos_at, max_new", [(None, 30), (6, 30), (None, 13)])
def test_oracle_drafts_equal_sampled_ar(peaked, eos_at, max_new):
    """Drafts injected from the sampled AR output, so steps accept 0..Dt drafts; EOS inside the tree
    and max_new_tokens mid-step: BiTA's sampled output still equals AR's exactly."""
    config, params, _ = peaked
    sampler = SAMPLERS[0]
    tokens, lens, streams = runner.pad_batch(PROMPTS, 0, len(PROMPTS), config.pad_id, seed=11)
    truth = np.asarray(ar_generate(config, 30, sampler)(params, tokens, lens, streams).output)
    if eos_at is not None:
        config = dataclasses.replace(config, eos_token_ids=(int(truth[0, eos_at]),))
    ar = loop.make_ar_generate(config, max_new, sampler)(params, tokens, lens, streams)
    tree = parse_tree("upper:4", 3)
    model = LlamaModel(config)
    extra = loop.BiTACarry.initial(tree, jnp.asarray(tokens), jnp.asarray(lens), config.vocab_size)
    init = jax.jit(lambda p, t, n, s: loop.initial_state(model, p, t, n, s, max_new, tree.step_rows, extra))
    step = jax.jit(functools.partial(loop.bita_loop_step, model, tree, sampler), static_argnums=(2,))
    state = init(params, tokens, lens, streams)
    rng = np.random.default_rng(0)
    while not bool(state.done.all()):
        drafts = oracle_drafts(rng, tree, truth, state.num_generated, config.vocab_size)
        state = step(
            params, adapter(config, 0), max_new, state.replace(extra=state.extra.replace(drafts=drafts))
        )
    assert_same_generation(ar, state)
    assert np.asarray(state.extra.accepted_per_level).sum(0)[-1] > 0  # deep acceptance happened


class FrozenPositionSampler(Sampler):
    """A planted bug: every draw of a step uses the noise of one position, not its own."""

    def choose(self, logits, positions, streams):
        return super().choose(logits, jnp.zeros_like(positions), streams)


def first_tokens_bita(config, params, prompt, sampler, seeds, greedy_after):
    """[len(seeds), 3] first three tokens of BiTA decoding of one prompt, one row per seed.

    After the first step, the drafts are the greedy continuation of the committed prefix (a function
    of the prefix only, as real drafts are), so the tree often accepts two sampled tokens at once.
    """
    tree = parse_tree("chain", 3)
    model = LlamaModel(config)
    rows = len(seeds)
    tokens, lens, _ = runner.pad_batch([prompt] * rows, 0, rows, config.pad_id)
    streams = np.stack([np.asarray(seeds, np.int32), np.zeros(rows, np.int32)], axis=-1)
    extra = loop.BiTACarry.initial(tree, jnp.asarray(tokens), jnp.asarray(lens), config.vocab_size)
    state = jax.jit(lambda p, t, n, s: loop.initial_state(model, p, t, n, s, 3, tree.step_rows, extra))(
        params, tokens, lens, streams
    )
    step = jax.jit(functools.partial(loop.bita_loop_step, model, tree, sampler), static_argnums=(2,))
    null = adapter(config, 0)
    while not bool(state.done.all()):
        first = np.asarray(state.output[:, 0])
        drafts = np.asarray(state.extra.drafts).copy()
        if int(state.steps) > 0:
            drafts[:, :2, 0] = greedy_after[first]  # [B, 2]: greedy continuation after token 1
        state = step(params, null, 3, state.replace(extra=state.extra.replace(drafts=jnp.asarray(drafts))))
    return np.asarray(state.output[:, :3]), np.asarray(state.extra.accepted_per_level).sum()


def homogeneity_p_value(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square test that two samples of token triples [n, 3] come from one distribution.

    Triples seen fewer than 10 times in both samples together are pooled into one category.
    """
    keys = [tuple(t) for t in np.concatenate([a, b])]
    values, index = np.unique(np.asarray(keys), axis=0, return_inverse=True)
    counts = np.zeros((2, len(values)), np.int64)
    np.add.at(counts, (np.repeat([0, 1], [len(a), len(b)]), index.ravel()), 1)
    rare = counts.sum(0) < 10
    table = np.concatenate([counts[:, ~rare], counts[:, rare].sum(1, keepdims=True)], axis=1)
    table = table[:, table.sum(0) > 0]
    return scipy.stats.chi2_contingency(table)[1]


def test_joint_distribution_of_three_tokens_matches_ar(peaked):
    """BiTA over seeds 0..N-1 against AR over seeds N..2N-1 (no shared noise): the first three tokens
    have one distribution (chi-square homogeneity); a BiTA that reuses one position's noise fails."""
    config, params, _ = peaked
    sampler = Sampler(1.0, top_k=3)
    prompt, n = PROMPTS[0], 2000
    # Greedy two-token continuation after each possible first token.
    after = [prompt + [t] for t in range(config.vocab_size)]
    greedy = np.asarray(
        ar_generate(config, 2, Sampler())(
            params, *runner.pad_batch(after, 0, len(after), config.pad_id)
        ).output
    )[:, :2]
    tokens, lens, _ = runner.pad_batch([prompt] * n, 0, n, config.pad_id)
    ar_streams = np.stack([np.arange(n, 2 * n, dtype=np.int32), np.zeros(n, np.int32)], axis=-1)
    ar = np.asarray(ar_generate(config, 3, sampler)(params, tokens, lens, ar_streams).output)[:, :3]
    bita, accepted = first_tokens_bita(config, params, prompt, sampler, np.arange(n), greedy)
    assert accepted > n / 4, "the tree must accept sampled tokens for the test to check the rule"
    assert homogeneity_p_value(bita, ar) > P_THRESHOLD
    buggy, _ = first_tokens_bita(
        config, params, prompt, FrozenPositionSampler(1.0, top_k=3), np.arange(n), greedy
    )
    assert homogeneity_p_value(buggy, ar) < P_THRESHOLD


@pytest.fixture(scope="module")
def loaded(peaked, tmp_path_factory):
    """The API's Model on the peaked checkpoint with a random adapter saved by save_adapter."""
    config, _, path = peaked
    adapter_dir = str(tmp_path_factory.mktemp("adapter"))
    adapter_files.save_adapter(adapter_dir, adapter(config, 1), BITA, path)
    return bita_jax.load(path, adapter=adapter_dir)


TEXTS = ["def add(a, b):", "x", "The quick brown fox jumps", "import os"]


@pytest.mark.parametrize("mode", ["ar", "bita"])
def test_outputs_do_not_depend_on_batch_size_or_slot(loaded, mode):
    options = dict(max_new_tokens=12, mode=mode, temperature=0.9, top_k=40, seed=5, tree="upper:3")
    outputs = {
        batch: [r["output_ids"] for r in loaded.generate(TEXTS, batch_size=batch, **options)]
        for batch in (1, 3, 4)
    }
    assert outputs[1] == outputs[3] == outputs[4]
    # A resumed run decodes the remaining prompts under their indices in the whole input.
    rest = loaded.generate(TEXTS[2:], first_index=2, batch_size=2, **options)
    assert [r["output_ids"] for r in rest] == outputs[1][2:]
    other_seed = [r["output_ids"] for r in loaded.generate(TEXTS, **{**options, "seed": 6})]
    assert other_seed != outputs[1]


def test_temperature_zero_is_greedy(loaded):
    greedy = loaded.generate(TEXTS, max_new_tokens=12, mode="ar", batch_size=2)
    for mode in ("ar", "bita"):
        zero = loaded.generate(
            TEXTS, max_new_tokens=12, mode=mode, batch_size=2, temperature=0.0, top_k=3, seed=9
        )
        assert [r["output_ids"] for r in zero] == [r["output_ids"] for r in greedy]
