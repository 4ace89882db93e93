"""Human-readable reports of a decode run: totals, BiTA acceptance, the comparison with AR (timed as
the faster of two identical runs)."""

from __future__ import annotations

import dataclasses

from bita_jax import api


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


def summarize(run: api.Run) -> RunSummary:
    """The run's totals; its seconds are the run's wall time (prompts decoded together overlap)."""
    return RunSummary(
        prompts=len(run.generations),
        new_tokens=sum(len(g.output_ids) for g in run.generations),
        steps=sum(g.steps for g in run.generations),
        seconds=run.seconds,
        compile_seconds=run.compile_seconds,
    )


def acceptance_report(run: api.Run) -> str:
    """BiTA's per-run acceptance: tokens per tree step and the acceptance rate of each draft level
    (and the share of accepted drafts the lookup chain proposed, when it has some), from the run's
    accepted_per_level [prompts, Dt] (steps in which draft level m was accepted and kept) and
    accepted_lookup [prompts] (drafts accepted through the lookup chain)."""
    accepted_per_level, accepted_lookup = run.accepted_per_level, run.accepted_lookup
    tokens = sum(len(g.output_ids) for g in run.generations)
    steps = sum(g.steps for g in run.generations)
    seconds = run.seconds
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


def comparison_report(bita: api.Run, ar: api.Run) -> str:
    """Speedup of BiTA over AR on the same prompts (the runs' wall times) and whether every output
    is identical."""
    pairs = zip(bita.generations, ar.generations, strict=True)
    differ = [i for i, (b, a) in enumerate(pairs) if b.output_ids != a.output_ids]
    bita_s, ar_s = bita.seconds, ar.seconds
    same = "identical outputs: yes" if not differ else f"identical outputs: NO (prompts {differ})"
    speedup = ar_s / bita_s if bita_s > 0 else float("nan")
    return f"compare: AR {ar_s:.2f} s, BiTA {bita_s:.2f} s, speedup {speedup:.2f}x, {same}"


def fastest_of_two(model: api.Model, texts: list[str], first: api.Run, **options) -> api.Run:
    """The faster of `first` and a second identical run. On CPU the first run of each compiled
    loop is up to 2x slower (cold executables and caches), which would skew a comparison."""
    again = model.run(texts, **options)
    return again if again.seconds < first.seconds else first
