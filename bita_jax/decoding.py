"""Greedy generation: prefill, the jitted decode step, and the on-device generation loop.

Both autoregressive (AR) and BiTA decoding share this sequencing. The cache holds every committed
token except the newest one, which is the next step's first input row ("pending" token), so a step
is always "feed the pending token (plus drafts), write the accepted rows, advance the length".
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bita_jax.config import ConfigError, ModelConfig
from bita_jax.kv_cache import KVCache
from bita_jax.llama import LlamaModel, causal_mask
from bita_jax.tree import DraftTree
from bita_jax.tree_decoding import placeholder_drafts, tree_step

MIN_BUCKET = 16
# Decoding runs the layers unrolled (see llama.py): each layer's weights are read in place.
SCAN_LAYERS = False


def prompt_bucket(length: int) -> int:
    """Padded prompt length: the next power of two (at least MIN_BUCKET), so few compiles serve all."""
    return max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())


def cache_length(bucket: int, max_new_tokens: int, step_rows: int) -> int:
    """Cache slots for a padded prompt, the new tokens and a step's overshoot, rounded up to 16."""
    need = bucket + max_new_tokens + 2 * step_rows
    return -(-need // 16) * 16


def check_lengths(config: ModelConfig, prompt_lens: list[int], max_new_tokens: int) -> None:
    """Refuses, before any compile, prompts that cannot fit the model's positions."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if min(prompt_lens) < 1:
        raise ConfigError("empty prompt: at least one token is needed")
    longest = max(prompt_lens)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ConfigError(
            f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"{config.max_position_embeddings} positions"
        )


def prefill(model: LlamaModel, params, tokens: jax.Array, prompt_lens: jax.Array, cache: KVCache) -> KVCache:
    """Writes the prompts' keys/values into an empty cache, leaving each last token pending.

    Args:
      tokens: [B, T] right-padded prompts.
      prompt_lens: [B] int32 true lengths (>= 1).
      cache: empty cache (length 0) with at least T slots.

    Returns:
      The cache with length = prompt_lens - 1.
    """
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    _, (k, v) = model.apply({"params": params}, tokens, positions, causal_mask(batch, length))
    return cache.write(k, v).advance(prompt_lens - 1)


def ar_step(model: LlamaModel, params, cache: KVCache, pending: jax.Array) -> tuple[jax.Array, KVCache]:
    """One greedy AR step: feeds pending [B], returns the next tokens [B] and the advanced cache."""
    batch = pending.shape[0]
    positions = cache.length[:, None]
    hidden, (k, v) = model.apply(
        {"params": params}, pending[:, None], positions, jnp.ones((batch, 1, 1), bool), cache=cache
    )
    next_tokens = jnp.argmax(model.apply({"params": params}, hidden[:, 0], method="logits"), axis=-1)
    return next_tokens.astype(jnp.int32), cache.write(k, v).advance(jnp.ones((batch,), jnp.int32))


def make_ar_step(config: ModelConfig) -> Callable:
    """Jitted AR step `(params, cache, pending) -> (next, cache)` with the cache donated."""
    model = LlamaModel(config)
    return jax.jit(lambda params, cache, pending: ar_step(model, params, cache, pending), donate_argnums=(1,))


@flax.struct.dataclass
class GenerationState:
    """Carry of the on-device generation loop.

    Attributes:
      cache: committed tokens except each row's pending one.
      pending: [B] the newest committed token, fed first by the next step.
      output: [B, max_new + R] generated ids; row b's first num_generated[b] are final.
      num_generated: [B] int32.
      done: [B] bool, the row hit EOS or max_new_tokens; finished rows never change again.
      row_steps: [B] int32, steps in which the row was still generating.
      steps: [] int32, steps taken by the loop.
      extra: method-specific carry (BiTA: drafts and acceptance counters).
    """

    cache: KVCache
    pending: jax.Array
    output: jax.Array
    num_generated: jax.Array
    done: jax.Array
    row_steps: jax.Array
    steps: jax.Array
    extra: Any = None


def record_tokens(
    state: GenerationState,
    new_tokens: jax.Array,
    num_new: jax.Array,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
) -> tuple[GenerationState, jax.Array]:
    """Appends each row's first num_new [B] of new_tokens [B, R], trimmed at EOS and max_new_tokens.

    Returns the state (cache untouched) and the count kept per row [B] (0 for finished rows).
    """
    width = new_tokens.shape[1]
    in_step = jnp.arange(width)[None, :] < num_new[:, None]
    is_eos = jnp.isin(new_tokens, jnp.asarray(eos_ids)) & in_step
    through_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, width)
    keep = jnp.minimum(jnp.minimum(num_new, through_eos), max_new_tokens - state.num_generated)
    keep = jnp.where(state.done, 0, keep)
    put = jax.vmap(lambda row, toks, start: jax.lax.dynamic_update_slice(row, toks, (start,)))
    output = jnp.where(state.done[:, None], state.output, put(state.output, new_tokens, state.num_generated))
    num_generated = state.num_generated + keep
    hit_eos = is_eos.any(axis=1) & (through_eos <= keep)
    done = state.done | hit_eos | (num_generated >= max_new_tokens)
    state = state.replace(
        output=output,
        num_generated=num_generated,
        done=done,
        row_steps=state.row_steps + (~state.done).astype(jnp.int32),
        steps=state.steps + 1,
    )
    return state, keep


def initial_state(
    model: LlamaModel,
    params,
    tokens: jax.Array,
    prompt_lens: jax.Array,
    max_len: int,
    max_new_tokens: int,
    step_rows: int,
    extra: Any = None,
) -> GenerationState:
    """Prefills the cache and builds the loop carry; the last prompt token is pending."""
    batch = tokens.shape[0]
    cache = prefill(model, params, tokens, prompt_lens, KVCache.init(model.config, batch, max_len))
    pending = jnp.take_along_axis(tokens, (prompt_lens - 1)[:, None], axis=1)[:, 0]
    zeros = jnp.zeros((batch,), jnp.int32)
    return GenerationState(
        cache=cache,
        pending=pending,
        output=jnp.full((batch, max_new_tokens + step_rows), model.config.pad_id, jnp.int32),
        num_generated=zeros,
        done=jnp.zeros((batch,), bool),
        row_steps=zeros,
        steps=jnp.zeros((), jnp.int32),
        extra=extra,
    )


def run_loop(
    state: GenerationState, step: Callable[[GenerationState], GenerationState], max_steps: int
) -> GenerationState:
    """Runs `step` on device until every row is done (or max_steps, a safety bound)."""
    return jax.lax.while_loop(lambda s: (~s.done.all()) & (s.steps < max_steps), step, state)


def make_ar_generate(config: ModelConfig, max_new_tokens: int) -> Callable:
    """Jitted `(params, tokens [B, T], prompt_lens [B]) -> GenerationState`: prefill + AR loop."""
    model = LlamaModel(config)

    def generate(params, tokens, prompt_lens):
        max_len = cache_length(tokens.shape[1], max_new_tokens, 1)
        state = initial_state(model, params, tokens, prompt_lens, max_len, max_new_tokens, 1)

        def step(s: GenerationState) -> GenerationState:
            next_tokens, cache = ar_step(model, params, s.cache, s.pending)
            s, keep = record_tokens(
                s, next_tokens[:, None], jnp.ones_like(s.num_generated), max_new_tokens, config.eos_token_ids
            )
            # Finished rows stop advancing so their cache never outgrows its headroom.
            cache = cache.replace(length=jnp.where(keep > 0, cache.length, s.cache.length))
            return s.replace(cache=cache, pending=jnp.where(keep > 0, next_tokens, s.pending))

        return run_loop(state, step, max_new_tokens)

    return jax.jit(generate)


@flax.struct.dataclass
class BiTACarry:
    """BiTA's extra loop carry.

    Attributes:
      drafts: [B, Dt, R] the draft tree's tokens for the next step.
      accepted_per_level: [B, Dt] int32, steps in which draft level m was accepted and kept.
    """

    drafts: jax.Array
    accepted_per_level: jax.Array

    @classmethod
    def initial(cls, tree: DraftTree, batch: int, vocab_size: int) -> "BiTACarry":
        return cls(
            drafts=placeholder_drafts(tree, batch, vocab_size),
            accepted_per_level=jnp.zeros((batch, tree.depth), jnp.int32),
        )


def bita_loop_step(
    model: LlamaModel,
    tree: DraftTree,
    params,
    adapter,
    max_new_tokens: int,
    state: GenerationState,
) -> GenerationState:
    """One tree step of the generation loop: verify, record, commit the accepted rows, redraft."""
    step = tree_step(model, tree, params, adapter, state.cache, state.pending, state.extra.drafts)
    state, keep = record_tokens(
        state, step.new_tokens, step.accepted + 1, max_new_tokens, model.config.eos_token_ids
    )
    running = keep > 0  # finished rows stay frozen, as in the AR loop
    levels = jnp.arange(tree.depth)[None, :]
    counted = (levels < step.accepted[:, None]) & (levels < keep[:, None])
    extra = BiTACarry(
        drafts=jnp.where(running[:, None, None], step.drafts, state.extra.drafts),
        accepted_per_level=state.extra.accepted_per_level + counted.astype(jnp.int32),
    )
    return state.replace(
        cache=step.cache.advance(jnp.where(running, step.accepted + 1, 0)),
        pending=jnp.where(running, step.bonus, state.pending),
        extra=extra,
    )


def make_bita_generate(config: ModelConfig, tree: DraftTree, max_new_tokens: int) -> Callable:
    """Jitted `((params, adapter), tokens [B, T], prompt_lens [B]) -> GenerationState`.

    Prefill, then tree steps in one on-device loop; `state.steps` counts tree steps and
    `state.extra` is a BiTACarry with per-level acceptance counts.
    """
    model = LlamaModel(config)

    def generate(weights, tokens, prompt_lens):
        params, adapter = weights
        extra = BiTACarry.initial(tree, tokens.shape[0], config.vocab_size)
        max_len = cache_length(tokens.shape[1], max_new_tokens, tree.step_rows)
        state = initial_state(
            model, params, tokens, prompt_lens, max_len, max_new_tokens, tree.step_rows, extra
        )
        step = functools.partial(bita_loop_step, model, tree, params, adapter, max_new_tokens)
        return run_loop(state, step, max_new_tokens)

    return jax.jit(generate)


def make_bita_step(config: ModelConfig, tree: DraftTree) -> Callable:
    """Jitted tree step `(params, adapter, cache, pending, drafts) -> TreeStepResult`, cache donated."""
    model = LlamaModel(config)
    return jax.jit(functools.partial(tree_step, model, tree), donate_argnums=(2,))


@dataclasses.dataclass
class Generation:
    """One prompt's result on the host."""

    output_ids: list[int]
    steps: int
    seconds: float


def pad_batch(prompts: list[list[int]], batch_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads up to batch_size prompts to their bucket; missing rows repeat the last prompt."""
    rows = prompts + [prompts[-1]] * (batch_size - len(prompts))
    bucket = prompt_bucket(max(len(p) for p in rows))
    tokens = np.full((batch_size, bucket), pad_id, np.int32)
    for i, p in enumerate(rows):
        tokens[i, : len(p)] = p
    return tokens, np.asarray([len(p) for p in rows], np.int32)


def generate_batches(
    generate_fn: Callable,
    params,
    prompts: list[list[int]],
    batch_size: int,
    pad_id: int,
    on_batch: Callable[[GenerationState, int], None] | None = None,
) -> list[Generation]:
    """Runs a jitted generate function over prompts in batches; returns one Generation per prompt.

    The first call of each shape compiles; `seconds` is the batch's wall time split evenly.
    """
    results: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        tokens, lens = pad_batch(chunk, batch_size, pad_id)
        t0 = time.perf_counter()
        state = jax.block_until_ready(generate_fn(params, tokens, lens))
        seconds = (time.perf_counter() - t0) / len(chunk)
        out, num, row_steps = jax.device_get((state.output, state.num_generated, state.row_steps))
        if on_batch is not None:
            on_batch(state, len(chunk))
        results += [
            Generation(out[i, : num[i]].tolist(), int(row_steps[i]), seconds) for i in range(len(chunk))
        ]
    return results
