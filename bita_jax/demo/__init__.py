"""The packaged demo (package data under bita_jax/demo/, built by scripts/make_demo.py).

model/          a small LLaMA (GQA) pretrained on the Python standard library, HF format + tokenizer
adapter/        its BiTA adapter, trained by train.py on data self-distilled by decode.py, and
                trees.json: its acceptance statistics and tree choices (python -m bita_jax.tune)
prompts.jsonl   prompts cut from standard-library modules held out of all training; the first
                ones are demo_prompts.jsonl (what `python decode.py` completes), the rest
                calibrate trees.json
recipe.json     how it was built (Python version, held-out modules, sizes, losses)
"""

from __future__ import annotations

import json
import os

from bita_jax.errors import UserError

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))  # this package holds the files
MODEL_DIR = os.path.join(DEMO_DIR, "model")
ADAPTER_DIR = os.path.join(DEMO_DIR, "adapter")
PROMPTS_FILE = os.path.join(DEMO_DIR, "prompts.jsonl")
DEMO_PROMPTS_FILE = os.path.join(DEMO_DIR, "demo_prompts.jsonl")
RECIPE_FILE = os.path.join(DEMO_DIR, "recipe.json")


def require() -> None:
    """Raises a one-line UserError when the demo files are not installed."""
    missing = [p for p in (MODEL_DIR, ADAPTER_DIR, PROMPTS_FILE, DEMO_PROMPTS_FILE) if not os.path.exists(p)]
    if missing:
        raise UserError(
            f"the packaged demo is missing ({missing[0]}); build it with `python scripts/make_demo.py`"
        )


# Named trees for the demo's benchmarks (benchmarks/tuning_check.py, docs/decoding.md). The demo adapter's
# top draft is often wrong where its second or third is right, so trees that also grow children
# under non-top level-1 drafts accept more than the reference upper-triangle tree: COMPACT_TREE
# (16 nodes, 68 rows per step) and WIDE_TREE (30 nodes, 124 rows). The demo itself decodes with
# `--tree auto`: the adapter's trees.json (written by `python -m bita_jax.tune`) picks per device.
COMPACT_TREE = json.dumps(
    [[c] for c in range(4)] + [[c, d] for c in range(4) for d in range(2)] + [[c, 0, 0] for c in range(4)]
)
WIDE_TREE = json.dumps(
    [[c] for c in range(5)]
    + [[c, d] for c in range(5) for d in range(3)]
    + [[c, 0, e] for c in range(5) for e in range(2)]
)


def calibration_prompts(demo_dir: str = DEMO_DIR) -> list[str]:
    """The held-out prompts that are not demo prompts: the tuner's calibration data for the demo,
    so the demo's tokens per step checks the statistics on prompts they never saw."""
    from bita_jax.io.prompts import read_prompts

    shown = set(read_prompts(os.path.join(demo_dir, "demo_prompts.jsonl")))
    return [p for p in read_prompts(os.path.join(demo_dir, "prompts.jsonl")) if p not in shown]


def format_completions(records: list[dict], max_lines: int = 6) -> str:
    """Compact prompts and completions (decode.py records) for the terminal: each prompt's last
    line, then the completion's first max_lines lines."""
    parts = []
    for i, r in enumerate(records, start=1):
        prompt_end = r["prompt"].rstrip("\n").rsplit("\n", 1)[-1]
        lines = r["completion"].split("\n")
        more = f"\n    [... {len(lines) - max_lines} more lines]" if len(lines) > max_lines else ""
        parts.append(
            f"--- completion {i} ({r['new_tokens']} tokens, {r['steps']} steps) after: {prompt_end!r}\n"
            + "\n".join(lines[:max_lines])
            + more
        )
    return "\n".join(parts)
