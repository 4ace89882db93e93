"""train.py: trains a BiTA adapter (prompt prefix + mask tokens) on a frozen LLaMA checkpoint.

  python train.py --model DIR --data data.jsonl --output runs/x --steps 200
  python train.py --config configs/llama2_7b_chat.yaml --model DIR --data data.jsonl --output runs/7b \\
      --mesh data=1,fsdp=8,tensor=1 --set optimizer.grad_accum=4

Flags override the YAML, `--set key=value` overrides both. A checkpoint is saved every
--save-every steps and when the run is stopped (Ctrl-C, SIGTERM); running again with the same
--output resumes from the last checkpoint (a larger --steps continues training). Multi-host: pass
--distributed (TPU pods / managed clusters detect the rest) or --coordinator/--num-processes/
--process-id on every host.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from bita_jax.cli import DefaultsHelpFormatter, run_main
from bita_jax.config import (
    MeshConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_yaml,
    set_dotted,
    to_dict,
)
from bita_jax.errors import ConfigError


def config_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key `--set` accepts, with its default."""
    keys = []
    for field in dataclasses.fields(cls):
        default = field.default_factory() if callable(field.default_factory) else field.default
        if dataclasses.is_dataclass(default):
            keys += config_keys(type(default), f"{prefix}{field.name}.")
        else:
            keys.append(f"{prefix}{field.name}={default!r}")
    return keys


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="train.py",
        description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelpFormatter,
        epilog="--set keys (defaults): " + ", ".join(config_keys()) + ". See docs/training.md.",
    )
    parser.add_argument("--config", help="YAML with TrainConfig fields (configs/*.yaml)")
    parser.add_argument("--model", help="Hugging Face LlamaForCausalLM checkpoint directory")
    parser.add_argument("--data", help="decode.py jsonl, a local datasets file/directory or a hub dataset")
    parser.add_argument("--output", help="run directory: checkpoints, metrics.jsonl, adapter/")
    parser.add_argument(
        "--steps",
        type=int,
        help=f"optimizer steps in total (default: `--set epochs=E` data passes, E={defaults.epochs})",
    )
    parser.add_argument(
        "--batch-size", type=int, help=f"global sequences per optimizer step (default: {defaults.batch_size})"
    )
    parser.add_argument(
        "--save-every",
        type=int,
        help=f"checkpoint every N steps (default: {defaults.save_every}); also saved on Ctrl-C/SIGTERM",
    )
    parser.add_argument(
        "--mesh", help="device mesh, e.g. data=2,fsdp=2,tensor=2 (-1 = remaining devices; default: data=-1)"
    )
    parser.add_argument("--chat", action="store_true", help="text records: wrap prompts in the chat template")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any config key (listed below)"
    )
    parser.add_argument("--distributed", action="store_true", help="multi-host: jax.distributed auto-detect")
    parser.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0")
    parser.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, help="multi-host: this process's index")
    return parser


def build_config(args: argparse.Namespace) -> TrainConfig:
    """YAML (optional) <- command-line flags <- --set overrides.

    Flags keep their parsed types (a path stays the string given); only YAML files and --set
    values are parsed as YAML.
    """
    values = load_yaml(args.config) if args.config else {}
    flags = {
        "model": args.model,
        "output": args.output,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "save_every": args.save_every,
        "data.path": args.data,
        "data.chat": True if args.chat else None,
    }
    for key, value in flags.items():
        if value is not None:
            set_dotted(values, key, value)
    if args.mesh:
        values["mesh"] = to_dict(MeshConfig.parse(args.mesh))
    return from_dict(TrainConfig, apply_overrides(values, args.set), "train")


def init_distributed(args: argparse.Namespace) -> None:
    """Joins the multi-host job before any device is used (no-op for a single process)."""
    import jax

    if args.coordinator or args.num_processes or args.process_id is not None:
        if not (args.coordinator and args.num_processes and args.process_id is not None):
            raise ConfigError("multi-host needs all of --coordinator, --num-processes and --process-id")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.distributed:
        jax.distributed.initialize()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = build_config(args)
    init_distributed(args)
    from bita_jax.sharding import check_platform
    from bita_jax.training import loop, resume

    check_platform()
    with resume.exclusive_run(cfg.output):  # before anything is loaded: one run per directory
        last = loop.run(cfg)
    adapter = os.path.join(cfg.output, loop.ADAPTER_DIR)
    if last.get("finished"):
        print(
            f"{cfg.output} is already finished (step {last['step']} of {last['total_steps']}); "
            f"adapter in {adapter}. A larger --steps trains on.",
            file=sys.stderr,
        )
        return 0
    loss = f"loss {last['loss']:.4f} mask_acc {last['mask_acc']}" if "loss" in last else "no step logged"
    print(f"step {last['step']}: {loss}; adapter in {adapter}", file=sys.stderr)
    return 0


def console() -> int:
    """The `bita-train` console script (pyproject.toml [project.scripts]): main with one-line errors."""
    return run_main(main)
