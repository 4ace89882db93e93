"""Tree decoding is exact: node logits equal full forwards, drafts equal a direct mask-group forward,
and greedy BiTA output equals greedy AR output token for token (float32), batched and sharded."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax.bita import adapter as bita_adapter
from bita_jax.bita.tree import DraftTree, parse_tree
from bita_jax.config import BiTAConfig, MeshConfig
from bita_jax.decoding import runner
from bita_jax.decoding.cache import CACHE_AXES, KVCache
from bita_jax.decoding.loop import (
    BiTACarry,
    bita_loop_step,
    initial_state,
    make_ar_generate,
    make_bita_generate,
    make_bita_step,
    prefill,
)
from bita_jax.decoding.sampling import GREEDY
from bita_jax.decoding.tree_step import placeholder_drafts, tree_step
from bita_jax.io import hf
from bita_jax.models.llama import LlamaModel, abstract_params, causal_mask
from bita_jax.sharding import logical_sharding, make_mesh, mesh_rules, tree_shardings

BITA = BiTAConfig(num_prompt_tokens=4, num_mask_tokens=3)
PROMPTS = [[1, 5, 9, 33], [1, 7, 8, 100, 101, 102, 40, 41, 42], [1, 77]]
FULL_LEN = 32  # padded length of the reference full forwards


@pytest.fixture(scope="module", params=[True, False], ids=["scanned", "unrolled"])
def model(tiny_checkpoint, request):
    """(config, params) with scanned layers (training's layout) and unrolled (decoding's default)."""
    config = hf.load_config(tiny_checkpoint, scan_layers=request.param)
    return config, hf.load_params(tiny_checkpoint, config)


def adapter(config, seed):
    return bita_adapter.init_adapter(config, BITA, jax.random.key(seed))


def random_tree(rng: np.random.Generator, depth: int) -> DraftTree:
    """A random tree: each node gets 0-3 children with random distinct ranks."""
    paths, frontier = [], [()]
    while frontier:
        parent = frontier.pop()
        if len(parent) == depth:
            continue
        for rank in rng.choice(4, size=rng.integers(1 if not parent else 0, 4), replace=False):
            paths.append(parent + (int(rank),))
            frontier.append(paths[-1])
    return DraftTree.from_paths(paths)


@functools.lru_cache(maxsize=None)
def full_forward(config):
    """Jitted no-cache forward over a right-padded [B, FULL_LEN] sequence, optionally with masks."""
    model = LlamaModel(config)

    def run(params, adapter, tokens, prefix_visible):
        batch, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        hidden, kv = bita_adapter.forward(
            model, params, adapter, tokens, positions, causal_mask(batch, length), prefix_visible
        )
        return model.apply({"params": params}, hidden, method="logits"), kv

    return jax.jit(run)


def forward_rows(config, params, adapter_params, sequences, num_masks=0):
    """Logits [len(sequences), FULL_LEN, V] and k [L, .., FULL_LEN, K, H] of causal forwards.

    With num_masks, each sequence is followed by masks 0..num_masks-1 that see the prefix."""
    tokens = np.full((len(sequences), FULL_LEN), config.pad_id, np.int32)
    visible = np.zeros((len(sequences), FULL_LEN), bool)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq)] = seq
        masks = config.vocab_size + np.arange(num_masks)
        tokens[i, len(seq) : len(seq) + num_masks] = masks
        visible[i, len(seq) : len(seq) + num_masks] = True
    logits, (k, _) = full_forward(config)(params, adapter_params, tokens, visible)
    return np.asarray(logits), np.asarray(k)


@functools.lru_cache(maxsize=None)
def jitted_prefill(config, batch, max_len=64):
    model = LlamaModel(config)
    return jax.jit(
        lambda params, tokens, lens: prefill(
            model, params, tokens, lens, KVCache.init(config, batch, max_len)
        )
    )


def prefilled(config, params, prompts):
    """(cache, pending tokens [B], streams [B]) after prefilling the prompts."""
    tokens, lens, streams = runner.pad_batch(prompts, 0, len(prompts), config.pad_id)
    cache = jitted_prefill(config, len(prompts))(params, tokens, lens)
    return cache, jnp.asarray(tokens[np.arange(len(prompts)), lens - 1]), streams


# One compile per (config, max_new) shared by all tests.
ar_generate = functools.lru_cache(maxsize=None)(make_ar_generate)


def greedy_continuation(config, params, prompts, count):
    """The AR reference: greedy tokens after each prompt."""
    state = ar_generate(config, count)(params, *runner.pad_batch(prompts, 0, len(prompts), config.pad_id))
    return np.asarray(state.output[:, :count])


@pytest.mark.parametrize("seed", [0, 1])
def test_step_matches_full_forward(model, seed):
    """Root and node logits equal full forwards on their paths; drafts equal a direct group forward;
    the committed rows of the cache equal the full forward's keys."""
    config, params = model
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, depth=3) if seed else parse_tree("upper:5", 3)
    adapter_params = adapter(config, seed)
    prompts = PROMPTS[:2]
    truth = greedy_continuation(config, params, PROMPTS, 30)
    # Drafts: random tokens, except that a random node's path holds the true greedy tokens.
    drafts = rng.integers(3, config.vocab_size, (len(prompts), tree.depth, tree.draft_width))
    targets = rng.integers(0, tree.num_nodes, len(prompts))
    for b, node in enumerate(targets):
        path = tree.paths[node]
        drafts[b][np.isin(drafts[b], truth[b])] = 0  # no accidental matches elsewhere
        for level, rank in enumerate(path):
            drafts[b, level, rank] = truth[b, level]
    cache, pending, streams = prefilled(config, params, prompts)
    length = np.asarray(cache.length)
    step = jax.jit(functools.partial(tree_step, LlamaModel(config), tree, GREEDY))
    out = step(params, adapter_params, cache, pending, jnp.asarray(drafts, jnp.int32), streams)
    cache = cache.commit(out.commit_k, out.commit_v, out.accepted + 1)

    node_tokens = drafts[:, tree.level, tree.rank]
    for b, prompt in enumerate(prompts):
        paths = [[]] + [
            [node_tokens[b, j] for j in tree.path_nodes[n][: tree.level[n] + 1]]
            for n in range(tree.num_nodes)
        ]
        logits, _ = forward_rows(config, params, adapter_params, [prompt + p for p in paths])
        ends = [len(prompt) + len(p) - 1 for p in paths]
        np.testing.assert_allclose(
            out.verify_logits[b], logits[np.arange(len(paths)), ends], rtol=1e-5, atol=1e-5
        )

        accepted = len(tree.paths[targets[b]])
        assert int(out.accepted[b]) == accepted
        np.testing.assert_array_equal(out.new_tokens[b, : accepted + 1], truth[b, : accepted + 1])
        committed = prompt + truth[b, :accepted].tolist()
        mask_logits, full_k = forward_rows(config, params, adapter_params, [committed], tree.depth)
        group = mask_logits[0, len(committed) : len(committed) + tree.depth]
        np.testing.assert_allclose(out.draft_logits[b], group, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out.drafts[b], np.argsort(-group, axis=-1)[:, : tree.draft_width])
        written = length[b] + accepted + 1
        np.testing.assert_allclose(cache.k[:, b, :written], full_k[:, 0, :written], rtol=1e-5, atol=1e-5)


def assert_same_generation(ar, bt):
    np.testing.assert_array_equal(ar.num_generated, bt.num_generated)
    for b in range(ar.num_generated.shape[0]):
        n = int(ar.num_generated[b])
        np.testing.assert_array_equal(ar.output[b, :n], bt.output[b, :n])


@pytest.mark.parametrize("batch", [1, 3])
def test_bita_equals_ar_random_adapters(model, batch):
    config, params = model
    prompts = PROMPTS[:batch] if batch == 1 else PROMPTS
    tokens, lens, streams = runner.pad_batch(prompts, 0, batch, config.pad_id)
    max_new = 30
    ar = ar_generate(config, max_new)(params, tokens, lens, streams)
    specs = ["upper:5", "[[0],[1],[0,0],[0,1],[1,0],[0,0,0],[1,0,2]]"]
    for spec in specs[:1] if batch == 1 else specs:
        generate = make_bita_generate(config, parse_tree(spec, 3), max_new)
        for seed in range(3):
            bt = generate((params, adapter(config, seed)), tokens, lens, streams)
            assert_same_generation(ar, bt)
            assert int(bt.steps) <= max_new
        assert generate._cache_size() == 1  # one compile for all adapters


def test_bita_equals_ar_with_cache_kernel(model):
    """The attention's cache part as the Pallas kernel (TPU's default; interpreted here) in every
    step: BiTA still equals AR, and AR equals AR with the einsums."""
    config, params = model
    kernel = dataclasses.replace(config, attention_kernel="pallas")
    tokens, lens, streams = runner.pad_batch(PROMPTS, 0, len(PROMPTS), config.pad_id)
    max_new = 20
    ar = ar_generate(kernel, max_new)(params, tokens, lens, streams)
    assert_same_generation(ar_generate(config, max_new)(params, tokens, lens, streams), ar)
    generate = make_bita_generate(kernel, parse_tree("upper:5", 3), max_new)
    for seed in range(2):
        assert_same_generation(ar, generate((params, adapter(kernel, seed)), tokens, lens, streams))


def oracle_drafts(rng, tree, truth, num_generated, vocab_size):
    """Drafts holding the true continuation at random ranks (sometimes missing, sometimes off-trunk)."""
    batch = truth.shape[0]
    drafts = rng.integers(3, vocab_size, (batch, tree.depth, tree.draft_width))
    for b in range(batch):
        start = int(num_generated[b])
        for level in range(tree.depth):
            if start + level >= truth.shape[1] or rng.random() < 0.15:
                continue
            rank = 0 if rng.random() < 0.7 else rng.integers(tree.draft_width)
            drafts[b, level][drafts[b, level] == truth[b, start + level]] = 0
            drafts[b, level, rank] = truth[b, start + level]
    return jnp.asarray(drafts, jnp.int32)


@pytest.mark.parametrize("eos_at, max_new", [(None, 30), (6, 30)])
def test_oracle_drafts_equal_ar(model, eos_at, max_new):
    """Deep acceptance, EOS inside the tree and max_new_tokens mid-step: drafts are injected from
    the AR output, so steps accept 0..Dt drafts, and the result must still equal AR exactly."""
    config, params = model
    truth = greedy_continuation(config, params, PROMPTS, 30)
    if eos_at is not None:
        # EOS = a token row 0 emits (not earlier in that row), so generation stops inside a tree step.
        eos = int(truth[0, eos_at])
        config = dataclasses.replace(config, eos_token_ids=(eos,))
    tree = parse_tree("upper:4", 3)
    model_ = LlamaModel(config)
    tokens, lens, streams = runner.pad_batch(PROMPTS, 0, len(PROMPTS), config.pad_id)
    ar = ar_generate(config, max_new)(params, tokens, lens, streams)
    if eos_at is not None:
        assert int(ar.num_generated[0]) <= eos_at + 1 < max_new

    extra = BiTACarry.initial(tree, jnp.asarray(tokens), jnp.asarray(lens), config.vocab_size)
    init = jax.jit(lambda p, t, lens, s: initial_state(model_, p, t, lens, s, max_new, tree.step_rows, extra))
    step = jax.jit(functools.partial(bita_loop_step, model_, tree, GREEDY), static_argnums=(2,))
    state = init(params, tokens, lens, streams)
    adapter_params = adapter(config, 0)
    rng = np.random.default_rng(0)
    while not bool(state.done.all()):
        drafts = oracle_drafts(rng, tree, truth, state.num_generated, config.vocab_size)
        state = step(params, adapter_params, max_new, state.replace(extra=state.extra.replace(drafts=drafts)))
    assert_same_generation(ar, state)
    per_level = np.asarray(state.extra.accepted_per_level).sum(0)
    assert per_level[-1] > 0 and int(state.steps) < int(ar.steps) / 1.5
    assert step._cache_size() == 1


def test_step_compiles_once(model):
    config, params = model
    tree = parse_tree("upper:3", 3)
    step = make_bita_step(config, tree)
    cache, pending, streams = prefilled(config, params, PROMPTS)
    drafts = placeholder_drafts(tree, len(PROMPTS), config.vocab_size)
    for seed in range(3):
        out, cache = step(params, adapter(config, seed), cache, pending, drafts, streams)
        pending, drafts = out.bonus, out.drafts
    assert step._cache_size() == 1


def test_tensor_parallel_equals_single_device(model, tiny_checkpoint):
    """data=4, tensor=2 on 8 fake devices: AR and BiTA outputs equal the 1-device outputs."""
    config, params = model
    prompts = PROMPTS + [[1, 250, 251, 252, 253, 254]]
    tokens, lens, streams = runner.pad_batch(prompts, 0, 4, config.pad_id)
    adapter_params = adapter(config, 3)
    tree = parse_tree("upper:5", 3)
    ar = ar_generate(config, 20)(params, tokens, lens, streams)
    bt = make_bita_generate(config, tree, 20)((params, adapter_params), tokens, lens, streams)

    mesh = make_mesh(MeshConfig(data=4, fsdp=1, tensor=2))
    sharded = hf.load_params(tiny_checkpoint, config, tree_shardings(abstract_params(config), mesh))
    sharded_adapter = bita_adapter.place_adapter(adapter_params, mesh)
    batch_sharding = logical_sharding(("batch", "seq"), mesh)
    tokens_s = jax.device_put(tokens, batch_sharding)
    lens_s, streams_s = (jax.device_put(x, logical_sharding(("batch",), mesh)) for x in (lens, streams))
    # Fresh jitted functions: the mesh and the rules are read at trace time.
    with mesh_rules(mesh):
        ar_s = make_ar_generate(config, 20)(sharded, tokens_s, lens_s, streams_s)
        bt_s = make_bita_generate(config, tree, 20)((sharded, sharded_adapter), tokens_s, lens_s, streams_s)
    assert_same_generation(ar, ar_s)
    assert_same_generation(bt, bt_s)
    assert_same_generation(ar, bt_s)
    # The cache stayed sharded over KV heads (tensor) and batch (data).
    assert bt_s.cache.k.sharding.is_equivalent_to(logical_sharding(CACHE_AXES, mesh), 5)
