"""Orbax training checkpoints: adapter params, optimizer state, step and data position.

The frozen base model is never saved here (it always comes from the HF checkpoint). Restores go
into an abstract target whose leaves carry their shardings, so each host reads only its shards.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

from bita_jax.io.paths import writing


def manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
    """CheckpointManager over `directory` (created if missing); saves only when asked.

    Saves are synchronous: the adapter and its optimizer state are small (MBs to a few hundred MB),
    and a save that fails (a full disk) then fails in `save`, as one error, instead of in a
    background thread that logs its traceback and fails a later call.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_position: dict[str, int]) -> None:
    """Saves the train state pytree and the data position (json) as checkpoint `step`.

    Raises:
      UserError: the filesystem refused the write (full disk, quota, read-only); the previous
        checkpoints are intact (orbax writes to a temporary directory and renames it when done).
    """
    with writing(f"checkpoint {step} in {mngr.directory}"), _thread_errors_unlogged():
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)
            ),
        )


@contextlib.contextmanager
def _thread_errors_unlogged() -> Iterator[None]:
    """orbax raises a failed write (e.g. a full disk) from `save`, where it is reported once; its
    writer threads log the same failure with tracebacks (absl's logger), tensorstore callbacks then
    fail on orbax's closed event loop (printed as unraisable errors), and the abandoned write
    tasks log "Task exception was never retrieved" (asyncio's logger) when collected. Hide those;
    after a failed save they stay hidden, since orbax's other writer threads go on failing."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    hook = sys.unraisablehook
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    except BaseException:
        gc.collect()  # the failed save's abandoned tasks log when collected
        raise
    sys.unraisablehook = hook
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, dict[str, int]] | None:
    """(state, data position) of the newest checkpoint, or None if there is none.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding`, the restore target.
    """
    step = mngr.latest_step()
    if step is None:
        return None
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
    )
    return restored["state"], dict(restored["data"])


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves carrying the given shardings (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
