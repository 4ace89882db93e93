"""Verification cost: time of one BiTA tree step relative to one AR step, across trees and batch sizes.

  python benchmarks/tree_cost.py                                 # small random model, current device
  python benchmarks/tree_cost.py --shape llama2-7b --dtype bfloat16 --context 512

Random weights (a step's time does not depend on their values). Both steps are the jitted ones
decoding uses (cache donated), timed with the cache at `--context` committed tokens; each time is
the median over `--iters` steps after a warm-up. Prints a table and writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bita_jax.bita import adapter as bita_adapter  # noqa: E402
from bita_jax.bita.tree import parse_tree  # noqa: E402
from bita_jax.config import BiTAConfig, ModelConfig  # noqa: E402
from bita_jax.decoding.cache import KVCache  # noqa: E402
from bita_jax.decoding.loop import SCAN_LAYERS, make_ar_step, make_bita_step  # noqa: E402
from bita_jax.decoding.tree_step import placeholder_drafts  # noqa: E402
from bita_jax.models.llama import init_params  # noqa: E402
from bita_jax.cli.aot import LLAMA2_7B  # noqa: E402

SHAPES = {
    # ~50M params: big enough that matmuls, not dispatch, dominate on a CPU.
    "small": {**LLAMA2_7B, "hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8,
              "num_hidden_layers": 8, "num_key_value_heads": 8},
    "llama2-7b": LLAMA2_7B,
}  # fmt: skip
TREES = ["chain", "upper:1", "upper:2", "upper:3", "upper:4", "upper:5"]


def median_seconds(step, args, rebuild, iters: int) -> float:
    """Median wall time of `step(*args)`; `rebuild(out, args)` gives the next call's args."""
    out = jax.block_until_ready(step(*args))  # compile + warm-up
    args = rebuild(out, args)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - t0)
        args = rebuild(out, args)
    return statistics.median(times)


def time_steps(config, params, adapter, batch: int, context: int, iters: int) -> dict[str, float]:
    """{"ar": seconds, tree spec: seconds} for one step at the given batch size."""
    max_len = context + 64

    def at_context(cache: KVCache) -> KVCache:
        # The length is held fixed so every timed step sees the same context.
        return cache.replace(length=jnp.full((batch,), context, jnp.int32))

    pending = jnp.ones((batch,), jnp.int32)
    ar_step = make_ar_step(config)
    streams = jnp.arange(batch, dtype=jnp.int32)
    ar_args = (params, at_context(KVCache.init(config, batch, max_len)), pending, streams)
    times = {"ar": median_seconds(ar_step, ar_args, lambda o, a: (a[0], at_context(o[1]), *a[2:]), iters)}
    for spec in TREES:
        tree = parse_tree(spec, 3)
        step = make_bita_step(config, tree)
        drafts = placeholder_drafts(tree, batch, config.vocab_size)
        args = (params, adapter, at_context(KVCache.init(config, batch, max_len)), pending, drafts, streams)
        # The step commits in place (the cache is donated); each call gets the returned cache.
        times[spec] = median_seconds(step, args, lambda o, a: (*a[:2], at_context(o[1]), *a[3:]), iters)
    return times


def plot(rows: list[dict], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for batch in sorted({r["batch"] for r in rows}):
        sel = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["rows"])
        ax.plot([r["rows"] for r in sel], [r["ratio"] for r in sel], "o-", label=f"batch {batch}")
        for r in sel:
            ax.annotate(
                r["tree"], (r["rows"], r["ratio"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("rows per tree step (1 + N + Dt (N + 1))")
    ax.set_ylabel("tree step time / AR step time")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--context", type=int, default=256, help="committed tokens in the cache")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--output", default="benchmarks/tree_cost", help="path prefix for .json and .png")
    args = parser.parse_args()

    config = ModelConfig.from_hf_config(SHAPES[args.shape], dtype=args.dtype, scan_layers=SCAN_LAYERS)
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    adapter = bita_adapter.init_adapter(config, BiTAConfig(num_mask_tokens=3), jax.random.key(1))
    device = jax.devices()[0]
    host = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    machine = f"{device.device_kind} ({device.platform}, {len(jax.devices())} device(s)), host {host}"
    title = f"{args.shape} {args.dtype}, context {args.context}, {machine}"
    print(title)
    print(f"{'tree':8s} {'nodes':>5s} {'rows':>5s} {'batch':>5s} {'AR ms':>8s} {'tree ms':>8s} {'ratio':>6s}")
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        times = time_steps(config, params, adapter, batch, args.context, args.iters)
        for spec in TREES:
            tree = parse_tree(spec, 3)
            row = dict(
                tree=spec, nodes=tree.num_nodes, rows=tree.num_rows, batch=batch,
                ar_ms=1e3 * times["ar"], tree_ms=1e3 * times[spec], ratio=times[spec] / times["ar"],
            )  # fmt: skip
            rows.append(row)
            print(
                f"{spec:8s} {row['nodes']:5d} {row['rows']:5d} {batch:5d} {row['ar_ms']:8.2f} "
                f"{row['tree_ms']:8.2f} {row['ratio']:6.2f}",
                flush=True,
            )
    with open(args.output + ".json", "w") as f:
        json.dump({"shape": args.shape, "dtype": args.dtype, "context": args.context, "machine": machine,
                   "jax": jax.__version__, "rows": rows}, f, indent=1)  # fmt: skip
    plot(rows, title, args.output + ".png")
    print(f"wrote {args.output}.json and {args.output}.png")


if __name__ == "__main__":
    main()
