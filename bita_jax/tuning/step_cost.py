"""Measured step cost on the current device: the jitted tree step for a ladder of row counts, and AR.

The steps are the decoding loop's own (`decoding.loop.ar_next`, `tree_step`, each with the write
of its rows to the cache), run STEPS_PER_CALL at a time in one on-device loop as decoding runs
them, on a cache of the size decoding allocates, so the times are what decoding pays per step. A step's cost
depends on its rows, not on what the drafts hold (shapes are fixed). Each loop is compiled and run
once to warm up, then timed in `repeats` interleaved rounds; the fastest call counts.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from bita_jax.bita.tree import DraftTree
from bita_jax.config import ModelConfig
from bita_jax.decoding.cache import KVCache
from bita_jax.decoding.loop import ar_next, cache_length
from bita_jax.decoding.runner import prompt_bucket
from bita_jax.decoding.sampling import GREEDY, streams_for
from bita_jax.decoding.tree_step import placeholder_drafts, tree_step
from bita_jax.errors import ConfigError
from bita_jax.models.llama import LlamaModel
from bita_jax.tuning.choice import StepCosts

# Steps per timed call: one on-device loop, as decoding runs them (no per-step dispatch).
STEPS_PER_CALL = 8


def current_device_kind() -> str:
    """The key of this device in trees.json, e.g. 'NVIDIA H200' or 'cpu'."""
    return jax.devices()[0].device_kind


def ladder_trees(num_masks: int, max_rows: int) -> list[DraftTree]:
    """Trees of about doubling rows, from the smallest (a one-token lookup chain: 2 rows) up to max_rows.

    Then N = 1, 2, 4, ... mask nodes at depth min(N, M): a rank-0 chain of that depth plus level-0
    siblings. Only their row counts matter (the step's cost is set by its shapes).
    """
    trees = [DraftTree((), 1)] if max_rows >= 2 else []
    num_nodes = 1
    while True:
        depth = min(num_nodes, num_masks)
        chain = [(0,) * (m + 1) for m in range(depth)]
        tree = DraftTree.from_paths(chain + [(c,) for c in range(1, num_nodes - depth + 1)])
        if tree.num_rows > max_rows:
            break
        trees.append(tree)
        num_nodes *= 2
    if not trees:
        raise ConfigError(f"max_rows {max_rows} is below the smallest tree step (2 rows)")
    return trees


def interleaved_best_seconds(runs: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Fastest wall time of each run() (blocked until ready) over `repeats` rounds that call every
    run once, after one untimed warm-up call each. Rounds interleave the runs, so load from other
    processes that comes and goes falls on all of them alike; and the minimum, not the median,
    because other processes only ever add time."""
    for run in runs:
        jax.block_until_ready(run())
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, seconds in zip(runs, times, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(run())
            seconds.append(time.perf_counter() - start)
    return [min(seconds) for seconds in times]


def decode_cache(
    config: ModelConfig, batch_size: int, prompt_len: int, max_new_tokens: int, step_rows: int
) -> KVCache:
    """A cache of the size decoding allocates for prompts of prompt_len tokens, max_new_tokens and
    a step that commits up to step_rows rows (decoding.loop.cache_length), filled to the middle of
    the generation. Attention reads every slot, so the size is what matters for the step's cost."""
    max_len = cache_length(prompt_bucket(prompt_len), max_new_tokens, step_rows)
    cache = KVCache.init(config, batch_size, max_len)
    return cache.replace(length=jnp.full((batch_size,), prompt_len + max_new_tokens // 2, jnp.int32))


def make_tree_steps(config: ModelConfig, tree: DraftTree, num_steps: int) -> Callable:
    """Jitted `(params, adapter, cache, pending, drafts, streams) -> cache`: num_steps greedy tree
    steps in one on-device loop, each feeding the last one's bonus token and drafts and writing
    its commit rows, as the decoding loop does. The length stays put (count 0), so every step
    sees one context length. The cache is donated (written in place)."""
    model = LlamaModel(config)

    def steps(params, adapter, cache, pending, drafts, streams):
        def body(_, carry):
            cache, pending, drafts = carry
            result = tree_step(model, tree, GREEDY, params, adapter, cache, pending, drafts, streams)
            cache = cache.commit(result.commit_k, result.commit_v, jnp.zeros_like(cache.length))
            return cache, result.bonus, result.drafts

        return jax.lax.fori_loop(0, num_steps, body, (cache, pending, drafts))[0]

    return jax.jit(steps, donate_argnums=(2,))


def make_ar_steps(config: ModelConfig, num_steps: int) -> Callable:
    """Jitted `(params, cache, pending, streams) -> cache`: num_steps greedy AR steps in one
    on-device loop, each writing its row without advancing the length (as `make_tree_steps`)."""
    model = LlamaModel(config)

    def steps(params, cache, pending, streams):
        def body(_, carry):
            cache, pending = carry
            next_tokens, (k, v) = ar_next(model, GREEDY, params, cache, pending, streams)
            return cache.commit(k, v, jnp.zeros_like(cache.length)), next_tokens

        return jax.lax.fori_loop(0, num_steps, body, (cache, pending))[0]

    return jax.jit(steps, donate_argnums=(1,))


def step_runs(
    config: ModelConfig, params: Any, adapter: Any, trees: Sequence[DraftTree], cache: KVCache
) -> list[Callable[[], KVCache]]:
    """Calls of STEPS_PER_CALL AR steps, then of each tree's steps, sharing one donated cache."""
    batch = cache.length.shape[0]
    pending = jnp.zeros((batch,), jnp.int32)
    streams = jnp.asarray(streams_for(0, range(batch)))
    state = {"cache": cache}
    ar_steps = make_ar_steps(config, STEPS_PER_CALL)

    def ar_run():
        state["cache"] = ar_steps(params, state["cache"], pending, streams)
        return state["cache"]

    def tree_run(tree: DraftTree) -> Callable[[], KVCache]:
        steps = make_tree_steps(config, tree, STEPS_PER_CALL)
        drafts = placeholder_drafts(tree, batch, config.vocab_size)

        def run():
            state["cache"] = steps(params, adapter, state["cache"], pending, drafts, streams)
            return state["cache"]

        return run

    return [ar_run, *(tree_run(t) for t in trees)]


def measure_step_costs(
    config: ModelConfig,
    params: Any,
    adapter: Any,
    batch_sizes: Sequence[int],
    trees: Sequence[DraftTree],
    prompt_len: int = 64,
    max_new_tokens: int = 128,
    repeats: int = 20,
) -> list[StepCosts]:
    """Tree-step seconds of each tree's row count, and AR-step seconds, at each batch size.

    Args:
      config: the decoding config (params in its dtype and layer layout, as decode.py loads them).
      params, adapter: base params and BiTA adapter on the device.
      batch_sizes: the batch sizes of interest.
      trees: the ladder (e.g. `ladder_trees`); row counts must be distinct.
      prompt_len, max_new_tokens: the decoding the cache is sized for (`decode_cache`).
      repeats: rounds of timed calls (STEPS_PER_CALL steps each) after one warm-up call each.

    Returns:
      One StepCosts per batch size, in the order given.
    """
    trees = sorted(trees, key=lambda t: t.num_rows)
    step_rows = max(t.step_rows for t in trees)
    out = []
    for batch_size in batch_sizes:
        cache = decode_cache(config, batch_size, prompt_len, max_new_tokens, step_rows)
        runs = step_runs(config, params, adapter, trees, cache)
        ar, *tree_seconds = [t / STEPS_PER_CALL for t in interleaved_best_seconds(runs, repeats)]
        out.append(StepCosts(batch_size, ar, tuple(t.num_rows for t in trees), tuple(tree_seconds)))
    return out
