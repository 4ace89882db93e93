"""The adapter's optimizer: global-norm clipping, then AdamW on a cosine schedule."""

from __future__ import annotations

from typing import Callable

import optax

from bita_jax.config import OptimizerConfig


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """Clip by global norm, then AdamW with a cosine schedule (linear warmup when warmup_steps > 0)."""
    decay_steps = max(total_steps, cfg.warmup_steps + 1)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if cfg.warmup_steps else cfg.learning_rate,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=decay_steps,
        end_value=0.0,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )
    return tx, schedule
