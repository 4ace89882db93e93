"""One training file of whole answers: the recipe's answers that ended within their budget, joined
with the capped ones continued by extend_answers.py, shuffled so the short ones spread over the pass.

    python benchmarks/recipe/mix_answers.py --model smollm2 --answers runs/smollm2/responses/train.jsonl \
        --continued runs/smollm2-long/responses/long.jsonl --output runs/smollm2-mix/responses/mix.jsonl
"""

from __future__ import annotations

import argparse
import json
import random

from extend_answers import capped, read_jsonl  # this script's neighbour (python puts its folder on the path)

from bita_jax.config import ModelConfig
from bita_jax.io.gguf import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the recipe's base model (for its EOS ids)")
    parser.add_argument("--answers", required=True, help="the recipe's training answers")
    parser.add_argument("--continued", required=True, help="extend_answers.py's records")
    parser.add_argument("--output", required=True)
    parser.add_argument("--budget", type=int, default=128, help="the answers' max_new_tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    eos = set(ModelConfig.from_pretrained(resolve_model(args.model)).eos_token_ids)
    answers = read_jsonl(args.answers)
    continued_ids = {id(r) for r in capped(answers, args.budget, eos)}
    ended = [r for r in answers if id(r) not in continued_ids]
    mixed = ended + read_jsonl(args.continued)
    random.Random(args.seed).shuffle(mixed)
    with open(args.output, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in mixed)
    print(f"{len(ended)} ended answers + {len(mixed) - len(ended)} continued -> {args.output}")


if __name__ == "__main__":
    main()
