"""Continue a recipe run's capped training answers to a longer budget, as the evaluation decodes them.

The recipe decodes training answers to `max_new_tokens` (128); MT-Bench is evaluated at 256, and
more than half of its drafting points lie past token 128 of an answer. This continues every capped
answer (full length, no EOS) greedily from its own prompt + answer ids by `--more` tokens, so the
result is the base model's own greedy answer at the longer budget. Records are appended as soon as
they and every earlier one are done: rerun the same command to resume.

    python benchmarks/recipe/extend_answers.py --model smollm2 --answers RUN/responses/train.jsonl \
        --output RUN/responses/long.jsonl --count 768
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bita_jax import api
from bita_jax.io.gguf import resolve_model


def read_jsonl(path: str) -> list[dict]:
    """The records of a jsonl file, blank lines skipped."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def capped(records: list[dict], budget: int, eos_ids: set[int]) -> list[dict]:
    """The records whose answer used its whole budget without ending."""
    return [r for r in records if len(r["output_ids"]) >= budget and r["output_ids"][-1] not in eos_ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the recipe's base model (directory or short name)")
    parser.add_argument("--answers", required=True, help="decode.py records (prompt_ids, output_ids)")
    parser.add_argument("--output", required=True, help="jsonl of the continued records (appended)")
    parser.add_argument("--budget", type=int, default=128, help="the answers' max_new_tokens")
    parser.add_argument("--more", type=int, default=128, help="new tokens per continued answer")
    parser.add_argument("--count", type=int, default=0, help="continue the first N capped answers (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    model = api.load(resolve_model(args.model))
    records = read_jsonl(args.answers)
    todo = capped(records, args.budget, set(model.config.eos_token_ids))
    todo = todo[: args.count or len(todo)]
    done = 0
    if os.path.isfile(args.output):
        with open(args.output) as f:
            done = sum(1 for line in f if line.strip())
    todo = todo[done:]
    print(f"{done} continued before, {len(todo)} to go", flush=True)
    pending, start = iter(todo), time.perf_counter()
    with open(args.output, "a") as out:

        def write(finished: list[dict]) -> None:
            """Appends records as they finish (in input order, so each is the next pending answer's)."""
            nonlocal done
            for rec, r in zip(finished, pending, strict=False):  # finished first: pending stays in step
                record = {"prompt": r["prompt"], "prompt_ids": r["prompt_ids"]}
                out.write(json.dumps({**record, "output_ids": r["output_ids"] + rec["output_ids"]}) + "\n")
            out.flush()
            done += len(finished)
            print(f"{done} continued, {time.perf_counter() - start:.0f} s", flush=True)

        # One run over all of them, from each answer's own ids: a finished row's slot refills at once.
        answers = [r["prompt_ids"] + r["output_ids"] for r in todo]
        model.run(answers, on_batch=write, max_new_tokens=args.more, batch_size=args.batch_size, mode="ar")


if __name__ == "__main__":
    main()
