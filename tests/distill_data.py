"""Self-distillation data for training tests: decode.py's greedy AR output on a tiny orbax_checkpoint."""

import json
import os
import random

import decode
from bita_jax.config import BiTAConfig, DataConfig, TrainConfig
from bita_jax.training import loop as train_loop
from tests.tiny_checkpoint import make_tiny_checkpoint

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


def sharp_model_and_data(root: str) -> tuple[str, str]:
    """(model dir, data path): a tiny model with sharp weights (repetitive greedy output, so drafts
    can be learned in a few steps) and its own greedy generations on 16 prompts."""
    model_dir = make_tiny_checkpoint(os.path.join(root, "model"), seed=1, initializer_range=0.3)
    data_path = os.path.join(root, "data.jsonl")
    make_distill_data(model_dir, data_path, num_prompts=16, max_new_tokens=40)
    return model_dir, data_path


def distill_config(model_dir: str, data_path: str, output: str, bita: BiTAConfig, steps: int) -> TrainConfig:
    """A float32 run of `steps` steps at batch 8 on `data_path`, saving only its final adapter."""
    return TrainConfig(
        model=model_dir,
        output=output,
        steps=steps,
        batch_size=8,
        dtype="float32",
        log_every=1,
        save_every=1000,
        bita=bita,
        data=DataConfig(path=data_path, max_groups=16, seq_buckets=(64, 128)),
    )


def train_adapter(cfg: TrainConfig) -> str:
    """Runs `cfg` and returns its saved adapter's directory."""
    train_loop.run(cfg)
    return os.path.join(cfg.output, train_loop.ADAPTER_DIR)
