"""AR decoding speed: bita_jax's jitted greedy generate vs transformers' PyTorch `generate`.

Builds a random ~125M-parameter LLaMA checkpoint (width 768, 12 layers, 12 query / 4 KV heads,
vocab 32000) in a temp dir, loads it with bita_jax.hf_io, and times both implementations on the same
random prompts in float32, side by side in one run:

  python benchmarks/ar_benchmark.py [--batch-sizes 1 8] [--prompt-len 64] [--new-tokens 64]

Prints a table and writes JSON (tokens/s of each, their ratio, our compile time, id agreement).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bita_jax.decoding import runner
from bita_jax.decoding.loop import SCAN_LAYERS, make_ar_generate
from bita_jax.decoding.runner import CompiledByShape
from bita_jax.io import hf

MODEL = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
    num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)  # fmt: skip


def build_checkpoint(path: str) -> int:
    """Saves the random benchmark model; returns its parameter count."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).eval()
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def best_of(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of `repeats` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def bench_ours(path: str, prompts: np.ndarray, new_tokens: int, repeats: int) -> dict:
    config = hf.load_config(path, scan_layers=SCAN_LAYERS)
    params = hf.load_params(path, config)
    generate = CompiledByShape(make_ar_generate(config, new_tokens))
    batch = runner.pad_batch([list(p) for p in prompts], 0, len(prompts), config.pad_id)
    generate.prepare(params, *batch)

    def run():
        state = jax.block_until_ready(generate(params, *batch))
        return jax.device_get((state.output, state.num_generated))

    seconds, (output, num) = best_of(run, repeats)
    ids = [output[i, : num[i]].tolist() for i in range(len(prompts))]
    return dict(seconds=seconds, compile_seconds=generate.compile_seconds, ids=ids)


def bench_torch(model: LlamaForCausalLM, prompts: np.ndarray, new_tokens: int, repeats: int) -> dict:
    ids = torch.from_numpy(prompts)

    def run():
        with torch.no_grad():
            return model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=new_tokens, pad_token_id=MODEL["eos_token_id"],
            )  # fmt: skip

    seconds, out = best_of(run, repeats)
    generated = []
    for row in out[:, prompts.shape[1] :].tolist():
        # Keep through the first EOS, as our output does.
        end = row.index(MODEL["eos_token_id"]) + 1 if MODEL["eos_token_id"] in row else len(row)
        generated.append(row[:end])
    return dict(seconds=seconds, ids=generated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/ar_benchmark.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)

    rows = []
    with tempfile.TemporaryDirectory() as path:
        num_params = build_checkpoint(path)
        torch_model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        rng = np.random.RandomState(0)
        for batch in args.batch_sizes:
            prompts = rng.randint(3, MODEL["vocab_size"], (batch, args.prompt_len)).astype(np.int32)
            ours = bench_ours(path, prompts, args.new_tokens, args.repeats)
            ref = bench_torch(torch_model, prompts, args.new_tokens, args.repeats)
            tokens = sum(len(r) for r in ours["ids"])
            rows.append(
                dict(
                    batch=batch,
                    new_tokens=tokens,
                    ours_tokens_per_s=tokens / ours["seconds"],
                    torch_tokens_per_s=sum(len(r) for r in ref["ids"]) / ref["seconds"],
                    ours_compile_s=ours["compile_seconds"],
                    ids_equal=ours["ids"] == ref["ids"],
                )
            )
            rows[-1]["ratio"] = rows[-1]["ours_tokens_per_s"] / rows[-1]["torch_tokens_per_s"]

    setup = f"prompt {args.prompt_len}, {args.new_tokens} new tokens"
    print(f"LLaMA {num_params / 1e6:.0f}M params, float32, {setup}")
    header = ("batch", "bita_jax tok/s", "torch tok/s", "ratio", "compile s", "same ids")
    print("{:>5} {:>15} {:>12} {:>6} {:>10} {:>9}".format(*header))
    for r in rows:
        print(
            f"{r['batch']:>5} {r['ours_tokens_per_s']:>15.1f} {r['torch_tokens_per_s']:>12.1f} "
            f"{r['ratio']:>6.2f} {r['ours_compile_s']:>10.1f} {str(r['ids_equal']):>9}"
        )
    report = dict(
        model=MODEL, num_params=num_params, dtype="float32", prompt_len=args.prompt_len,
        max_new_tokens=args.new_tokens, torch_threads=args.torch_threads, cpu_count=os.cpu_count(),
        machine=platform.processor() or platform.machine(), jax=jax.__version__, torch=torch.__version__,
        results=rows,
    )  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
