"""The resumable training loop: data stream, jitted steps, metrics, orbax checkpoints, the adapter.

`run(TrainConfig)` trains the adapter, resuming from OUTPUT/checkpoints, and writes OUTPUT/adapter.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from bita_jax.bita.adapter import (
    abstract_adapter,
    adapter_shapes,
    init_adapter,
    init_at_mean_embedding,
    init_from_text,
    init_lora,
)
from bita_jax.config import TrainConfig
from bita_jax.errors import ConfigError, Interrupted, UserError
from bita_jax.io.adapter_files import load_adapter, save_adapter
from bita_jax.io.hf import load_config, load_params
from bita_jax.io.paths import check_writable_dir, writing
from bita_jax.models.llama import LlamaModel
from bita_jax.sharding import check_mesh_fits, make_mesh, rules_from_overrides
from bita_jax.training import data, resume
from bita_jax.training.optimizer import make_optimizer
from bita_jax.training.step import TrainState, make_train_step, step_shardings

logger = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
INIT_TEXT_TOKENS = 256  # real text for `bita.init: activations`


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
    length = data.bucket_for(stream.needed_length(sequences), stream.buckets)
    if jax.process_count() > 1:
        length = int(np.max(multihost_utils.process_allgather(np.int32(length))))
    return length


def run(cfg: TrainConfig, evaluate: Callable[[Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Trains the adapter, resuming from OUTPUT/checkpoints, and writes OUTPUT/adapter.

    `evaluate(adapter) -> dict` (held-out measurements; the caller's) runs before the first step,
    every `cfg.eval_every` steps and after the last; its results go to OUTPUT/eval.jsonl with the
    step and the sequences seen, one line per evaluation, kept consistent across resumes.

    Returns the last logged metrics (with `step`); `finished: True` when the run had already
    reached its steps (nothing trained).

    Raises:
      Interrupted: SIGINT/SIGTERM arrived; a checkpoint of the last finished step was saved first.
    """
    # orbax is imported only by training runs.
    from bita_jax.io import orbax_checkpoint as checkpoint

    if not cfg.model:
        raise ConfigError("no model given (--model DIR)")
    if not cfg.output:
        raise ConfigError("no output directory given (--output DIR)")
    check_writable_dir(cfg.output, f"--output {cfg.output}", create=True)
    model_cfg = load_config(cfg.model, dtype=resolve_dtype(cfg.dtype), remat=cfg.remat)
    mesh = make_mesh(cfg.mesh)
    rules = rules_from_overrides(cfg.sharding_rules)
    check_mesh_fits(model_cfg, mesh, rules)
    check_batch(cfg, mesh)
    M = cfg.bita.num_mask_tokens

    shard = (jax.process_index(), jax.process_count())
    eos_id = model_cfg.eos_token_ids[0]
    examples = data.read_examples(cfg.data, cfg.model, eos_id, shard, model_cfg.vocab_size)
    counts = [len(examples), data.trainable_count(examples, M)]
    counts.append(data.full_count(examples, cfg.data.max_length))
    counts = multihost_utils.process_allgather(np.asarray(counts))
    num_examples, num_trainable, num_full = np.asarray(counts).reshape(-1, 3).sum(axis=0).tolist()
    check_trainable(num_examples, num_trainable, M, cfg.data.path, num_full, cfg.data.max_length)
    steps_per_epoch = max(1, num_examples // cfg.batch_size)
    total_steps = cfg.steps or math.ceil(cfg.epochs * steps_per_epoch)
    local_batch = cfg.batch_size // jax.process_count()
    stream = data.BatchStream(
        examples, local_batch, steps_per_epoch, cfg.data, model_cfg.vocab_size, M, cfg.seed
    )

    optimizer, schedule = make_optimizer(cfg.optimizer, total_steps)
    sh = step_shardings(model_cfg, optimizer, abstract_adapter(model_cfg, cfg.bita), mesh, rules)
    base = load_params(cfg.model, model_cfg, sh.base)
    adapter = first_adapter(cfg, model_cfg, base, examples)
    adapter = jax.device_put(adapter, sh.state.adapter)
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), sh.state.step),
        adapter=adapter,
        opt_state=jax.jit(optimizer.init, out_shardings=sh.state.opt_state)(adapter),
    )
    position = {"epoch": 0, "index": 0}
    mngr = checkpoint.manager(os.path.join(cfg.output, CHECKPOINT_DIR), cfg.keep_checkpoints)
    # Before the restore: a checkpoint of other shapes would fail deep inside orbax.
    resume.check_same_run(cfg, has_checkpoint=mngr.latest_step() is not None)
    restored = checkpoint.restore_latest(mngr, checkpoint.abstract_like(state, sh.state))
    if restored is not None:
        state, position = restored
    start = int(state.step)
    is_main = jax.process_index() == 0
    metrics_path = os.path.join(cfg.output, METRICS_FILE)
    eval_path = os.path.join(cfg.output, EVAL_FILE)
    adapter_dir = os.path.join(cfg.output, ADAPTER_DIR)
    if start >= total_steps:
        if not os.path.isfile(os.path.join(adapter_dir, "adapter.safetensors")):
            with writing(adapter_dir):  # the run was killed before writing it
                save_adapter(adapter_dir, state.adapter, cfg.bita, cfg.model)
        return {**resume.last_metrics(metrics_path, start), "finished": True, "total_steps": total_steps}
    if start and is_main:
        logger.info("resumed from step %d of %d (%s)", start, total_steps, cfg.output)
    if is_main:
        for path in (metrics_path, eval_path):
            resume.trim_metrics(path, start)  # steps after the checkpoint will be logged again
    train_step = make_train_step(
        model_cfg, cfg.bita, optimizer, schedule, cfg.data.max_groups * M, cfg.seed, sh, cfg.loss
    )

    def log_evaluation(step: int) -> None:
        result = {"step": step, "sequences": step * cfg.batch_size, **evaluate(state.adapter)}
        if is_main:
            with writing(eval_path), open(eval_path, "a") as f:
                f.write(json.dumps(result) + "\n")

    if evaluate is not None and start == 0:
        log_evaluation(0)

    last: dict[str, Any] = {"step": start}
    saved = start
    bar = tqdm(total=total_steps, initial=start, desc="train", disable=not is_main, dynamic_ncols=True)
    tokens_since, clock = 0, time.perf_counter()
    with writing(metrics_path):
        log = open(metrics_path, "a") if is_main else open(os.devnull, "w")
    with log, bar, resume.StopSignals() as stop:  # the bar closes before an error is printed
        for step in range(start, total_steps):
            sequences = stream.sequences(position["epoch"], position["index"])
            local = data.collate(sequences, agreed_length(stream, sequences), model_cfg.pad_id)
            tokens_since += sum(len(s["tokens"]) for s in sequences) * jax.process_count()
            state, metrics = train_step(state, base, global_batch(local, cfg.optimizer.grad_accum, sh.batch))
            epoch, index = stream.advance(position["epoch"], position["index"])
            position = {"epoch": epoch, "index": index}
            done = step + 1
            stopping = stop.requested()
            save_now = done % cfg.save_every == 0 or done == total_steps or stopping
            if done % cfg.log_every == 0 or save_now:
                m = jax.device_get(metrics)
                check_finite_loss(float(m["loss"]), done, saved)  # never checkpoint a diverged state
            if done % cfg.log_every == 0 or done == total_steps:
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
                with writing(metrics_path):
                    log.write(json.dumps(last) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{last['loss']:.4f}", acc=last["mask_acc"])
                tokens_since, clock = 0, now
            bar.update(1)
            if evaluate is not None and (done == total_steps or (cfg.eval_every and done % cfg.eval_every == 0)):
                log_evaluation(done)
            if save_now:
                checkpoint.save(mngr, done, state, position)
                saved = done
            if stopping:
                raise Interrupted(
                    f"{stop.name} at step {done}: checkpoint saved in {mngr.directory}; "
                    "run the same command again to resume"
                )
    mngr.wait_until_finished()
    with writing(adapter_dir):
        save_adapter(adapter_dir, state.adapter, cfg.bita, cfg.model)
    return last


def first_adapter(cfg: TrainConfig, model_cfg, base: Any, examples: list[data.Example]) -> Any:
    """The adapter a run starts from: a trained one (`init_adapter`), or by `bita.init` random,
    random with the masks at the mean input embedding, or from the frozen model's activations on the
    first INIT_TEXT_TOKENS tokens of process 0's examples (the same text on every host)."""
    rng = jax.random.key(cfg.seed)
    if cfg.init_adapter:
        return continued_adapter(cfg, model_cfg, rng)
    if cfg.bita.init == "random":
        return init_adapter(model_cfg, cfg.bita, rng)
    if cfg.bita.init == "mean":
        return init_at_mean_embedding(LlamaModel(model_cfg), base, cfg.bita, rng)
    text = np.full((INIT_TEXT_TOKENS,), -1, np.int32)
    joined = [t for e in examples for t in (*e.source, *e.target)][:INIT_TEXT_TOKENS]
    text[: len(joined)] = joined
    text = np.asarray(multihost_utils.broadcast_one_to_all(text))
    text = text[text >= 0]
    return init_from_text(LlamaModel(model_cfg), base, cfg.bita, jnp.asarray(text), rng)


def continued_adapter(cfg: TrainConfig, model_cfg, rng: jax.Array) -> dict[str, Any]:
    """A trained adapter's arrays as the start, with fresh low-rank factors if it has none and the run
    adds them (B = 0: the start decodes exactly as the trained adapter does)."""
    saved_cfg, arrays = load_adapter(cfg.init_adapter, model_cfg)
    expected = adapter_shapes(model_cfg, cfg.bita)
    if saved_cfg.lora_rank == 0:
        arrays = {**arrays, **init_lora(model_cfg, cfg.bita, jax.random.fold_in(rng, 1))}
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    if shapes != expected:
        raise ConfigError(
            f"init_adapter {cfg.init_adapter} does not fit this run's bita settings "
            f"(prompt tokens {saved_cfg.num_prompt_tokens}, masks {saved_cfg.num_mask_tokens}, "
            f"lora_rank {saved_cfg.lora_rank} against {cfg.bita.num_prompt_tokens}, "
            f"{cfg.bita.num_mask_tokens}, {cfg.bita.lora_rank})"
        )
    return {name: jnp.asarray(a) for name, a in arrays.items()}


def check_trainable(
    num_examples: int, num_trainable: int, num_masks: int, path: str, num_full: int = 0, max_length: int = 0
) -> None:
    """Refuses data where no response is longer than M tokens (no mask gets a label), naming
    data.max_length when it cut responses (`num_full` examples reach it); warns when some are that
    short."""
    if num_trainable == 0:
        cut = (
            f" once data.max_length={max_length} cut prompt + response ({num_full} of {num_examples} "
            "examples reach it: raise it)"
            if num_full
            else ""
        )
        raise UserError(
            f"no example in {path} has a response longer than the {num_masks} mask tokens "
            f"(EOS included){cut}: there is nothing to train them on"
        )
    if num_trainable < num_examples:
        warnings.warn(
            f"{num_examples - num_trainable} of {num_examples} examples in {path} have responses of at "
            f"most {num_masks} tokens and train nothing",
            stacklevel=2,
        )


def check_finite_loss(loss: float, step: int, saved: int) -> None:
    """Stops a run whose loss became NaN or inf, before it is checkpointed."""
    if not math.isfinite(loss):
        raise UserError(
            f"loss is {loss} at step {step}: training diverged (try a lower optimizer.learning_rate); "
            f"the last checkpoint (step {saved}) is kept"
        )
