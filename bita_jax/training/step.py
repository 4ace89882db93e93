"""The BiTA train step: the loss on the mask rows and the jitted, sharded update.

The loss is split like a decoding step: the normal tokens run once through the frozen model as a
prefill (no gradient), and only the G * M mask rows run with the adapter, attending to the
prefill's keys/values under the training visibility; only they are differentiated.

Only the adapter (prefix keys/values, mask embeddings; float32) gets gradients and optimizer
state; the base params are frozen, stay in the config dtype and are never donated. The step takes
a batch of `optimizer.grad_accum` micro-batches [A, B, T] and scans over them, so accumulation is
exact: the loss is the mean over all label tokens of the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from bita_jax.bita import adapter as bita_adapter
from bita_jax.bita.adapter import adapter_shardings
from bita_jax.bita.training_mask import IGNORE, NORMAL, mask_row_visibility
from bita_jax.config import BiTAConfig, LossConfig, ModelConfig
from bita_jax.decoding.cache import CACHE_AXES
from bita_jax.models.llama import KeysValues, LlamaModel, abstract_params, causal_mask, forward
from bita_jax.sharding import Rules, logical_sharding, replicated, tree_shardings

BATCH_AXES = (None, "batch", "seq")  # [A, B, T]: micro-batches, sequences, tokens


@flax.struct.dataclass
class TrainState:
    """Everything a step updates (and a checkpoint stores): step [] int32, adapter, optimizer state."""

    step: jax.Array
    adapter: dict[str, jax.Array]
    opt_state: Any


def mask_rows(group: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """Indices [B, R] of each sequence's mask rows (contiguous after its normal part), validity [B, R].

    R is static: rows past a sequence's own masks are its padding (the batch has room, see `loss_terms`).
    """
    is_mask = group >= 0  # [B, T]
    start = jnp.argmax(is_mask, axis=1)  # [B] first mask row (0 when there is none, count is 0)
    r = jnp.arange(num_rows)
    return start[:, None] + r[None, :], r[None, :] < is_mask.sum(axis=1)[:, None]


def normal_pass(model: LlamaModel, base: Any, tokens: jax.Array, normal_len: int) -> tuple[jax.Array, KeysValues]:
    """(a) The frozen model over the first S = normal_len tokens, causal: final hidden states and
    each layer's keys/values.

    A prefill, as decoding's: normal rows never see the adapter, so these are constants of the
    loss (no gradient, no saved activations). Slots past a sequence's normal part hold its masks or
    padding as plain tokens; the mask rows' cache lengths never reach them. The hidden states give the
    teacher's next-token distributions (`teacher_hidden`); XLA drops them when no loss reads them.

    Args:
      tokens: [B, T] ids, T >= S.

    Returns:
      hidden [B, S, D] and (k, v) [L, B, S, K, H], sharded like a decoding cache.
    """
    batch = tokens.shape[0]
    positions = jnp.broadcast_to(jnp.arange(normal_len, dtype=jnp.int32), (batch, normal_len))
    hidden, kv = forward(model, base, tokens[:, :normal_len], positions, causal_mask(batch, normal_len))
    k, v = (nn.with_logical_constraint(jax.lax.stop_gradient(x), CACHE_AXES) for x in kv)
    return jax.lax.stop_gradient(hidden), (k, v)


class MaskRows(NamedTuple):
    """The mask rows of a batch after `mask_row_forward`, each [B, R, ...] in sequence order.

    hidden [B, R, D]: their final hidden states (with the adapter); labels [B, R]; valid [B, R]: a
    real row with a label; offset [B, R]: k of its group; teacher [B, R, D]: the frozen model's
    final hidden state at the normal row that predicts the label (row = the mask's position:
    mask k of group j sits at position S + s_j + k and is labelled token S + s_j + k + 1).
    """

    hidden: jax.Array
    labels: jax.Array
    valid: jax.Array
    offset: jax.Array
    teacher: jax.Array


def loss_terms(
    model: LlamaModel,
    base: Any,
    adapter: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    num_masks: int,
    num_rows: int,
    loss_cfg: LossConfig = LossConfig(),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed objective over mask rows, and counts for the metrics.

    Args:
      batch, num_rows: as in `mask_row_forward`.

    Returns:
      (sum over labels of the weighted objective [] f32, {"labels": [] count, "correct": [M],
      "count": [M]}).
    """
    return mask_row_loss(model, base, mask_row_forward(model, base, adapter, batch, num_rows), num_masks, loss_cfg)


def mask_row_forward(
    model: LlamaModel, base: Any, adapter: dict[str, jax.Array], batch: dict[str, jax.Array], num_rows: int
) -> MaskRows:
    """(a) + (b): the mask rows' final hidden states under the training format.

    The normal tokens run once without the adapter (`normal_pass`); only the R mask rows run
    with it, attending to those keys/values, their own group and the prefix, so only they carry
    activations for the backward pass. Equal to one forward over the whole sequence under
    `attention_mask` (tests/single_forward.py), within float rounding. The tuner's teacher forcing
    (tuning/calibrate.py) runs the same forward.

    Args:
      batch: [B, T] int32 arrays `tokens, positions, group, visible_end, labels` (bita/training_mask.py);
        every sequence's normal part fits in the first T - R slots (`data.BatchStream` pads so).
      num_rows: R < T, the static number of mask rows gathered per sequence.
    """
    normal_len = batch["tokens"].shape[1] - num_rows
    if normal_len < 1:
        raise ValueError(
            f"sequence length {batch['tokens'].shape[1]} leaves no room beside {num_rows} mask rows"
        )
    normal_hidden, cache_kv = normal_pass(model, base, batch["tokens"], normal_len)
    rows, valid = mask_rows(batch["group"], num_rows)
    take = lambda x: jnp.take_along_axis(x, rows, axis=1)  # noqa: E731  [B, T] -> [B, R]
    group, positions, visible_end = take(batch["group"]), take(batch["positions"]), take(batch["visible_end"])
    cache_length, self_mask = mask_row_visibility(group, visible_end, positions)
    hidden, _ = bita_adapter.forward(
        model, base, adapter, take(batch["tokens"]), positions, self_mask, group != NORMAL,
        cache_kv=cache_kv, cache_length=cache_length,
    )  # fmt: skip
    labels = take(batch["labels"])
    # Padding rows' positions may lie past the normal part: clipped, and never counted.
    teacher_rows = jnp.minimum(positions, normal_len - 1)[..., None]
    teacher = jnp.take_along_axis(normal_hidden, teacher_rows, axis=1)  # [B, R, D]
    return MaskRows(hidden, labels, valid & (labels != IGNORE), positions - visible_end, teacher)


def distillation_kl(student: jax.Array, teacher: jax.Array, top_k: int) -> jax.Array:
    """KL(teacher || student) [B, R] between next-token distributions given as logits [B, R, V].

    top_k > 0: both restricted to the teacher's top_k tokens and renormalised there, so the term
    is still zero exactly when the two distributions agree.
    """
    if top_k:
        teacher, ids = jax.lax.top_k(teacher, top_k)
        student = jnp.take_along_axis(student, ids, axis=-1)
    log_p = jax.nn.log_softmax(teacher, axis=-1)
    log_q = jax.nn.log_softmax(student, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def mask_row_loss(
    model: LlamaModel, base: Any, rows: MaskRows, num_masks: int, loss_cfg: LossConfig = LossConfig()
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(c) The LM head on the mask rows: the summed objective of `LossConfig` over valid rows, and per
    mask offset the counts for `loss_terms`."""
    logits = model.apply({"params": base}, rows.hidden, method="logits")  # [B, R, V] f32
    safe = jnp.where(rows.valid, rows.labels, 0)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    objective = loss_cfg.ce_weight * nll
    if loss_cfg.kl_weight:
        teacher = jax.lax.stop_gradient(model.apply({"params": base}, rows.teacher, method="logits"))
        objective += loss_cfg.kl_weight * distillation_kl(logits, teacher, loss_cfg.kl_top_k)
    objective *= loss_cfg.offset_decay ** rows.offset.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == rows.labels) & rows.valid
    per_offset = jax.nn.one_hot(rows.offset, num_masks, dtype=jnp.float32) * rows.valid[..., None]  # [B, R, M]
    stats = {
        "labels": rows.valid.sum().astype(jnp.float32),
        "correct": jnp.einsum("brm,br->m", per_offset, correct.astype(jnp.float32)),
        "count": per_offset.sum(axis=(0, 1)),
    }
    return jnp.sum(jnp.where(rows.valid, objective, 0.0)), stats


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
    adapter_sh = adapter_shardings(abstract_adapter, mesh, rules)
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
    loss_cfg: LossConfig = LossConfig(),
    loss: Callable = loss_terms,
) -> Callable:
    """Jitted `(state, base, batch [A, B, T]) -> (state, metrics)`; the state is donated, the base never.

    Metrics: loss (the objective of `loss_cfg` per label token; with the default, the mean NLL),
    mask_acc [M], lr, grad_norm, label_tokens.
    `loss` has `loss_terms`'s signature; another (the single-forward reference) can be compared.
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
                return loss(model, base, dropped, mb, M, num_rows, loss_cfg)

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
