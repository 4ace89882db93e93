"""Host-side plumbing around generation: prompt files, ahead-of-time compiles, result records.

Nothing here is jitted; `decoding.py` owns the device-side sequencing. decode.py (and the
benchmarks) use these helpers so the CLI stays thin.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from bita_jax.cli import UserError
from bita_jax.decoding import Generation, generate_batches, pad_batch


def read_prompts(path: str) -> list[str]:
    """Prompts from a jsonl file whose lines are objects with a string "prompt"; blank lines skipped."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"prompts file not found: {path}") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f'{path} line {number}: expected an object with a string "prompt"')
        prompts.append(record["prompt"])
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


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

    def prepare_batches(self, params, prompts: list[list[int]], batch_size: int, pad_id: int) -> None:
        """Compiles every (batch, bucket) shape that `decoding.generate_batches` will meet."""
        for start in range(0, len(prompts), batch_size):
            tokens, lens = pad_batch(prompts[start : start + batch_size], batch_size, pad_id)
            self.prepare(params, tokens, lens)


def compile_and_generate(
    jitted: Callable,
    params,
    prompt_ids: list[list[int]],
    batch_size: int,
    pad_id: int,
    on_batch: Callable | None = None,
) -> tuple[list[Generation], float, float]:
    """Compiles every (batch, bucket) shape first, then runs `decoding.generate_batches`.

    Returns (generations, decoding seconds for all prompts, compile seconds).
    """
    compiled = CompiledByShape(jitted)
    compiled.prepare_batches(params, prompt_ids, batch_size, pad_id)
    t0 = time.perf_counter()
    generations = generate_batches(compiled, params, prompt_ids, batch_size, pad_id, on_batch)
    return generations, time.perf_counter() - t0, compiled.compile_seconds


@dataclasses.dataclass
class RunSummary:
    """Totals of one decode run, for the human summary line."""

    prompts: int
    new_tokens: int
    steps: int
    seconds: float
    compile_seconds: float

    def __str__(self) -> str:
        rate = self.new_tokens / self.seconds if self.seconds > 0 else float("nan")
        return (
            f"{self.prompts} prompts, {self.new_tokens} new tokens in {self.steps} steps, "
            f"{self.seconds:.2f} s decoding ({rate:.1f} tokens/s), compile {self.compile_seconds:.1f} s"
        )


def result_records(
    tokenizer, texts: list[str], prompt_ids: list[list[int]], generations: list[Generation]
) -> list[dict[str, Any]]:
    """One output record per prompt, in input order."""
    return [
        {
            "prompt": text,
            "completion": tokenizer.decode(gen.output_ids, skip_special_tokens=True),
            "prompt_ids": ids,
            "output_ids": gen.output_ids,
            "new_tokens": len(gen.output_ids),
            "steps": gen.steps,
            "seconds": round(gen.seconds, 6),
        }
        for text, ids, gen in zip(texts, prompt_ids, generations, strict=True)
    ]


def summarize(generations: list[Generation], compile_seconds: float) -> RunSummary:
    return RunSummary(
        prompts=len(generations),
        new_tokens=sum(len(g.output_ids) for g in generations),
        steps=sum(g.steps for g in generations),
        seconds=sum(g.seconds for g in generations),
        compile_seconds=compile_seconds,
    )


def write_jsonl(records: list[dict[str, Any]], path: str | None = None) -> None:
    """Writes one JSON object per line to path, or to stdout when path is None."""
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if path is None:
        sys.stdout.write(lines)
    else:
        with open(path, "w") as f:
            f.write(lines)


def acceptance_report(generations: list[Generation], accepted_per_level: np.ndarray) -> str:
    """BiTA's per-run acceptance: tokens per tree step and the acceptance rate of each draft level.

    Args:
      accepted_per_level: [prompts, Dt] steps in which draft level m was accepted (and kept).
    """
    tokens = sum(len(g.output_ids) for g in generations)
    steps = sum(g.steps for g in generations)
    seconds = sum(g.seconds for g in generations)
    rates = accepted_per_level.sum(axis=0) / max(steps, 1)
    levels = ", ".join(f"{m + 1}: {100 * r:.1f}%" for m, r in enumerate(rates))
    return (
        f"tokens per step {tokens / max(steps, 1):.2f} (accepted drafts + bonus), "
        f"acceptance per draft level (share of steps) {levels}, "
        f"{tokens / seconds if seconds > 0 else float('nan'):.1f} tokens/s"
    )


def comparison_report(bita: list[Generation], ar: list[Generation]) -> str:
    """Speedup of BiTA over AR on the same prompts and whether every output is identical."""
    differ = [i for i, (b, a) in enumerate(zip(bita, ar, strict=True)) if b.output_ids != a.output_ids]
    bita_s, ar_s = sum(g.seconds for g in bita), sum(g.seconds for g in ar)
    same = "identical outputs: yes" if not differ else f"identical outputs: NO (prompts {differ})"
    speedup = ar_s / bita_s if bita_s > 0 else float("nan")
    return f"compare: AR {ar_s:.2f} s, BiTA {bita_s:.2f} s, speedup {speedup:.2f}x, {same}"
