"""The BiTA train step: the loss on the mask rows and the jitted, sharded update.

Only the adapter (prefix keys/values, mask embeddings; float32) gets gradients and optimizer
state; the base params are frozen, stay in the config dtype and are never donated. The step takes
a batch of `optimizer.grad_accum` micro-batches [A, B, T] and scans over them, so accumulation is
exact: the loss is the mean over all label tokens of the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from bita_jax.bita import adapter as bita_adapter
from bita_jax.bita.adapter import adapter_shardings
from bita_jax.bita.training_mask import IGNORE, NORMAL, attention_mask
from bita_jax.config import BiTAConfig, ModelConfig
from bita_jax.models.llama import LlamaModel, abstract_params
from bita_jax.sharding import Rules, logical_sharding, replicated, tree_shardings

BATCH_AXES = (None, "batch", "seq")  # [A, B, T]: micro-batches, sequences, tokens


@flax.struct.dataclass
class TrainState:
    """Everything a step updates (and a checkpoint stores): step [] int32, adapter, optimizer state."""

    step: jax.Array
    adapter: dict[str, jax.Array]
    opt_state: Any


def mask_rows(group: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """Indices [B, R] of each sequence's mask rows (contiguous at its end) and their validity [B, R].

    R = min(G * M, T) is static, so only these rows reach the LM head, not all T.
    """
    is_mask = group >= 0  # [B, T]
    start = jnp.argmax(is_mask, axis=1)  # [B] first mask row (0 when there is none, count is 0)
    r = jnp.arange(num_rows)
    rows = jnp.minimum(start[:, None] + r[None, :], group.shape[1] - 1)
    return rows, r[None, :] < is_mask.sum(axis=1)[:, None]


def loss_terms(
    model: LlamaModel,
    base: Any,
    adapter: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    num_masks: int,
    num_rows: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed unshifted cross-entropy over mask rows, and counts for the metrics.

    Args:
      batch: [B, T] int32 arrays `tokens, positions, group, visible_end, labels` (bita/training_mask.py).
      num_rows: R, the static number of mask rows gathered per sequence.

    Returns:
      (sum of per-label NLL [] f32, {"labels": [] count, "correct": [M], "count": [M]}).
    """
    mask = attention_mask(batch["group"], batch["visible_end"], batch["positions"])
    hidden, _ = bita_adapter.forward(
        model, base, adapter, batch["tokens"], batch["positions"], mask, batch["group"] != NORMAL
    )
    rows, valid = mask_rows(batch["group"], min(num_rows, batch["tokens"].shape[1]))
    take = lambda x: jnp.take_along_axis(x, rows, axis=1)  # noqa: E731  [B, T] -> [B, R]
    labels = take(batch["labels"])
    valid = valid & (labels != IGNORE)
    offset = take(batch["positions"] - batch["visible_end"])  # mask k of its group
    h = jnp.take_along_axis(hidden, rows[..., None], axis=1)  # [B, R, D]
    logits = model.apply({"params": base}, h, method="logits")  # [B, R, V] f32
    safe = jnp.where(valid, labels, 0)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == labels) & valid
    per_offset = jax.nn.one_hot(offset, num_masks, dtype=jnp.float32) * valid[..., None]  # [B, R, M]
    stats = {
        "labels": valid.sum().astype(jnp.float32),
        "correct": jnp.einsum("brm,br->m", per_offset, correct.astype(jnp.float32)),
        "count": per_offset.sum(axis=(0, 1)),
    }
    return jnp.sum(jnp.where(valid, nll, 0.0)), stats


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """In/out shardings of the train step, and the mesh + rules its activation constraints use."""

    state: TrainState
    base: Any
    batch: NamedSharding
    metrics: NamedSharding
    mesh: Mesh
    rules: Rules


def step_shardings(
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    abstract_adapter: Any,
    mesh: Mesh,
    rules: Rules,
) -> StepShardings:
    """Base params by the logical-axis rules, adapter by ADAPTER_AXES (optimizer moments alike),
    batch over (data, fsdp), scalars replicated."""
    adapter_sh = {name: s for name, s in adapter_shardings(mesh, rules).items() if name in abstract_adapter}
    opt_abstract = jax.eval_shape(optimizer.init, abstract_adapter)
    opt_sh = optax.tree_map_params(
        optimizer,
        lambda _, s: s,
        opt_abstract,
        adapter_sh,
        transform_non_params=lambda _: replicated(mesh),
    )
    return StepShardings(
        state=TrainState(step=replicated(mesh), adapter=adapter_sh, opt_state=opt_sh),
        base=tree_shardings(abstract_params(model_cfg), mesh, rules),
        batch=logical_sharding(BATCH_AXES, mesh, rules),
        metrics=replicated(mesh),
        mesh=mesh,
        rules=rules,
    )


def make_train_step(
    model_cfg: ModelConfig,
    bita_cfg: BiTAConfig,
    optimizer: optax.GradientTransformation,
    schedule: Callable,
    num_rows: int,
    seed: int,
    shardings: StepShardings,
) -> Callable:
    """Jitted `(state, base, batch [A, B, T]) -> (state, metrics)`; the state is donated, the base never.

    Metrics: loss (mean NLL over label tokens), mask_acc [M], lr, grad_norm, label_tokens.
    """
    model = LlamaModel(model_cfg)
    M = bita_cfg.num_mask_tokens

    def update(state: TrainState, base: Any, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)

        def micro(carry, inputs):
            grads, nll, stats = carry
            i, mb = inputs

            def summed_nll(adapter):
                dropped = bita_adapter.drop_prefix(
                    adapter, bita_cfg.prefix_dropout, jax.random.fold_in(rng, i)
                )
                return loss_terms(model, base, dropped, mb, M, num_rows)

            (mb_nll, mb_stats), mb_grads = jax.value_and_grad(summed_nll, has_aux=True)(state.adapter)
            return (
                jax.tree.map(jnp.add, grads, mb_grads),
                nll + mb_nll,
                jax.tree.map(jnp.add, stats, mb_stats),
            ), None

        zeros = (
            jax.tree.map(jnp.zeros_like, state.adapter),
            jnp.zeros((), jnp.float32),
            {"labels": jnp.zeros(()), "correct": jnp.zeros((M,)), "count": jnp.zeros((M,))},
        )
        num_micro = batch["tokens"].shape[0]
        (grads, nll, stats), _ = jax.lax.scan(micro, zeros, (jnp.arange(num_micro), batch))
        denom = jnp.maximum(stats["labels"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.adapter)
        adapter = optax.apply_updates(state.adapter, updates)
        metrics = {
            "loss": nll / denom,
            "mask_acc": stats["correct"] / jnp.maximum(stats["count"], 1.0),
            "lr": schedule(state.step),
            "grad_norm": optax.tree.norm(grads),
            "label_tokens": stats["labels"],
        }
        return TrainState(step=state.step + 1, adapter=adapter, opt_state=opt_state), metrics

    def step(state: TrainState, base: Any, batch: dict[str, jax.Array]):
        # The model's logical constraints are no-ops without rules and a mesh in context. Traced
        # under them, activations stay sharded over the batch and each layer's weights are gathered
        # inside the layer scan; without them XLA sharded activations over `embed` and replicated
        # the batch (AOT, 7B, fsdp=8, seq 2304: 10.3 -> 7.6 GiB temporaries per device).
        with (
            jax.sharding.use_abstract_mesh(shardings.mesh.abstract_mesh),
            nn.logical_axis_rules(shardings.rules),
        ):
            return update(state, base, batch)

    jitted = jax.jit(
        step,
        in_shardings=(shardings.state, shardings.base, shardings.batch),
        out_shardings=(shardings.state, shardings.metrics),
        donate_argnums=(0,),
    )
    return jitted
