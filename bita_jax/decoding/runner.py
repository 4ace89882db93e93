"""The host side of decoding: batching and padding, compiling once per shape, and timing.

A runner takes a jitted generate function of decoding/loop.py (`(weights, tokens, prompt_lens,
streams) -> GenerationState`), compiles it ahead of time for every (batch, bucket) shape the
prompts need, then runs the batches and times them with compiles excluded.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np

from bita_jax.config import ModelConfig
from bita_jax.decoding.loop import GenerationState
from bita_jax.decoding.sampling import streams_for
from bita_jax.errors import ConfigError, PromptError

MIN_BUCKET = 16


@dataclasses.dataclass
class Generation:
    """One prompt's result on the host: its new tokens, decoding steps, and its own wall time (the
    engine: from its insert to the end of the chunk that finished it; `generate`: its batch's)."""

    output_ids: list[int]
    steps: int
    seconds: float


def prompt_bucket(length: int) -> int:
    """Padded prompt length: the next power of two (at least MIN_BUCKET), so few compiles serve all."""
    return max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())


def check_lengths(config: ModelConfig, prompt_lens: list[int], budgets: list[int]) -> None:
    """Refuses, before any compile, prompts that cannot fit the model's positions with their
    max_new_tokens (`budgets`, one per prompt).

    Raises:
      ConfigError: a budget below 1. PromptError: naming the first prompt without tokens or too long.
    """
    for index, (length, budget) in enumerate(zip(prompt_lens, budgets, strict=True)):
        if budget < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {budget}")
        if length < 1:
            raise PromptError(index, "is empty: at least one token is needed")
        if length + budget > config.max_position_embeddings:
            raise PromptError(
                index,
                f"has {length} tokens: with max_new_tokens={budget} that exceeds the model's "
                f"{config.max_position_embeddings} positions",
            )


def pad_batch(
    prompts: list[list[int]], first_index: int, batch_size: int, pad_id: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pads up to batch_size prompts to their bucket; missing rows repeat the last prompt.

    Returns tokens [B, T], prompt lengths [B] and streams [B, 2]: each row's (seed, prompt index
    in the whole input), the index starting at first_index for the first prompt.
    """
    rows = prompts + [prompts[-1]] * (batch_size - len(prompts))
    bucket = prompt_bucket(max(len(p) for p in rows))
    tokens = np.full((batch_size, bucket), pad_id, np.int32)
    for i, p in enumerate(rows):
        tokens[i, : len(p)] = p
    streams = streams_for(seed, first_index + np.minimum(np.arange(batch_size), len(prompts) - 1))
    return tokens, np.asarray([len(p) for p in rows], np.int32), streams


def batches(prompts: list[list[int]], batch_size: int, pad_id: int, seed: int, first_index: int):
    """(number of real prompts, tokens, prompt_lens, streams) per batch, in input order; prompts[0]
    is prompt first_index of the whole input."""
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        yield len(chunk), *pad_batch(chunk, first_index + start, batch_size, pad_id, seed)


class CompiledByShape:
    """Compiles a jitted function ahead of time once per input shape and records compile time.

    Calling it runs the compiled executable, so timings taken around calls exclude compiles as
    long as `prepare` was called for the shape first.
    """

    def __init__(self, jitted: Callable):
        self.jitted = jitted
        self.executables: dict[Any, Any] = {}
        self.compile_seconds = 0.0

    @staticmethod
    def _key(args) -> Any:
        return tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args))

    def prepare(self, *args) -> None:
        key = self._key(args)
        if key not in self.executables:
            t0 = time.perf_counter()
            self.executables[key] = self.jitted.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - t0

    def __call__(self, *args):
        self.prepare(*args)
        return self.executables[self._key(args)](*args)


def generate(
    compiled: CompiledByShape,
    weights,
    prompts: list[list[int]],
    batch_size: int,
    pad_id: int,
    seed: int = 0,
    on_batch: Callable[[GenerationState, list[Generation]], None] | None = None,
    first_index: int = 0,
) -> tuple[list[Generation], float]:
    """Compiles every (batch, bucket) shape first, then runs the prompts in batches.

    Returns one Generation per prompt (in input order; `seconds` is its batch's wall time) and the
    decoding seconds of all batches, compiles excluded. `on_batch` gets each finished batch's state
    and its prompts' Generations, in input order.
    """
    for _, tokens, lens, streams in batches(prompts, batch_size, pad_id, seed, first_index):
        compiled.prepare(weights, tokens, lens, streams)
    results: list[Generation] = []
    total = 0.0
    for count, tokens, lens, streams in batches(prompts, batch_size, pad_id, seed, first_index):
        t0 = time.perf_counter()
        state = jax.block_until_ready(compiled(weights, tokens, lens, streams))
        seconds = time.perf_counter() - t0
        total += seconds
        out, num, row_steps = jax.device_get((state.output, state.num_generated, state.row_steps))
        batch = [
            Generation(out[i, : num[i]].tolist(), int(row_steps[i]), seconds) for i in range(count)
        ]
        results += batch
        if on_batch is not None:
            on_batch(state, batch)
    return results, total
