"""One writer per output: an exclusive lock held for a run's whole life on its output file or run
directory. A second run on the same output is refused at once, with one line naming the run that
holds it, instead of both writing and one run's results vanishing.

The lock is `flock(2)`: it belongs to the open file, so the kernel releases it when the holder exits
however it exits (kill -9 included); no stale lock file is ever left to remove by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator

from bita_jax.errors import UserError

PROC_LOCKS = "/proc/locks"


@contextlib.contextmanager
def exclusive(path: str, what: str, directory: bool = False) -> Iterator[int]:
    """Holds an exclusive lock on `path` (a file, created if missing, or an existing directory).

    Yields the locked file descriptor (read-write for a file); closing it on exit releases the lock.

    Raises:
      UserError: another open file (another process, or another run in this one) holds the lock;
        the message names `what`, and the holder's pid and command line where /proc tells them.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY if directory else os.O_RDWR | os.O_CREAT
    fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{what} is in use by another run ({holder(os.fstat(fd).st_ino)}): wait for it to "
                "finish, or give another output"
            ) from None
        yield fd
    finally:
        os.close(fd)


def holder(inode: int) -> str:
    """'pid N: COMMAND' of the process holding a flock on `inode`, from /proc/locks (Linux)."""
    try:
        with open(PROC_LOCKS) as f:
            lines = f.read().splitlines()
    except OSError:
        return "its process is unknown"
    for line in lines:
        fields = line.split()
        if "FLOCK" not in fields or "->" in fields:  # "->" marks a waiter, not the holder
            continue
        i = fields.index("FLOCK")
        pid, where = fields[i + 3], fields[i + 4]
        if where.rsplit(":", 1)[-1] == str(inode):
            return f"pid {pid}: {command_line(pid)}"
    return "its process is unknown"


def command_line(pid: str, limit: int = 160) -> str:
    """The command line of process `pid`, cut to `limit` characters."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            text = " ".join(f.read().replace(b"\0", b" ").decode("utf-8", "replace").split())
    except OSError:
        return "command unknown"
    return text if len(text) <= limit else text[: limit - 3] + "..."
