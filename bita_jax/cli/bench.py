"""Side-by-side decoding benchmark: our AR and BiTA, transformers' greedy and prompt-lookup decoding.

  python -m bita_jax.cli.bench                        # the packaged demo
  python -m bita_jax.cli.bench --model DIR --adapter DIR --prompts FILE.jsonl --batch-sizes 1,4 \\
      --trees upper:5,upper:3,chain --output-dir bench_out

All methods run in one process on the same prompts with the same max_new_tokens. Per method it
reports tokens/s (compiles excluded: every shape is compiled before the clock starts), tokens per
forward pass, the speedup over our AR at the same batch size and the exact-match rate against our
AR output ids. It writes bench.json, bench.md (the table) and bench.png (acceptance per draft level;
speedup per batch size and tree).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np

from bita_jax import api, demo
from bita_jax.bita.tree import parse_tree
from bita_jax.cli import run_main
from bita_jax.cli.options import MODEL_GROUPS, add_decoding_flags, decoding_options, parse_batch_sizes
from bita_jax.io.prompts import read_prompts


@dataclasses.dataclass
class MethodResult:
    """One benchmarked configuration."""

    method: str
    batch_size: int
    tree: str | None
    new_tokens: int
    forward_passes: int
    seconds: float
    compile_seconds: float
    outputs: list[list[int]] = dataclasses.field(repr=False)
    acceptance: list[float] | None = None
    speedup: float = float("nan")
    exact_match: float = float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.forward_passes

    def row(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "outputs"}
        return {**out, "tokens_per_s": self.tokens_per_s, "tokens_per_forward": self.tokens_per_forward}


def run_ours(model: api.Model, texts: list[str], max_new: int, batch_size: int, chat: bool,
             tree: str | None = None) -> MethodResult:  # fmt: skip
    """Our AR (tree None) or BiTA with the given tree, through the Python API (`chat`: prompts in
    the chat template)."""
    options = {"mode": "ar"} if tree is None else {"mode": "bita", "tree": tree}
    run = model.run(texts, max_new_tokens=max_new, batch_size=batch_size, chat=chat, **options)
    generations = run.generations
    acceptance = None
    if run.accepted_per_level is not None:
        acceptance = (run.accepted_per_level.sum(axis=0) / max(sum(g.steps for g in generations), 1)).tolist()
    return MethodResult(
        f"ours {'BiTA' if tree else 'AR'}", batch_size, tree, sum(len(g.output_ids) for g in generations),
        sum(g.steps for g in generations), run.seconds, run.compile_seconds,
        [g.output_ids for g in generations], acceptance=acceptance,
    )  # fmt: skip


def run_hf(model_dir, prompt_ids, max_new, config, lookup: int | None) -> MethodResult:
    """transformers' PyTorch greedy `generate` at batch 1 (prompt lookup when `lookup` is set)."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    kwargs = dict(
        max_new_tokens=max_new, do_sample=False, eos_token_id=list(config.eos_token_ids),
        pad_token_id=config.pad_id, prompt_lookup_num_tokens=lookup,
    )  # fmt: skip

    def generate(ids):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kwargs
            )
        return out[0, len(ids) :].tolist()

    generate(prompt_ids[0])  # warm-up, untimed
    calls[0] = 0
    t0 = time.perf_counter()
    outputs = [generate(ids) for ids in prompt_ids]
    seconds = time.perf_counter() - t0
    name = f"transformers prompt lookup ({lookup})" if lookup else "transformers generate"
    return MethodResult(name, 1, None, sum(map(len, outputs)), calls[0], seconds, 0.0, outputs)


def score(results: list[MethodResult]) -> None:
    """Fills speedup (vs our AR at the same batch size) and exact match (vs our AR at batch 1)."""
    ar = {r.batch_size: r for r in results if r.method == "ours AR"}
    reference = ar[min(ar)].outputs
    for r in results:
        r.speedup = r.tokens_per_s / ar[r.batch_size].tokens_per_s
        r.exact_match = float(np.mean([a == b for a, b in zip(r.outputs, reference, strict=True)]))


def tree_label(spec: str | None) -> str:
    """Short name of a tree spec for tables and legends (JSON path lists become their size)."""
    if spec is None:
        return "-"
    names = {demo.COMPACT_TREE: "demo compact", demo.WIDE_TREE: "demo wide"}
    if spec.startswith("["):
        return f"{names.get(spec, 'custom')} ({len(json.loads(spec))} nodes)"
    return spec


def markdown_table(results: list[MethodResult]) -> str:
    lines = [
        "| method | batch | tree | tokens/s | tokens/forward | speedup vs our AR | exact match vs our AR |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {r.batch_size} | {tree_label(r.tree)} | {r.tokens_per_s:.1f} | "
            f"{r.tokens_per_forward:.2f} | {r.speedup:.2f}x | {100 * r.exact_match:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[MethodResult], path: str) -> None:
    """Left: acceptance rate per draft level (batch 1, per tree). Right: speedup per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bita = [r for r in results if r.method == "ours BiTA"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for r in bita:
        if r.batch_size == min(b.batch_size for b in bita):
            left.plot(range(1, len(r.acceptance) + 1), r.acceptance, marker="o", label=tree_label(r.tree))
    left.set(
        xlabel="draft level", ylabel="acceptance rate", title="BiTA acceptance per draft level", ylim=(0, 1)
    )
    left.legend()
    for tree in dict.fromkeys(r.tree for r in bita):
        rows = sorted((r.batch_size, r.speedup) for r in bita if r.tree == tree)
        right.plot(*zip(*rows, strict=True), marker="o", label=tree_label(tree))
    right.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    right.set(xlabel="batch size", ylabel="speedup vs our AR", title="wall-clock speedup")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bita_jax.cli.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF checkpoint directory (default: the packaged demo model)")
    parser.add_argument("--adapter", help="BiTA adapter directory (default: the packaged demo adapter)")
    parser.add_argument("--prompts", help="jsonl prompts (default: the demo's held-out prompts)")
    parser.add_argument("--num-prompts", type=int, default=16, help="use the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,4", help="comma-separated, for our AR and BiTA")
    parser.add_argument(
        "--trees",
        nargs="+",
        help="tree specs: upper:K, chain or JSON paths (default: upper:5 and the demo's wide tree)",
    )
    parser.add_argument("--prompt-lookup", type=int, default=10, help="prompt_lookup_num_tokens")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers (PyTorch) methods")
    parser.add_argument("--output-dir", default="bench_out")
    # chat, dtype, precision, mesh: our methods' (transformers' run in float32 on one device).
    add_decoding_flags(parser, MODEL_GROUPS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.model and args.adapter and args.prompts):
        demo.require()
    model_dir = args.model or demo.MODEL_DIR
    adapter_dir = args.adapter or demo.ADAPTER_DIR
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    decoding = decoding_options(args)
    import jax

    trees = args.trees or ["upper:5", demo.WIDE_TREE]
    texts = read_prompts(args.prompts or demo.PROMPTS_FILE)[: args.num_prompts]
    model = api.load(model_dir, adapter=adapter_dir, **decoding.load_options())
    for spec in trees:
        parse_tree(spec, model.bita_config.num_mask_tokens)  # bad specs fail before any compile
    prompt_ids = model.encode(texts, decoding.chat)

    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {os.cpu_count()} host cores)"
    print(
        f"benchmark: {len(texts)} prompts, max_new_tokens {args.max_new_tokens}, on {device}", file=sys.stderr
    )
    results = []
    for batch in batch_sizes:
        results.append(run_ours(model, texts, args.max_new_tokens, batch, decoding.chat))
        for spec in trees:
            results.append(run_ours(model, texts, args.max_new_tokens, batch, decoding.chat, spec))
        print(f"  batch {batch} done", file=sys.stderr)
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("note: torch is not installed; transformers methods skipped", file=sys.stderr)
        else:
            results.append(run_hf(model_dir, prompt_ids, args.max_new_tokens, model.config, None))
            results.append(
                run_hf(model_dir, prompt_ids, args.max_new_tokens, model.config, args.prompt_lookup)
            )
    score(results)

    os.makedirs(args.output_dir, exist_ok=True)
    table = markdown_table(results)
    meta = {
        "model": model_dir, "adapter": adapter_dir, "prompts": len(texts),
        "max_new_tokens": args.max_new_tokens, "device": device, **decoding.load_options(),
        "chat": decoding.chat,
    }  # fmt: skip
    with open(os.path.join(args.output_dir, "bench.json"), "w") as f:
        json.dump({**meta, "results": [r.row() for r in results]}, f, indent=2)
    with open(os.path.join(args.output_dir, "bench.md"), "w") as f:
        f.write(f"{len(texts)} prompts, max_new_tokens {args.max_new_tokens}, {device}\n\n{table}")
    plot(results, os.path.join(args.output_dir, "bench.png"))
    print(table)
    print(f"wrote bench.json, bench.md, bench.png to {args.output_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
