"""decode.py: AR or BiTA decoding from a Hugging Face LLaMA checkpoint, a shell over bita_jax.api.

  python decode.py        # no arguments: runs the packaged demo, BiTA vs AR on held-out prompts
  python decode.py --model DIR --mode ar --prompt "def add(a, b):" --max-new-tokens 64
  python decode.py --model DIR --prompts prompts.jsonl --batch-size 4 --output out.jsonl
  python decode.py --model DIR --mode bita --adapter ADAPTER_DIR --compare     # --tree auto
  python decode.py --model DIR --mode bita --adapter ADAPTER_DIR --tree upper:5 --compare
  python decode.py --model DIR --mode bita --adapter ADAPTER_DIR --mesh data=1,fsdp=1,tensor=8
  python decode.py --model DIR --prompt "def add(a, b):" --stream

Decodes with continuous batching: --batch-size slots, each refilled with the next prompt as soon as
its prompt finishes (--batching static decodes batches that wait for their slowest prompt; the
outputs are the same). A "max_new_tokens" in a prompts-file record overrides the flag for that
prompt. Writes one jsonl record per prompt (prompt, completion, prompt_ids, output_ids, new_tokens,
steps, seconds; for bita `steps` counts tree steps) in input order, each as soon as it and every
earlier prompt are finished, and prints a short summary. An interrupted run keeps its finished
records; --resume decodes only the prompts they lack. --stream prints one prompt's completion as
it grows.
BiTA also prints tokens per step, the acceptance rate per draft level and, with --compare, the
speedup over AR on the same prompts and whether every output is identical. `--tree auto` (the
default) takes the tree that `python -m bita_jax.tune` stored with the adapter for this device,
dtype and batch size, and decodes AR when no tree pays off there.
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from bita_jax import api
from bita_jax.cli import DefaultsHelpFormatter, UserError
from bita_jax.cli.files import RecordWriter, finished_records, read_prompt_records
from bita_jax.cli.reports import acceptance_report, comparison_report, summarize
from bita_jax.config import DTYPES, PRECISIONS
from bita_jax.decoding.engine import BATCHING, CHUNK_STEPS
from bita_jax.decoding.loop import SCAN_LAYERS
from bita_jax.io.paths import check_output_file
from bita_jax.tuning.auto import AUTO


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="decode.py",
        description=__doc__.splitlines()[0] + " With no arguments it runs the packaged demo.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--model", help="Hugging Face LlamaForCausalLM checkpoint directory")
    parser.add_argument(
        "--mode", choices=api.MODES, help="decoding method (default: bita with --adapter, else ar)"
    )
    parser.add_argument("--prompt", nargs="+", action="extend", help="prompt text(s)")
    parser.add_argument("--prompts", help='jsonl file, one {"prompt": ...} per line')
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt at most")
    parser.add_argument(
        "--batch-size", type=int, default=1, help="prompts decoded together (clamped to the prompts)"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the weights' dtype")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="exact",
        help="bfloat16 weights: exact computes activations and the KV cache in float32 so BiTA's output "
        "equals AR's; fast computes in bfloat16",
    )
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    parser.add_argument("--output", help="write results to this jsonl file (default: stdout)")
    parser.add_argument(
        "--resume", action="store_true", help="keep the records already in --output, decode the rest"
    )
    parser.add_argument("--adapter", help="BiTA adapter directory (adapter.safetensors); implies --mode bita")
    parser.add_argument(
        "--tree",
        help="bita draft tree: auto (the adapter's tuned choice for this device and batch size, AR when no "
        "tree pays off), upper:K, chain, or JSON rank paths (default: auto)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="bita: also run AR, print the speedup (faster of two runs per mode) and equality",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--batching",
        choices=BATCHING,
        default="continuous",
        help="continuous: refill each slot as its prompt finishes; static: each batch waits for its "
        "slowest prompt",
    )
    parser.add_argument("--chunk-steps", type=int, default=CHUNK_STEPS, help="decoding steps per host sync")
    parser.add_argument("--ignore-eos", action="store_true", help="decode max_new_tokens whatever is emitted")
    parser.add_argument(
        "--stream", action="store_true", help="print the completion of a single prompt as it grows (stdout)"
    )
    parser.add_argument("--mesh", help="device mesh, e.g. data=1,fsdp=1,tensor=8 (default: one device)")
    parser.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        default=SCAN_LAYERS,
        help="scan the layers: faster compiles for deep models, slower steps (default: unrolled)",
    )
    return parser


def decoding_mode(args: argparse.Namespace) -> str:
    """--mode, defaulting to bita when an --adapter is given; refuses BiTA options in AR mode."""
    mode = args.mode or ("bita" if args.adapter else "ar")
    if mode == "ar":
        given = [flag for flag, value in (("--adapter", args.adapter), ("--tree", args.tree)) if value]
        given += ["--compare"] if args.compare else []
        if given:
            raise UserError(f"{given[0]} is for --mode bita, but the mode is ar")
    elif not args.adapter:
        raise UserError("--mode bita needs --adapter DIR")
    return mode


def prompt_texts(args) -> tuple[list[str], list[int]]:
    """The prompts and each one's max_new_tokens (a prompts-file record's own, else the flag)."""
    if args.prompt and args.prompts:
        raise UserError("give either --prompt or --prompts, not both")
    if args.prompts:
        records = read_prompt_records(args.prompts)
        return [r["prompt"] for r in records], [r.get("max_new_tokens", args.max_new_tokens) for r in records]
    if not args.prompt:
        raise UserError("no prompts: give --prompt TEXT or --prompts FILE.jsonl")
    return args.prompt, [args.max_new_tokens] * len(args.prompt)


def fastest_of_two(model: api.Model, texts: list[str], first: api.Run, **options) -> api.Run:
    """The faster of `first` and a second identical run. On CPU the first run of each compiled
    loop is up to 2x slower (cold executables and caches), which would skew a comparison."""
    again = model.run(texts, **options)
    return again if again.seconds < first.seconds else first


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # no arguments: BiTA vs AR on the packaged demo (bita_jax/demo)
        from bita_jax.cli.demo import run_demo

        return run_demo()
    args = build_parser().parse_args(argv)
    if not args.model:
        raise UserError("--model DIR is required")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.resume and not args.output:
        raise UserError("--resume needs --output FILE")
    mode = decoding_mode(args)
    texts, budgets = prompt_texts(args)
    if args.stream and len(texts) != 1:
        raise UserError(f"--stream prints one prompt's completion, got {len(texts)} prompts")
    done, offset = [], 0
    if args.output:  # before anything is loaded: a bad --output must not cost a model load
        check_output_file(args.output)
        done, offset = finished_records(args.output, texts, args.resume)
    if len(done) == len(texts):
        print(f"all {len(texts)} prompts are already in {args.output}; nothing to decode", file=sys.stderr)
        return 0
    if done:
        print(f"resuming: {len(done)} of {len(texts)} prompts already in {args.output}", file=sys.stderr)
    texts, budgets = texts[len(done) :], budgets[len(done) :]
    model = api.load(
        args.model,
        adapter=args.adapter if mode == "bita" else None,
        dtype=args.dtype,
        precision=args.precision,
        mesh=args.mesh,
        scan_layers=args.scan_layers,
    )
    tree = args.tree or AUTO
    options = dict(
        max_new_tokens=budgets, batch_size=args.batch_size, chat=args.chat, tree=tree,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        batching=args.batching, ignore_eos=args.ignore_eos, chunk_steps=args.chunk_steps,
    )  # fmt: skip
    model.check(texts, mode=mode, **options)  # bad input fails before the progress bar shows
    # Records (or the --stream text) own stdout unless --output is given; reports go wherever they do not.
    out = sys.stdout if args.output else sys.stderr
    writer = RecordWriter(args.output, offset) if args.output or not args.stream else None

    def batch_done(records: list[dict]) -> None:
        if writer is not None:
            writer.write(records)
        progress.update(len(records))

    def print_delta(delta: api.Delta) -> None:
        sys.stdout.write(delta.text + ("\n" if delta.done else ""))
        sys.stdout.flush()

    with tqdm(total=len(texts), desc=f"decode ({mode})", unit="prompt", file=sys.stderr) as progress:
        # Resumed prompts keep their index in the input: it keys their sampling noise.
        run = model.run(
            texts, mode=mode, on_batch=batch_done, first_index=len(done),
            on_delta=print_delta if args.stream else None, **options,
        )  # fmt: skip
        if writer is not None:
            writer.close()
        if run.mode == "bita":
            tree_line = run.auto.note() if run.auto else f"tree {tree}: {run.tree.describe()}"
            tqdm.write(tree_line, file=out)
            tqdm.write(acceptance_report(run.generations, run.accepted_per_level), file=out)
        if args.compare and mode == "bita" and run.mode == "ar":
            # Auto decoded AR: the run was the AR loop itself; timing it twice would only measure noise.
            tqdm.write(
                "compare: --tree auto decoded AR here (no tree pays off on this device), so its outputs "
                "and speed are AR's: speedup 1.00x, identical outputs: yes",
                file=out,
            )
        elif args.compare and mode == "bita":  # each mode timed twice
            progress.reset(total=len(texts))
            progress.set_description("decode (ar, --compare)")
            timing = dict(first_index=len(done), **options)
            ar_run = model.run(texts, mode="ar", on_batch=lambda r: progress.update(len(r)), **timing)
            # Each mode timed twice, in the order BiTA, AR, AR, BiTA: a drift in speed over the
            # runs falls on both modes alike.
            ar_timed = fastest_of_two(model, texts, ar_run, mode="ar", **timing)
            timed = fastest_of_two(model, texts, run, mode=mode, **timing)
            tqdm.write(comparison_report(timed.generations, ar_timed.generations), file=out)
    print(summarize(run.generations, run.compile_seconds), file=out)
    return 0
