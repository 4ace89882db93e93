"""Files the CLIs read and write: prompt jsonl in, result jsonl out."""

from __future__ import annotations

import json
import sys
from typing import Any

from bita_jax.errors import UserError


def read_prompts(path: str) -> list[str]:
    """Prompts from a jsonl file whose lines are objects with a string "prompt"; blank lines skipped."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"prompts file not found: {path}") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f'{path} line {number}: expected an object with a string "prompt"')
        prompts.append(record["prompt"])
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def write_jsonl(records: list[dict[str, Any]], path: str | None = None) -> None:
    """Writes one JSON object per line to path, or to stdout when path is None."""
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if path is None:
        sys.stdout.write(lines)
    else:
        with open(path, "w") as f:
            f.write(lines)
