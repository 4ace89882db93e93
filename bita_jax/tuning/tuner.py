"""The tuner: calibration data -> acceptance statistics, measured step costs -> the choice per batch size.

`python -m bita_jax.tune` (bita_jax/cli/tune.py) is its command line. Calibration sequences must be
the base model's own greedy outputs (BiTA accepts exactly those): decode.py records with
`output_ids` are used as they are; prompts without them are decoded greedily first, by the command
line through the API (this module sits below it: it takes the config, params and adapter).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from bita_jax.bita.adapter import Adapter
from bita_jax.bita.tree import DraftTree
from bita_jax.config import ModelConfig
from bita_jax.errors import UserError
from bita_jax.training import data
from bita_jax.tuning import calibrate, step_cost
from bita_jax.tuning.choice import Choice, Prediction, StepCosts, TreeStore, choose, predict
from bita_jax.tuning.stats import AcceptanceStats

DEFAULT_MAX_RANK = 8
DEFAULT_MAX_ROWS = 160


def has_outputs(path: str) -> bool:
    """Whether every record of a jsonl file carries `prompt_ids` and `output_ids` (decode.py output)."""
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise UserError(f"calibration data not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON lines ({e.msg})") from None
    return bool(records) and all(
        isinstance(r, dict) and "prompt_ids" in r and "output_ids" in r for r in records
    )


def acceptance_statistics(
    config: ModelConfig, params: Any, adapter: Adapter, examples: list[data.Example], max_rank: int
) -> AcceptanceStats:
    """Teacher-forcing ranks and lookup runs of every drafting point of the examples (the base
    model's params and the adapter, as `bita_jax.load` places them), as statistics."""
    longest = max(len(e.source) + len(e.target) for e in examples)
    ranks = calibrate.teacher_forced_ranks(config, params, adapter, examples, max_length=longest)
    runs = calibrate.lookup_runs(examples, config.vocab_size)
    return AcceptanceStats.from_ranks(ranks, max_rank, runs)


def with_exact_rows(costs: StepCosts, extra: StepCosts) -> StepCosts:
    """costs with the tree steps of `extra` added and its AR step: `extra` times the finalists
    against AR in one interleaved measurement, so the choice between them rests on it."""
    rows = dict(zip(costs.tree_rows, costs.tree_seconds, strict=True))
    rows.update(zip(extra.tree_rows, extra.tree_seconds, strict=True))
    ordered = sorted(rows)
    return StepCosts(costs.batch_size, extra.ar_seconds, tuple(ordered), tuple(rows[r] for r in ordered))


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The tuner's result at one batch size.

    Attributes:
      costs: the measured step costs (the ladder plus the exact rows of the top candidates).
      predictions: every candidate tree's predicted speed, in candidate order.
      choice: the best tree against AR.
    """

    costs: StepCosts
    predictions: list[Prediction]
    choice: Choice


def tune_batch_size(
    config: ModelConfig,
    params: Any,
    adapter: Adapter,
    stats: AcceptanceStats,
    batch_size: int,
    max_rows: int = DEFAULT_MAX_ROWS,
    prompt_len: int = 64,
    max_new_tokens: int = 128,
    refine: int = 3,
    repeats: int = 20,
) -> Tuning:
    """Measures step costs at one batch size and picks the tree with the most predicted tokens/s.

    The ladder's row counts are interpolated; the `refine` best-predicted candidates' own row
    counts are then measured against AR once more, and the choice is made on those times. The
    cache is sized for prompts of prompt_len tokens and max_new_tokens, as decoding sizes it.
    """
    num_masks = stats.num_masks
    ladder = step_cost.ladder_trees(num_masks, max_rows)
    measure = lambda trees: step_cost.measure_step_costs(  # noqa: E731
        config, params, adapter, [batch_size], trees, prompt_len, max_new_tokens, repeats
    )[0]
    costs = measure(ladder)
    candidates = stats.best_trees(costs.tree_rows[-1])
    ranked = sorted(predict(candidates, costs), key=lambda p: -p.tokens_per_s)
    top: dict[int, DraftTree] = {}
    for p in ranked:
        if len(top) == refine:
            break
        top.setdefault(p.rows, p.tree)
    if top:  # no candidates when no rank path was ever followed: AR
        costs = with_exact_rows(costs, measure(list(top.values())))
    return Tuning(costs, predict(candidates, costs), choose(candidates, costs))


def stored(store: TreeStore | None, stats: AcceptanceStats, device_kind: str, dtype: str,
           choices: Sequence[Choice], **fields: Any) -> TreeStore:  # fmt: skip
    """The store with these statistics and choices (for device_kind, dtype and `fields`: the other
    ChoiceKey fields). Choices for other keys survive only when they were made from the same
    statistics (otherwise they are dropped as stale)."""
    old = None if store is None else store.statistics
    same = old is not None and old.to_json() == stats.to_json()
    out = TreeStore(stats, dict(store.choices) if same else {})
    for choice in choices:
        out = out.with_choice(device_kind, dtype, choice, **fields)
    return out


def shown_trees(tuning: Tuning, budgets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64)) -> list[Prediction]:
    """The table's trees: per node budget the candidate with the most predicted tokens/s, and the
    best tree overall; by rows."""
    shown: dict[DraftTree, Prediction] = {}
    for n in budgets:
        fitting = [p for p in tuning.predictions if p.tree.num_nodes == n]
        if fitting:
            best = max(fitting, key=lambda p: p.tokens_per_s)
            shown[best.tree] = best
    if tuning.choice.best_tree is not None:
        shown[tuning.choice.best_tree.tree] = tuning.choice.best_tree
    return sorted(shown.values(), key=lambda p: p.rows)
