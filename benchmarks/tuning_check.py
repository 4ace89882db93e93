"""Checks the tree tuner on the packaged demo: predicted vs measured tokens per step and tokens/s.

    python benchmarks/tuning_check.py [--batch-size 1] [--max-new-tokens 128] [--output FILE.json]

Statistics: the demo adapter's trees.json (calibrated on the held-out prompts that are not demo
prompts). Step costs: measured in this run for each tree's own row count, interleaved with AR.
Measured: decoding the demo prompts (demo_prompts.jsonl) with each tree and with AR in this one
run (fastest of two runs each). One row per tree: rows, predicted tau (uniform and replayed) and
measured tau, predicted and measured tokens/s and speedup over AR, identical outputs; then what
`--tree auto` picks here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bita_jax  # noqa: E402
from bita_jax import demo  # noqa: E402
from bita_jax.bita.tree import parse_tree  # noqa: E402
from bita_jax.cli.tune import measured_speed  # noqa: E402
from bita_jax.io.prompts import read_prompts  # noqa: E402
from bita_jax.tuning import step_cost  # noqa: E402
from bita_jax.tuning.choice import predict  # noqa: E402

NAMED = {
    "chain": "chain",
    "upper:2": "upper:2",
    "upper:3": "upper:3",
    "upper:5": "upper:5",
    "wide": demo.WIDE_TREE,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--output", help="also write the rows as JSON here")
    args = parser.parse_args()
    demo.require()
    model = bita_jax.load(demo.MODEL_DIR, adapter=demo.ADAPTER_DIR)
    stats = model.tree_store.statistics
    B, M = args.batch_size, model.bita_config.num_mask_tokens
    texts = read_prompts(demo.DEMO_PROMPTS_FILE)
    auto = model.auto_tree(B)
    trees = {name: parse_tree(spec, M) for name, spec in NAMED.items()}
    if auto.tree is not None:
        trees["auto: " + auto.tree.describe().split(",")[0]] = auto.tree
    if auto.choice is not None and auto.choice.best_tree is not None and auto.tree is None:
        trees["best (auto: AR)"] = auto.choice.best_tree.tree
    by_rows = {t.num_rows: t for t in trees.values()}  # one measurement per row count
    prompt_len = int(np.median([len(ids) for ids in model.encode(texts)]))
    (costs,) = step_cost.measure_step_costs(
        model.config,
        model.params,
        model.adapter,
        [B],
        list(by_rows.values()),
        prompt_len,
        args.max_new_tokens,
    )
    ar_tau, ar_tps, ar_ids = measured_speed(model, texts, None, B, args.max_new_tokens)
    ar_pred = B / costs.ar_seconds
    header = (
        f"{'tree':<22}{'rows':>5}{'tau unif':>9}{'tau repl':>9}{'tau meas':>9}{'repl err':>9}"
        f"{'tok/s pred':>11}{'tok/s meas':>11}{'x AR pred':>10}{'x AR meas':>10}  identical"
    )
    kind = step_cost.current_device_kind()
    print(f"{kind}, batch {B}, {len(texts)} demo prompts, {args.max_new_tokens} new tokens")
    print(header)
    print(
        f"{'AR':<22}{1:>5}{1:>9.2f}{1:>9.2f}{ar_tau:>9.2f}{'':>9}{ar_pred:>11.1f}{ar_tps:>11.1f}{1:>10.2f}{1:>10.2f}"
    )
    rows = [{"tree": "AR", "rows": 1, "tokens_per_s_predicted": ar_pred, "tokens_per_s_measured": ar_tps}]
    for name, tree in trees.items():
        (pred,) = predict([(tree, stats.replayed_tokens(tree))], costs)
        tau, tps, ids = measured_speed(model, texts, tree, B, args.max_new_tokens)
        row = {
            "tree": name, "rows": tree.num_rows, "tau_uniform": stats.expected_tokens(tree),
            "tau_replayed": pred.tau, "tau_measured": tau, "tokens_per_s_predicted": pred.tokens_per_s,
            "tokens_per_s_measured": tps, "identical": ids == ar_ids,
        }  # fmt: skip
        rows.append(row)
        print(
            f"{name:<22}{tree.num_rows:>5}{row['tau_uniform']:>9.2f}{pred.tau:>9.2f}{tau:>9.2f}"
            f"{100 * (pred.tau / tau - 1):>8.1f}%{pred.tokens_per_s:>11.1f}{tps:>11.1f}"
            f"{pred.tokens_per_s / ar_pred:>10.2f}{tps / ar_tps:>10.2f}  {ids == ar_ids}"
        )
    print(auto.note())
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": step_cost.current_device_kind(), "batch_size": B, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
