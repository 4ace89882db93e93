"""The train step's loss as one forward over the whole multi-group sequence (the step before the split).

Kept only as the reference that the split `loss_terms` must equal, and as the baseline of
benchmarks/train_step_bench.py: every row of [B, T], normal ones included, runs with the adapter
under the dense [B, T, T] `attention_mask` and is differentiated.
"""

from typing import Any

import jax
import jax.numpy as jnp

from bita_jax.bita import adapter as bita_adapter
from bita_jax.bita.training_mask import IGNORE, NORMAL, attention_mask
from bita_jax.config import LossConfig
from bita_jax.models.llama import LlamaModel, forward
from bita_jax.training.step import MaskRows, mask_row_loss, mask_rows


def single_forward_loss_terms(
    model: LlamaModel,
    base: Any,
    adapter: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    num_masks: int,
    num_rows: int,
    loss_cfg: LossConfig = LossConfig(),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`loss_terms` (same arguments and results) from one forward over all T rows."""
    mask = attention_mask(batch["group"], batch["visible_end"], batch["positions"])
    hidden, _ = bita_adapter.forward(
        model, base, adapter, batch["tokens"], batch["positions"], mask, batch["group"] != NORMAL
    )
    rows, valid = mask_rows(batch["group"], num_rows)
    take = lambda x: jax.numpy.take_along_axis(x, rows, axis=1)  # noqa: E731  [B, T] -> [B, R]
    labels = take(batch["labels"])
    hidden = jax.numpy.take_along_axis(hidden, rows[..., None], axis=1)  # [B, R, D]
    offset = take(batch["positions"] - batch["visible_end"])
    # The teacher is the same forward without the adapter, at the row each label follows.
    plain, _ = forward(model, base, batch["tokens"], batch["positions"], mask)
    teacher_rows = jnp.minimum(take(batch["positions"]), batch["tokens"].shape[1] - 1)[..., None]
    teacher = jnp.take_along_axis(plain, teacher_rows, axis=1)
    rows = MaskRows(hidden, labels, valid & (labels != IGNORE), offset, teacher)
    return mask_row_loss(model, base, rows, num_masks, loss_cfg)
