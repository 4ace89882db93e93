"""`--tree auto`: the draft tree to decode with on this device, dtype, batch size, sampling,
precision and chat setting (a `ChoiceKey`), or AR.

In order: the choice stored in the adapter's trees.json for the key, or for the key with chat the
other way (`ChoiceKey.fallbacks`); else, for greedy decoding, the stored statistics combined with step
costs measured here and now (seconds); else the default tree: for an adapter without statistics,
and for sampled decoding, which the greedy statistics do not predict. The decision says which and
why in one line (docs/tuning.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bita_jax.bita.tree import DEFAULT_TREE, DraftTree, parse_tree
from bita_jax.config import ModelConfig, precision_of
from bita_jax.tuning import step_cost
from bita_jax.tuning.choice import Choice, ChoiceKey, TreeStore, choose

AUTO = "auto"
# The on-the-spot ladder stops here: it compiles about log2(rows) steps, seconds on a small model.
ON_THE_SPOT_MAX_ROWS = 132


@dataclasses.dataclass(frozen=True)
class AutoTree:
    """What `--tree auto` resolved to.

    Attributes:
      tree: the draft tree, or None to decode AR.
      source: "stored" (trees.json choice), "measured" (stored statistics, step costs measured now)
        or "default" (DEFAULT_TREE: no statistics, or sampled decoding without a stored choice).
      choice: the choice behind a stored or measured decision (None for "default").
      key: what the decision is for.
      stored_for: the key a stored choice was made for (one of `key.fallbacks()`); None unless stored.
    """

    tree: DraftTree | None
    source: str
    choice: Choice | None
    key: ChoiceKey
    stored_for: ChoiceKey | None = None

    @property
    def silent(self) -> bool:
        """A tree stored for exactly this key needs no note; anything else is said in one line."""
        return self.tree is not None and self.source == "stored" and self.stored_for == self.key

    def note(self) -> str:
        """One line: what auto decided and why."""
        where = self.key.describe()
        if self.choice is None:
            default = f"the default tree {DEFAULT_TREE} ({self.tree.describe()})"
            if self.key.sampling != "greedy":
                return (
                    f"tree auto: trees.json holds no choice for sampled decoding (its statistics are "
                    f"greedy acceptance), using {default} on {where}"
                )
            return (
                f"tree auto: the adapter has no trees.json statistics, using {default}; "
                f"`python -m bita_jax.tune` picks one for {where}"
            )
        how = "step costs measured now"
        if self.source == "stored":
            how = "stored choice"
            if self.stored_for != self.key:
                how += f" for {self.stored_for.describe()}"
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


def default_tree(num_masks: int, key: ChoiceKey) -> AutoTree:
    return AutoTree(parse_tree(DEFAULT_TREE, num_masks), "default", None, key)


def resolve_auto_tree(
    store: TreeStore | None,
    config: ModelConfig,
    params: Any,
    adapter: Any,
    num_masks: int,
    batch_size: int,
    sampled: bool = False,
    chat: bool = False,
) -> AutoTree:
    """The tree `--tree auto` decodes with (None in `.tree`: AR) for this device, dtype, batch
    size, sampling, precision and chat setting (the module docstring's order).

    Args:
      store: the adapter's trees.json (None when it has none).
      config: the decoding config (its dtype and precision are part of the key).
      params, adapter: on the device, for measuring step costs when no choice is stored.
      num_masks: M, the adapter's mask tokens.
      batch_size: B.
      sampled: decoding samples (temperature > 0).
      chat: prompts are wrapped in the chat template.
    """
    key = ChoiceKey(
        step_cost.current_device_kind(), config.dtype, batch_size,
        "sampled" if sampled else "greedy", precision_of(config), chat,
    )  # fmt: skip
    if store is None or store.statistics is None:
        return default_tree(num_masks, key)
    found = store.resolve(key)
    if found is not None:
        stored_for, stored = found
        return AutoTree(stored.tree, "stored", stored, key, stored_for)
    if sampled:  # the statistics are greedy acceptance: they would overrate every tree
        return default_tree(num_masks, key)
    ladder = step_cost.ladder_trees(num_masks, ON_THE_SPOT_MAX_ROWS)
    (costs,) = step_cost.measure_step_costs(config, params, adapter, [batch_size], ladder)
    choice = choose(store.statistics.best_trees(costs.tree_rows[-1]), costs)
    return AutoTree(choice.tree, "measured", choice, key)
