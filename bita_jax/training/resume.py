"""What makes a training run resumable without loss: its identity (refuse to resume a different
run), metrics that hold each step once across restarts, and stopping on SIGINT/SIGTERM at a step
boundary so the loop can save a checkpoint first."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from bita_jax.config import TrainConfig, read_json
from bita_jax.errors import UserError
from bita_jax.io import lock
from bita_jax.io.paths import check_writable_dir, writing

RUN_FILE = "run.json"
# What a checkpoint is only valid for, with the option that sets it (for the error message).
IDENTITY_OPTIONS = {
    "model": "--model",
    "model_config_sha256": "the base model's config.json (sha256)",
    "data": "--data",
    "data_sha256": "the data file's contents (sha256)",
    "batch_size": "--batch-size",
    "num_prompt_tokens": "bita.num_prompt_tokens",
    "num_mask_tokens": "bita.num_mask_tokens",
}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive_run(output: str | None) -> Iterator[None]:
    """Holds the run directory (created if missing) for this run alone while entered: a second run
    on it is refused at once (`lock.exclusive`). Multi-host: process 0 holds it for the job."""
    if not output or jax.process_index() != 0:
        yield
        return
    check_writable_dir(output, f"--output {output}", create=True)
    with lock.exclusive(output, f"--output {output}", directory=True):
        yield


def run_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The settings a run's checkpoints depend on: base model, data, batch size, adapter shape."""
    local_data = os.path.exists(cfg.data.path)
    return {
        "model": os.path.realpath(cfg.model),
        "model_config_sha256": _sha256(os.path.join(cfg.model, "config.json")),
        "data": os.path.realpath(cfg.data.path) if local_data else cfg.data.path,
        "data_sha256": _sha256(cfg.data.path) if os.path.isfile(cfg.data.path) else None,
        "batch_size": cfg.batch_size,
        "num_prompt_tokens": cfg.bita.num_prompt_tokens,
        "num_mask_tokens": cfg.bita.num_mask_tokens,
    }


def check_same_run(cfg: TrainConfig, has_checkpoint: bool) -> None:
    """Refuses to resume checkpoints of a run with another identity; records this run's identity.

    Raises:
      UserError: naming the first setting that differs from the run in OUTPUT.
    """
    path = os.path.join(cfg.output, RUN_FILE)
    identity = run_identity(cfg)
    if has_checkpoint and os.path.isfile(path):
        recorded = read_json(path)
        for key, option in IDENTITY_OPTIONS.items():
            before, now = recorded.get(key, identity[key]), identity[key]
            if before != now:
                if key.endswith("sha256"):
                    before, now = str(before)[:12], str(now)[:12]
                raise UserError(
                    f"{cfg.output} holds checkpoints of a run with {option} {before}, not {now}: "
                    "resume with the same settings, or give a new --output"
                )
        return
    if jax.process_index() == 0:
        with writing(path), open(path, "w") as f:
            json.dump(identity, f, indent=2)


def trim_metrics(path: str, step: int) -> None:
    """Drops metrics logged after `step` (the checkpoint resumed from), and a torn last line, so a
    step is logged once however often the run was killed and resumed."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a kill
    if len(kept) < len(lines):
        with writing(path):
            with open(path + ".tmp", "w") as f:
                f.write("".join(line + "\n" for line in kept))
            os.replace(path + ".tmp", path)


def last_metrics(path: str, step: int) -> dict[str, Any]:
    """The metrics logged for `step`, or just the step when none were."""
    if os.path.isfile(path):
        with open(path) as f:
            for line in reversed(f.read().splitlines()):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("step") == step:
                    return record
    return {"step": step}


class StopSignals:
    """While entered, SIGINT and SIGTERM only ask the loop to stop after its current step (so it
    can save a checkpoint); a second SIGINT stops at once. A no-op outside the main thread."""

    def __init__(self):
        self.name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name

    def requested(self) -> bool:
        """Whether any process got a stop signal (all processes must stop at the same step)."""
        stop = self.name is not None
        if jax.process_count() > 1:
            stop = bool(np.max(multihost_utils.process_allgather(np.int32(stop))))
            self.name = self.name or ("a stop signal on another host" if stop else None)
        return stop
