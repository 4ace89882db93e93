"""Measured step cost on the current device: the jitted tree step for a ladder of row counts, and AR.

The steps are the decoding loop's own (`decoding.loop.ar_step`, `tree_step` plus the commit of its
rows) on a cache of decode size, so the times are what decoding pays. A step's cost depends on
its rows, not on what the drafts hold (shapes are fixed), so placeholder drafts serve. Each step is
compiled and run once to warm up, then timed `repeats` times; the median counts.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from bita_jax.bita.tree import DraftTree
from bita_jax.config import ModelConfig
from bita_jax.decoding.cache import KVCache
from bita_jax.decoding.loop import make_ar_step
from bita_jax.decoding.sampling import GREEDY, streams_for
from bita_jax.decoding.tree_step import placeholder_drafts, tree_step
from bita_jax.errors import ConfigError
from bita_jax.models.llama import LlamaModel
from bita_jax.tuning.choice import StepCosts


def current_device_kind() -> str:
    """The key of this device in trees.json, e.g. 'NVIDIA H200' or 'cpu'."""
    return jax.devices()[0].device_kind


def ladder_trees(num_masks: int, max_rows: int) -> list[DraftTree]:
    """Trees of about doubling rows, from the smallest (1 node: 4 rows) up to max_rows.

    N = 1, 2, 4, ... nodes at depth min(N, M): a rank-0 chain of that depth plus level-0 siblings.
    Only their row counts matter (the step's cost is set by its shapes).
    """
    trees = []
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
        raise ConfigError(f"max_rows {max_rows} is below the smallest tree step (4 rows)")
    return trees


def median_seconds(run: Callable[[], Any], repeats: int) -> float:
    """Median wall time of run() (blocked until ready) after one untimed warm-up call."""
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def filled_cache(config: ModelConfig, batch_size: int, context_len: int, headroom: int) -> KVCache:
    """A cache of context_len committed (zero) tokens per row and headroom free slots."""
    max_len = -(-(context_len + headroom) // 16) * 16
    cache = KVCache.init(config, batch_size, max_len)
    return cache.replace(length=jnp.full((batch_size,), context_len, jnp.int32))


def make_timed_tree_step(config: ModelConfig, tree: DraftTree) -> Callable:
    """Jitted `(params, adapter, cache, pending, drafts, streams) -> cache`: a greedy tree step and
    the write of its commit rows, as the decoding loop does; the length stays put (count 0), so
    repeated calls time one context length. The cache is donated (written in place)."""
    model = LlamaModel(config)

    def step(params, adapter, cache, pending, drafts, streams):
        result = tree_step(model, tree, GREEDY, params, adapter, cache, pending, drafts, streams)
        return cache.commit(result.commit_k, result.commit_v, jnp.zeros_like(cache.length))

    return jax.jit(step, donate_argnums=(2,))


def tree_step_seconds(
    config: ModelConfig, params: Any, adapter: Any, tree: DraftTree, cache: KVCache, repeats: int
) -> tuple[float, KVCache]:
    """Median seconds of one tree step; returns the cache back (the step donates it)."""
    step = make_timed_tree_step(config, tree)
    batch = cache.length.shape[0]
    pending = jnp.zeros((batch,), jnp.int32)
    drafts = placeholder_drafts(tree, batch, config.vocab_size)
    streams = jnp.asarray(streams_for(0, range(batch)))
    state = {"cache": cache}

    def run():
        state["cache"] = step(params, adapter, state["cache"], pending, drafts, streams)
        return state["cache"]

    return median_seconds(run, repeats), state["cache"]


def ar_step_seconds(config: ModelConfig, params: Any, cache: KVCache, repeats: int) -> float:
    """Median seconds of one AR step (each advances the cache by one: headroom >= repeats + 1)."""
    step = make_ar_step(config)
    batch = cache.length.shape[0]
    pending = jnp.zeros((batch,), jnp.int32)
    streams = jnp.asarray(streams_for(0, range(batch)))
    state = {"cache": cache}

    def run():
        _, state["cache"] = step(params, state["cache"], pending, streams)
        return state["cache"]

    return median_seconds(run, repeats)


def measure_step_costs(
    config: ModelConfig,
    params: Any,
    adapter: Any,
    batch_sizes: Sequence[int],
    trees: Sequence[DraftTree],
    context_len: int = 256,
    repeats: int = 5,
) -> list[StepCosts]:
    """Tree-step seconds of each tree's row count, and AR-step seconds, at each batch size.

    Args:
      config: the decoding config (params in its dtype and layer layout, as decode.py loads them).
      params, adapter: base params and BiTA adapter on the device.
      batch_sizes: the batch sizes of interest.
      trees: the ladder (e.g. `ladder_trees`); row counts must be distinct.
      context_len: committed tokens in the cache (attention reads every slot of the cache).
      repeats: timed calls per step after one warm-up call.

    Returns:
      One StepCosts per batch size, in the order given.
    """
    trees = sorted(trees, key=lambda t: t.num_rows)
    headroom = max(max(t.num_rows for t in trees), repeats + 1)
    out = []
    for batch_size in batch_sizes:
        cache = filled_cache(config, batch_size, context_len, headroom)
        seconds = []
        for tree in trees:
            tree_seconds, cache = tree_step_seconds(config, params, adapter, tree, cache, repeats)
            seconds.append(tree_seconds)
        ar_seconds = ar_step_seconds(config, params, cache, repeats)
        out.append(StepCosts(batch_size, ar_seconds, tuple(t.num_rows for t in trees), tuple(seconds)))
    return out
