"""The tree choice: predicted tokens/s of each candidate tree on this device, AR unless a tree wins.

For batch size B, a tree of R rows and expected tokens per step tau runs at B * tau / t(B, R)
tokens/s, where t is the measured step time (step_cost.py); AR is tau = 1 at the measured AR step
time. The choice keeps AR unless the best tree is predicted faster by a margin, so a user never
pays for a tree that does not pay off.

The statistics and choices live with the adapter in `trees.json`, choices keyed by device kind
(`jax.Device.device_kind`), dtype and batch size, so decoding on a known device needs no
calibration. numpy only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple, Sequence

import numpy as np

from bita_jax.bita.tree import DraftTree
from bita_jax.config import PRECISIONS
from bita_jax.errors import ConfigError, UserError
from bita_jax.tuning.stats import AcceptanceStats

TREES_FILE = "trees.json"
FORMAT_VERSION = 1
DEFAULT_MARGIN = 0.05


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """Measured step seconds at one batch size on one device.

    Attributes:
      batch_size: B.
      ar_seconds: one AR step.
      tree_rows: ascending row counts R of the measured tree steps.
      tree_seconds: one tree step of each of those row counts.
    """

    batch_size: int
    ar_seconds: float
    tree_rows: tuple[int, ...]
    tree_seconds: tuple[float, ...]

    def __post_init__(self):
        if not self.tree_rows or len(self.tree_rows) != len(self.tree_seconds):
            raise ConfigError("step costs need one time per measured row count")
        if list(self.tree_rows) != sorted(set(self.tree_rows)):
            raise ConfigError("step cost row counts must be ascending and distinct")

    def tree_step_seconds(self, rows: int) -> float:
        """t(B, rows), linear between measured row counts; no extrapolation past the last."""
        if not self.tree_rows[0] <= rows <= self.tree_rows[-1]:
            raise ConfigError(
                f"no step cost measured for {rows} rows (measured {self.tree_rows[0]}..{self.tree_rows[-1]})"
            )
        return float(np.interp(rows, self.tree_rows, self.tree_seconds))


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Predicted speed of one way to decode (tree None: AR).

    Attributes:
      tree: the draft tree, or None for AR.
      tau: predicted tokens committed per step (1 for AR).
      rows: rows per step (1 for AR).
      step_seconds: measured (or interpolated) seconds per step at this batch size.
      tokens_per_s: predicted B * tau / step_seconds.
    """

    tree: DraftTree | None
    tau: float
    rows: int
    step_seconds: float
    tokens_per_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "tree": None if self.tree is None else [list(p) for p in self.tree.paths],
            "lookup": 0 if self.tree is None else self.tree.lookup,
            "tau": self.tau,
            "rows": self.rows,
            "step_seconds": self.step_seconds,
            "tokens_per_s": self.tokens_per_s,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Prediction":
        lookup = int(data.get("lookup", 0))  # stores written before lookup chains have none
        tree = None if data["tree"] is None else DraftTree.from_paths(data["tree"], lookup)
        return cls(
            tree,
            float(data["tau"]),
            int(data["rows"]),
            float(data["step_seconds"]),
            float(data["tokens_per_s"]),
        )


@dataclasses.dataclass(frozen=True)
class Choice:
    """The decision for one batch size: the best tree predicted, AR, and the margin between them.

    Attributes:
      batch_size: B.
      best_tree: the candidate tree with the most predicted tokens/s (None without candidates).
      ar: AR's measured speed.
      margin: the tree is chosen only if predicted at least (1 + margin) times AR's tokens/s.
    """

    batch_size: int
    best_tree: Prediction | None
    ar: Prediction
    margin: float = DEFAULT_MARGIN

    @property
    def speedup(self) -> float:
        """Predicted tokens/s of the best tree over AR's (0 without candidates)."""
        return 0.0 if self.best_tree is None else self.best_tree.tokens_per_s / self.ar.tokens_per_s

    @property
    def chosen(self) -> Prediction:
        """The best tree if it beats AR by the margin, else AR."""
        return self.best_tree if self.speedup >= 1.0 + self.margin else self.ar

    @property
    def tree(self) -> DraftTree | None:
        """The tree to decode with; None means decode AR."""
        return self.chosen.tree

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "margin": self.margin,
            "best_tree": None if self.best_tree is None else self.best_tree.to_json(),
            "ar": self.ar.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Choice":
        best = data["best_tree"]
        return cls(
            int(data["batch_size"]),
            None if best is None else Prediction.from_json(best),
            Prediction.from_json(data["ar"]),
            float(data["margin"]),
        )


def predict(candidates: Sequence[tuple[DraftTree, float]], costs: StepCosts) -> list[Prediction]:
    """Predicted speed of each (tree, tau) candidate whose rows were measured (others dropped)."""
    out = []
    for tree, tau in candidates:
        if not costs.tree_rows[0] <= tree.num_rows <= costs.tree_rows[-1]:
            continue
        seconds = costs.tree_step_seconds(tree.num_rows)
        out.append(Prediction(tree, tau, tree.num_rows, seconds, costs.batch_size * tau / seconds))
    return out


def ar_prediction(costs: StepCosts) -> Prediction:
    return Prediction(None, 1.0, 1, costs.ar_seconds, costs.batch_size / costs.ar_seconds)


def choose(
    candidates: Sequence[tuple[DraftTree, float]], costs: StepCosts, margin: float = DEFAULT_MARGIN
) -> Choice:
    """The best candidate tree by predicted tokens/s at costs.batch_size, against AR.

    Args:
      candidates: (tree, predicted tau) pairs, e.g. `AcceptanceStats.best_trees(max rows measured)`.
      costs: measured step times at one batch size.
      margin: a tree is chosen only if predicted at least (1 + margin) x AR's tokens/s.
    """
    predictions = predict(candidates, costs)
    best = max(predictions, key=lambda p: p.tokens_per_s, default=None)
    return Choice(costs.batch_size, best, ar_prediction(costs), margin)


# ---------------------------------------------------------------------------------------------
# trees.json


class ChoiceKey(NamedTuple):
    """What a stored tree choice was made for: everything that changes acceptance or step cost.

    Attributes:
      device_kind: `jax.devices()[0].device_kind` ("cpu", "NVIDIA H100 80GB HBM3").
      dtype: the weights' dtype.
      batch_size: B.
      sampling: "greedy" or "sampled" (temperature > 0): sampling accepts fewer drafts (1.16
        tokens per step at temperature 1 against 1.86 greedy on the demo).
      precision: "exact" or "fast" (config.PRECISIONS, as `config.precision_of` reads it): the
        compute dtype changes the step cost.
      chat: prompts wrapped in the tokenizer's chat template.
    """

    device_kind: str
    dtype: str
    batch_size: int
    sampling: str = "greedy"
    precision: str = "exact"
    chat: bool = False

    def fallbacks(self) -> list["ChoiceKey"]:
        """The keys whose stored choice `TreeStore.resolve` takes, in order: this one, then the same
        with chat the other way (the template reframes the prompts; the step cost and the adapter
        are the same). Device, dtype, batch size, sampling and precision are never ignored: a choice
        for another of them predicts another acceptance or step cost."""
        return [self, self._replace(chat=not self.chat)]

    def describe(self) -> str:
        """"cpu float32 batch 1", then whatever is not the default: sampled, fast precision, chat."""
        extra = [self.sampling] if self.sampling != "greedy" else []
        extra += [f"{self.precision} precision"] if self.precision != "exact" else []
        extra += ["chat"] if self.chat else []
        return " ".join([self.device_kind, self.dtype, "batch", str(self.batch_size), *extra])


SAMPLINGS = ("greedy", "sampled")


@dataclasses.dataclass(frozen=True)
class TreeStore:
    """Contents of an adapter's trees.json.

    Attributes:
      statistics: the adapter's acceptance statistics (None before calibration): teacher-forced
        ranks of greedy outputs, so they predict greedy acceptance only.
      choices: ChoiceKey -> Choice.
    """

    statistics: AcceptanceStats | None = None
    choices: dict[ChoiceKey, Choice] = dataclasses.field(default_factory=dict)

    def lookup(self, *key: Any, **fields: Any) -> Choice | None:
        """The choice stored for exactly this key (`ChoiceKey` fields), or None."""
        return self.choices.get(ChoiceKey(*key, **fields))

    def resolve(self, key: ChoiceKey) -> tuple[ChoiceKey, Choice] | None:
        """(the key it was stored under, the choice) for the first of `key.fallbacks()` stored."""
        for candidate in key.fallbacks():
            if candidate in self.choices:
                return candidate, self.choices[candidate]
        return None

    def with_choice(self, device_kind: str, dtype: str, choice: Choice, **fields: Any) -> "TreeStore":
        """A copy with `choice` stored for (device_kind, dtype, its batch size, `fields`: the other
        ChoiceKey fields, default greedy, exact, no chat), replacing one for the same key."""
        key = ChoiceKey(device_kind, dtype, choice.batch_size, **fields)
        return dataclasses.replace(self, choices={**self.choices, key: choice})

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "statistics": None if self.statistics is None else self.statistics.to_json(),
            "choices": [
                {"device_kind": key.device_kind, "dtype": key.dtype, "sampling": key.sampling,
                 "precision": key.precision, "chat": key.chat, **choice.to_json()}
                for key, choice in sorted(self.choices.items())
            ],  # fmt: skip
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TreeStore":
        """Inverse of `to_json`; raises ConfigError on malformed content or another format version."""
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"expected a JSON object with format_version {FORMAT_VERSION}")
        stats = data.get("statistics")
        statistics = None if stats is None else AcceptanceStats.from_json(stats)
        try:
            # Choices written before sampling, precision and chat were keyed were all made by the
            # tuner as it was then: greedy outputs, the "exact" policy, prompts without the template.
            choices = {
                ChoiceKey(
                    str(c["device_kind"]), str(c["dtype"]), int(c["batch_size"]),
                    str(c.get("sampling", "greedy")), str(c.get("precision", "exact")),
                    bool(c.get("chat", False)),
                ): Choice.from_json(c)
                for c in data["choices"]
            }  # fmt: skip
        except (KeyError, TypeError, ValueError):
            raise ConfigError(
                "malformed choices (expected device_kind, dtype, batch_size, ar, best_tree)"
            ) from None
        for key in choices:
            if key.sampling not in SAMPLINGS or key.precision not in PRECISIONS:
                raise ConfigError(
                    f"a choice's sampling or precision is unknown: {key.sampling!r}, {key.precision!r}"
                )
        return cls(statistics, choices)


def load_store(adapter_dir: str) -> TreeStore | None:
    """The adapter's trees.json, or None when it has none.

    Raises:
      UserError: the file exists but is not a valid store.
    """
    path = os.path.join(adapter_dir, TREES_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return TreeStore.from_json(json.load(f))
    except json.JSONDecodeError as e:
        raise UserError(f"cannot parse {path}: {e.msg}") from None
    except ConfigError as e:
        raise UserError(f"{path}: {e}") from None


def save_store(adapter_dir: str, store: TreeStore) -> str:
    """Writes the adapter's trees.json (atomically: a reader never sees half a file); returns its path."""
    path = os.path.join(adapter_dir, TREES_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(store.to_json(), f)
    os.replace(tmp, path)
    return path
