"""Checks the tree tuner on the packaged demo: predicted vs measured tokens per step and tokens/s.

    python benchmarks/tuning_check.py [--batch-size 1] [--max-new-tokens 128]

Calibration: our greedy AR outputs on the demo's held-out prompts (prompts.jsonl), teacher-forced
through the adapter (bita_jax.tuning.calibrate). Measurement: BiTA decoding of the demo prompts
(demo_prompts.jsonl, a different set) with each tree, against AR, in this one run. Prints one row
per tree: rows, predicted and measured tau, predicted and measured tokens/s and speedup over AR.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax

from bita_jax import adapter_io, data, decoding, demo_files, generation_io, hf_io
from bita_jax.config import DataConfig
from bita_jax.tree import parse_tree
from bita_jax.tuning import calibrate, choice, step_cost
from bita_jax.tuning.stats import AcceptanceStats

MAX_RANK = 8


def ar_outputs(config, params, prompt_ids, max_new, batch_size):
    generations, seconds, _ = generation_io.compile_and_generate(
        decoding.make_ar_generate(config, max_new), params, prompt_ids, batch_size, config.pad_id
    )
    return generations, seconds


def calibration_examples(prompt_ids, outputs, eos_id, max_length) -> list[data.Example]:
    """decode.py-style jsonl of (prompt_ids, output_ids), read back by data.py."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "calibration.jsonl")
        with open(path, "w") as f:
            for p, o in zip(prompt_ids, outputs, strict=True):
                f.write(json.dumps({"prompt_ids": p, "output_ids": o}) + "\n")
        return data.read_examples(DataConfig(path=path, max_length=max_length), demo_files.MODEL_DIR, eos_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    demo_files.require()
    config = hf_io.load_config(demo_files.MODEL_DIR, scan_layers=decoding.SCAN_LAYERS)
    params = hf_io.load_params(demo_files.MODEL_DIR, config)
    bita_cfg, adapter = adapter_io.load_adapter(demo_files.ADAPTER_DIR, config)
    adapter = jax.device_put(adapter)
    tokenizer = hf_io.load_tokenizer(demo_files.MODEL_DIR)
    encode = lambda path: hf_io.encode_prompts(tokenizer, generation_io.read_prompts(path), False)  # noqa: E731
    calib_prompts, demo_prompts = encode(demo_files.PROMPTS_FILE), encode(demo_files.DEMO_PROMPTS_FILE)
    B, M = args.batch_size, bita_cfg.num_mask_tokens

    calib, _ = ar_outputs(config, params, calib_prompts, args.max_new_tokens, 8)
    examples = calibration_examples(
        calib_prompts, [g.output_ids for g in calib], config.eos_token_ids[0], config.max_position_embeddings
    )
    ranks = calibrate.teacher_forced_ranks(
        config, params, adapter, examples, max_length=config.max_position_embeddings
    )
    stats = AcceptanceStats.from_ranks(ranks, MAX_RANK)
    print(
        f"calibration: {len(examples)} sequences, {stats.num_points} points, {len(stats.counts)} rank paths"
    )

    ladder = step_cost.ladder_trees(M, max_rows=160)
    (costs,) = step_cost.measure_step_costs(config, params, adapter, [B], ladder, context_len=256)
    print("step cost (s): AR", f"{costs.ar_seconds:.5f};", ", ".join(
        f"{r} rows {s:.5f}" for r, s in zip(costs.tree_rows, costs.tree_seconds, strict=True)))  # fmt: skip
    decided = choice.choose(stats.best_trees(costs.tree_rows[-1]), costs)
    print(f"choice: {'AR' if decided.tree is None else decided.tree.describe()}, "
          f"best tree predicted {decided.speedup:.2f}x AR")  # fmt: skip

    named = {s: parse_tree(s, M) for s in ("chain", "upper:2", "upper:3", "upper:5")}
    named["wide"] = parse_tree(demo_files.WIDE_TREE, M)
    if decided.best_tree is not None:
        named["best predicted"] = decided.best_tree.tree
    ar_gens, ar_seconds = ar_outputs(config, params, demo_prompts, args.max_new_tokens, B)
    ar_tps = sum(len(g.output_ids) for g in ar_gens) / ar_seconds
    print(f"\n{'tree':<16}{'rows':>5}{'tau unif':>9}{'tau repl':>9}{'tau meas':>9}{'tok/s pred':>11}"
          f"{'tok/s meas':>11}{'x AR pred':>10}{'x AR meas':>10}  identical")  # fmt: skip
    print(f"{'AR':<16}{1:>5}{1.0:>9.2f}{1.0:>9.2f}{1.0:>9.2f}{decided.ar.tokens_per_s:>11.1f}{ar_tps:>11.1f}"
          f"{1.0:>10.2f}{1.0:>10.2f}")  # fmt: skip
    for name, tree in named.items():
        gens, seconds = bita_outputs(config, params, adapter, tree, demo_prompts, args.max_new_tokens, B)
        tokens = sum(len(g.output_ids) for g in gens)
        tau_meas = tokens / sum(g.steps for g in gens)
        tau_replayed = stats.replayed_tokens(tree)
        pred = choice.predict([(tree, tau_replayed)], costs)
        tps_pred = pred[0].tokens_per_s if pred else float("nan")
        same = all(g.output_ids == a.output_ids for g, a in zip(gens, ar_gens, strict=True))
        print(f"{name:<16}{tree.num_rows:>5}{stats.expected_tokens(tree):>9.2f}{tau_replayed:>9.2f}{tau_meas:>9.2f}"
              f"{tps_pred:>11.1f}"
              f"{tokens / seconds:>11.1f}{tps_pred / decided.ar.tokens_per_s:>10.2f}"
              f"{tokens / seconds / ar_tps:>10.2f}  {same}")  # fmt: skip


def bita_outputs(config, params, adapter, tree, prompt_ids, max_new, batch_size):
    generations, seconds, _ = generation_io.compile_and_generate(
        decoding.make_bita_generate(config, tree, max_new),
        (params, adapter),
        prompt_ids,
        batch_size,
        config.pad_id,
    )
    return generations, seconds


if __name__ == "__main__":
    main()
