"""Full-size BiTA train steps compiled ahead of time on fake CPU devices: per-device memory, no weights.

  python scripts/aot_train_memory.py [--devices 16] [--seq 2304] [--per-device-batch 1] [--case N]
                                    [--no-hoist]

The LLaMA-2 shapes are bita_jax.cli.aot's presets (published config.json contents, no checkpoint
needed). Every input is an abstract `jax.ShapeDtypeStruct` carrying its sharding; the step is
lowered and compiled exactly as training compiles it, and the compiler's memory analysis is printed
per device.

XLA:CPU has no bfloat16 matmuls: it converts bf16 operands to float32, and its loop-invariant code
motion then hoists the conversion of the whole (sharded) stacked layer weights and the saved layer
inputs out of the layer loop, float32 copies that TPU/GPU compilers never make. `--no-hoist`
disables that pass to estimate the accelerator figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bita_jax.cli.aot import LLAMA2_7B, LLAMA2_70B  # noqa: E402

# (name, hf config, M, mesh) — the meshes of configs/llama2_{7b,70b}_chat.yaml on one 8-device host,
# and a 16-chip pod slice with tensor parallelism for 70B.
CASES = (
    ("LLaMA-2-7B", LLAMA2_7B, 3, "data=1,fsdp=8,tensor=1"),
    ("LLaMA-2-70B", LLAMA2_70B, 4, "data=1,fsdp=8,tensor=1"),
    ("LLaMA-2-70B", LLAMA2_70B, 4, "data=1,fsdp=4,tensor=4"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=16, help="fake CPU devices")
    parser.add_argument("--seq", type=int, default=2048 + 64 * 4, help="padded length: cutoff + G * M")
    parser.add_argument("--per-device-batch", type=int, default=1)
    parser.add_argument("--case", type=int, choices=range(len(CASES)), help="compile only CASES[N]")
    parser.add_argument(
        "--no-hoist", action="store_true", help="disable XLA:CPU's while-loop invariant code motion"
    )
    args = parser.parse_args()
    flags = [f"--xla_force_host_platform_device_count={args.devices}"]
    if args.no_hoist:
        flags.append("--xla_disable_hlo_passes=while-loop-invariant-code-motion")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ["JAX_PLATFORMS"] = "cpu"

    import jax

    from bita_jax.cli.aot import abstract_train_step
    from bita_jax.config import BiTAConfig, MeshConfig, ModelConfig
    from bita_jax.sharding import make_mesh

    gib = 1024**3
    print(
        f"jax {jax.__version__}, {args.devices} fake CPU devices, seq {args.seq}, bf16 base, remat, "
        f"f32 adapter + AdamW, {args.per_device_batch} sequence(s) per data shard"
        + (", no loop-invariant hoisting" if args.no_hoist else "")
    )
    for name, hf, num_masks, mesh_text in CASES if args.case is None else CASES[args.case : args.case + 1]:
        mesh_cfg = MeshConfig.parse(mesh_text)
        n = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor
        mesh = make_mesh(mesh_cfg, jax.devices()[:n])
        model_cfg = ModelConfig.from_hf_config(hf, dtype="bfloat16", remat=True)
        bita_cfg = BiTAConfig(num_prompt_tokens=16, num_mask_tokens=num_masks)
        batch_size = args.per_device_batch * mesh_cfg.data * mesh_cfg.fsdp
        step, (state, base, batch) = abstract_train_step(
            model_cfg, bita_cfg, mesh, batch_size, args.seq, 64 * num_masks
        )
        start = time.perf_counter()
        compiled = step.lower(state, base, batch).compile()
        seconds = time.perf_counter() - start
        mem = compiled.memory_analysis()
        params = sum(x.size for x in jax.tree.leaves(base)) / 1e9
        print(
            f"{name:12s} mesh {mesh_text:24s} batch {batch_size:2d}x{args.seq}  params {params:.1f}B  "
            f"per device: args {mem.argument_size_in_bytes / gib:6.2f} GiB, "
            f"temp {mem.temp_size_in_bytes / gib:6.2f} GiB, "
            f"out {mem.output_size_in_bytes / gib:5.3f} GiB (aliased {mem.alias_size_in_bytes / gib:5.3f})  "
            f"compile {seconds:5.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
