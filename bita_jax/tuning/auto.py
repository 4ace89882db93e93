"""`--tree auto`: the draft tree to decode with on this device, dtype and batch size, or AR.

In order: the choice stored in the adapter's trees.json for (device kind, dtype, batch size); else
the stored statistics combined with step costs measured here and now (seconds); else, for an
adapter without statistics, the default tree. The decision says which and why in one line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bita_jax.bita.tree import DEFAULT_TREE, DraftTree, parse_tree
from bita_jax.config import ModelConfig
from bita_jax.tuning import step_cost
from bita_jax.tuning.choice import Choice, TreeStore, choose

AUTO = "auto"
# The on-the-spot ladder stops here: it compiles about log2(rows) steps, seconds on a small model.
ON_THE_SPOT_MAX_ROWS = 132


@dataclasses.dataclass(frozen=True)
class AutoTree:
    """What `--tree auto` resolved to.

    Attributes:
      tree: the draft tree, or None to decode AR.
      source: "stored" (trees.json choice), "measured" (stored statistics, step costs measured now)
        or "default" (no statistics: DEFAULT_TREE).
      choice: the choice behind a stored or measured decision (None for "default").
      key: (device kind, dtype, batch size) the decision is for.
    """

    tree: DraftTree | None
    source: str
    choice: Choice | None
    key: tuple[str, str, int]

    def note(self) -> str:
        """One line: what auto decided and why."""
        kind, dtype, batch = self.key
        where = f"{kind} {dtype} batch {batch}"
        if self.choice is None:
            return (
                f"tree auto: the adapter has no trees.json statistics, using the default tree "
                f"{DEFAULT_TREE} ({self.tree.describe()}); `python -m bita_jax.tune` picks one for {where}"
            )
        how = "stored choice" if self.source == "stored" else "step costs measured now"
        best = self.choice.best_tree
        if best is None:
            return f"tree auto: AR on {where} (no candidate tree fits the measured rows; {how})"
        ar_speed = self.choice.ar.tokens_per_s
        versus = (
            f"{best.tree.describe()}: predicted {best.tau:.2f} tokens per step, "
            f"{best.tokens_per_s:.1f} tokens/s = {self.choice.speedup:.2f}x AR's {ar_speed:.1f}"
        )
        if self.tree is None:
            margin = 1 + self.choice.margin
            return f"tree auto: AR on {where}, the best tree is below {margin:.2f}x AR ({versus}; {how})"
        return f"tree auto: on {where} the best tree ({versus}; {how})"


def default_tree(num_masks: int, key: tuple[str, str, int]) -> AutoTree:
    return AutoTree(parse_tree(DEFAULT_TREE, num_masks), "default", None, key)


def resolve_auto_tree(
    store: TreeStore | None,
    config: ModelConfig,
    params: Any,
    adapter: Any,
    num_masks: int,
    batch_size: int,
) -> AutoTree:
    """The tree `--tree auto` decodes with (None in `.tree`: AR) for this device, dtype and batch.

    Args:
      store: the adapter's trees.json (None when it has none).
      config: the decoding config (its dtype is part of the key).
      params, adapter: on the device, for measuring step costs when no choice is stored.
      num_masks: M, the adapter's mask tokens.
      batch_size: B.
    """
    key = (step_cost.current_device_kind(), config.dtype, batch_size)
    if store is None or store.statistics is None:
        return default_tree(num_masks, key)
    stored = store.lookup(*key)
    if stored is not None:
        return AutoTree(stored.tree, "stored", stored, key)
    ladder = step_cost.ladder_trees(num_masks, ON_THE_SPOT_MAX_ROWS)
    (costs,) = step_cost.measure_step_costs(config, params, adapter, [batch_size], ladder)
    choice = choose(store.statistics.best_trees(costs.tree_rows[-1]), costs)
    return AutoTree(choice.tree, "measured", choice, key)
