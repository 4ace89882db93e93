"""BiTA vs AR on SmolLM2-135M-Instruct in float32 and bfloat16 (exact and fast precision), one run.

  GGUF=$(python -c 'from bita_jax.io.gguf import find_smollm2_gguf as f; print(f())')
  python -m bita_jax.cli.gguf $GGUF /work/models/smollm2-f32
  python -m bita_jax.cli.gguf $GGUF /work/models/smollm2-bf16 --dtype bfloat16
  python benchmarks/bf16_smollm2.py --f32-model /work/models/smollm2-f32 \
      --bf16-model /work/models/smollm2-bf16 --adapter RUN/adapter --num-prompts 64 --max-new-tokens 128

The evaluation prompts are the first --num-prompts of benchmarks/chat_prompts.jsonl (the adapter's
distillation data comes from benchmarks/chat_train_prompts.jsonl, which holds none of them). For
each setting (f32; bf16 weights with the exact policy; all-bf16 fast) the same prompts run through
AR and BiTA; printed side by side: outputs identical to AR's, tokens per tree step, acceptance per
draft level, BiTA's wall-clock speedup and AR tokens/s. Times exclude compiles.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import bita_jax
from bita_jax.bita.tree import DEFAULT_TREE
from bita_jax.io.prompts import read_prompts

SETTINGS = (  # (name, model argument, dtype, precision)
    ("f32", "f32_model", "float32", "exact"),
    ("bf16 exact", "bf16_model", "bfloat16", "exact"),
    ("bf16 fast", "bf16_model", "bfloat16", "fast"),
)


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def compare(name: str, model: bita_jax.Model, prompts: list[str], options: dict) -> dict:
    """AR then BiTA on the prompts: exactness, acceptance and speed of one setting."""
    ar = model.run(prompts, mode="ar", **options)
    bita = model.run(prompts, mode="bita", **options)
    pairs = zip(bita.generations, ar.generations, strict=True)
    differ = [i for i, (b, a) in enumerate(pairs) if b.output_ids != a.output_ids]
    ar_tokens = sum(len(g.output_ids) for g in ar.generations)
    bita_tokens = sum(len(g.output_ids) for g in bita.generations)
    steps = sum(g.steps for g in bita.generations)
    return {
        "setting": name,
        "identical": len(prompts) - len(differ),
        "prompts": len(prompts),
        "differing_prompts": differ,
        "tokens_per_step": bita_tokens / steps,
        "acceptance_per_level": (bita.accepted_per_level.sum(axis=0) / steps).round(4).tolist(),
        "speedup": ar.seconds / bita.seconds,
        "ar_tokens_per_s": ar_tokens / ar.seconds,
        "bita_tokens_per_s": bita_tokens / bita.seconds,
        "load_average": load_avg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--f32-model", required=True)
    parser.add_argument("--bf16-model", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--prompts", default="benchmarks/chat_prompts.jsonl")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--tree", default=DEFAULT_TREE)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--settings", default=",".join(s[0] for s in SETTINGS), help="comma-separated")
    parser.add_argument("--output", help="also write the results as json")
    args = parser.parse_args()

    prompts = read_prompts(args.prompts)[: args.num_prompts]
    options = dict(max_new_tokens=args.max_new_tokens, tree=args.tree, batch_size=args.batch_size, chat=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load {load_avg()}")
    print(
        f"{len(prompts)} prompts x {args.max_new_tokens} new tokens, "
        f"tree {args.tree}, batch {args.batch_size}"
    )
    wanted = args.settings.split(",")
    results = []
    for name, model_arg, dtype, precision in SETTINGS:
        if name not in wanted:
            continue
        model = bita_jax.load(
            getattr(args, model_arg), adapter=args.adapter, dtype=dtype, precision=precision
        )
        results.append(compare(name, model, prompts, options))
        print(json.dumps(results[-1]), flush=True)

    print(
        f"\n{'setting':12} {'identical':>10} {'tok/step':>9} {'speedup':>8} {'AR tok/s':>9}  "
        "acceptance per level"
    )
    for r in results:
        levels = " ".join(f"{100 * x:.1f}%" for x in r["acceptance_per_level"])
        print(
            f"{r['setting']:12} {r['identical']:>4}/{r['prompts']:<5} {r['tokens_per_step']:>9.2f} "
            f"{r['speedup']:>7.2f}x {r['ar_tokens_per_s']:>9.1f}  {levels}"
        )
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"options": options, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
