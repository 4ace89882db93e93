"""The decoding options' flags, defined once for decode.py, the tuner and bench: where a command
takes an option it has the same flag, help and default (api.DecodingOptions') as everywhere else."""

from __future__ import annotations

import argparse
import math
from typing import Sequence

from bita_jax import api
from bita_jax.cli import UserError
from bita_jax.config import DTYPES, PRECISIONS
from bita_jax.decoding.sampling import SAMPLING_ONLY, Sampler
from bita_jax.tuning.auto import AUTO

# Option groups, as `add_decoding_flags` takes them. "sampling": --temperature, --top-k, --top-p, --seed.
GROUPS = ("mode", "tree", "batch_size", "chat", "sampling", "dtype", "precision", "mesh")
# What a command that picks its own mode, trees, batch sizes and sampling takes (the tuner, bench).
MODEL_GROUPS = ("chat", "dtype", "precision", "mesh")
DEFAULTS = api.DecodingOptions()


def add_decoding_flags(parser: argparse.ArgumentParser, groups: Sequence[str] = GROUPS) -> None:
    """Adds the flags of `groups` (names in GROUPS). --mode, --tree and the sampling-only flags
    default to None, so that a command can tell a flag given from one left out."""
    if "mode" in groups:
        parser.add_argument(
            "--mode", choices=api.MODES, help="decoding method (default: bita with --adapter, else ar)"
        )
    if "tree" in groups:
        parser.add_argument(
            "--tree",
            help="bita draft tree: auto (the adapter's tuned choice for this device, dtype, batch size, "
            "sampling, precision and chat; AR when no tree pays off), upper:K, chain, or JSON rank paths, "
            "each optionally +lookup:n (a prompt-lookup chain of n tokens beside the mask drafts); "
            "--mode lookup: lookup:n (default: auto; lookup:4)",
        )
    if "batch_size" in groups:
        parser.add_argument(
            "--batch-size", type=int, default=DEFAULTS.batch_size,
            help="prompts decoded together (clamped to the prompts)",
        )  # fmt: skip
    if "chat" in groups:
        parser.add_argument(
            "--chat", action="store_true", help="wrap prompts in the tokenizer's chat template"
        )
    if "sampling" in groups:
        parser.add_argument(
            "--temperature", type=float, default=DEFAULTS.temperature, help="0: greedy; > 0: sample"
        )
        # Sampling only: given with temperature 0 they are refused (they would change nothing).
        k, p, seed = DEFAULTS.top_k, DEFAULTS.top_p, DEFAULTS.seed
        parser.add_argument("--top-k", type=int, help=f"sampling: the k likeliest tokens (default {k}: off)")
        parser.add_argument("--top-p", type=float, help=f"sampling: nucleus threshold (default {p:g}: off)")
        parser.add_argument("--seed", type=int, help=f"sampling seed (default {seed})")
    if "dtype" in groups:
        parser.add_argument("--dtype", choices=DTYPES, default=DEFAULTS.dtype, help="the weights' dtype")
    if "precision" in groups:
        parser.add_argument(
            "--precision", choices=PRECISIONS, default=DEFAULTS.precision,
            help="bfloat16 weights: exact computes activations and the KV cache in float32 so BiTA's output "
            "equals AR's; fast computes in bfloat16",
        )  # fmt: skip
    if "mesh" in groups:
        parser.add_argument("--mesh", help="device mesh, e.g. data=1,fsdp=1,tensor=8 (default: one device)")


def sampling_options(args: argparse.Namespace) -> dict[str, float | int]:
    """temperature, top_k, top_p, seed; refuses sampling flags given for a greedy decode (they would
    change nothing, yet a reader of the command would believe they did) and values that are not
    finite or out of range, before anything is loaded."""
    given = {name: getattr(args, name) for name in SAMPLING_ONLY if getattr(args, name) is not None}
    if args.temperature == 0 and given:
        flag = "--" + next(iter(given)).replace("_", "-")
        raise UserError(f"{flag} is for sampling, but --temperature is 0 (greedy): give --temperature > 0")
    options = {"temperature": args.temperature, **SAMPLING_ONLY, **given}
    for name in ("temperature", "top_p"):
        if not math.isfinite(options[name]):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {options[name]}")
    Sampler(options["temperature"], options["top_k"], options["top_p"])  # refuses values out of range
    return options


def decoding_options(args: argparse.Namespace) -> api.DecodingOptions:
    """The options the parsed flags give; a field whose flag the command lacks keeps its default
    (--tree left out: auto). Refuses bad sampling flags (`sampling_options`)."""
    fields = {
        name: getattr(args, name)
        for name in ("mode", "batch_size", "chat", "dtype", "precision", "mesh")
        if hasattr(args, name)
    }
    if getattr(args, "tree", None) is not None:
        fields["tree"] = args.tree
    if hasattr(args, "temperature"):
        fields.update(sampling_options(args))
    return api.DecodingOptions(**fields)


def parse_batch_sizes(text: str) -> list[int]:
    """--batch-sizes (the tuner's and bench's list): sorted distinct positive integers."""
    try:
        sizes = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise UserError(f"--batch-sizes must be positive integers, got {text!r}")
    return sizes
