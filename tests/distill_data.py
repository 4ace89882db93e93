"""Self-distillation data for training tests: tiny checkpoints and their own greedy outputs."""

import json
import os
import random

import numpy as np

import decode
from bita_jax.config import BiTAConfig, DataConfig, OptimizerConfig, TrainConfig
from bita_jax.decoding import runner
from bita_jax.decoding.loop import make_ar_generate
from bita_jax.io import hf
from bita_jax.training import loop as train_loop
from bita_jax.training import pretrain
from bita_jax.training.optimizer import make_optimizer
from tests.tiny_checkpoint import make_tiny_checkpoint

PERIOD = 4  # the patterned model's pretraining corpus repeats motifs of this many tokens
ALPHABET = 32  # motif tokens are drawn from ids 3..34

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


def motif(rng: np.random.Generator) -> list[int]:
    """PERIOD distinct ordinary token ids (0, 1, 2 are unk, bos, eos)."""
    return [int(t) for t in rng.choice(np.arange(3, 3 + ALPHABET), PERIOD, replace=False)]


def patterned_model_and_data(root: str) -> tuple[str, str, list[list[int]], list[runner.Generation]]:
    """A tiny LLaMA pretrained to continue period-4 patterns, and its greedy outputs as BiTA data.

    The base model's next token is then a function of the context (the token PERIOD back), so every
    mask's target is predictable and a working adapter must reach high mask accuracy.
    Returns (model_dir, data_path, prompts, generations).
    """
    model_dir = make_tiny_checkpoint(os.path.join(root, "model"), seed=0)  # config.json + tokenizer
    cfg = hf.load_config(model_dir, dtype="float32")
    params = hf.load_params(model_dir, cfg)
    rng = np.random.default_rng(0)
    docs = [[cfg.bos_token_id, *motif(rng) * 16] for _ in range(400)]
    windows = pretrain.pack_documents(docs, 64, cfg.eos_token_ids[0])
    steps = 300
    optimizer, _ = make_optimizer(OptimizerConfig(learning_rate=2e-2, warmup_steps=20), steps)
    pretrain_step = pretrain.make_pretrain_step(cfg, optimizer)
    opt_state = optimizer.init(params)
    for _, windows_batch in zip(range(steps), pretrain.epoch_batches(windows, 16, 0), strict=False):
        params, opt_state, _ = pretrain_step(params, opt_state, windows_batch)
    with open(f"{model_dir}/config.json") as f:
        hf.save_params(params, cfg, model_dir, hf_config=json.load(f))
    # Self-distillation with the project's AR decoding, on motifs the model never saw.
    prompts = [[cfg.bos_token_id, *motif(rng) * 2] for _ in range(16)]
    generate = runner.CompiledByShape(make_ar_generate(cfg, 40))
    generations = runner.generate(generate, params, prompts, 16, cfg.pad_id)[0]
    data_path = os.path.join(root, "data.jsonl")
    with open(data_path, "w") as f:
        for prompt, gen in zip(prompts, generations, strict=True):
            f.write(json.dumps({"prompt_ids": prompt, "output_ids": gen.output_ids}) + "\n")
    return model_dir, data_path, prompts, generations


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
