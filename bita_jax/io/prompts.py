"""Prompts in: prompt texts checked before any work, and prompt jsonl files (what decode.py, the
tuner, the benchmarks and the demo read).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from bita_jax.errors import ConfigError, PromptError, UserError


def check_prompts(prompts: Sequence[str]) -> None:
    """Refuses, before any work, what no decode can make sense of: a bare string (which would be one
    prompt per character), and prompts that are not text, blank, or not encodable Unicode.

    Raises:
      ConfigError: `prompts` is a string or not a sequence. PromptError: naming the first bad prompt.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ConfigError(f"prompts must be a list of strings, got {type(prompts).__name__}: pass [text]")
    for index, text in enumerate(prompts):
        if not isinstance(text, str):
            raise PromptError(index, f"is not a string but {type(text).__name__}")
        if not text.strip():
            raise PromptError(index, "is empty" if not text else "is only whitespace")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, as from "\\ud800" in JSON
            raise PromptError(
                index, f"holds invalid Unicode (lone surrogate {text[e.start]!a} at character {e.start})"
            ) from None


def read_text_lines(path: str, what: str) -> list[str]:
    """The lines of a UTF-8 text file; a missing path, a directory or other bytes raise UserError."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory, not a file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None


@dataclasses.dataclass(frozen=True)
class PromptFile:
    """A prompts jsonl file as read: the prompts, each one's line number, and each one's own
    "max_new_tokens" (None where the record has none: the flag applies)."""

    prompts: list[str]
    lines: list[int]
    budgets: list[int | None]


def read_prompt_lines(path: str) -> PromptFile:
    """Prompts from a jsonl file whose lines are objects with a string "prompt" and optionally an
    integer "max_new_tokens" >= 1 (blank lines skipped). Every record is checked before any is
    decoded (so a bad one cannot stop a run half way): a prompt that is empty or not valid Unicode,
    or a bad budget, raises UserError naming its line."""
    read = PromptFile([], [], [])
    for number, line in enumerate(read_text_lines(path, "prompts file"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f'{path} line {number}: expected an object with a string "prompt"')
        try:
            check_prompts([record["prompt"]])
        except PromptError as e:
            raise UserError(f"{path} line {number}: the prompt {e.reason}") from None
        budget = record.get("max_new_tokens")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise UserError(f'{path} line {number}: "max_new_tokens" must be an integer >= 1, got {budget!r}')
        read.prompts.append(record["prompt"])
        read.lines.append(number)
        read.budgets.append(budget)
    if not read.prompts:
        raise UserError(f"{path} holds no prompts")
    return read


def read_prompts(path: str) -> list[str]:
    """The prompts of a jsonl prompts file (`read_prompt_lines`)."""
    return read_prompt_lines(path).prompts
