"""BiTA training: the loss, the jitted sharded train step, and the resumable training loop.

Only the adapter (prefix keys/values, mask embeddings; float32) gets gradients and optimizer
state; the base params are frozen, stay in the config dtype and are never donated. The step takes
a batch of `optimizer.grad_accum` micro-batches [A, B, T] and scans over them, so accumulation is
exact: the loss is the mean over all label tokens of the step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from bita_jax import checkpoint, data
from bita_jax.adapter_io import save_adapter
from bita_jax.bita import ADAPTER_AXES, init_adapter
from bita_jax.config import BiTAConfig, ConfigError, ModelConfig, OptimizerConfig, TrainConfig
from bita_jax.llama import LlamaModel, abstract_params
from bita_jax.sharding import (
    Rules,
    logical_sharding,
    make_mesh,
    replicated,
    rules_from_overrides,
    tree_shardings,
)

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
BATCH_AXES = (None, "batch", "seq")  # [A, B, T]: micro-batches, sequences, tokens


@flax.struct.dataclass
class TrainState:
    """Everything a step updates (and a checkpoint stores): step [] int32, adapter, optimizer state."""

    step: jax.Array
    adapter: dict[str, jax.Array]
    opt_state: Any


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


def drop_prefix(adapter: dict[str, jax.Array], rate: float, rng: jax.Array) -> dict[str, jax.Array]:
    """Dropout on the whole prefix tensor (keys and values), as the reference does in training."""
    if rate == 0.0:
        return adapter
    out = dict(adapter)
    for name, key in zip(("prefix_keys", "prefix_values"), jax.random.split(rng), strict=True):
        keep = jax.random.bernoulli(key, 1.0 - rate, adapter[name].shape)
        out[name] = jnp.where(keep, adapter[name] / (1.0 - rate), 0.0)
    return out


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
      batch: [B, T] int32 arrays `tokens, positions, group, visible_end, labels` (data.py).
      num_rows: R, the static number of mask rows gathered per sequence.

    Returns:
      (sum of per-label NLL [] f32, {"labels": [] count, "correct": [M], "count": [M]}).
    """
    mask = data.attention_mask(batch["group"], batch["visible_end"], batch["positions"])
    hidden, _ = model.apply(
        {"params": base},
        batch["tokens"],
        batch["positions"],
        mask,
        adapter=adapter,
        prefix_visible=batch["group"] >= 0,
    )
    rows, valid = mask_rows(batch["group"], min(num_rows, batch["tokens"].shape[1]))
    take = lambda x: jnp.take_along_axis(x, rows, axis=1)  # noqa: E731  [B, T] -> [B, R]
    labels = take(batch["labels"])
    valid = valid & (labels != data.IGNORE)
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
    adapter_sh = {name: logical_sharding(ADAPTER_AXES[name], mesh, rules) for name in abstract_adapter}
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
                dropped = drop_prefix(adapter, bita_cfg.prefix_dropout, jax.random.fold_in(rng, i))
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


# ---------------------------------------------------------------------------------------------
# The training loop


def resolve_dtype(dtype: str) -> str:
    """ "auto": bfloat16 on accelerators, float32 on CPU (where bf16 matmuls are slow and inexact)."""
    if dtype != "auto":
        return dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def check_batch(cfg: TrainConfig, mesh: Mesh) -> int:
    """Validates batch divisibility against the mesh and hosts; returns the micro-batch size."""
    micro = cfg.batch_size // cfg.optimizer.grad_accum
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro % shards:
        raise ConfigError(
            f"micro-batch {micro} (batch_size {cfg.batch_size} / grad_accum {cfg.optimizer.grad_accum}) "
            f"must be a multiple of data*fsdp = {shards}"
        )
    if micro % jax.process_count():
        raise ConfigError(f"micro-batch {micro} must be a multiple of the {jax.process_count()} hosts")
    return micro


def global_batch(
    local: dict[str, np.ndarray], grad_accum: int, sharding: NamedSharding
) -> dict[str, jax.Array]:
    """This host's [b, T] rows -> global [A, B, T] arrays (each host contributes its slice of B)."""
    out = {}
    for name, value in local.items():
        local_ab = value.reshape(grad_accum, -1, value.shape[-1])
        shape = (grad_accum, local_ab.shape[1] * jax.process_count(), value.shape[-1])
        out[name] = jax.make_array_from_process_local_data(sharding, local_ab, shape)
    return out


def agreed_length(stream: data.BatchStream, sequences: list[dict[str, np.ndarray]]) -> int:
    """The bucket for this step, the same on every host (the longest any host needs)."""
    length = data.bucket_for(max(len(s["tokens"]) for s in sequences), stream.buckets)
    if jax.process_count() > 1:
        length = int(np.max(multihost_utils.process_allgather(np.int32(length))))
    return length


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Trains the adapter, resuming from OUTPUT/checkpoints, and writes OUTPUT/adapter.

    Returns the last logged metrics (with `step`).
    """
    from bita_jax.hf_io import load_config, load_params

    if not cfg.model:
        raise ConfigError("no model given (--model DIR)")
    if not cfg.output:
        raise ConfigError("no output directory given (--output DIR)")
    model_cfg = load_config(cfg.model, dtype=resolve_dtype(cfg.dtype), remat=cfg.remat)
    mesh = make_mesh(cfg.mesh)
    rules = rules_from_overrides(cfg.sharding_rules)
    check_batch(cfg, mesh)
    M = cfg.bita.num_mask_tokens

    shard = (jax.process_index(), jax.process_count())
    examples = data.read_examples(cfg.data, cfg.model, model_cfg.eos_token_ids[0], shard)
    num_examples = int(np.sum(multihost_utils.process_allgather(np.int64(len(examples)))))
    steps_per_epoch = max(1, num_examples // cfg.batch_size)
    total_steps = cfg.steps or math.ceil(cfg.epochs * steps_per_epoch)
    local_batch = cfg.batch_size // jax.process_count()
    stream = data.BatchStream(
        examples, local_batch, steps_per_epoch, cfg.data, model_cfg.vocab_size, M, model_cfg.pad_id, cfg.seed
    )

    optimizer, schedule = make_optimizer(cfg.optimizer, total_steps)
    adapter = init_adapter(model_cfg, cfg.bita, jax.random.key(cfg.seed))
    sh = step_shardings(model_cfg, optimizer, adapter, mesh, rules)
    adapter = jax.device_put(adapter, sh.state.adapter)
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), sh.state.step),
        adapter=adapter,
        opt_state=jax.jit(optimizer.init, out_shardings=sh.state.opt_state)(adapter),
    )
    position = {"epoch": 0, "index": 0}
    os.makedirs(cfg.output, exist_ok=True)
    mngr = checkpoint.manager(os.path.join(cfg.output, CHECKPOINT_DIR), cfg.keep_checkpoints)
    restored = checkpoint.restore_latest(mngr, checkpoint.abstract_like(state, sh.state))
    if restored is not None:
        state, position = restored
    start = int(state.step)
    base = load_params(cfg.model, model_cfg, sh.base)
    train_step = make_train_step(
        model_cfg, cfg.bita, optimizer, schedule, cfg.data.max_groups * M, cfg.seed, sh
    )

    metrics_path = os.path.join(cfg.output, METRICS_FILE)
    last: dict[str, Any] = {"step": start}
    is_main = jax.process_index() == 0
    bar = tqdm(total=total_steps, initial=start, desc="train", disable=not is_main, dynamic_ncols=True)
    tokens_since, clock = 0, time.perf_counter()
    with open(metrics_path, "a") if is_main else open(os.devnull, "w") as log:
        for step in range(start, total_steps):
            sequences = stream.sequences(position["epoch"], position["index"])
            local = data.collate(sequences, agreed_length(stream, sequences), model_cfg.pad_id)
            tokens_since += sum(len(s["tokens"]) for s in sequences) * jax.process_count()
            state, metrics = train_step(state, base, global_batch(local, cfg.optimizer.grad_accum, sh.batch))
            epoch, index = stream.advance(position["epoch"], position["index"])
            position = {"epoch": epoch, "index": index}
            done = step + 1
            if done % cfg.log_every == 0 or done == total_steps:
                m = jax.device_get(metrics)
                now = time.perf_counter()
                last = {
                    "step": done,
                    "loss": float(m["loss"]),
                    "mask_acc": [round(float(a), 4) for a in m["mask_acc"]],
                    "tokens_per_s": round(tokens_since / (now - clock), 1),
                    "lr": float(m["lr"]),
                    "grad_norm": float(m["grad_norm"]),
                    "epoch": epoch,
                }
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{last['loss']:.4f}", acc=last["mask_acc"])
                tokens_since, clock = 0, now
            bar.update(1)
            if done % cfg.save_every == 0 or done == total_steps:
                checkpoint.save(mngr, done, state, position)
    bar.close()
    mngr.wait_until_finished()
    save_adapter(os.path.join(cfg.output, ADAPTER_DIR), state.adapter, cfg.bita, cfg.model)
    return last
