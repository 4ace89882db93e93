"""The packaged demo (package data under bita_jax/demo/, built by scripts/make_demo.py).

model/          a small LLaMA (GQA) pretrained on the Python standard library, HF format + tokenizer
adapter/        its BiTA adapter, trained by train.py on data self-distilled by decode.py
prompts.jsonl   prompts cut from standard-library modules held out of all training
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


# Draft trees for the demo, chosen by measuring (README, "Demo and benchmark"). The demo adapter's
# top draft is often wrong where its second or third is right, so trees that also grow children
# under non-top level-1 drafts accept far more than the reference upper-triangle tree (1.8 tokens
# per step on the held-out prompts): COMPACT_TREE (16 nodes, 68 rows per step) reaches 2.05 and
# WIDE_TREE (30 nodes, 124 rows) 2.3. On this 2-core CPU no tree beats AR in wall-clock time (every
# row costs time), so the demo takes WIDE_TREE everywhere, for the most tokens per step; on an
# accelerator its extra rows should be nearly free at this model size (not measured here).
COMPACT_TREE = json.dumps(
    [[c] for c in range(4)] + [[c, d] for c in range(4) for d in range(2)] + [[c, 0, 0] for c in range(4)]
)
WIDE_TREE = json.dumps(
    [[c] for c in range(5)]
    + [[c, d] for c in range(5) for d in range(3)]
    + [[c, 0, e] for c in range(5) for e in range(2)]
)
DEMO_TREES = {"cpu": WIDE_TREE, "gpu": WIDE_TREE, "tpu": WIDE_TREE}


def demo_tree(backend: str) -> str:
    """The demo's tree for a jax backend name ("cpu", "gpu", "tpu")."""
    return DEMO_TREES.get(backend, DEMO_TREES["gpu"])


def demo_argv(backend: str, max_new_tokens: int = 128) -> list[str]:
    """decode.py arguments of the demo: BiTA with --compare (AR too) on the demo prompts, batch 1."""
    require()
    return [
        "--model", MODEL_DIR, "--mode", "bita", "--adapter", ADAPTER_DIR, "--tree", demo_tree(backend),
        "--compare", "--prompts", DEMO_PROMPTS_FILE, "--max-new-tokens", str(max_new_tokens),
    ]  # fmt: skip


def format_completions(records: list[dict]) -> str:
    """Human-readable prompts and completions (decode.py records) for the terminal."""
    parts = []
    for i, r in enumerate(records, start=1):
        parts.append(f"--- prompt {i} ---\n{r['prompt']}")
        parts.append(
            f"--- completion {i} ({r['new_tokens']} tokens, {r['steps']} steps) ---\n{r['completion']}"
        )
    return "\n".join(parts)
