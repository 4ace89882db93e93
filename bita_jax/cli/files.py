"""The file decode.py writes: result jsonl, appended batch by batch by one run at a time (locked),
each record saying what made it, so --resume refuses another run's records. (Prompt files are read
by bita_jax/io/prompts.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Sequence

from bita_jax.errors import UserError
from bita_jax.io import lock
from bita_jax.io.paths import check_output_file, writing

# The key of each record's identity, and what sets each field of it (for --resume's refusal).
RUN_KEY = "run"
IDENTITY_OPTIONS = {
    "model": "--model (weights fingerprint)",
    "adapter": "--adapter (fingerprint)",
    "mode": "mode (as decoded)",
    "tree": "--tree (as resolved)",
    "max_new_tokens": "--max-new-tokens",
    "ignore_eos": "--ignore-eos",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "seed": "--seed",
    "chat": "--chat",
    "dtype": "--dtype",
    "precision": "--precision",
}


def _shown(value: Any) -> str:
    text = "none" if value is None else value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 48 else text[:45] + "..."


class ResultsFile:
    """decode.py's output: a jsonl file held by this run alone (`lock.exclusive`), or stdout.

    Entering it locks the file and reads what an earlier run finished there: without `resume` a
    file holding anything is refused (a finished output is never replaced by a run that may be
    interrupted); with it, its complete lines must be finished records (with output_ids) of the
    first prompts, in order; a torn last line (a run killed while writing) is dropped. `check`
    compares their identity with this run's, `write` appends records (each with this run's
    identity) after the kept ones. A file this run created and left empty is removed on exit.
    """

    def __init__(
        self, path: str | None, prompts: Sequence[str], resume: bool, budgets: Sequence[int] | None = None
    ):
        self.path, self.prompts, self.resume, self.budgets = path, prompts, resume, budgets
        self.records: list[dict[str, Any]] = []  # the finished records kept
        self.offset = 0  # bytes of the kept records
        self.fd: int | None = None
        self._stack = contextlib.ExitStack()
        self._created = False
        self._started = False

    def __enter__(self) -> "ResultsFile":
        if self.path is None:
            return self
        check_output_file(self.path)
        self._created = not os.path.exists(self.path)
        with self._stack:
            self.fd = self._stack.enter_context(lock.exclusive(self.path, f"--output {self.path}"))
            self._read_finished()
            self._stack = self._stack.pop_all()  # keep the lock past this block
        return self

    def __exit__(self, *exc) -> None:
        if self._created and self.fd is not None and os.fstat(self.fd).st_size == 0:
            os.unlink(self.path)  # still locked: no other run can have opened it meanwhile
        self._stack.close()

    def _read_finished(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        if not data:
            return
        if not self.resume:
            raise UserError(
                f"--output {self.path} already holds results: pass --resume to decode only the "
                "prompts it lacks, or remove it"
            )
        lines = data.split(b"\n")
        for number, line in enumerate(lines[:-1], start=1):  # the piece after the last newline is torn
            where = f"--resume: {self.path} line {number}"
            try:
                record = json.loads(line.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"{where} is not a JSON record") from None
            if not isinstance(record, dict) or not isinstance(record.get("output_ids"), list):
                raise UserError(f"{where} is not a finished decode.py record (no output_ids; the prompts?)")
            if number > len(self.prompts) or record.get("prompt") != self.prompts[number - 1]:
                raise UserError(
                    f"{where} is not the record of prompt {number} of this input (another run's output?)"
                )
            if not isinstance(record.get(RUN_KEY), dict):
                raise UserError(f"{where} does not say what made it (older bita_jax?): give a new --output")
            self.records.append(record)
            self.offset += len(line) + 1

    def check(self, identity: dict[str, Any], skip: Sequence[str] = ()) -> None:
        """Refuses kept records made by another run: naming the first field of `identity` (keys
        of IDENTITY_OPTIONS) that differs, except those in `skip` (not known yet), or a prompt's
        max_new_tokens other than `budgets` gives it."""
        for number, record in enumerate(self.records, start=1):
            made = record[RUN_KEY]
            for key, option in IDENTITY_OPTIONS.items():
                if key in skip or key not in identity:
                    continue
                before, now = made.get(key, "unrecorded"), identity[key]
                if before != now:
                    raise UserError(
                        f"--resume: {self.path} line {number} was made with {option} {_shown(before)}, "
                        f"not {_shown(now)}: resume with the same settings, or give another --output"
                    )
            if self.budgets is not None and record.get("max_new_tokens") != self.budgets[number - 1]:
                raise UserError(
                    f"--resume: {self.path} line {number} was decoded with max_new_tokens "
                    f"{_shown(record.get('max_new_tokens'))}, this input asks {self.budgets[number - 1]} "
                    "for that prompt (its prompts-file record): resume with the same budgets"
                )

    def write(self, records: list[dict[str, Any]], identity: dict[str, Any]) -> None:
        """Appends records, each with `identity` under "run", flushed (fsync'd to a file)."""
        text = "".join(json.dumps({**r, RUN_KEY: identity}, ensure_ascii=False) + "\n" for r in records)
        if self.fd is None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        with writing(f"--output {self.path}"):
            if not self._started:  # drop a torn last line of an earlier run
                os.ftruncate(self.fd, self.offset)
                self._started = True
            data = text.encode("utf-8")
            os.lseek(self.fd, 0, os.SEEK_END)
            while data:
                data = data[os.write(self.fd, data) :]
            os.fsync(self.fd)
