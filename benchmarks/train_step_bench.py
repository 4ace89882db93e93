"""Train step speed and memory: the split step (normal tokens as a no-gradient prefill, only the mask
rows differentiated) vs the single forward over the whole multi-group sequence it replaced.

Both are the real jitted train step (`make_train_step`, AdamW, float32, one device), differing only
in the loss function (the single forward is tests/single_forward.py). Models: the packaged demo model
and a random SmolLM2-135M-shaped LLaMA (30 layers, width 576, MLP 1536, 9 query / 3 KV heads, vocab
49152, tied embeddings). Each sequence fills its length T exactly: normal part T - G*M, then G groups
of M masks (G = 64, M = 3 by default). Run from the repo root:

  PYTHONPATH=. python benchmarks/train_step_bench.py [--lengths 256 1024 2048] [--repeats 2]

Prints a side-by-side table (training tokens/s = B*T per step time; the compiler's temporary bytes)
and writes benchmarks/train_step_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bita_jax.bita import adapter as bita_adapter
from bita_jax.bita.training_mask import build_sequence
from bita_jax.config import BiTAConfig, MeshConfig, ModelConfig, OptimizerConfig
from bita_jax.io import hf
from bita_jax.models.llama import init_params
from bita_jax.sharding import LOGICAL_AXIS_RULES, make_mesh
from bita_jax.training import data
from bita_jax.training import loop as train_loop
from bita_jax.training import step as train_step
from bita_jax.training.optimizer import make_optimizer
from tests.single_forward import single_forward_loss_terms

DEMO_MODEL = os.path.join(os.path.dirname(__file__), "..", "bita_jax", "demo", "model")
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
LOSSES = {"single": single_forward_loss_terms, "split": train_step.loss_terms}


def full_batch(cfg: ModelConfig, batch: int, length: int, groups: int, masks: int) -> dict[str, np.ndarray]:
    """[B, T] sequences of exactly T tokens: T - G*M normal (prompt + target[:G-1]), G groups of M."""
    rng = np.random.default_rng(0)
    normal = length - groups * masks
    source_len = normal - (groups - 1)  # offsets 0..G-1: the normal part is source + target[:G-1]
    sequences = [
        build_sequence(
            rng.integers(3, cfg.vocab_size, source_len),
            rng.integers(3, cfg.vocab_size, groups + masks),
            np.arange(groups),
            cfg.vocab_size,
            masks,
        )
        for _ in range(batch)
    ]
    return data.collate(sequences, length, pad_id=0)


def measure(cfg, params, batch, loss, bita, groups, repeats) -> dict:
    """Compiles one train step with `loss`; its temp bytes and median step time over `repeats`."""
    optimizer, schedule = make_optimizer(OptimizerConfig(), 100)
    adapter = bita_adapter.init_adapter(cfg, bita, jax.random.key(0))
    sh = train_step.step_shardings(
        cfg, optimizer, adapter, make_mesh(MeshConfig(data=1), jax.devices()[:1]), LOGICAL_AXIS_RULES
    )
    state = train_step.TrainState(jnp.zeros((), jnp.int32), adapter, jax.jit(optimizer.init)(adapter))
    step = train_step.make_train_step(
        cfg, bita, optimizer, schedule, groups * bita.num_mask_tokens, 0, sh, loss=loss
    )
    device_batch = train_loop.global_batch(batch, 1, sh.batch)
    t0 = time.perf_counter()
    compiled = step.lower(state, params, device_batch).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats + 1):  # the first run allocates; not timed
        t0 = time.perf_counter()
        state, metrics = compiled(state, params, device_batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {
        "step_s": statistics.median(times[1:]),
        "temp_gib": compiled.memory_analysis().temp_size_in_bytes / 1024**3,
        "compile_s": compile_s,
        "loss": float(metrics["loss"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--demo-batch", type=int, default=4)
    parser.add_argument("--smollm-batch", type=int, default=1)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "train_step_bench.json"))
    args = parser.parse_args()
    load = os.getloadavg()
    machine = platform.processor() or platform.machine()
    print(f"{machine}, {os.cpu_count()} cores, load {load}, jax {jax.__version__}")
    bita = BiTAConfig(num_prompt_tokens=16, num_mask_tokens=3, prefix_dropout=0.1)
    demo_cfg = hf.load_config(DEMO_MODEL, dtype="float32")
    smol_cfg = ModelConfig.from_hf_config(SMOLLM2_135M, dtype="float32")
    models = {
        "demo": (demo_cfg, hf.load_params(DEMO_MODEL, demo_cfg), args.demo_batch),
        "SmolLM2-135M-shaped": (smol_cfg, init_params(smol_cfg, jax.random.key(0)), args.smollm_batch),
    }
    rows = []
    header = f"{'model':20s} {'T':>5s} {'B':>2s} | {'single tok/s':>12s} {'split tok/s':>11s} {'speedup':>7s}"
    header += f" | {'single temp':>11s} {'split temp':>10s} {'ratio':>6s}"
    print(header)
    for name, (cfg, params, batch_size) in models.items():
        for length in args.lengths:
            batch = full_batch(cfg, batch_size, length, args.groups, bita.num_mask_tokens)
            r = {
                kind: measure(cfg, params, batch, loss, bita, args.groups, args.repeats)
                for kind, loss in LOSSES.items()
            }
            tokens = batch_size * length
            row = {"model": name, "length": length, "batch": batch_size, **r}
            row["speedup"] = r["single"]["step_s"] / r["split"]["step_s"]
            rows.append(row)
            print(
                f"{name:20s} {length:5d} {batch_size:2d} | {tokens / r['single']['step_s']:12.0f} "
                f"{tokens / r['split']['step_s']:11.0f} {row['speedup']:6.2f}x | "
                f"{r['single']['temp_gib']:8.3f} GiB {r['split']['temp_gib']:6.3f} GiB "
                f"{r['single']['temp_gib'] / r['split']['temp_gib']:5.1f}x",
                flush=True,
            )
    result = {"load_before": load, "load_after": os.getloadavg(), "cores": os.cpu_count(), "rows": rows}
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"load after {result['load_after']}; wrote {args.output}")


if __name__ == "__main__":
    main()
