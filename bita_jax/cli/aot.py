"""Ahead-of-time compiles of the decode and train steps for a TPU topology, on this (CPU-only) host.

  python -m bita_jax.aot --target v5e:2x2 --model llama2-7b --steps ar,tree --trees upper:5 \\
      --batch-sizes 1,8 --cache 2048 [--json]
  python -m bita_jax.aot --target cpu:2 --model DIR/config.json --trees chain --cache 64   # a CPU check

Needs `libtpu` for TPU targets (`pip install "jax[tpu]==<jax version>"`): the topology's devices
are abstract (`jax.experimental.topologies`), nothing runs, and the numbers are the TPU compiler's
own: `memory_analysis()` (arguments, temporaries, outputs, aliased outputs) and `cost_analysis()`
(bytes accessed, flops), all per chip. Params, adapter, cache and inputs are abstract
`ShapeDtypeStruct`s with their shardings from the logical-axis rules; the steps are the jitted
functions decoding and training run (decoding/loop.py, training/step.py), traced under the mesh
and rules. A shape that does not fit is reported with the compiler's out-of-memory message, and
with `--fit` the smallest larger topology of the same generation that fits is searched for.
`--json` prints one object per compiled step; otherwise a table, and for TPU targets a roofline
projection of each tree step against the AR step (see `projection`).

Layers are unrolled as decoding runs them, so `cost_analysis` counts every layer (a scanned
layer's body would be counted once). A 7B compile takes minutes of CPU; `--layers A,B` compiles A
and B layers instead and extrapolates every per-chip figure linearly to the model's depth (the
layers are identical, so each adds the same bytes and flops), marked `extrapolated_from`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Any

from bita_jax.cli import run_main
from bita_jax.config import ATTENTION_KERNELS
from bita_jax.errors import ConfigError, UserError

# Published config.json shapes of meta-llama/Llama-2-{7b,13b,70b}-chat-hf (no checkpoint needed).
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "rms_norm_eps": 1e-05,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
}
LLAMA2_13B = {**LLAMA2_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
              "num_hidden_layers": 40, "num_key_value_heads": 40}  # fmt: skip
LLAMA2_70B = {**LLAMA2_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
              "num_hidden_layers": 80, "num_key_value_heads": 8}  # fmt: skip
# (HF config, BiTA mask tokens M): the reference trains M=3 for 7B/13B and M=4 for 70B.
PRESETS = {"llama2-7b": (LLAMA2_7B, 3), "llama2-13b": (LLAMA2_13B, 3), "llama2-70b": (LLAMA2_70B, 4)}
PROMPT_TOKENS = 16

# Published per-chip bf16 dense peak FLOP/s and HBM bandwidth (bytes/s), HBM bytes.
CHIPS = {
    "v4": (275e12, 1.2e12, 32 * 2**30),
    "v5e": (197e12, 0.82e12, 16 * 2**30),
    "v5p": (459e12, 2.77e12, 95 * 2**30),
    "v6e": (918e12, 1.64e12, 32 * 2**30),
}
# Topologies per generation, smallest first (names as MaxText's accelerator_to_spec_map), for --fit.
LADDER = {
    "v4": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4"),
    "v5e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8"),
    "v5p": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4"),
    "v6e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8"),
}
# Projection assumptions: the share of peak bandwidth and FLOP/s a step reaches (the same for the AR
# and the tree step, so memory-bound ratios do not depend on them).
BANDWIDTH_EFFICIENCY = 0.7
FLOPS_EFFICIENCY = 0.5


def parse_target(text: str) -> tuple[str, str, int]:
    """'v5e:2x2' -> ('v5e', '2x2', 4 chips); 'cpu:N' -> ('cpu', '', N fake CPU devices)."""
    gen, _, shape = text.partition(":")
    try:
        if gen == "cpu":
            return "cpu", "", int(shape or 1)
        if gen in CHIPS and shape:
            chips = 1
            for n in shape.split("x"):
                chips *= int(n)
            return gen, shape, chips
    except ValueError:
        pass
    raise UserError(
        f"bad --target {text!r}: expected cpu[:N] or one of {sorted(CHIPS)} with a shape, e.g. v5e:2x2"
    )


def target_devices(gen: str, shape: str, chips: int) -> list:
    """Abstract TPU devices of the topology, or the first `chips` CPU devices."""
    import jax

    if gen == "cpu":
        if len(jax.devices()) < chips:
            raise UserError(f"--target cpu:{chips} needs {chips} CPU devices, have {len(jax.devices())}")
        return jax.devices()[:chips]
    from jax.experimental import topologies

    dims = [int(n) for n in shape.split("x")] + [1]
    # One host holds at most 2x2 chips on v4/v5p and 2x4 on v5e/v6e.
    per_host = (min(dims[0], 2), min(dims[1], 2 if gen in ("v4", "v5p") else 4), 1)
    topology = topologies.get_topology_desc(
        platform="tpu",
        topology_name=f"{gen}:{shape}",
        chip_config_name="megacore" if gen in ("v4", "v5p") else "default",
        chips_per_host_bounds=per_host,
        num_slices=1,
    )
    return list(topology.devices)


def model_config(spec: str, precision: str, kernel: str, layers: int | None = None):
    """(ModelConfig, M) from a preset name or a config.json path, bf16 weights under `precision`,
    the attention's cache part by `kernel`, optionally cut to `layers` decoder layers."""
    from bita_jax.config import ModelConfig, decoding_dtypes, read_json

    if spec in PRESETS:
        hf, masks = PRESETS[spec]
    elif os.path.isfile(spec):
        hf, masks = read_json(spec), 3
    else:
        raise UserError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file")
    if layers is not None:
        hf = {**hf, "num_hidden_layers": layers}
    config = ModelConfig.from_hf_config(
        hf, **decoding_dtypes("bfloat16", precision), scan_layers=False, attention_kernel=kernel
    )
    return config, masks


def resolve_tree(spec: str, masks: int):
    """A --trees entry: a decode.py tree spec, or `wide` (the demo's 30-node tree, 124 rows at M=3)."""
    from bita_jax import demo
    from bita_jax.bita.tree import parse_tree

    return parse_tree(demo.WIDE_TREE if spec == "wide" else spec, masks)


def analyse(compiled, seconds: float) -> dict[str, Any]:
    """The compiler's per-chip memory and cost figures."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {
        "argument_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "code_bytes": mem.generated_code_size_in_bytes,
        "bytes_accessed": float(cost.get("bytes accessed", -1)),
        "flops": float(cost.get("flops", -1)),
        "compile_seconds": round(seconds, 1),
        "fits": True,
    }


def step_cases(config, masks: int, mesh, args) -> list[tuple[dict[str, Any], Any, tuple]]:
    """(description, jitted step, abstract args) for every requested step, tree and batch size."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from bita_jax.bita import adapter as bita_adapter
    from bita_jax.config import BiTAConfig
    from bita_jax.decoding import loop as decoding
    from bita_jax.decoding.cache import CACHE_AXES, KVCache
    from bita_jax.io.orbax_checkpoint import abstract_like
    from bita_jax.models.llama import abstract_params
    from bita_jax.sharding import logical_sharding, tree_shardings

    bita_cfg = BiTAConfig(num_prompt_tokens=PROMPT_TOKENS, num_mask_tokens=masks)
    boxed = abstract_params(config)
    params = abstract_like(nn.unbox(boxed), tree_shardings(boxed, mesh))
    adapter = bita_adapter.abstract_adapter(config, bita_cfg)
    adapter = abstract_like(adapter, bita_adapter.adapter_shardings(adapter, mesh))
    sharded = lambda shape, dtype, axes: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=logical_sharding(axes, mesh)
    )
    cases = []
    for batch in args.batch_sizes:
        cache = KVCache.abstract(config, batch, args.cache)
        cache = KVCache(
            k=sharded(cache.k.shape, cache.k.dtype, CACHE_AXES),
            v=sharded(cache.v.shape, cache.v.dtype, CACHE_AXES),
            length=sharded((batch,), jnp.int32, ("cache_batch",)),
        )
        pending = sharded((batch,), jnp.int32, ("batch",))
        streams = sharded((batch, 2), jnp.int32, ("batch", None))
        if "ar" in args.steps:
            ar = decoding.make_ar_step(config)
            desc = {"step": "ar", "tree": None, "rows": 1, "batch": batch}
            cases.append((desc, ar, (params, cache, pending, streams)))
        for spec in args.trees if "tree" in args.steps else ():
            tree = resolve_tree(spec, masks)
            drafts = sharded((batch, tree.depth, tree.draft_width), jnp.int32, ("batch", None, None))
            step = decoding.make_bita_step(config, tree)
            desc = {"step": "tree", "tree": spec, "rows": tree.num_rows, "batch": batch}
            cases.append((desc, step, (params, adapter, cache, pending, drafts, streams)))
        if "train" in args.steps:
            cases.append(train_case(config, bita_cfg, mesh, batch, args.cache))
    return cases


def train_case(config, bita_cfg, mesh, batch: int, normal_len: int):
    """The train step (scanned, rematerialised layers as training runs them) on `batch` sequences of
    normal_len tokens plus 64 groups of M mask rows; the reported rows are the mask rows."""
    import dataclasses

    config = dataclasses.replace(config, scan_layers=True, remat=True, activation_dtype=None)
    rows = 64 * bita_cfg.num_mask_tokens
    step, inputs = abstract_train_step(config, bita_cfg, mesh, batch, normal_len + rows, rows)
    return {"step": "train", "tree": None, "rows": rows, "batch": batch}, step, inputs


def abstract_train_step(config, bita_cfg, mesh, batch: int, seq_len: int, rows: int):
    """(train step, (state, base, data)): the jitted train step with AdamW and abstract inputs
    (`jax.ShapeDtypeStruct`s carrying their shardings over `mesh`), ready to lower and compile
    without weights; data fields are [1, batch, seq_len], rows of which are mask rows."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from bita_jax.bita import adapter as bita_adapter
    from bita_jax.config import OptimizerConfig
    from bita_jax.io.orbax_checkpoint import abstract_like
    from bita_jax.models.llama import abstract_params
    from bita_jax.sharding import LOGICAL_AXIS_RULES
    from bita_jax.training import step as train_step
    from bita_jax.training.data import BATCH_FIELDS
    from bita_jax.training.optimizer import make_optimizer

    optimizer, schedule = make_optimizer(OptimizerConfig(), 1000)
    adapter = bita_adapter.abstract_adapter(config, bita_cfg)
    sh = train_step.step_shardings(config, optimizer, adapter, mesh, LOGICAL_AXIS_RULES)
    state = train_step.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=sh.state.step),
        adapter=abstract_like(adapter, sh.state.adapter),
        opt_state=abstract_like(jax.eval_shape(optimizer.init, adapter), sh.state.opt_state),
    )
    base = abstract_like(nn.unbox(abstract_params(config)), sh.base)
    shape = (1, batch, seq_len)  # [steps per call, B, S + R]
    data = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh.batch) for k in BATCH_FIELDS}
    step = train_step.make_train_step(config, bita_cfg, optimizer, schedule, rows, 0, sh)
    return step, (state, base, data)


def compile_case(step, step_args, mesh) -> dict[str, Any]:
    """Lowers and compiles one step; an out-of-memory compile is reported, not raised."""
    from bita_jax.sharding import mesh_rules

    start = time.perf_counter()
    try:
        with mesh_rules(mesh):
            compiled = step.lower(*step_args).compile()
    except Exception as e:  # noqa: BLE001  the compiler's own out-of-memory error is a result here
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
            raise
        line = next((s for s in text.splitlines() if "memory" in s.lower()), text.splitlines()[0])
        seconds = round(time.perf_counter() - start, 1)
        return {"fits": False, "error": line.strip()[:300], "compile_seconds": seconds}
    return analyse(compiled, time.perf_counter() - start)


def build_mesh(devices: list, mesh_text: str, config):
    from bita_jax.config import MeshConfig
    from bita_jax.sharding import check_mesh_fits, make_mesh

    mesh = make_mesh(MeshConfig.parse(mesh_text), devices)
    check_mesh_fits(config, mesh)
    return mesh


def run_target(target: str, config, masks: int, args, quiet: bool = False) -> list[dict[str, Any]]:
    """Compiles every case on one target; with --fit, retries an out-of-memory case one topology up."""
    gen, shape, chips = parse_target(target)
    mesh = build_mesh(target_devices(gen, shape, chips), args.mesh, config)
    records = []
    for desc, step, step_args in step_cases(config, masks, mesh, args):
        record = {"target": target, "chips": chips, "mesh": args.mesh, "model": args.model,
                  "layers": config.num_layers, "precision": args.precision, "cache": args.cache,
                  "attention_kernel": args.attention_kernel, **desc}  # fmt: skip
        record.update(compile_case(step, step_args, mesh))
        if not record["fits"] and args.fit and gen != "cpu":
            record["smallest_fit"] = smallest_fit(gen, shape, config, masks, desc, args)
        records.append(record)
        if not quiet:
            emit(record, args.json)
    return records


# Per-chip figures that grow by the same amount with every (identical, unrolled) layer.
LINEAR_FIELDS = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "bytes_accessed", "flops")


def extrapolate(
    shallow: list[dict[str, Any]], deep: list[dict[str, Any]], layers: int
) -> list[dict[str, Any]]:
    """Full-depth records from the same cases compiled at two layer counts: each figure of
    LINEAR_FIELDS is a + b * layers, fitted through the two compiles (the embedding, LM head and
    step logic are a; one layer's weights, cache and attention are b)."""
    out = []
    for a, b in zip(shallow, deep, strict=True):
        record = {**b, "layers": layers, "extrapolated_from": [a["layers"], b["layers"]]}
        record["compile_seconds"] = round(a["compile_seconds"] + b["compile_seconds"], 1)
        if a["fits"] and b["fits"]:
            for field in LINEAR_FIELDS:
                slope = (b[field] - a[field]) / (b["layers"] - a["layers"])
                record[field] = a[field] + slope * (layers - a["layers"])
        out.append(record)
    return out


def smallest_fit(gen: str, shape: str, config, masks: int, desc: dict[str, Any], args) -> str | None:
    """The first larger topology of the generation on which the case compiles (None: none listed)."""
    ladder = LADDER[gen]
    for bigger in ladder[ladder.index(shape) + 1 if shape in ladder else 0 :]:
        target = f"{gen}:{bigger}"
        _, _, chips = parse_target(target)
        try:
            mesh = build_mesh(target_devices(gen, bigger, chips), args.mesh, config)
        except ConfigError:
            continue
        one = argparse.Namespace(**{**vars(args), "batch_sizes": [desc["batch"]], "steps": [desc["step"]],
                                    "trees": [desc["tree"]] if desc["tree"] else []})  # fmt: skip
        (_, step, step_args), = step_cases(config, masks, mesh, one)  # fmt: skip
        if compile_case(step, step_args, mesh)["fits"]:
            return target
    return None


def emit(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(record), flush=True)
        return
    gib = 2**30
    if not record["fits"]:
        fit = record.get("smallest_fit")
        print(f"{record['target']:9s} {record['step']:5s} {str(record['tree']):8s} "
              f"batch {record['batch']:2d}: does not fit ({record['error']})"
              + (f"; smallest fit {fit}" if fit else ""), flush=True)  # fmt: skip
        return
    print(
        f"{record['target']:9s} {record['step']:5s} {str(record['tree']):8s} rows {record['rows']:4d} "
        f"batch {record['batch']:2d}  per chip: args {record['argument_bytes'] / gib:6.2f} GiB, "
        f"temp {record['temp_bytes'] / gib:5.2f}, out {record['output_bytes'] / gib:5.2f} "
        f"(aliased {record['alias_bytes'] / gib:5.2f}), accessed {record['bytes_accessed'] / gib:6.2f} GiB, "
        f"{record['flops'] / 1e12:7.3f} TFLOP  compile {record['compile_seconds']:5.1f} s",
        flush=True,
    )


def roofline_seconds(record: dict, chip: tuple) -> float:
    """A compiled step's roofline time on `chip` (peak flop/s, HBM bytes/s, ...): the longer of its
    bytes at BANDWIDTH_EFFICIENCY of the bandwidth and its flops at FLOPS_EFFICIENCY of the peak."""
    peak, bandwidth = chip[0], chip[1]
    memory = record["bytes_accessed"] / (BANDWIDTH_EFFICIENCY * bandwidth)
    return max(memory, record["flops"] / (FLOPS_EFFICIENCY * peak))


def projection(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Roofline step times (a projection, not a measurement) and each tree step / the AR step.

    t = max(bytes accessed / (BANDWIDTH_EFFICIENCY * HBM bandwidth), flops / (FLOPS_EFFICIENCY *
    peak)) per chip, from the TPU compile's own bytes and flops and the chip's published figures;
    collectives and launch overheads are ignored.
    """
    out = []
    ar = {(r["target"], r["batch"]): r for r in records if r["step"] == "ar" and r["fits"]}
    for r in records:
        gen = r["target"].split(":")[0]
        if gen not in CHIPS or not r["fits"] or r["step"] == "train":
            continue
        seconds = functools.partial(roofline_seconds, chip=CHIPS[gen])
        row = {"target": r["target"], "step": r["step"], "tree": r["tree"], "rows": r["rows"],
               "batch": r["batch"], "ms": 1e3 * seconds(r)}  # fmt: skip
        base = ar.get((r["target"], r["batch"]))
        if base is not None:
            row["bytes_vs_ar"] = r["bytes_accessed"] / base["bytes_accessed"]
            row["time_vs_ar"] = seconds(r) / seconds(base)
        out.append(row)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bita_jax.aot", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target", default="v5e:2x2", help="comma list: v5e:2x2, v5p:2x2x1, v6e:2x4, cpu:N, ..."
    )
    parser.add_argument("--model", default="llama2-7b", help=f"{', '.join(PRESETS)} or a config.json path")
    parser.add_argument(
        "--precision", choices=("fast", "exact"), default="fast",
        help="bf16 weights with bf16 (fast) or float32 (exact) activations and cache",
    )  # fmt: skip
    parser.add_argument(
        "--attention-kernel", choices=ATTENTION_KERNELS, default="auto",
        help="the attention's cache part: auto (the Pallas kernel on TPU), einsum, pallas",
    )  # fmt: skip
    parser.add_argument("--steps", default="ar,tree", help="comma list of ar, tree, train")
    parser.add_argument(
        "--trees", default="upper:5", help="comma list: chain, upper:K, wide (124 rows), JSON paths"
    )
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--cache", type=int, default=2048, help="KV cache slots (train: normal tokens)")
    parser.add_argument("--mesh", default="data=1,fsdp=1,tensor=-1")
    parser.add_argument("--layers", help="A,B: compile A and B layers and extrapolate to the model's depth")
    parser.add_argument(
        "--fit", action="store_true", help="for a shape that does not fit, find the smallest topology"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per compiled step")
    args = parser.parse_args(argv)
    args.steps = args.steps.split(",")
    if not set(args.steps) <= {"ar", "tree", "train"}:
        raise UserError(f"--steps: expected ar, tree, train; got {','.join(args.steps)}")
    args.trees = args.trees.split(",")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise UserError(f"--batch-sizes: expected integers, got {args.batch_sizes!r}") from None
    if args.layers is not None:
        try:
            args.layers = [int(n) for n in args.layers.split(",")]
        except ValueError:
            args.layers = []
        if len(args.layers) != 2 or not 0 < args.layers[0] < args.layers[1]:
            raise UserError("--layers: expected two layer counts A,B with 0 < A < B")
    if min(args.batch_sizes) < 1 or args.cache < 1:
        raise UserError("--batch-sizes and --cache must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    targets = args.target.split(",")
    parsed = [parse_target(t) for t in targets]
    cpus = max([n for gen, _, n in parsed if gen == "cpu"], default=0)
    if cpus and "jax" not in sys.modules:  # fake CPU devices must be requested before jax starts
        flag = f" --xla_force_host_platform_device_count={cpus}"
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + flag
    config, masks = model_config(args.model, args.precision, args.attention_kernel)
    if args.layers is None:
        records = [r for target in targets for r in run_target(target, config, masks, args)]
    else:
        records = []
        for target in targets:
            kernel = args.attention_kernel
            configs = (model_config(args.model, args.precision, kernel, n) for n in args.layers)
            shallow, deep = (run_target(target, c, masks, args, quiet=True) for c, _ in configs)
            records += extrapolate(shallow, deep, config.num_layers)
            for record in records[-len(deep) :]:
                emit(record, args.json)
    rows = projection(records)
    if args.json:
        for row in rows:
            print(json.dumps({"projection": True, **row}))
    elif rows:
        print(
            f"\nProjection (roofline at {BANDWIDTH_EFFICIENCY:.0%} of HBM bandwidth, "
            f"{FLOPS_EFFICIENCY:.0%} of peak):"
        )
        for row in rows:
            ratio = ""
            if "time_vs_ar" in row:
                ratio = f"  bytes {row['bytes_vs_ar']:.2f}x AR, time {row['time_vs_ar']:.2f}x AR"
            print(f"{row['target']:9s} {row['step']:5s} {str(row['tree']):8s} rows {row['rows']:4d} "
                  f"batch {row['batch']:2d}  {row['ms']:7.2f} ms{ratio}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(run_main(main))
