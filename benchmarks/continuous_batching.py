"""Static vs continuous batching, AR and BiTA, side by side in one run (not a test).

Workload: N prompts (cycled from a prompts file) whose budgets are ceil(Exp(mean)) capped at `cap`
(and at the model's positions), EOS ignored, fixed seed. For each batch size and mode, the same
engine decodes the workload with `batching="static"` and `"continuous"`; prints and writes generated
tokens/s, the ratio, slot utilisation, time to first token p50/p99, host share, recompiles after
warm-up, and whether every output is identical. Each engine first decodes the workload once
untimed (cold executables on a CPU run up to 2x slower), so runs are compared warm.

  python benchmarks/continuous_batching.py --prompts 64 --out benchmarks/continuous_batching.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time

import numpy as np

import bita_jax
from bita_jax import demo
from bita_jax.io.prompts import read_prompts

DEMO = os.path.dirname(demo.__file__)


def budgets(count: int, mean: float, cap: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(min(math.ceil(x), cap)) for x in rng.exponential(mean, count)]


def ideal_steps(lengths: list[int], slots: int) -> tuple[int, int]:
    """(static, continuous) steps of an AR engine with instant refill, in input order."""
    static = sum(max(lengths[i : i + slots]) for i in range(0, len(lengths), slots))
    free = [0] * slots  # the step at which each slot frees
    for n in lengths:
        b = int(np.argmin(free))
        free[b] += n
    return static, max(free)


def measure(model, texts, lengths, mode, tree, slots, batching, chunk_steps):
    options = dict(
        max_new_tokens=lengths, mode=mode, batch_size=slots, batching=batching, ignore_eos=True,
        chunk_steps=chunk_steps, **({"tree": tree} if mode == "bita" else {}),
    )  # fmt: skip
    model.run(texts, **options)  # warm
    run = model.run(texts, **options)
    stats = run.stats
    ttft = np.asarray(stats.first_token_seconds)
    tokens = sum(len(g.output_ids) for g in run.generations)
    return {
        "mode": mode, "slots": slots, "batching": batching, "tokens": tokens,
        "seconds": stats.seconds, "tokens_per_s": tokens / stats.seconds, "steps": stats.steps,
        "utilisation": stats.utilisation, "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)), "host_share": stats.host_share,
        "recompiles": stats.recompiles, "chunks": stats.chunks,
    }, [g.output_ids for g in run.generations]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(DEMO, "model"))
    parser.add_argument("--adapter", default=os.path.join(DEMO, "adapter"))
    parser.add_argument("--prompt-file", default=os.path.join(DEMO, "prompts.jsonl"))
    parser.add_argument("--tree", default="auto", help="BiTA's tree (auto: the adapter's choice per batch)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--mean", type=float, default=128)
    parser.add_argument("--cap", type=int, default=1024)
    parser.add_argument("--slots", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--modes", nargs="+", default=["ar", "bita"])
    parser.add_argument("--chunk-steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    model = bita_jax.load(args.model, adapter=args.adapter)
    pool = read_prompts(args.prompt_file)
    texts = [pool[i % len(pool)] for i in range(args.prompts)]
    longest = max(len(p) for p in model.encode(texts))
    room = model.config.max_position_embeddings - longest - 16  # a tree step's overshoot
    cap = min(args.cap, room)
    lengths = budgets(args.prompts, args.mean, cap, args.seed)
    rows = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for slots in args.slots:
        static_ideal, continuous_ideal = ideal_steps(lengths, slots)
        for mode in args.modes:
            common = (model, texts, lengths, mode, args.tree, slots)
            static, static_ids = measure(*common, "static", args.chunk_steps)
            cont, cont_ids = measure(*common, "continuous", args.chunk_steps)
            row = {
                "mode": mode, "slots": slots, "static": static, "continuous": cont,
                "speedup": cont["tokens_per_s"] / static["tokens_per_s"],
                "ideal_ar_speedup": static_ideal / continuous_ideal, "identical": static_ids == cont_ids,
            }  # fmt: skip
            rows.append(row)
            print(
                f"B={slots} {mode:4s}: static {static['tokens_per_s']:8.1f} tok/s "
                f"(util {static['utilisation']:.2f}), "
                f"continuous {cont['tokens_per_s']:8.1f} tok/s (util {cont['utilisation']:.2f}) -> "
                f"{row['speedup']:.2f}x (ideal AR {row['ideal_ar_speedup']:.2f}x); TTFT p50/p99 "
                f"static {static['ttft_p50_s']:.2f}/{static['ttft_p99_s']:.2f} s, continuous "
                f"{cont['ttft_p50_s']:.2f}/{cont['ttft_p99_s']:.2f} s; host share {cont['host_share']:.3f}; "
                f"recompiles {static['recompiles'] + cont['recompiles']}; identical {row['identical']}",
                flush=True,
            )
    result = {
        "date": started, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "uptime_before_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "model": args.model, "tree": args.tree, "prompts": args.prompts, "mean": args.mean, "cap": cap,
        "seed": args.seed, "chunk_steps": args.chunk_steps, "tokens": sum(lengths), "rows": rows,
    }  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
