"""Shared CLI plumbing: user errors become one line on stderr and a non-zero exit, no traceback."""

from __future__ import annotations

import json
import sys
from typing import Callable

from bita_jax.config import ConfigError


class UserError(ConfigError):
    """Bad input from the user (missing file, malformed data line, ...)."""


# Errors that describe bad input rather than a bug; anything else keeps its traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, NotADirectoryError, json.JSONDecodeError)


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Calls main(argv); prints `error: <message>` for user errors and returns exit code 2."""
    try:
        return main(argv) or 0
    except USER_ERRORS as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
