"""Errors that describe bad input rather than a bug: the CLIs report them as one `error: ...` line."""

from __future__ import annotations

import contextlib
import errno
from typing import Iterator


class ConfigError(ValueError):
    """A configuration problem (bad option, unsupported model, mismatched adapter, ...)."""


class UserError(ConfigError):
    """Bad input from the user (missing file, malformed data line, ...)."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM after saving its work; the message says where it is."""


# A full disk, a quota, a read-only or vanished filesystem: the machine's state, not a bug.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """Turns an OSError of the filesystem while writing `what` into a one-line UserError."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        raise UserError(f"cannot write {what}: {e.strerror}") from None
