"""The accelerator suite: what BiTA's rows cost and earn on this device, in one run.

  bash benchmarks/accelerator.sh                 # LLaMA-2-7B/13B shapes, bf16, batch 1/8/32; the demo
  bash benchmarks/accelerator.sh --small         # tiny shapes and a short demo run (CPU check)

1. Verification cost: one tree step / one AR step, random weights (a step's time does not depend on
   them), each step timed in an on-device loop of the decoding loop's own steps
   (bita_jax.tuning.step_cost), the cache sized as decoding sizes it for a prompt of the preset's
   context and 128 new tokens; fastest of interleaved
   rounds. Steps of one shape and batch are compiled concurrently (threads) to bound the wall time.
2. AR tokens/s against the memory-bandwidth bound: B / AR step seconds, against measured copy
   bandwidth / weight bytes (each AR step reads every weight once).
3. The tuner and `--tree auto` end to end on the packaged demo: `python -m bita_jax.tune` on the
   held-out calibration prompts (into a copy of the demo adapter), then auto vs AR on the demo
   prompts: the choice, tokens per step, speedup, identical outputs.
Writes accelerator.json and accelerator.md to --output-dir. Needs jax, flax, optax, orbax,
transformers, safetensors, tokenizers (no torch, datasets or matplotlib: the tuner's plot is skipped
when matplotlib is missing).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bita_jax.bita.adapter import init_adapter  # noqa: E402
from bita_jax.bita.tree import parse_tree  # noqa: E402
from bita_jax.config import BiTAConfig, ModelConfig  # noqa: E402
from bita_jax.decoding.loop import SCAN_LAYERS  # noqa: E402
from bita_jax.decoding.sampling import streams_for  # noqa: E402
from bita_jax.decoding.tree_step import placeholder_drafts  # noqa: E402
from bita_jax.models.llama import init_params  # noqa: E402
from bita_jax.tuning import step_cost  # noqa: E402
from bita_jax.cli.aot import LLAMA2_7B, LLAMA2_13B  # noqa: E402

NEW_TOKENS = 128  # the cache holds --context prompt tokens and room for this many new ones
TINY = {**LLAMA2_7B, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 512}  # fmt: skip
FULL = {"shapes": {"llama2-7b": LLAMA2_7B, "llama2-13b": LLAMA2_13B}, "dtype": "bfloat16",
        "batch_sizes": (1, 8, 32), "context": 512, "repeats": 10, "demo_batch_sizes": "1,8",
        "demo_max_new_tokens": 128, "demo_measure_prompts": 8, "demo_max_rows": 160}  # fmt: skip
SMALL = {"shapes": {"tiny": TINY}, "dtype": "float32", "batch_sizes": (1, 2), "context": 32, "repeats": 2,
         "demo_batch_sizes": "1", "demo_max_new_tokens": 16, "demo_measure_prompts": 0,
         "demo_max_rows": 10}  # fmt: skip


def device_line() -> str:
    device = jax.devices()[0]
    return (
        f"{device.device_kind} ({device.platform}, {len(jax.devices())} device(s)), "
        f"host {platform.machine()} with {os.cpu_count()} CPU cores, jax {jax.__version__}"
    )


def copy_bandwidth(num_bytes: int, repeats: int) -> float:
    """Device memory bandwidth in bytes/s from timing a copy (x + 1 reads and writes every byte)."""
    x = jnp.zeros((num_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1)
    (seconds,) = step_cost.interleaved_best_seconds([lambda: copy(x)], repeats)
    return 2 * x.nbytes / seconds


def compiled_step_runs(config: ModelConfig, params, adapter, trees, batch: int, context: int):
    """Like step_cost.step_runs, with every step compiled ahead of time, concurrently."""
    step_rows = max(t.step_rows for t in trees)
    state = {"cache": step_cost.decode_cache(config, batch, context, NEW_TOKENS, step_rows)}
    pending = jnp.zeros((batch,), jnp.int32)
    streams = jnp.asarray(streams_for(0, range(batch)))
    calls = [
        (step_cost.make_ar_steps(config, step_cost.STEPS_PER_CALL), lambda c: (params, c, pending, streams))
    ]
    for tree in trees:
        drafts = placeholder_drafts(tree, batch, config.vocab_size)
        calls.append((
            step_cost.make_tree_steps(config, tree, step_cost.STEPS_PER_CALL),
            lambda c, d=drafts: (params, adapter, c, pending, d, streams),
        ))  # fmt: skip
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        executables = list(pool.map(lambda fc: fc[0].lower(*fc[1](state["cache"])).compile(), calls))
    compile_seconds = time.perf_counter() - start

    def run_of(executable, args):
        def run():
            state["cache"] = executable(*args(state["cache"]))
            return state["cache"]

        return run

    return [run_of(e, args) for e, (_, args) in zip(executables, calls, strict=True)], compile_seconds


def verification_costs(
    preset: dict, tree_specs: list[str], bandwidth: float
) -> tuple[list[dict], list[dict]]:
    """Per shape and batch size: tree step / AR step of each tree, and AR tokens/s against the
    bound B * bandwidth / weight bytes."""
    cost_rows, ar_rows = [], []
    for name, shape in preset["shapes"].items():
        config = ModelConfig.from_hf_config(shape, dtype=preset["dtype"], scan_layers=SCAN_LAYERS)
        params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
        adapter = init_adapter(config, BiTAConfig(num_mask_tokens=3), jax.random.key(1))
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
        trees = [parse_tree(s, 3) for s in tree_specs]
        for batch in preset["batch_sizes"]:
            runs, compile_seconds = compiled_step_runs(
                config, params, adapter, trees, batch, preset["context"]
            )
            ar, *tree_times = [
                t / step_cost.STEPS_PER_CALL
                for t in step_cost.interleaved_best_seconds(runs, preset["repeats"])
            ]
            for spec, tree, seconds in zip(tree_specs, trees, tree_times, strict=True):
                cost_rows.append({
                    "shape": name, "batch": batch, "tree": tree_label(spec), "nodes": tree.num_nodes,
                    "rows": tree.num_rows, "ar_ms": 1e3 * ar, "tree_ms": 1e3 * seconds, "ratio": seconds / ar,
                })  # fmt: skip
            bound = bandwidth / weight_bytes * batch
            ar_rows.append({
                "shape": name, "batch": batch, "weight_gb": weight_bytes / 1e9, "ar_ms": 1e3 * ar,
                "tokens_per_s": batch / ar, "bound_tokens_per_s": bound, "of_bound": batch / ar / bound,
                "compile_s": compile_seconds,
            })  # fmt: skip
            ratios = ", ".join(f"{r['tree']} {r['ratio']:.2f}" for r in cost_rows[-len(trees) :])
            print(f"{name} batch {batch}: AR {1e3 * ar:.2f} ms; tree/AR {ratios}", flush=True)
        del params, adapter
    return cost_rows, ar_rows


def tree_label(spec: str) -> str:
    return f"json ({len(json.loads(spec))} nodes)" if spec.startswith("[") else spec


def demo_end_to_end(preset: dict, work: str) -> dict:
    """The tuner on the demo's calibration prompts (a copy of its adapter), then auto vs AR."""
    import bita_jax
    from bita_jax import demo
    from bita_jax.cli import tune as tune_cli
    from bita_jax.io.prompts import read_prompts

    demo.require()
    adapter_dir = shutil.copytree(demo.ADAPTER_DIR, os.path.join(work, "adapter"), dirs_exist_ok=True)
    os.remove(os.path.join(adapter_dir, "trees.json"))  # tune from scratch on this device
    calibration = os.path.join(work, "calibration_prompts.jsonl")
    with open(calibration, "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in demo.calibration_prompts())
    start = time.perf_counter()
    tune_cli.main([
        "--model", demo.MODEL_DIR, "--adapter", adapter_dir, "--data", calibration,
        "--batch-sizes", preset["demo_batch_sizes"], "--max-new-tokens", str(preset["demo_max_new_tokens"]),
        "--measure-prompts", str(preset["demo_measure_prompts"]), "--max-rows", str(preset["demo_max_rows"]),
        "--output-dir", os.path.join(work, "tune"),
    ])  # fmt: skip
    tune_seconds = time.perf_counter() - start
    model = bita_jax.load(demo.MODEL_DIR, adapter=adapter_dir)
    texts = read_prompts(demo.DEMO_PROMPTS_FILE)
    out = {"tune_seconds": tune_seconds, "runs": []}
    for batch in (int(b) for b in preset["demo_batch_sizes"].split(",")):
        options = dict(max_new_tokens=preset["demo_max_new_tokens"], batch_size=batch)
        auto_run = model.run(texts, mode="bita", tree="auto", **options)
        ar_run = model.run(texts, mode="ar", **options)
        tokens = sum(len(g.output_ids) for g in auto_run.generations)
        choice = auto_run.auto.choice
        same = all(
            a.output_ids == b.output_ids
            for a, b in zip(auto_run.generations, ar_run.generations, strict=True)
        )
        out["runs"].append({
            "batch": batch, "auto": auto_run.auto.note(), "mode": auto_run.mode,
            "tokens_per_step": tokens / sum(g.steps for g in auto_run.generations),
            "predicted_tokens_per_step": choice.chosen.tau, "speedup": ar_run.seconds / auto_run.seconds,
            "predicted_speedup": choice.chosen.tokens_per_s / choice.ar.tokens_per_s, "identical": same,
        })  # fmt: skip
    return out


def markdown(result: dict) -> str:
    lines = [f"# Accelerator suite\n\n{result['device']}\n", "## Verification cost (tree step / AR step)\n"]
    specs = list(dict.fromkeys(r["tree"] for r in result["verification_cost"]))
    rows_of = {r["tree"]: r["rows"] for r in result["verification_cost"]}
    lines.append("| shape | batch | AR ms | " + " | ".join(f"{s} ({rows_of[s]} rows)" for s in specs) + " |")
    lines.append("|---|---|---|" + "---|" * len(specs))
    for ar in result["ar_vs_bound"]:
        ratios = {
            r["tree"]: r["ratio"]
            for r in result["verification_cost"]
            if (r["shape"], r["batch"]) == (ar["shape"], ar["batch"])
        }
        cells = " | ".join(f"{ratios[s]:.2f}" for s in specs)
        lines.append(f"| {ar['shape']} | {ar['batch']} | {ar['ar_ms']:.2f} | {cells} |")
    lines.append(
        f"\n## AR tokens/s against the memory-bandwidth bound ({result['bandwidth_gb_s']:.0f} GB/s copy)\n"
    )
    lines.append("| shape | batch | weights GB | AR tokens/s | bound tokens/s | of bound |")
    lines.append("|---|---|---|---|---|---|")
    for r in result["ar_vs_bound"]:
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['weight_gb']:.1f} | {r['tokens_per_s']:.1f} | "
            f"{r['bound_tokens_per_s']:.1f} | {100 * r['of_bound']:.0f}% |"
        )
    demo_result = result.get("demo")
    if demo_result:
        lines.append(f"\n## Demo: tuner ({demo_result['tune_seconds']:.0f} s) and --tree auto vs AR\n")
        lines.append("| batch | auto decodes | tokens/step (pred) | speedup (pred) | identical | why |")
        lines.append("|---|---|---|---|---|---|")
        for r in demo_result["runs"]:
            tau = f"{r['tokens_per_step']:.2f} ({r['predicted_tokens_per_step']:.2f})"
            speedup = f"{r['speedup']:.2f}x ({r['predicted_speedup']:.2f}x)"
            same = "yes" if r["identical"] else "NO"
            lines.append(f"| {r['batch']} | {r['mode']} | {tau} | {speedup} | {same} | {r['auto']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes and a short demo run (CPU check)")
    parser.add_argument("--trees", default="chain,upper:3,upper:5,wide", help="tree specs; wide: the demo's")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo's tuner and auto run")
    parser.add_argument("--output-dir", default="accelerator_out")
    args = parser.parse_args()
    from bita_jax import demo

    preset = SMALL if args.small else FULL
    specs = [demo.WIDE_TREE if s == "wide" else s for s in args.trees.split(",")]
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    result = {"device": device_line(), "preset": "small" if args.small else "full", "dtype": preset["dtype"]}
    print(result["device"], flush=True)
    bandwidth = copy_bandwidth(1 << 30 if jax.default_backend() != "cpu" else 1 << 26, preset["repeats"])
    result["bandwidth_gb_s"] = bandwidth / 1e9
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    result["verification_cost"], result["ar_vs_bound"] = verification_costs(preset, specs, bandwidth)
    if not args.no_demo:
        result["demo"] = demo_end_to_end(preset, os.path.join(args.output_dir, "demo"))
    result["seconds"] = time.perf_counter() - start
    with open(os.path.join(args.output_dir, "accelerator.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(args.output_dir, "accelerator.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"wrote accelerator.json and accelerator.md to {args.output_dir} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
