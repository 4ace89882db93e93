"""LLaMA-2-70B decode steps (BiTA tree step and AR step) compiled ahead of time on fake CPU devices.

  python scripts/aot_decode_70b.py [--devices 8] [--mesh data=1,fsdp=1,tensor=8] [--batch-sizes 1,8]
      [--cache 4096] [--tree upper:5] [--scan-layers]

No weights: params, adapter, cache and inputs are abstract `jax.ShapeDtypeStruct`s carrying their
shardings from the logical-axis rules. The steps are decoding's jitted step functions (the AR step
donates its cache; `make_bita_step` donates nothing), traced under the mesh and rules as
`decode.py --mesh` does. Prints per-device memory from the
compiler's analysis and the compile time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices")
    parser.add_argument("--mesh", default="data=1,fsdp=1,tensor=8")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--cache", type=int, default=4096, help="KV cache slots per row")
    parser.add_argument("--tree", default="upper:5")
    parser.add_argument(
        "--scan-layers", action="store_true", help="scanned layers (default: unrolled, as decode.py)"
    )
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, ROOT)

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from bita_jax.bita import adapter as bita_adapter
    from bita_jax.bita.tree import parse_tree
    from bita_jax.config import BiTAConfig, MeshConfig, ModelConfig
    from bita_jax.decoding.cache import CACHE_AXES, KVCache
    from bita_jax.decoding.loop import make_ar_step, make_bita_step
    from bita_jax.io.orbax_checkpoint import abstract_like
    from bita_jax.models.llama import abstract_params
    from bita_jax.sharding import logical_sharding, make_mesh, mesh_rules, tree_shardings
    from scripts.aot_train_memory import LLAMA2_70B

    mesh = make_mesh(MeshConfig.parse(args.mesh))
    config = ModelConfig.from_hf_config(LLAMA2_70B, dtype="bfloat16", scan_layers=args.scan_layers)
    bita_cfg = BiTAConfig(num_prompt_tokens=16, num_mask_tokens=4)  # the reference's 70B setting
    tree = parse_tree(args.tree, bita_cfg.num_mask_tokens)
    boxed = abstract_params(config)
    params = abstract_like(nn.unbox(boxed), tree_shardings(boxed, mesh))
    adapter = abstract_like(
        bita_adapter.abstract_adapter(config, bita_cfg), bita_adapter.adapter_shardings(mesh)
    )
    gib = 1024**3
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / gib
    print(
        f"jax {jax.__version__}, {args.devices} fake CPU devices, mesh {args.mesh}, LLaMA-2-70B bf16 "
        f"({weights:.1f} GiB of weights), BiTA P=16 M=4, tree {args.tree} ({tree.describe()}), "
        f"cache {args.cache} slots"
    )
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        cache = KVCache.abstract(config, batch, args.cache)
        cache = KVCache(
            k=jax.ShapeDtypeStruct(cache.k.shape, cache.k.dtype, sharding=logical_sharding(CACHE_AXES, mesh)),
            v=jax.ShapeDtypeStruct(cache.v.shape, cache.v.dtype, sharding=logical_sharding(CACHE_AXES, mesh)),
            length=jax.ShapeDtypeStruct(
                (batch,), jnp.int32, sharding=logical_sharding(("cache_batch",), mesh)
            ),
        )
        rows = logical_sharding(("batch",), mesh)
        pending = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
        drafts = jax.ShapeDtypeStruct(
            (batch, tree.depth, tree.draft_width),
            jnp.int32,
            sharding=logical_sharding(("batch", None, None), mesh),
        )
        steps = {
            "ar": (make_ar_step(config), (params, cache, pending, pending)),
            "bita": (
                make_bita_step(config, tree),
                (params, adapter, cache, pending, drafts, pending),
            ),
        }
        for name, (step, step_args) in steps.items():
            start = time.perf_counter()
            with mesh_rules(mesh):
                compiled = step.lower(*step_args).compile()
            seconds = time.perf_counter() - start
            mem = compiled.memory_analysis()
            size = {
                k: getattr(mem, f"{k}_size_in_bytes") / gib for k in ("argument", "temp", "output", "alias")
            }
            print(
                f"{name:4s} step  batch {batch}  per device: args {size['argument']:6.2f} GiB, "
                f"temp {size['temp']:5.2f} GiB, out {size['output']:5.2f} GiB "
                f"(aliased {size['alias']:5.2f})  compile {seconds:5.1f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
