"""Self-distillation data for training tests: decode.py's greedy AR output on a tiny orbax_checkpoint."""

import json
import random

import decode

WORDS = "def add return print import class for range if self the quick brown fox".split()


def make_distill_data(model_dir: str, path: str, num_prompts: int, max_new_tokens: int, seed: int = 0) -> str:
    """Writes `num_prompts` random word prompts and runs `decode.py --mode ar --output path` on them."""
    rng = random.Random(seed)
    prompts = path + ".prompts.jsonl"
    with open(prompts, "w") as f:
        for _ in range(num_prompts):
            f.write(
                json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))}) + "\n"
            )
    argv = [
        "--model",
        model_dir,
        "--mode",
        "ar",
        "--prompts",
        prompts,
        "--max-new-tokens",
        str(max_new_tokens),
        "--batch-size",
        "8",
        "--output",
        path,
    ]
    assert decode.main(argv) in (0, None)
    return path
