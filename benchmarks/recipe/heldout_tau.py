"""Held-out tau of an adapter against transformers' prompt lookup, on a recipe run's held-out answers.

The recipe's learning curve replays the first 64 drafting points of 32 held-out answers; this replays
every drafting point of every held-out answer (RUN/responses/heldout.jsonl: ShareGPT first turns the
training never saw, chat template, the base model's greedy answers), and runs transformers' prompt
lookup (10 tokens, batch 1) on the same prompt ids, checking its outputs equal those answers.

    python benchmarks/recipe/heldout_tau.py --model smollm2 --run runs/smollm2-ce --adapter smollm2

Both measurements are stored in RUN/report/heldout-*.json (a rerun reuses them); prints one JSON object.
"""

import argparse
import json
import os

from bita_jax import api
from bita_jax.config import read_json
from bita_jax.io.gguf import resolve_model
from bita_jax.recipe import report

TREES = ("upper:5", "upper:3", "chain", "auto")  # auto: the adapter's stored batch-1 chat choice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the recipe's base model (directory or short name)")
    parser.add_argument("--run", required=True, help="recipe run directory holding responses/heldout.jsonl")
    parser.add_argument("--adapter", required=True, help="adapter directory or short name")
    args = parser.parse_args()

    with open(os.path.join(args.run, "responses", "heldout.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    prompt_ids = [r["prompt_ids"] for r in records]
    answers = [r["output_ids"] for r in records]
    max_new = read_json(os.path.join(args.run, "recipe.json"))["max_new_tokens"]  # the answers' budget
    model_dir = resolve_model(args.model)
    model = api.load(model_dir, adapter=args.adapter)
    out = os.path.join(args.run, "report")
    os.makedirs(out, exist_ok=True)
    name = os.path.basename(os.path.normpath(args.adapter))
    replayed = report.measured(
        os.path.join(out, f"heldout-replay-{name}.json"),
        lambda: report.replay(model, prompt_ids, answers, TREES),
    )
    looked_up = report.measured(
        os.path.join(out, "heldout-lookup.json"),
        lambda: report.prompt_lookup(model_dir, model.config, prompt_ids, max_new),
    )
    summary = {
        "prompts": len(records),
        "max_new_tokens": max_new,
        "replayed": {"tau": replayed["tau"], "mask_acc": replayed["mask_acc"]},
        "prompt_lookup": {
            "tau": looked_up["tau"],
            "identical": report.identical(looked_up["outputs"], answers),
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
