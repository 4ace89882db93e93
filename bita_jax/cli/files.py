"""Files the CLIs read and write: prompt jsonl in, result jsonl out (appended batch by batch)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, BinaryIO

from bita_jax.errors import UserError
from bita_jax.io.paths import writing


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


def read_prompts(path: str) -> list[str]:
    """Prompts from a jsonl file whose lines are objects with a string "prompt"; blank lines skipped."""
    return [record["prompt"] for record in read_prompt_records(path)]


def read_prompt_records(path: str) -> list[dict[str, Any]]:
    """The records of a prompts jsonl file: objects with a string "prompt" and optionally an integer
    "max_new_tokens" (>= 1) that overrides the flag for that prompt; blank lines skipped."""
    records = []
    for number, line in enumerate(read_text_lines(path, "prompts file"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f'{path} line {number}: expected an object with a string "prompt"')
        budget = record.get("max_new_tokens", 1)
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise UserError(f'{path} line {number}: "max_new_tokens" must be an integer >= 1, got {budget!r}')
        records.append(record)
    if not records:
        raise UserError(f"{path} holds no prompts")
    return records


def finished_records(path: str, prompts: list[str], resume: bool) -> tuple[list[dict[str, Any]], int]:
    """The records an earlier run left in `path` and the byte length of that good prefix.

    With `resume` they must be the records of the first prompts, in order; a torn last line (a run
    killed while writing it) is not counted. Without `resume` a non-empty file is refused, so a
    finished output is never replaced by a run that may be interrupted.
    """
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return [], 0
    if not resume:
        raise UserError(
            f"--output {path} already holds results: pass --resume to decode only the prompts it lacks, "
            "or remove it"
        )
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records, offset = [], 0
    for number, line in enumerate(lines[:-1], start=1):  # the piece after the last newline is torn
        try:
            record = json.loads(line.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"--resume: {path} line {number} is not a JSON record") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if number > len(prompts) or prompt != prompts[number - 1]:
            raise UserError(
                f"--resume: {path} line {number} is not the record of prompt {number} of this input "
                "(another run's output?)"
            )
        records.append(record)
        offset += len(line) + 1
    return records, offset


class RecordWriter:
    """Writes result records as batches finish: one json line each, flushed, to a file or stdout.

    A file is kept up to `offset` (the finished records of an earlier run) and appended to.
    """

    def __init__(self, path: str | None, offset: int = 0):
        self.path = path
        self.file: BinaryIO | None = None
        if path is not None:
            with writing(path):
                self.file = open(path, "r+b" if os.path.exists(path) else "wb")
                self.file.seek(offset)
                self.file.truncate()

    def write(self, records: list[dict[str, Any]]) -> None:
        text = "".join(_line(r) for r in records)
        if self.file is None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        with writing(self.path):
            self.file.write(text.encode("utf-8"))
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            with writing(self.path):
                self.file.close()


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"
