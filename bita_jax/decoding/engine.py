"""The slot engine: continuous batching for AR and BiTA decoding, with tokens streamed per chunk.

The device holds B decode slots (`SlotState`: the loop carry of decoding/loop.py plus a budget per
slot). Two jitted functions, both donating the state, do all device work:

- `insert` prefills n prompts and writes them into n chosen slots (slot index B pads n up to a
  compiled size; its writes are dropped). It resets the slots' counters and drafts to today's
  first-step values, so a prompt's steps are exactly those of `loop.make_*_generate`.
- `chunk` runs up to `num_steps` steps of loop.py's AR or tree step, and returns early when a slot
  finishes while prompts wait (both arguments traced: one compile serves every chunk).

The host loop (`Engine.events`) refills free slots, runs a chunk, and reports each prompt's new
tokens and, when it is finished, its Generation. A prompt's tokens depend only on its own row
(cache, pending token, drafts and the noise key (seed, prompt index, position)), never on its slot,
its neighbours or when it arrived.

Static batching runs on the same engine: it refills only when every slot is free, B prompts at a
time in input order, which is what a static batch does (it waits for its slowest row).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Iterator

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bita_jax.bita.tree import DraftTree
from bita_jax.config import ModelConfig
from bita_jax.decoding import loop
from bita_jax.decoding.cache import CACHE_AXES, KVCache
from bita_jax.decoding.runner import Generation, pad_batch, prompt_bucket
from bita_jax.decoding.sampling import GREEDY, Sampler
from bita_jax.models.llama import LlamaModel, causal_mask, forward

BATCHING = ("continuous", "static")
CHUNK_STEPS = 16  # steps per host sync; a chunk also ends early when a slot frees while prompts wait


@flax.struct.dataclass
class SlotState:
    """The engine's donated device state.

    Attributes:
      gen: loop.GenerationState of B slots. `done` marks free and finished slots (they never change
        until an insert); `streams[:, 1]` is each slot's prompt index; `output` [B, M + R] holds
        each slot's first num_generated tokens.
      budget: [B] int32, each slot's max_new_tokens.
    """

    gen: loop.GenerationState
    budget: jax.Array


def no_eos(config: ModelConfig) -> ModelConfig:
    """The config with EOS switched off (id -1 is never chosen), for fixed-length benchmarks."""
    return dataclasses.replace(config, eos_token_ids=(-1,), pad_token_id=config.pad_id)


def empty_state(
    config: ModelConfig, tree: DraftTree | None, slots: int, max_len: int, max_new: int, prompt_len: int
):
    """A SlotState of `slots` free slots with `max_len` cache slots, room for max_new tokens and,
    for prompt lookup, prompts of up to `prompt_len` tokens."""
    rows = 1 if tree is None else tree.step_rows
    cache = KVCache.init(config, slots, max_len)
    cache = cache.replace(
        k=nn.with_logical_constraint(cache.k, CACHE_AXES), v=nn.with_logical_constraint(cache.v, CACHE_AXES)
    )
    zeros = jnp.zeros((slots,), jnp.int32)
    gen = loop.GenerationState(
        cache=cache,
        pending=zeros,
        streams=jnp.zeros((slots, 2), jnp.int32),
        output=jnp.full((slots, max_new + rows), config.pad_id, jnp.int32),
        num_generated=zeros,
        done=jnp.ones((slots,), bool),
        row_steps=zeros,
        steps=jnp.zeros((), jnp.int32),
        extra=None if tree is None else loop.BiTACarry.initial(
            tree, jnp.full((slots, prompt_len), config.pad_id, jnp.int32), zeros + 1, config.vocab_size
        ),
    )
    return SlotState(gen=gen, budget=zeros)


def insert(
    model: LlamaModel,
    tree: DraftTree | None,
    state: SlotState,
    params,
    tokens: jax.Array,
    prompt_lens: jax.Array,
    streams: jax.Array,
    budgets: jax.Array,
    slots: jax.Array,
) -> SlotState:
    """Prefills n prompts and writes them into `slots`, ready for their first step.

    Args:
      tokens: [n, T] right-padded prompts (T <= the cache length).
      prompt_lens: [n] int32 true lengths (>= 1).
      streams: [n, 2] int32 (seed, prompt index).
      budgets: [n] int32 max_new_tokens per prompt.
      slots: [n] int32 target slots; B (out of range) for padding rows, whose writes are dropped.

    Returns:
      The state with each slot's cache rows [0, T) holding its prompt's keys/values, length
      prompt_len - 1, the last prompt token pending, counters zero and placeholder drafts. Keys and
      values past the length are stale but finite and masked, as in any cache row.
    """
    count, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (count, length))
    _, (k, v) = forward(model, params, tokens, positions, causal_mask(count, length))  # [L, n, T, K, H]
    gen = state.gen
    cache = gen.cache

    def put(buf, rows):
        out = buf.at[:, slots, :length].set(rows.astype(buf.dtype), mode="drop")
        return nn.with_logical_constraint(out, CACHE_AXES)

    def set_rows(full, new):
        return full.at[slots].set(new.astype(full.dtype), mode="drop")

    zeros = jnp.zeros((count,), jnp.int32)
    extra = gen.extra
    if tree is not None:  # placeholder drafts: the first step accepts nothing, as today's first step
        fresh = loop.BiTACarry.initial(tree, tokens, prompt_lens, model.config.vocab_size)
        extra = extra.replace(
            drafts=set_rows(extra.drafts, fresh.drafts),
            accepted_per_level=set_rows(extra.accepted_per_level, fresh.accepted_per_level),
            accepted_lookup=set_rows(extra.accepted_lookup, fresh.accepted_lookup),
            prompt=extra.prompt.at[slots, :length].set(tokens, mode="drop"),  # prompt lookup's history
            prompt_lens=set_rows(extra.prompt_lens, prompt_lens),
        )
    gen = gen.replace(
        cache=KVCache(k=put(cache.k, k), v=put(cache.v, v), length=set_rows(cache.length, prompt_lens - 1)),
        pending=set_rows(gen.pending, jnp.take_along_axis(tokens, (prompt_lens - 1)[:, None], axis=1)[:, 0]),
        streams=set_rows(gen.streams, streams),
        num_generated=set_rows(gen.num_generated, zeros),
        done=set_rows(gen.done, jnp.zeros((count,), bool)),
        row_steps=set_rows(gen.row_steps, zeros),
        extra=extra,
    )
    return SlotState(gen=gen, budget=set_rows(state.budget, budgets))


def chunk(
    model: LlamaModel,
    tree: DraftTree | None,
    policy: Sampler,
    state: SlotState,
    weights,
    num_steps: jax.Array,
    waiting: jax.Array,
) -> SlotState:
    """Runs up to num_steps [] steps on every slot; stops early when all slots are done, or when a
    slot finishes while prompts wait (waiting [] bool) so the host can refill it.

    `state.gen.steps` counts the steps taken (all chunks together).
    """
    if tree is None:
        step = functools.partial(loop.ar_loop_step, model, policy, weights)
    else:
        params, adapter = weights
        step = functools.partial(loop.bita_loop_step, model, tree, policy, params, adapter)
    done_at_start = state.gen.done
    start = state.gen.steps

    def cond(s: SlotState):
        freed = s.gen.done & ~done_at_start
        return (s.gen.steps - start < num_steps) & ~s.gen.done.all() & ~(waiting & freed.any())

    def body(s: SlotState):
        return s.replace(gen=step(s.budget, s.gen))

    return jax.lax.while_loop(cond, body, state)


@dataclasses.dataclass
class Event:
    """New tokens of one prompt after a chunk.

    Attributes:
      index: the prompt's position in the engine's input.
      token_ids: tokens committed since the last event (cut at EOS and the prompt's budget).
      generation: set when the prompt is finished (its whole output, steps and seconds).
      accepted_per_level: tree steps, finished prompts: [Dt] steps in which draft level m was accepted.
      accepted_lookup: tree steps, finished prompts: drafts accepted through the lookup chain.
    """

    index: int
    token_ids: list[int]
    generation: Generation | None = None
    accepted_per_level: np.ndarray | None = None
    accepted_lookup: int | None = None


@dataclasses.dataclass
class EngineStats:
    """Totals of one engine run (compiles excluded).

    Attributes:
      seconds: wall time of the run. device_seconds: spent waiting on inserts and chunks.
      steps: decode steps; slot_steps: steps summed over slots that were generating.
      first_token_seconds: per prompt (input order), from the run's start to its first token.
      recompiles: compiles during the run, after warm-up (0 expected).
    """

    slots: int
    seconds: float = 0.0
    device_seconds: float = 0.0
    steps: int = 0
    slot_steps: int = 0
    chunks: int = 0
    inserts: int = 0
    first_token_seconds: list[float] = dataclasses.field(default_factory=list)
    recompiles: int = 0

    @property
    def utilisation(self) -> float:
        """Share of slot-steps that produced tokens for a prompt still generating."""
        return self.slot_steps / max(self.steps * self.slots, 1)

    @property
    def host_share(self) -> float:
        """Share of the run's wall time the device was not busy (host work between calls)."""
        return 1 - self.device_seconds / self.seconds if self.seconds > 0 else 0.0


class Engine:
    """B decode slots of one model, tree and policy: one compiled chunk, one insert per prompt bucket.

    Args:
      config: the model's config (use `no_eos(config)` to ignore EOS).
      tree: the draft tree for BiTA, None for AR.
      slots: B. max_len: cache slots S per slot. max_new: the largest budget M the output holds.
      max_prompt: the largest prompt bucket T an insert takes (prompt lookup keeps [B, T] prompts).
    """

    def __init__(
        self,
        config: ModelConfig,
        tree: DraftTree | None,
        policy: Sampler = GREEDY,
        *,
        slots: int,
        max_len: int,
        max_new: int,
        max_prompt: int,
        chunk_steps: int = CHUNK_STEPS,
    ):
        model = LlamaModel(config)
        self.config, self.tree, self.slots, self.chunk_steps = config, tree, slots, chunk_steps
        self.max_len, self.max_new, self.max_prompt = max_len, max_new, max_prompt
        self._empty = jax.jit(lambda: empty_state(config, tree, slots, max_len, max_new, max_prompt))
        # Plain jit (not ahead-of-time executables): under a mesh the state's shardings are the
        # compiler's choice, and a call with other shardings recompiles (and is counted) instead
        # of failing.
        self._insert = jax.jit(functools.partial(insert, model, tree), donate_argnums=(0,))
        self._chunk = jax.jit(functools.partial(chunk, model, tree, policy), donate_argnums=(0,))
        self.compile_seconds = 0.0  # of the warm-ups that compiled something

    @property
    def compiles(self) -> int:
        """Programs compiled so far (inserts and chunks)."""
        return self._insert._cache_size() + self._chunk._cache_size()

    def _params(self, weights):
        """The base params of the weights (AR: params; BiTA: (params, adapter))."""
        return weights if self.tree is None else weights[0]

    def _insert_args(self, prompts, budgets, indices, seed, slots, size=None):
        """insert's arrays for prompts into slots; `size` rows at the prompts' bucket, the
        missing ones repeating the last prompt into slot B (dropped)."""
        size = size or len(prompts)
        tokens, lens, streams = pad_batch(prompts, 0, size, self.config.pad_id, seed)
        streams[:, 1] = (indices + indices[-1:] * size)[:size]
        slots = np.asarray(slots + [self.slots] * (size - len(slots)), np.int32)  # out of range: dropped
        return tokens, lens, streams, np.asarray((budgets + budgets[-1:] * size)[:size], np.int32), slots

    def warm_up(self, weights, buckets) -> SlotState:
        """Compiles insert for every prompt bucket and the chunk by running them on a fresh empty
        state (an insert into slot B and a chunk of 0 steps change nothing); returns the state."""
        t0, compiles = time.perf_counter(), self.compiles
        state = self._empty()
        buckets = sorted(set(buckets))
        for bucket in buckets + buckets[:1]:  # insert on an empty state and on a chunk's output
            args = self._insert_args([[0] * bucket], [1], [0], 0, [self.slots])
            state = self._insert(state, self._params(weights), *args)
            state = self._chunk(state, weights, np.int32(0), np.bool_(False))
        state = jax.block_until_ready(state)
        if self.compiles > compiles:
            self.compile_seconds += time.perf_counter() - t0
        return state

    def events(
        self,
        weights,
        prompts: list[list[int]],
        budgets: list[int],
        indices: list[int],
        seed: int = 0,
        batching: str = "continuous",
        stats: EngineStats | None = None,
    ) -> Iterator[list[Event]]:
        """Decodes prompts, yielding each chunk's events (prompts that got tokens, in slot order).

        Args:
          prompts: token ids per prompt, decoded in this order; each prompt's bucket plus its
            budget and two steps' rows fit max_len, and its budget fits max_new.
          budgets: max_new_tokens per prompt.
          indices: each prompt's index in the user's input: with the seed, its noise key.
          batching: "continuous" refills a slot as soon as it frees; "static" refills only when
            all slots are free.
          stats: filled in as the run goes (compiles happen before its clock starts).
        """
        stats = stats if stats is not None else EngineStats(self.slots)
        state = self.warm_up(weights, [prompt_bucket(len(p)) for p in prompts])
        compiles = self.compiles
        queue = collections.deque(range(len(prompts)))
        holder: list[int | None] = [None] * self.slots  # prompt in each slot
        seen = [0] * self.slots  # tokens already reported per slot
        admitted = [0.0] * len(prompts)  # when each prompt's insert began
        stats.first_token_seconds = [0.0] * len(prompts)
        start = time.perf_counter()
        while queue or any(h is not None for h in holder):
            free = [b for b, h in enumerate(holder) if h is None]
            if queue and free and (batching == "continuous" or len(free) == self.slots):
                # One prompt per insert, prefilled at its own bucket: its keys and values are then a
                # function of the prompt alone (a prefill's rounding may depend on its batch shape).
                t0 = time.perf_counter()
                for slot in free[: len(queue)]:
                    i = queue.popleft()
                    admitted[i] = time.perf_counter()
                    args = self._insert_args([prompts[i]], [budgets[i]], [indices[i]], seed, [slot])
                    state = self._insert(state, self._params(weights), *args)
                    holder[slot], seen[slot] = i, 0
                    stats.inserts += 1
                state = jax.block_until_ready(state)
                stats.device_seconds += time.perf_counter() - t0
            waiting = bool(queue) and batching == "continuous"
            t0 = time.perf_counter()
            state = self._chunk(state, weights, np.int32(self.chunk_steps), np.bool_(waiting))
            gen = state.gen
            fetched = [gen.output, gen.num_generated, gen.done, gen.row_steps, gen.steps]
            if self.tree is not None:
                fetched += [gen.extra.accepted_per_level, gen.extra.accepted_lookup]
            output, num, done, row_steps, steps, *counts = jax.device_get(fetched)
            now = time.perf_counter()
            stats.device_seconds += now - t0
            stats.chunks += 1
            stats.steps = int(steps)
            active = [b for b, h in enumerate(holder) if h is not None]
            events = []
            for b in active:
                i = holder[b]
                new = output[b, seen[b] : num[b]].tolist()
                if new and seen[b] == 0:
                    stats.first_token_seconds[i] = now - start
                seen[b] = int(num[b])
                event = Event(i, new)
                if done[b]:
                    ids = output[b, : num[b]].tolist()
                    event.generation = Generation(ids, int(row_steps[b]), now - admitted[i])
                    stats.slot_steps += int(row_steps[b])
                    if counts:
                        event.accepted_per_level = counts[0][b].copy()
                        event.accepted_lookup = int(counts[1][b])
                    holder[b] = None
                if new or event.generation is not None:
                    events.append(event)
            stats.seconds = now - start
            stats.recompiles = self.compiles - compiles
            yield events
