"""`python decode.py` with no arguments: the packaged demo, BiTA with `--tree auto` against AR.

Decodes the demo prompts with the tree auto picks for this device (trees.json ships the demo
adapter's statistics and its CPU choice), and with AR; when auto decodes AR here, also with the
best tree it turned down, so the summary can show what BiTA does and why it does not pay here.
Prints the completions (compact), then the summary as the last lines.
"""

from __future__ import annotations

import sys

import jax
from tqdm import tqdm

from bita_jax import api, demo
from bita_jax.cli.reports import fastest_of_two
from bita_jax.io.prompts import read_prompts
from bita_jax.tuning.auto import AUTO, AutoTree

MAX_NEW_TOKENS = 128
CPU_NOTE = (
    "why little on a CPU: a CPU is compute-bound, so every row the tree step adds (each node brings "
    "1 + depth rows) costs time, while an accelerator at small batch is memory-bound and the rows are "
    "nearly free; see docs/performance.md for the accelerator figures"
)


def rate(run: api.Run) -> tuple[float, float]:
    """(tokens per step, tokens/s) of a run."""
    tokens = sum(len(g.output_ids) for g in run.generations)
    return tokens / max(sum(g.steps for g in run.generations), 1), tokens / run.seconds


def summary(auto: AutoTree, auto_run: api.Run, ar_run: api.Run, tree_run: api.Run | None) -> list[str]:
    """The demo's last lines: identical outputs, tokens per step, auto's choice and why (predicted
    vs measured), the measured speedup, and on a CPU why it gains little."""
    bita_run = auto_run if auto_run.mode == "bita" else tree_run
    ar_tps = rate(ar_run)[1]
    lines = []
    if bita_run is not None:
        same = all(
            b.output_ids == a.output_ids
            for b, a in zip(bita_run.generations, ar_run.generations, strict=True)
        )
        tau, tps = rate(bita_run)
        lines.append(f"identical outputs (BiTA vs AR): {'yes' if same else 'NO'}")
        lines.append(f"tokens per step: {tau:.2f} with BiTA ({bita_run.tree.describe()}), 1.00 with AR")
    choice = auto.choice
    if choice is None or choice.best_tree is None:  # no statistics, or no tree fits: the note says why
        lines.append(auto.note())
    else:
        best = choice.best_tree
        what = "AR" if auto.tree is None else best.tree.describe()
        lines.append(
            f"tree auto chose on {auto.key[0]} {auto.key[1]} batch {auto.key[2]}: {what}, because the best "
            f"tree ({best.tree.describe()}) was predicted {choice.speedup:.2f}x AR "
            f"({best.tau:.2f} tokens per step at {best.step_seconds / choice.ar.step_seconds:.2f}x AR's step "
            f"time) and measured {tps / ar_tps:.2f}x AR here ({tau:.2f} tokens per step)"
        )
    if auto_run.mode == "ar":  # auto's run is the AR run itself
        lines.append("speedup of --tree auto over AR: 1.00x (auto decodes AR here, so it never runs slower)")
    else:
        lines.append(f"measured speedup of --tree auto over AR: {rate(auto_run)[1] / ar_tps:.2f}x")
    if jax.default_backend() == "cpu":
        lines.append(CPU_NOTE)
    return lines


def run_demo() -> int:
    demo.require()
    texts = read_prompts(demo.DEMO_PROMPTS_FILE)
    model = api.load(demo.MODEL_DIR, adapter=demo.ADAPTER_DIR)
    options = dict(max_new_tokens=MAX_NEW_TOKENS, batch_size=1)
    with tqdm(total=len(texts), desc="demo (bita, --tree auto)", unit="prompt", file=sys.stderr) as bar:

        def decode(description: str, **how) -> api.Run:
            bar.reset(total=len(texts))
            bar.set_description(description)
            first = model.run(texts, on_batch=lambda records: bar.update(len(records)), **options, **how)
            return fastest_of_two(model, texts, first, **options, **how)

        auto_run = decode("demo (bita, --tree auto)", mode="bita", tree=AUTO)
        auto = auto_run.auto
        ar_run = auto_run if auto_run.mode == "ar" else decode("demo (ar)", mode="ar")
        tree_run = None
        if auto_run.mode == "ar" and auto.choice is not None and auto.choice.best_tree is not None:
            spec = auto.choice.best_tree.tree.spec
            tree_run = decode("demo (bita, the best tree)", mode="bita", tree=spec)
    print(demo.format_completions(auto_run.records))
    print("\n".join(summary(auto, auto_run, ar_run, tree_run)))
    return 0
