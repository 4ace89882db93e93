"""python -m bita_jax.tune: pick the draft tree with the most tokens/s on this device, per batch size.

  python -m bita_jax.tune --model DIR --adapter DIR --data calibration.jsonl --batch-sizes 1,4

1. Acceptance statistics: teacher-forcing ranks of the base model's greedy outputs (decode.py
   records with output_ids as they are; prompts-only records are decoded greedily first).
2. Step cost: the jitted tree step for a ladder of row counts and the AR step, measured here.
3. The choice per batch size: the tree with the most predicted tokens/s = B tau / t(B, rows);
   AR unless a tree is predicted faster by 5%.
Writes the statistics and the choices (keyed by device kind, dtype, batch size, greedy, --precision
and --chat: docs/tuning.md) into
ADAPTER/trees.json, which `--tree auto` (decode.py's default) reads; prints the candidate table
with measured tokens/s on the first --measure-prompts prompts, and writes tune.json and tune.png
(tau and tokens/s against rows per step) to --output-dir.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time

import numpy as np

from bita_jax import api
from bita_jax.bita.tree import DraftTree
from bita_jax.cli import UserError, run_main
from bita_jax.cli.options import MODEL_GROUPS, add_decoding_flags, decoding_options, parse_batch_sizes
from bita_jax.cli.reports import fastest_of_two
from bita_jax.config import DataConfig, MeshConfig, precision_of
from bita_jax.io import lock
from bita_jax.io.paths import check_writable_dir
from bita_jax.io.prompts import read_prompts
from bita_jax.sharding import make_mesh, mesh_rules
from bita_jax.training import data
from bita_jax.tuning import step_cost, tuner
from bita_jax.tuning.choice import Prediction, load_store, save_store


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bita_jax.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face LlamaForCausalLM checkpoint directory")
    parser.add_argument("--adapter", required=True, help="BiTA adapter directory; trees.json goes there")
    parser.add_argument("--data", required=True, help="calibration jsonl: decode.py records or prompts")
    parser.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes to choose for")
    add_decoding_flags(parser, MODEL_GROUPS)  # chat, dtype, precision, mesh: as decode.py will decode
    parser.add_argument("--max-new-tokens", type=int, default=128, help="for prompts decoded first")
    parser.add_argument("--max-rank", type=int, default=tuner.DEFAULT_MAX_RANK, help="draft ranks tracked")
    parser.add_argument("--max-rows", type=int, default=tuner.DEFAULT_MAX_ROWS, help="largest tree step")
    parser.add_argument(
        "--measure-prompts", type=int, default=8, help="prompts decoded per shown tree (0: no measuring)"
    )
    parser.add_argument("--output-dir", default="tune_out", help="tune.json and tune.png go here")
    return parser


def calibration_examples(
    model: api.Model, model_dir: str, path: str, max_new_tokens: int, batch_size: int, chat: bool
) -> list[data.Example]:
    """(source, target) calibration examples from a decode.py jsonl (its prompt_ids as they are), or
    from a prompts jsonl by greedy AR decoding (max_new_tokens each, batch_size at a time; `chat`:
    in the chat template)."""
    if tuner.has_outputs(path):
        config = DataConfig(path=path, max_length=model.config.max_position_embeddings)
        return data.read_examples(config, model_dir, model.config.eos_token_ids[0])
    prompts = read_prompts(path)
    run = model.run(prompts, max_new_tokens=max_new_tokens, mode="ar", batch_size=batch_size, chat=chat)
    return [data.Example(tuple(r["prompt_ids"]), tuple(r["output_ids"])) for r in run.records]


def measured_speed(model: api.Model, prompts: list[str], tree: DraftTree | None, batch_size: int,
                   max_new_tokens: int, chat: bool) -> tuple[float, float, list[list[int]]]:  # fmt: skip
    """(tokens per step, tokens/s, output ids) of decoding prompts (`chat`: in the chat template)
    with the tree (None: AR), compiles excluded; the faster of two runs (the first also warms the
    executable up)."""
    options = {"mode": "ar"} if tree is None else {"mode": "bita", "tree": tree}
    options.update(max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat)
    run = fastest_of_two(model, prompts, model.run(prompts, **options), **options)
    tokens = sum(len(g.output_ids) for g in run.generations)
    steps = sum(g.steps for g in run.generations)
    return tokens / steps, tokens / run.seconds, [g.output_ids for g in run.generations]


def tree_label(p: Prediction) -> str:
    if p.tree is None:
        return "AR"
    if p.tree.lookup:
        return f"{p.tree.num_mask_nodes}+lookup:{p.tree.lookup}, depth {p.tree.depth}"
    return f"{p.tree.num_nodes} nodes, depth {p.tree.depth}"


def table(rows: list[dict], ar_seconds: float) -> str:
    """The candidate table of one batch size (rows from `measure_rows`)."""
    head = (
        f"{'tree':<20}{'rows':>5}{'tau pred':>9}{'tau meas':>9}{'step ms':>9}{'x AR step':>10}"
        f"{'tok/s pred':>11}{'tok/s meas':>11}{'x AR pred':>10}{'x AR meas':>10}"
    )
    lines = [head]
    ar = rows[0]
    for r in rows:
        lines.append(
            f"{r['tree']:<20}{r['rows']:>5}{r['tau_predicted']:>9.2f}{r['tau_measured']:>9.2f}"
            f"{1e3 * r['step_seconds']:>9.3f}{r['step_seconds'] / ar_seconds:>10.2f}"
            f"{r['tokens_per_s_predicted']:>11.1f}{r['tokens_per_s_measured']:>11.1f}"
            f"{r['tokens_per_s_predicted'] / ar['tokens_per_s_predicted']:>10.2f}"
            f"{r['tokens_per_s_measured'] / ar['tokens_per_s_measured']:>10.2f}"
        )
    return "\n".join(lines)


def measure_rows(
    model: api.Model, tuning: tuner.Tuning, prompts: list[str], max_new_tokens: int, chat: bool
) -> list[dict]:
    """AR then the shown trees: predicted and (on prompts, `chat`: in the chat template; nan
    without) measured tau and tokens/s."""
    rows = []
    for p in [tuning.choice.ar, *tuner.shown_trees(tuning)]:
        tau, speed = float("nan"), float("nan")
        if prompts:
            tau, speed, _ = measured_speed(
                model, prompts, p.tree, tuning.costs.batch_size, max_new_tokens, chat
            )
        rows.append(
            {
                "tree": tree_label(p), "spec": None if p.tree is None else p.tree.spec,
                "rows": p.rows, "tau_predicted": p.tau, "tau_measured": tau, "step_seconds": p.step_seconds,
                "tokens_per_s_predicted": p.tokens_per_s, "tokens_per_s_measured": speed,
            }
        )  # fmt: skip
    return rows


def plot(results: list[dict], title: str, path: str) -> None:
    """Per batch size: tau and tokens/s against rows per step, every candidate predicted (dots),
    the shown trees measured (crosses), AR as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.6 * len(results)), squeeze=False)
    for (tau_ax, speed_ax), result in zip(axes, results, strict=True):
        cands, shown = result["candidates"], result["shown"][1:]
        tau_ax.scatter(
            [c["rows"] for c in cands], [c["tau"] for c in cands], s=6, alpha=0.4, label="predicted"
        )
        tau_ax.scatter(
            [r["rows"] for r in shown], [r["tau_measured"] for r in shown], marker="x", label="measured"
        )
        speed_ax.scatter(
            [c["rows"] for c in cands], [c["tokens_per_s"] for c in cands], s=6, alpha=0.4, label="predicted"
        )
        speed_ax.scatter(
            [r["rows"] for r in shown],
            [r["tokens_per_s_measured"] for r in shown],
            marker="x",
            label="measured",
        )
        ar = result["shown"][0]
        speed_ax.axhline(ar["tokens_per_s_predicted"], color="gray", ls="--", lw=1, label="AR predicted")
        speed_ax.axhline(ar["tokens_per_s_measured"], color="black", ls=":", lw=1, label="AR measured")
        batch = result["batch_size"]
        tau_ax.set(
            xscale="log", xlabel="rows per tree step", ylabel="tokens per step", title=f"batch {batch}"
        )
        speed_ax.set(xscale="log", xlabel="rows per tree step", ylabel="tokens/s", title=f"batch {batch}")
        tau_ax.legend(fontsize=8)
        speed_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    decoding = decoding_options(args)
    if decoding.mesh is not None:  # refused before a load, as the API would refuse each batch size
        shape = make_mesh(MeshConfig.parse(decoding.mesh)).shape
        ways = shape["data"] * shape["fsdp"]
        if any(b % ways for b in batch_sizes):
            raise UserError(f"--batch-sizes must be multiples of the mesh's data*fsdp = {ways}")
    if not 1 <= args.max_rank <= 36:
        raise UserError(f"--max-rank must be in 1..36, got {args.max_rank}")
    if not os.path.isdir(args.adapter):
        raise UserError(f"adapter directory not found: {args.adapter}")
    check_writable_dir(args.output_dir, f"--output-dir {args.output_dir}", create=True)
    # One tuner per adapter (it rewrites trees.json) and per --output-dir, held before any load.
    with contextlib.ExitStack() as held:
        held.enter_context(lock.exclusive(args.adapter, f"--adapter {args.adapter}", directory=True))
        if not os.path.samefile(args.adapter, args.output_dir):
            held.enter_context(
                lock.exclusive(args.output_dir, f"--output-dir {args.output_dir}", directory=True)
            )
        return tune(args, decoding, batch_sizes)


def tune(args: argparse.Namespace, decoding: api.DecodingOptions, batch_sizes: list[int]) -> int:
    """Measures, chooses and writes the trees (the module docstring's steps 1-3) for the model
    loaded and the prompts framed as `decoding` says (dtype, precision, mesh, chat)."""
    model = api.load(args.model, adapter=args.adapter, **decoding.load_options())
    device_kind = step_cost.current_device_kind()
    start = time.perf_counter()
    examples = calibration_examples(
        model, args.model, args.data, args.max_new_tokens, max(batch_sizes), decoding.chat
    )
    with mesh_rules(model.mesh):
        stats = tuner.acceptance_statistics(
            model.config, model.params, model.adapter, examples, args.max_rank
        )
    print(
        f"statistics: {len(examples)} sequences, {stats.num_points} drafting points, "
        f"{len(stats.counts)} rank paths ({time.perf_counter() - start:.1f} s)",
        file=sys.stderr,
    )
    prompt_len = int(np.median([len(e.source) for e in examples]))  # step costs: caches sized for these
    prompts = []
    if args.measure_prompts > 0:
        prompts = read_prompts(args.data)[: args.measure_prompts]
    title = f"{device_kind} {decoding.dtype}, {os.path.basename(os.path.normpath(args.adapter))}"
    results, choices = [], []
    for batch in batch_sizes:
        start = time.perf_counter()
        with mesh_rules(model.mesh):
            tuning = tuner.tune_batch_size(
                model.config, model.params, model.adapter, stats, batch, args.max_rows, prompt_len,
                args.max_new_tokens,
            )  # fmt: skip
        choices.append(tuning.choice)
        print(f"batch {batch}: step costs measured in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        rows = measure_rows(model, tuning, prompts, args.max_new_tokens, decoding.chat)
        decision = "AR" if tuning.choice.tree is None else tuning.choice.tree.describe()
        speedup = tuning.choice.speedup
        print(f"\n{title}, batch {batch}: choice {decision} (best tree predicted {speedup:.2f}x AR)")
        print(table(rows, tuning.costs.ar_seconds))
        candidates = [
            {"rows": p.rows, "nodes": p.tree.num_nodes, "tau": p.tau, "tokens_per_s": p.tokens_per_s}
            for p in tuning.predictions
        ]
        results.append(
            {"batch_size": batch, "choice": tuning.choice.to_json(), "shown": rows, "candidates": candidates}
        )
    path = save_store(
        args.adapter,
        tuner.stored(
            load_store(args.adapter), stats, device_kind, decoding.dtype, choices,
            precision=precision_of(model.config), chat=decoding.chat,
        ),  # fmt: skip
    )
    with open(os.path.join(args.output_dir, "tune.json"), "w") as f:
        json.dump({"device_kind": device_kind, "dtype": decoding.dtype, "results": results}, f, indent=1)
    written = "tune.json"
    if importlib.util.find_spec("matplotlib") is not None:  # not in every accelerator image
        plot(results, title, os.path.join(args.output_dir, "tune.png"))
        written += " and tune.png"
    print(f"\nwrote {path}; {written} to {args.output_dir}", file=sys.stderr)
    return 0


def console() -> int:
    """The `bita-tune` console script (pyproject.toml [project.scripts]): main with one-line errors."""
    return run_main(main)
