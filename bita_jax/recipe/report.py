"""The recipe's evaluation report on an evaluation set (MT-Bench first turns): greedy, chat template.

Per measurement one JSON file in RUN/report/, so an interrupted report resumes where it stopped:
  ar.json            AR outputs and speed (the reference every other output is compared with)
  replay.json        replayed tau and acceptance per level of each tree, from the adapter's ranks on
                     the AR outputs (teacher forcing: exactly what greedy tree decoding accepts)
  bita-<tree>.json   measured BiTA decoding per tree: tau, acceptance per level, identical-to-AR count
  bf16-ar.json, bf16-bita.json
                     bfloat16 weights under the exact precision policy: BiTA == AR in bf16
  lookup.json        transformers' prompt-lookup decoding tau on the same prompt ids
report.md gathers them into one table.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any, Sequence

from bita_jax import api
from bita_jax.bita.tree import parse_tree
from bita_jax.config import ModelConfig
from bita_jax.errors import UserError
from bita_jax.io.paths import writing
from bita_jax.recipe.evaluate import rank_summary
from bita_jax.recipe.pipeline import RecipeConfig, path
from bita_jax.training import data
from bita_jax.tuning.calibrate import lookup_runs, teacher_forced_ranks


def evaluation_prompts(file: str, count: int) -> list[str]:
    """First turns (MT-Bench "turns"[0]) or "prompt" fields of an evaluation jsonl."""
    if not file:
        raise UserError("the report needs an evaluation set: --exclude FILE (e.g. MT-Bench first turns)")
    with open(file, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [(r.get("turns") or [r.get("prompt")])[0] for r in records][:count]


def measured(file: str, compute) -> dict[str, Any]:
    """The measurement stored in `file`, computed and stored first if it is not there yet."""
    if os.path.isfile(file):
        with open(file) as f:
            return json.load(f)
    result = compute()
    with writing(file), open(file + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(file + ".tmp", file)
    return result


def decode(model: api.Model, prompts: list[str], cfg: RecipeConfig, **options) -> dict[str, Any]:
    run = model.run(prompts, chat=True, max_new_tokens=cfg.report_tokens, batch_size=cfg.report_batch, **options)
    tokens = sum(len(g.output_ids) for g in run.generations)
    steps = sum(g.steps for g in run.generations)
    out = {
        "outputs": [g.output_ids for g in run.generations],
        "tokens": tokens, "steps": steps, "tau": tokens / steps, "tokens_per_s": tokens / run.seconds,
        "tree": None if run.tree is None else run.tree.describe(),
    }  # fmt: skip
    if run.accepted_per_level is not None:
        out["acceptance"] = (run.accepted_per_level.sum(axis=0) / steps).round(4).tolist()
    return out


def identical(outputs: list[list[int]], reference: list[list[int]]) -> int:
    return sum(a == b for a, b in zip(outputs, reference, strict=True))


def replay(
    model: api.Model, prompt_ids: list[list[int]], outputs: list[list[int]], specs: Sequence[str]
) -> dict[str, Any]:
    """Replayed tau of each tree spec ("auto": the stored batch-1 chat choice) and mask accuracy,
    from teacher-forced ranks and lookup runs on the AR outputs."""
    examples = [data.Example(tuple(p), tuple(o)) for p, o in zip(prompt_ids, outputs, strict=True) if len(o) > 1]
    longest = max(len(e.source) + len(e.target) for e in examples)
    ranks = teacher_forced_ranks(model.config, model.params, model.adapter, examples, max_length=longest)
    M = model.bita_config.num_mask_tokens
    trees = {spec: parse_tree(spec, M) for spec in specs if spec != "auto"}
    auto = model.auto_tree(1, chat=True).tree if "auto" in specs else None
    if auto is not None:
        trees["auto"] = auto
    runs = lookup_runs(examples, model.config.vocab_size) if any(t.lookup for t in trees.values()) else None
    return {**rank_summary(ranks, trees, runs), "auto_tree": None if auto is None else auto.describe()}


def prompt_lookup(
    model_dir: str, config: ModelConfig, prompt_ids: list[list[int]], max_new_tokens: int
) -> dict[str, Any]:
    """transformers' prompt-lookup decoding (10 tokens, batch 1) of `prompt_ids` with the checkpoint
    in `model_dir` (`config` gives its EOS and pad ids): tau, tokens/s, outputs."""
    from bita_jax.cli.bench import run_hf

    r = run_hf(model_dir, prompt_ids, max_new_tokens, config, 10)
    return {"tau": r.tokens_per_forward, "tokens_per_s": r.tokens_per_s, "outputs": r.outputs}


def stage_report(cfg: RecipeConfig) -> str:
    out = path(cfg, "report")
    os.makedirs(out, exist_ok=True)
    prompts = evaluation_prompts(cfg.exclude, cfg.report_prompts)
    adapter = path(cfg, "train", "adapter")
    model = api.load(cfg.model, adapter=adapter)
    ar = measured(os.path.join(out, "ar.json"), lambda: decode(model, prompts, cfg, mode="ar"))
    prompt_ids = model.encode(prompts, chat=True)
    replayed = measured(os.path.join(out, "replay.json"),
                        lambda: replay(model, prompt_ids, ar["outputs"], cfg.report_trees))  # fmt: skip
    results = {"ar": ar, "replay": replayed}
    decoded = prompts[: cfg.report_decoded_prompts or len(prompts)]
    for spec in cfg.report_trees:
        name = f"bita-{spec.replace(':', '')}"
        results[name] = measured(os.path.join(out, f"{name}.json"),
                                 lambda s=spec: decode(model, decoded, cfg, mode="bita", tree=s))  # fmt: skip
    bf16 = api.load(cfg.model, adapter=adapter, dtype="bfloat16")  # exact precision policy
    results["bf16"] = {
        "ar": measured(os.path.join(out, "bf16-ar.json"), lambda: decode(bf16, decoded, cfg, mode="ar")),
        "bita": measured(os.path.join(out, "bf16-bita.json"),
                         lambda: decode(bf16, decoded, cfg, mode="bita", tree=cfg.report_trees[0])),
    }  # fmt: skip

    results["lookup"] = measured(
        os.path.join(out, "lookup.json"),
        lambda: prompt_lookup(cfg.model, model.config, prompt_ids, cfg.report_tokens),
    )
    write_markdown(cfg, results, len(prompts), os.path.join(out, "report.md"))
    return out


def write_markdown(cfg: RecipeConfig, results: dict[str, Any], count: int, file: str) -> None:
    ar = results["ar"]
    rows = [
        "| method | tree | tau (measured) | tau (replayed) | acceptance per level | identical to AR | tokens/s |",
        "|---|---|---|---|---|---|---|",
        f"| AR | - | 1.00 | - | - | - | {ar['tokens_per_s']:.1f} |",
    ]
    replayed = results["replay"]["tau"]
    for spec in cfg.report_trees:
        r = results[f"bita-{spec.replace(':', '')}"]
        acc = " / ".join(f"{a:.2f}" for a in r.get("acceptance", []))
        key = "auto" if spec == "auto" else spec
        rows.append(
            f"| BiTA | {spec} ({r['tree'] or 'AR'}) | {r['tau']:.2f} | {replayed.get(key, float('nan')):.2f} "
            f"| {acc} | {identical(r['outputs'], ar['outputs'][: len(r['outputs'])])}/{len(r['outputs'])} "
            f"| {r['tokens_per_s']:.1f} |"
        )
    bf16 = results["bf16"]
    same = identical(bf16["bita"]["outputs"], bf16["ar"]["outputs"])
    rows.append(
        f"| BiTA bf16 exact | {cfg.report_trees[0]} | {bf16['bita']['tau']:.2f} | - | - "
        f"| {same}/{len(bf16['ar']['outputs'])} (vs bf16 AR) "
        f"| {bf16['bita']['tokens_per_s']:.1f} |"
    )
    lookup = results["lookup"]
    rows.append(f"| transformers prompt lookup (10) | - | {lookup['tau']:.2f} | - | - "
                f"| {identical(lookup['outputs'], ar['outputs'])}/{count} | {lookup['tokens_per_s']:.1f} |")
    acc = " / ".join(f"{a:.3f}" for a in results["replay"]["mask_acc"])
    head = (f"{count} evaluation prompts ({os.path.basename(cfg.exclude)}), chat template, greedy, "
            f"{cfg.report_tokens} new tokens, batch {cfg.report_batch}; {platform.machine()}, "
            f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}. Mask top-1 accuracy on the AR "
            f"outputs: {acc}.\n\n")  # fmt: skip
    with open(file, "w") as f:
        f.write(head + "\n".join(rows) + "\n")
