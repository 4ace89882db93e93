"""The command-line shells behind decode.py and train.py, and their shared plumbing: user errors
become one line on stderr and exit code 2, no traceback; warnings become one `warning: ...` line;
the library's log records (`logging`, INFO and up under `bita_jax`) become their message lines."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from typing import Callable, Iterator

from bita_jax.errors import ConfigError, Interrupted, UserError

__all__ = ["USER_ERRORS", "DefaultsHelpFormatter", "UserError", "run_main"]

# Errors that describe bad input rather than a bug; anything else keeps its traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, NotADirectoryError, json.JSONDecodeError)

# transformers announces at import that it found no PyTorch, which bita_jax never needs (only the
# tests and benchmarks use torch); the CLIs silence that advisory notice.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default, where it has one and its help does not state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            if "default" not in text:
                text += " (default: %(default)s)"
        return text


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {str(message).splitlines()[0]}", file=sys.stderr)


@contextlib.contextmanager
def _library_log_on_stderr() -> Iterator[None]:
    """While open, the `bita_jax` loggers' INFO-and-up records print as bare lines on stderr (the
    stream current at entry, so a test's captured stderr sees them); their earlier level returns."""
    library = logging.getLogger("bita_jax")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = library.level
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    try:
        yield
    finally:
        library.removeHandler(handler)
        library.setLevel(level)


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Calls main(argv); prints `error: <message>` for user errors and returns exit code 2.

    An interrupted run (Ctrl-C, SIGTERM) prints one line and returns 130. The library's log
    records print on stderr meanwhile (`_library_log_on_stderr`).
    """
    try:
        with warnings.catch_warnings(), _library_log_on_stderr():
            warnings.showwarning = _one_line_warning
            return main(argv) or 0
    except USER_ERRORS as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"error: {e if isinstance(e, Interrupted) else 'interrupted'}", file=sys.stderr)
        return 130
