"""Orbax training checkpoints: adapter params, optimizer state, step and data position.

The frozen base model is never saved here (it always comes from the HF checkpoint). Restores go
into an abstract target whose leaves carry their shardings, so each host reads only its shards.
"""

from __future__ import annotations

import os
from typing import Any

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
    with writing(f"checkpoint {step} in {mngr.directory}"):
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)
            ),
        )


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
