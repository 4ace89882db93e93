"""Output locations: refuse unusable ones before any work, and report filesystem failures in one line."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from typing import Iterator

from bita_jax.errors import UserError

# A full disk, a quota, a read-only or failing filesystem, no permission: the machine's state, not a bug.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def is_disk_error(e: BaseException) -> bool:
    """An OSError of the filesystem, or a tensorstore (orbax) write error caused by a full disk."""
    if isinstance(e, OSError):
        return e.errno in DISK_ERRNOS
    return "No space left on device" in str(e) or "Disk quota exceeded" in str(e)


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """Turns a filesystem failure while writing `what` into a one-line UserError."""
    try:
        yield
    except Exception as e:  # only filesystem failures are turned into a UserError
        if not is_disk_error(e):
            raise
        reason = e.strerror if isinstance(e, OSError) else "no space left on device"
        raise UserError(f"cannot write {what}: {reason}") from None


def check_writable_dir(directory: str, what: str, create: bool = False) -> None:
    """Refuses, before any work, a directory that is missing (unless created) or not writable."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserError(f"{what} is a file, not a directory")
    if create:
        with writing(what):
            os.makedirs(directory, exist_ok=True)
    elif not os.path.isdir(directory):
        raise UserError(f"{what}: directory {directory} does not exist")
    with writing(f"in {directory} ({what})"), tempfile.TemporaryFile(dir=directory):
        pass


def check_output_file(path: str) -> None:
    """Refuses an output file path that is a directory or lies where no file can be created."""
    if os.path.isdir(path):
        raise UserError(f"--output {path} is a directory; give a file name")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), f"--output {path}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"--output {path} is not writable")
