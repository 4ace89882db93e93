"""decode.py: AR or BiTA decoding from a Hugging Face LLaMA checkpoint, a shell over bita_jax.api.

  python decode.py        # no arguments: the packaged demo, BiTA vs AR on held-out prompts
  python decode.py --model DIR --mode ar --prompt "def add(a, b):" --max-new-tokens 64
  python decode.py --model DIR --prompts prompts.jsonl --batch-size 4 --output out.jsonl
  python decode.py --model DIR --mode bita --adapter ADAPTER_DIR --tree upper:5 --compare
  python decode.py --model DIR --mode bita --adapter ADAPTER_DIR --mesh data=1,fsdp=1,tensor=8

Writes one jsonl record per prompt (prompt, completion, prompt_ids, output_ids, new_tokens, steps,
seconds; for bita `steps` counts tree steps) and prints a short summary. BiTA also prints tokens
per step, the acceptance rate per draft level and, with --compare, the speedup over AR on the same
prompts and whether every output is identical.
"""

from __future__ import annotations

import argparse
import sys

import jax
from tqdm import tqdm

from bita_jax import api, demo
from bita_jax.bita.tree import DEFAULT_TREE
from bita_jax.cli import UserError
from bita_jax.cli.files import read_prompts, write_jsonl
from bita_jax.cli.reports import acceptance_report, comparison_report, summarize
from bita_jax.config import DTYPES, PRECISIONS
from bita_jax.decoding.loop import SCAN_LAYERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decode.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face LlamaForCausalLM checkpoint directory")
    parser.add_argument("--mode", choices=api.MODES, default="ar", help="decoding method")
    parser.add_argument("--prompt", nargs="+", action="extend", help="prompt text(s)")
    parser.add_argument("--prompts", help='jsonl file, one {"prompt": ...} per line')
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the weights' dtype")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="exact",
        help="bfloat16 weights: exact computes activations and the KV cache in float32 so BiTA's output "
        "equals AR's; fast computes in bfloat16 (default: %(default)s)",
    )
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    parser.add_argument("--output", help="write results to this jsonl file (default: stdout)")
    parser.add_argument("--adapter", help="BiTA adapter directory (adapter.safetensors), for --mode bita")
    parser.add_argument("--tree", default=DEFAULT_TREE, help="draft tree: upper:K, chain, or JSON paths")
    parser.add_argument(
        "--compare", action="store_true", help="bita: also run AR, print speedup and equality"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy; > 0: sample (default: %(default)s)"
    )
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--mesh", help="device mesh, e.g. data=1,fsdp=1,tensor=8 (default: one device)")
    parser.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        default=SCAN_LAYERS,
        help="scan the layers: faster compiles for deep models, slower steps (default: unrolled)",
    )
    return parser


def prompt_texts(args) -> list[str]:
    if args.prompt and args.prompts:
        raise UserError("give either --prompt or --prompts, not both")
    if args.prompts:
        return read_prompts(args.prompts)
    if not args.prompt:
        raise UserError("no prompts: give --prompt TEXT or --prompts FILE.jsonl")
    return args.prompt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    is_demo = not argv  # no arguments: BiTA vs AR on the packaged demo (bita_jax/demo)
    if is_demo:
        argv = demo.demo_argv(jax.default_backend())
    args = build_parser().parse_args(argv)
    if not args.model:
        raise UserError("--model DIR is required")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.mode == "bita" and not args.adapter:
        raise UserError("--mode bita needs --adapter DIR")
    texts = prompt_texts(args)
    model = api.load(
        args.model,
        adapter=args.adapter if args.mode == "bita" else None,
        dtype=args.dtype,
        precision=args.precision,
        mesh=args.mesh,
        scan_layers=args.scan_layers,
    )
    options = dict(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, chat=args.chat, tree=args.tree,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )  # fmt: skip
    model.check(texts, mode=args.mode, **options)  # bad input fails before the progress bar shows
    # Records own stdout unless --output is given; reports go wherever they do not.
    out = sys.stdout if args.output else sys.stderr
    with tqdm(total=len(texts), desc=f"decode ({args.mode})", unit="prompt", file=sys.stderr) as progress:
        run = model.run(texts, mode=args.mode, on_batch=progress.update, **options)
        if run.mode == "bita":
            tqdm.write(f"tree {args.tree}: {run.tree.describe()}", file=out)
            tqdm.write(acceptance_report(run.generations, run.accepted_per_level), file=out)
            if args.compare:
                progress.reset(total=len(texts))
                progress.set_description("decode (ar, --compare)")
                ar_run = model.run(texts, mode="ar", on_batch=progress.update, **options)
                tqdm.write(comparison_report(run.generations, ar_run.generations), file=out)
    if is_demo:
        print(demo.format_completions(run.records))
    else:
        write_jsonl(run.records, args.output)
    print(summarize(run.generations, run.compile_seconds), file=out)
    return 0
