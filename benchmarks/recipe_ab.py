"""The recipe's options at equal compute: the same sequences seen, the same held-out set, one table.

Each variant trains an adapter from the same seed on the same records for the same steps, with
one option changed from the baseline (bita_jax.recipe's defaults before this comparison), and is
measured by the recipe's held-out evaluation (mask accuracy per offset, replayed tau of upper:5
and chain). Writes ab.json and ab.md into --output.

    python benchmarks/recipe_ab.py --model /work/models/smollm2-f32 --data train.jsonl \
        --heldout heldout.jsonl --output runs/ab --steps 24 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from bita_jax.bita.tree import parse_tree
from bita_jax.config import DataConfig, TrainConfig, apply_overrides, from_dict, to_dict
from bita_jax.io import hf
from bita_jax.recipe.evaluate import heldout_evaluator
from bita_jax.training import data, loop

VARIANTS = {
    "baseline": [],
    "ce+kl": ["loss.kl_weight=1.0"],
    "kl only": ["loss.ce_weight=0.0", "loss.kl_weight=1.0"],
    "offset decay 0.8": ["loss.offset_decay=0.8"],
    "init from activations": ["bita.init=activations"],
    "no prefix dropout": ["bita.prefix_dropout=0.0"],
    "mask-row lora rank 4": ["bita.lora_rank=4"],
    "init + kl only": ["bita.init=activations", "loss.ce_weight=0.0", "loss.kl_weight=1.0"],
    "init + kl only + lora 4": [
        "bita.init=activations", "loss.ce_weight=0.0", "loss.kl_weight=1.0", "bita.lora_rank=4",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="decode.py records to train on")
    parser.add_argument("--heldout", required=True, help="decode.py records to evaluate on")
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--heldout-count", type=int, default=24)
    parser.add_argument("--points", type=int, default=48, help="drafting points per held-out example")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--set", action="append", default=[], help="overrides for every variant")
    args = parser.parse_args()

    config = hf.load_config(args.model)
    base = hf.load_params(args.model, config)
    heldout = data.read_examples(DataConfig(path=args.heldout), args.model, config.eos_token_ids[0])
    trees = {name: parse_tree(name, 3) for name in ("upper:5", "chain")}
    evaluate = heldout_evaluator(config, base, heldout[: args.heldout_count], trees, args.points)
    common = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "data": {"path": args.data}}
    results = {}
    for name in args.variants.split(","):
        out = os.path.join(args.output, name.replace(" ", "_").replace("+", "_"))
        cfg = from_dict(TrainConfig, apply_overrides({**common, "output": out}, args.set + VARIANTS[name]))
        start = time.perf_counter()
        last = loop.run(cfg, evaluate)
        with open(os.path.join(out, loop.EVAL_FILE)) as f:
            evals = [json.loads(line) for line in f]
        results[name] = {"overrides": VARIANTS[name], "train_loss": last.get("loss"), "start": evals[0],
                         "end": evals[-1], "seconds": round(time.perf_counter() - start, 1)}
        print(name, results[name], flush=True)
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "config": to_dict(cfg) | {"output": None, "heldout": args.heldout, "heldout_count": args.heldout_count,
                                  "points": args.points},
        "results": results,
    }
    with open(os.path.join(args.output, "ab.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = ["| variant | held-out mask acc (offsets 1/2/3) | replayed tau upper:5 | chain | train loss |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        acc = " / ".join(f"{a:.3f}" for a in r["end"]["mask_acc"])
        lines.append(f"| {name} | {acc} | {r['end']['tau']['upper:5']:.3f} | {r['end']['tau']['chain']:.3f} "
                     f"| {r['train_loss']:.3f} |")
    with open(os.path.join(args.output, "ab.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
