"""The command-line shells behind decode.py and train.py, and their shared plumbing: user errors
become one line on stderr and exit code 2, no traceback."""

from __future__ import annotations

import json
import sys
from typing import Callable

from bita_jax.errors import ConfigError, UserError

__all__ = ["USER_ERRORS", "UserError", "run_main"]

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
