"""Prompts in: prompt texts or token-id prompts checked before any work, and prompt jsonl files
(what decode.py, the tuner, the benchmarks and the demo read).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np

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


def given_as_ids(prompts: Sequence) -> bool:
    """True when a request's prompts come encoded: its first prompt is token ids, not text."""
    first = prompts[0] if isinstance(prompts, Sequence) and prompts else None
    return isinstance(first, (Sequence, np.ndarray)) and not isinstance(first, (str, bytes))


def check_prompt_ids(prompts: Sequence, vocab_size: int) -> list[list[int]]:
    """Encoded prompts as plain int lists, refusing, before any work, a text among them, an empty
    prompt and an id outside the vocabulary.

    Raises:
      PromptError: naming the first bad prompt.
    """
    checked = []
    for index, ids in enumerate(prompts):
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
            kind = type(ids).__name__
            raise PromptError(index, f"is a {kind}: prompts are all texts or all token-id lists")
        if len(ids) == 0:
            raise PromptError(index, "has no token ids")
        bad = [t for t in ids if not _is_token_id(t, vocab_size)]
        if bad:
            raise PromptError(index, f"holds {bad[0]!r}, not a token id in [0, {vocab_size})")
        checked.append([int(t) for t in ids])
    return checked


def _is_token_id(value, vocab_size: int) -> bool:
    """An integer (not a bool) in [0, vocab_size)."""
    integer = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    return integer and 0 <= value < vocab_size


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
