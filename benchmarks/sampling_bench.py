"""BiTA vs AR under sampling: tokens per step and wall-clock speedup at several temperatures.

  python benchmarks/sampling_bench.py [--prompts 8] [--new-tokens 64] [--skip-125m]

Two models, side by side in one run, through the Python API: the packaged demo (its trained
adapter, the demo's wide tree) and a random ~125M-parameter LLaMA (benchmarks/ar_benchmark.py's
shape) with a random adapter (nothing accepted: it shows the cost of the tree under sampling).
For temperature 0 (greedy), 0.7 and 1.0 (top-p 0.9, seed 0) it decodes the same prompts with AR and
BiTA, checks that the outputs are identical, and prints tokens per step, acceptance per draft level
and the speedup. Writes benchmarks/sampling_bench.json and benchmarks/sampling_bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bita_jax  # noqa: E402
from bita_jax import demo  # noqa: E402
from bita_jax.bita import adapter as bita_adapter  # noqa: E402
from bita_jax.io.prompts import read_prompts  # noqa: E402
from bita_jax.config import BiTAConfig  # noqa: E402
from bita_jax.io import adapter_files  # noqa: E402

SETTINGS = [dict(temperature=0.0), dict(temperature=0.7, top_p=0.9), dict(temperature=1.0, top_p=0.9)]


def compare(model: bita_jax.Model, texts: list[str], tree: str, new_tokens: int, name: str) -> list[dict]:
    """One row per sampling setting: AR and BiTA on the same prompts, seed 0, batch 1."""
    rows = []
    for setting in SETTINGS:
        options = dict(max_new_tokens=new_tokens, batch_size=1, seed=0, **setting)
        model.run(texts[:1], mode="ar", **options)  # compile both before timing anything
        model.run(texts[:1], mode="bita", tree=tree, **options)
        ar = model.run(texts, mode="ar", **options)
        bita = model.run(texts, mode="bita", tree=tree, **options)
        tokens = sum(r["new_tokens"] for r in bita.records)
        steps = sum(r["steps"] for r in bita.records)
        rows.append(
            {
                "model": name,
                **{"temperature": 0.0, "top_p": 1.0, **setting},
                "identical": [r["output_ids"] for r in bita.records] == [r["output_ids"] for r in ar.records],
                "tokens_per_step": tokens / steps,
                "acceptance_per_level": (bita.accepted_per_level.sum(0) / steps).round(3).tolist(),
                "ar_tokens_per_s": sum(r["new_tokens"] for r in ar.records) / ar.seconds,
                "bita_tokens_per_s": tokens / bita.seconds,
            }
        )
        rows[-1]["speedup"] = rows[-1]["bita_tokens_per_s"] / rows[-1]["ar_tokens_per_s"]
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def random_125m(path: str) -> str:
    """The AR benchmark's random 125M model with a random adapter; returns the adapter directory."""
    from benchmarks.ar_benchmark import build_checkpoint
    from tests.tiny_checkpoint import make_tokenizer

    build_checkpoint(path)
    make_tokenizer(32000).save_pretrained(path)
    bita = BiTAConfig(num_prompt_tokens=16, num_mask_tokens=3)
    config = bita_jax.load(path).config
    adapter = bita_adapter.init_adapter(config, bita, jax.random.key(0))
    return adapter_files.save_adapter(os.path.join(path, "adapter"), adapter, bita, path)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | temperature | top-p | identical | tokens/step | acceptance per level "
        "| AR tok/s | BiTA tok/s | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        levels = " / ".join(f"{100 * a:.0f}%" for a in r["acceptance_per_level"])
        lines.append(
            f"| {r['model']} | {r['temperature']} | {r['top_p']} | {'yes' if r['identical'] else 'NO'} | "
            f"{r['tokens_per_step']:.2f} | {levels} | {r['ar_tokens_per_s']:.1f} | "
            f"{r['bita_tokens_per_s']:.1f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help="demo prompts (the 125M model gets half)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-125m", action="store_true")
    parser.add_argument("--output", default="benchmarks/sampling_bench")
    args = parser.parse_args(argv)
    texts = read_prompts(demo.PROMPTS_FILE)[: args.prompts]
    model = bita_jax.load(demo.MODEL_DIR, adapter=demo.ADAPTER_DIR)
    rows = compare(model, texts, demo.WIDE_TREE, args.new_tokens, "demo (2M, trained adapter, wide tree)")
    if not args.skip_125m:
        with tempfile.TemporaryDirectory() as path:
            adapter_dir = random_125m(path)
            big = bita_jax.load(path, adapter=adapter_dir)
            half = texts[: max(1, args.prompts // 2)]
            name = "random 125M (random adapter, upper:2)"
            rows += compare(big, half, "upper:2", args.new_tokens // 2, name)
    load = os.getloadavg()[0]
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, load {load:.1f}, jax {jax.__version__}"
    table = markdown(rows)
    print(f"{machine}\n\n{table}")
    with open(args.output + ".json", "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=2)
    with open(args.output + ".md", "w") as f:
        f.write(f"{machine}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
