"""Greedy decoding from a Hugging Face LLaMA checkpoint.

  python decode.py        # no arguments: the packaged demo, BiTA vs AR on held-out prompts
  python decode.py --model DIR --mode ar --prompt "def add(a, b):" --max-new-tokens 64
  python decode.py --model DIR --prompts prompts.jsonl --batch-size 4 --output out.jsonl
  python decode.py --model DIR --mode bita --adapter ADAPTER_DIR --tree upper:5 --compare
  python decode.py --model DIR --mode bita --adapter ADAPTER_DIR --mesh data=1,fsdp=1,tensor=8

Writes one jsonl record per prompt (prompt, completion, prompt_ids, output_ids, new_tokens, steps,
seconds; for bita `steps` counts tree steps) and prints a short summary. Each mode is a function in
MODES. BiTA also prints tokens per step, the acceptance rate per draft level and, with --compare,
the speedup over AR on the same prompts and whether every output is identical.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np
from tqdm import tqdm

from bita_jax import adapter_io, decoding, demo_files, generation_io, hf_io
from bita_jax.bita import ADAPTER_AXES
from bita_jax.cli import UserError, run_main
from bita_jax.config import DTYPES, MeshConfig
from bita_jax.llama import abstract_params
from bita_jax.sharding import logical_sharding, make_mesh, mesh_rules, tree_shardings
from bita_jax.tree import DEFAULT_TREE, parse_tree


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face LlamaForCausalLM checkpoint directory")
    parser.add_argument("--mode", choices=sorted(MODES), default="ar", help="decoding method")
    parser.add_argument("--prompt", nargs="+", action="extend", help="prompt text(s)")
    parser.add_argument("--prompts", help='jsonl file, one {"prompt": ...} per line')
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    parser.add_argument("--output", help="write results to this jsonl file (default: stdout)")
    parser.add_argument("--adapter", help="BiTA adapter directory (adapter.safetensors), for --mode bita")
    parser.add_argument("--tree", default=DEFAULT_TREE, help="draft tree: upper:K, chain, or JSON paths")
    parser.add_argument(
        "--compare", action="store_true", help="bita: also run AR, print speedup and equality"
    )
    parser.add_argument("--mesh", help="device mesh, e.g. data=1,fsdp=1,tensor=8 (default: one device)")
    parser.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        default=decoding.SCAN_LAYERS,
        help="scan the layers: faster compiles for deep models, slower steps (default: unrolled)",
    )
    return parser


def decode_ar(args, config, params, prompt_ids: list[list[int]], progress: tqdm):
    """Autoregressive greedy decoding; returns (generations, compile seconds)."""
    generations, _, compile_seconds = generation_io.compile_and_generate(
        decoding.make_ar_generate(config, args.max_new_tokens),
        params,
        prompt_ids,
        args.batch_size,
        config.pad_id,
        on_batch=lambda _state, rows: progress.update(rows),
    )
    return generations, compile_seconds


def decode_bita(args, config, params, prompt_ids: list[list[int]], progress: tqdm):
    """BiTA tree decoding; prints acceptance (and the AR comparison); returns (generations, compile s)."""
    if not args.adapter:
        raise UserError("--mode bita needs --adapter DIR")
    bita_cfg, arrays = adapter_io.load_adapter(args.adapter, config)
    tree = parse_tree(args.tree, bita_cfg.num_mask_tokens)
    mesh = jax.sharding.get_mesh()  # set by --mesh
    adapter = {
        name: jax.device_put(x, None if mesh.empty else logical_sharding(ADAPTER_AXES[name], mesh))
        for name, x in arrays.items()
    }
    weights = (params, adapter)
    accepted = []

    def on_batch(state, rows):
        accepted.append(np.asarray(state.extra.accepted_per_level)[:rows])
        progress.update(rows)

    generations, _, compile_seconds = generation_io.compile_and_generate(
        decoding.make_bita_generate(config, tree, args.max_new_tokens),
        weights,
        prompt_ids,
        args.batch_size,
        config.pad_id,
        on_batch=on_batch,
    )
    out = sys.stdout if args.output else sys.stderr
    tqdm.write(f"tree {args.tree}: {tree.describe()}", file=out)
    tqdm.write(generation_io.acceptance_report(generations, np.concatenate(accepted)), file=out)
    if args.compare:
        progress.reset(total=len(prompt_ids))
        progress.set_description("decode (ar, --compare)")
        ar_generations, _ = decode_ar(args, config, params, prompt_ids, progress)
        tqdm.write(generation_io.comparison_report(generations, ar_generations), file=out)
    return generations, compile_seconds


MODES = {"ar": decode_ar, "bita": decode_bita}


def device_mesh(args, config):
    """(mesh, param shardings) for --mesh, or (None, None) for one device."""
    if not args.mesh:
        return None, None
    mesh = make_mesh(MeshConfig.parse(args.mesh))
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if args.batch_size % batch_ways:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of data*fsdp = {batch_ways}")
    return mesh, tree_shardings(abstract_params(config), mesh)


def prompt_texts(args) -> list[str]:
    if args.prompt and args.prompts:
        raise UserError("give either --prompt or --prompts, not both")
    if args.prompts:
        return generation_io.read_prompts(args.prompts)
    if not args.prompt:
        raise UserError("no prompts: give --prompt TEXT or --prompts FILE.jsonl")
    return args.prompt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    demo = not argv  # no arguments: BiTA vs AR on the packaged demo (bita_jax/demo_files.py)
    if demo:
        argv = demo_files.demo_argv(jax.default_backend())
    args = build_parser().parse_args(argv)
    if not args.model:
        raise UserError("--model DIR is required")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    texts = prompt_texts(args)
    config = hf_io.load_config(args.model, dtype=args.dtype, scan_layers=args.scan_layers)
    tokenizer = hf_io.load_tokenizer(args.model)
    prompt_ids = hf_io.encode_prompts(tokenizer, texts, args.chat)
    decoding.check_lengths(config, [len(p) for p in prompt_ids], args.max_new_tokens)
    mesh, shardings = device_mesh(args, config)
    params = hf_io.load_params(args.model, config, shardings)

    with (
        mesh_rules(mesh),
        tqdm(total=len(texts), desc=f"decode ({args.mode})", unit="prompt", file=sys.stderr) as progress,
    ):
        generations, compile_seconds = MODES[args.mode](args, config, params, prompt_ids, progress)
    records = generation_io.result_records(tokenizer, texts, prompt_ids, generations)
    if demo:
        print(demo_files.format_completions(records))
    else:
        generation_io.write_jsonl(records, args.output)
    # Records own stdout unless --output is given; the summary goes wherever they do not.
    print(
        generation_io.summarize(generations, compile_seconds), file=sys.stdout if args.output else sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
