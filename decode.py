"""Greedy decoding from a Hugging Face LLaMA checkpoint.

  python decode.py --model DIR --mode ar --prompt "def add(a, b):" --max-new-tokens 64
  python decode.py --model DIR --prompts prompts.jsonl --batch-size 4 --output out.jsonl

Writes one jsonl record per prompt (prompt, completion, prompt_ids, output_ids, new_tokens, steps,
seconds) and prints a short summary. Each mode is a function in MODES.
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from bita_jax import decoding, generation_io, hf_io
from bita_jax.cli import UserError, run_main
from bita_jax.config import DTYPES


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
    return parser


def decode_ar(args, config, params, prompt_ids: list[list[int]], progress: tqdm):
    """Autoregressive greedy decoding; returns (generations, compile seconds)."""
    generate = generation_io.CompiledByShape(decoding.make_ar_generate(config, args.max_new_tokens))
    generate.prepare_batches(params, prompt_ids, args.batch_size, config.pad_id)
    generations = decoding.generate_batches(
        generate,
        params,
        prompt_ids,
        args.batch_size,
        config.pad_id,
        on_batch=lambda _state, rows: progress.update(rows),
    )
    return generations, generate.compile_seconds


MODES = {"ar": decode_ar}


def prompt_texts(args) -> list[str]:
    if args.prompt and args.prompts:
        raise UserError("give either --prompt or --prompts, not both")
    if args.prompts:
        return generation_io.read_prompts(args.prompts)
    if not args.prompt:
        raise UserError("no prompts: give --prompt TEXT or --prompts FILE.jsonl")
    return args.prompt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.model:
        raise UserError("--model DIR is required")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    texts = prompt_texts(args)
    config = hf_io.load_config(args.model, dtype=args.dtype)
    tokenizer = hf_io.load_tokenizer(args.model)
    prompt_ids = hf_io.encode_prompts(tokenizer, texts, args.chat)
    decoding.check_lengths(config, [len(p) for p in prompt_ids], args.max_new_tokens)
    params = hf_io.load_params(args.model, config)

    with tqdm(total=len(texts), desc=f"decode ({args.mode})", unit="prompt", file=sys.stderr) as progress:
        generations, compile_seconds = MODES[args.mode](args, config, params, prompt_ids, progress)
    records = generation_io.result_records(tokenizer, texts, prompt_ids, generations)
    generation_io.write_jsonl(records, args.output)
    # Records own stdout unless --output is given; the summary goes wherever they do not.
    print(
        generation_io.summarize(generations, compile_seconds), file=sys.stdout if args.output else sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
