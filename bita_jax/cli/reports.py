"""Human-readable reports of a decode run: totals, BiTA acceptance, the comparison with AR (timed as
the faster of two identical runs)."""

from __future__ import annotations

import dataclasses

import numpy as np

from bita_jax import api
from bita_jax.decoding.runner import Generation


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


def summarize(generations: list[Generation], compile_seconds: float) -> RunSummary:
    return RunSummary(
        prompts=len(generations),
        new_tokens=sum(len(g.output_ids) for g in generations),
        steps=sum(g.steps for g in generations),
        seconds=sum(g.seconds for g in generations),
        compile_seconds=compile_seconds,
    )


def acceptance_report(
    generations: list[Generation], accepted_per_level: np.ndarray, accepted_lookup: np.ndarray | None = None
) -> str:
    """BiTA's per-run acceptance: tokens per tree step and the acceptance rate of each draft level
    (and the share of accepted drafts the lookup chain proposed, when it has some).

    Args:
      accepted_per_level: [prompts, Dt] steps in which draft level m was accepted (and kept).
      accepted_lookup: [prompts] drafts accepted through the lookup chain.
    """
    tokens = sum(len(g.output_ids) for g in generations)
    steps = sum(g.steps for g in generations)
    seconds = sum(g.seconds for g in generations)
    rates = accepted_per_level.sum(axis=0) / max(steps, 1)
    levels = ", ".join(f"{m + 1}: {100 * r:.1f}%" for m, r in enumerate(rates))
    if accepted_lookup is not None and accepted_lookup.sum():
        share = accepted_lookup.sum() / max(accepted_per_level.sum(), 1)
        levels += f"; {100 * share:.1f}% of accepted drafts from prompt lookup"
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


def fastest_of_two(model: api.Model, texts: list[str], first: api.Run, **options) -> api.Run:
    """The faster of `first` and a second identical run. On CPU the first run of each compiled
    loop is up to 2x slower (cold executables and caches), which would skew a comparison."""
    again = model.run(texts, **options)
    return again if again.seconds < first.seconds else first
