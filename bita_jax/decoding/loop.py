"""The on-device generation loop: prefill, the AR step, the tree step's loop carry, and the jitted
generate functions of both modes.

Both autoregressive (AR) and BiTA decoding share this sequencing. The cache holds every committed
token except the newest one, which is the next step's first input row ("pending" token), so a step
is always "feed the pending token (plus drafts), choose, record, commit the accepted rows".
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bita_jax.bita.tree import DraftTree
from bita_jax.config import ModelConfig
from bita_jax.decoding import lookup
from bita_jax.decoding.cache import KVCache
from bita_jax.decoding.sampling import GREEDY, Sampler
from bita_jax.decoding.tree_step import TreeStepResult, placeholder_drafts, tree_step
from bita_jax.models.llama import LlamaModel, causal_mask, forward

# Decoding runs the layers unrolled (see models/llama.py): each layer's weights are read in place.
SCAN_LAYERS = False


def cache_length(bucket: int, max_new_tokens: int, step_rows: int) -> int:
    """Cache slots for a padded prompt, the new tokens and a step's overshoot, rounded up to 16."""
    need = bucket + max_new_tokens + 2 * step_rows
    return -(-need // 16) * 16


def prefill(model: LlamaModel, params, tokens: jax.Array, prompt_lens: jax.Array, cache: KVCache) -> KVCache:
    """Commits the prompts' keys/values to an empty cache, leaving each last token pending.

    Args:
      tokens: [B, T] right-padded prompts.
      prompt_lens: [B] int32 true lengths (>= 1).
      cache: empty cache (length 0) with at least T slots.

    Returns:
      The cache with length = prompt_lens - 1.
    """
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    _, (k, v) = forward(model, params, tokens, positions, causal_mask(batch, length))
    return cache.commit(k, v, prompt_lens - 1)


def ar_next(
    model: LlamaModel, policy: Sampler, params, cache: KVCache, pending: jax.Array, streams: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Feeds pending [B] after the cache: the chosen next tokens [B] and pending's keys/values
    [L, B, 1, K, H] (not yet committed)."""
    batch = pending.shape[0]
    hidden, kv = forward(
        model, params, pending[:, None], cache.length[:, None], jnp.ones((batch, 1, 1), bool),
        **cache.model_inputs(1),
    )  # fmt: skip
    logits = model.apply({"params": params}, hidden[:, :1], method="logits")  # [B, 1, V]
    # The pending token sits at the cache length; the chosen token one position later.
    return policy.choose(logits, cache.length[:, None] + 1, streams)[:, 0], kv


def ar_step(
    model: LlamaModel, policy: Sampler, params, cache: KVCache, pending: jax.Array, streams: jax.Array
) -> tuple[jax.Array, KVCache]:
    """One AR step that commits pending [B]: returns the chosen next tokens [B] and the cache."""
    next_tokens, (k, v) = ar_next(model, policy, params, cache, pending, streams)
    return next_tokens, cache.commit(k, v, jnp.ones_like(cache.length))


def make_ar_step(config: ModelConfig, policy: Sampler = GREEDY) -> Callable:
    """Jitted AR step `(params, cache, pending, streams) -> (next, cache)` with the cache donated."""
    model = LlamaModel(config)
    return jax.jit(functools.partial(ar_step, model, policy), donate_argnums=(1,))


@flax.struct.dataclass
class GenerationState:
    """Carry of the on-device generation loop.

    Attributes:
      cache: committed tokens except each row's pending one.
      pending: [B] the newest committed token, fed first by the next step.
      streams: [B, 2] int32 (seed, prompt index in the caller's input) of each row: its noise key.
      output: [B, max_new + R] generated ids; row b's first num_generated[b] are final.
      num_generated: [B] int32.
      done: [B] bool, the row hit EOS or max_new_tokens; finished rows never change again.
      row_steps: [B] int32, steps in which the row was still generating.
      steps: [] int32, steps taken by the loop.
      extra: method-specific carry (BiTA: drafts and acceptance counters).
    """

    cache: KVCache
    pending: jax.Array
    streams: jax.Array
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
    streams: jax.Array,
    max_new_tokens: int,
    step_rows: int,
    extra: Any = None,
) -> GenerationState:
    """Prefills the cache and builds the loop carry; the last prompt token is pending."""
    batch = tokens.shape[0]
    max_len = cache_length(tokens.shape[1], max_new_tokens, step_rows)
    cache = prefill(model, params, tokens, prompt_lens, KVCache.init(model.config, batch, max_len))
    pending = jnp.take_along_axis(tokens, (prompt_lens - 1)[:, None], axis=1)[:, 0]
    zeros = jnp.zeros((batch,), jnp.int32)
    return GenerationState(
        cache=cache,
        pending=pending,
        streams=streams,
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


def ar_loop_step(model: LlamaModel, policy: Sampler, params, max_new_tokens: int, state: GenerationState):
    """One AR step of the generation loop: choose, record, commit the pending token if running."""
    next_tokens, (k, v) = ar_next(model, policy, params, state.cache, state.pending, state.streams)
    state, keep = record_tokens(
        state, next_tokens[:, None], jnp.ones_like(state.num_generated), max_new_tokens,
        model.config.eos_token_ids,
    )  # fmt: skip
    # Finished rows commit nothing, so their cache never outgrows its headroom.
    return state.replace(
        cache=state.cache.commit(k, v, keep),
        pending=jnp.where(keep > 0, next_tokens, state.pending),
    )


def make_ar_generate(config: ModelConfig, max_new_tokens: int, policy: Sampler = GREEDY) -> Callable:
    """Jitted `(params, tokens [B, T], prompt_lens [B], streams [B, 2]) -> GenerationState`:
    prefill + AR loop."""
    model = LlamaModel(config)

    def generate(params, tokens, prompt_lens, streams):
        state = initial_state(model, params, tokens, prompt_lens, streams, max_new_tokens, 1)
        step = functools.partial(ar_loop_step, model, policy, params, max_new_tokens)
        return run_loop(state, step, max_new_tokens)

    return jax.jit(generate)


@flax.struct.dataclass
class BiTACarry:
    """BiTA's extra loop carry.

    Attributes:
      drafts: [B, Dm, R] the draft tree's mask tokens for the next step.
      accepted_per_level: [B, Dt] int32, steps in which draft level m was accepted and kept.
      accepted_lookup: [B] int32, kept drafts accepted through the lookup chain.
      prompt: [B, T] the prompts and prompt_lens [B] their lengths: with the generated tokens,
        the history prompt lookup searches.
    """

    drafts: jax.Array
    accepted_per_level: jax.Array
    accepted_lookup: jax.Array
    prompt: jax.Array
    prompt_lens: jax.Array

    @classmethod
    def initial(
        cls, tree: DraftTree, tokens: jax.Array, prompt_lens: jax.Array, vocab_size: int
    ) -> "BiTACarry":
        batch = tokens.shape[0]
        return cls(
            drafts=placeholder_drafts(tree, batch, vocab_size),
            accepted_per_level=jnp.zeros((batch, tree.depth), jnp.int32),
            accepted_lookup=jnp.zeros((batch,), jnp.int32),
            prompt=tokens,
            prompt_lens=prompt_lens,
        )


def bita_loop_step(
    model: LlamaModel,
    tree: DraftTree,
    policy,
    params,
    adapter,
    max_new_tokens: int,
    state: GenerationState,
) -> GenerationState:
    """One tree step of the generation loop: look up, verify, record, commit the accepted rows, redraft."""
    proposals = None
    if tree.lookup:
        carry = state.extra
        history = lookup.history(carry.prompt, carry.prompt_lens, state.output, state.num_generated)
        proposals = lookup.propose(*history, tree.lookup, model.config.vocab_size)
    step = tree_step(
        model, tree, policy, params, adapter, state.cache, state.pending, state.extra.drafts,
        state.streams, proposals,
    )  # fmt: skip
    state, keep = record_tokens(
        state, step.new_tokens, step.accepted + 1, max_new_tokens, model.config.eos_token_ids
    )
    running = keep > 0  # finished rows stay frozen, as in the AR loop
    levels = jnp.arange(tree.depth)[None, :]
    counted = (levels < step.accepted[:, None]) & (levels < keep[:, None])
    from_lookup = jnp.asarray(np.concatenate([[False], tree.is_lookup]))[step.stop]  # [B]
    extra = state.extra.replace(
        drafts=jnp.where(running[:, None, None], step.drafts, state.extra.drafts),
        accepted_per_level=state.extra.accepted_per_level + counted.astype(jnp.int32),
        accepted_lookup=state.extra.accepted_lookup + jnp.where(from_lookup, counted.sum(axis=1), 0),
    )
    return state.replace(
        cache=state.cache.commit(step.commit_k, step.commit_v, jnp.where(running, step.accepted + 1, 0)),
        pending=jnp.where(running, step.bonus, state.pending),
        extra=extra,
    )


def make_bita_generate(
    config: ModelConfig, tree: DraftTree, max_new_tokens: int, policy: Sampler = GREEDY
) -> Callable:
    """Jitted `((params, adapter), tokens [B, T], prompt_lens [B], streams [B, 2]) -> GenerationState`.

    Prefill, then tree steps in one on-device loop; `state.steps` counts tree steps and
    `state.extra` is a BiTACarry with per-level acceptance counts.
    """
    model = LlamaModel(config)

    def generate(weights, tokens, prompt_lens, streams):
        params, adapter = weights
        extra = BiTACarry.initial(tree, tokens, prompt_lens, config.vocab_size)
        state = initial_state(
            model, params, tokens, prompt_lens, streams, max_new_tokens, tree.step_rows, extra
        )
        step = functools.partial(bita_loop_step, model, tree, policy, params, adapter, max_new_tokens)
        return run_loop(state, step, max_new_tokens)

    return jax.jit(generate)


def bita_step(
    model: LlamaModel,
    tree: DraftTree,
    policy: Sampler,
    params,
    adapter,
    cache: KVCache,
    pending: jax.Array,
    drafts: jax.Array,
    streams: jax.Array,
) -> tuple[TreeStepResult, KVCache]:
    """One tree step that commits its accepted rows.

    Args: as `tree_step` (pending [B], drafts [B, Dm, R], streams [B, 2]).

    Returns:
      The TreeStepResult and the cache with each row b's accepted[b] + 1 new keys/values committed.
    """
    result = tree_step(model, tree, policy, params, adapter, cache, pending, drafts, streams)
    return result, cache.commit(result.commit_k, result.commit_v, result.accepted + 1)


def make_bita_step(config: ModelConfig, tree: DraftTree, policy: Sampler = GREEDY) -> Callable:
    """Jitted `bita_step`: `(params, adapter, cache, pending, drafts, streams) -> (TreeStepResult,
    cache)` with the cache donated, so the accepted rows are written in place, as `make_ar_step`
    writes its row."""
    model = LlamaModel(config)
    return jax.jit(functools.partial(bita_step, model, tree, policy), donate_argnums=(2,))
