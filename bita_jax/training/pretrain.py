"""Next-token pretraining of a (small) base model from scratch: packing, loss, jitted step, loop.

This is not BiTA training (that trains only the adapter of a frozen model, see the training
module); it exists so the project can build its own demo base model on a corpus every machine has.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from bita_jax.config import ModelConfig, OptimizerConfig
from bita_jax.models.llama import LlamaModel, causal_mask, forward
from bita_jax.training.optimizer import make_optimizer


def pack_documents(docs: Iterable[list[int]], seq_len: int, eos_id: int) -> np.ndarray:
    """Concatenates token lists (each followed by EOS) and cuts them into windows.

    Args:
      docs: token ids per document, BOS included when the tokenizer adds one.
      seq_len: T, tokens a window trains on; windows hold T + 1 ids (inputs plus the shifted target).

    Returns:
      [num_windows, T + 1] int32; the stream's tail that does not fill a window is dropped.
    """
    stream = np.fromiter((t for doc in docs for t in (*doc, eos_id)), dtype=np.int32)
    num = (len(stream) - 1) // seq_len
    if num < 1:
        raise ValueError(f"corpus of {len(stream)} tokens is shorter than one window of {seq_len + 1}")
    # Consecutive windows overlap by one id: the last target of one is the first input of the next.
    idx = np.arange(num)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx]


def next_token_loss(model: LlamaModel, params, windows: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting windows[:, 1:] from windows[:, :-1] ([B, T + 1] int32)."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    batch, length = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    hidden, _ = forward(model, params, inputs, positions, causal_mask(batch, length))
    logits = model.apply({"params": params}, hidden, method="logits")  # [B, T, V] float32
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_pretrain_step(config: ModelConfig, optimizer: optax.GradientTransformation) -> Callable:
    """Jitted `(params, opt_state, windows [B, T+1]) -> (params, opt_state, loss)`, state donated."""
    model = LlamaModel(config)

    def step(params, opt_state, windows):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(model, p, windows))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def epoch_batches(windows: np.ndarray, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless [B, T + 1] batches, reshuffled every epoch with a seeded generator."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(windows))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield windows[order[start : start + batch_size]]


def pretrain(
    config: ModelConfig,
    params,
    windows: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    optimizer_config: OptimizerConfig,
    seed: int = 0,
    eval_windows: np.ndarray | None = None,
    log_every: int = 25,
    metrics_path: str | None = None,
):
    """Trains all params on packed windows with the BiTA trainer's optimizer; shows progress, logs loss.

    Args:
      windows: [num, T + 1] int32 from `pack_documents`.
      optimizer_config: AdamW settings (`training.make_optimizer`: clipping, warmup, cosine decay).
      eval_windows: optional held-out windows (at least batch_size); their mean loss is logged at
        each log step, over whole batches so the eval step compiles once.
      metrics_path: optional jsonl file receiving {"step", "loss", "eval_loss", "lr", "seconds"}.

    Returns:
      (params, history): the trained params and the logged metric dicts.
    """
    if len(windows) < batch_size:
        raise ValueError(f"{len(windows)} windows cannot fill a batch of {batch_size}")
    eval_batches = 0 if eval_windows is None else len(eval_windows) // batch_size
    if eval_windows is not None and not eval_batches:
        raise ValueError(f"{len(eval_windows)} eval windows cannot fill a batch of {batch_size}")
    optimizer, schedule = make_optimizer(optimizer_config, steps)
    opt_state = optimizer.init(params)
    step_fn = make_pretrain_step(config, optimizer)
    model = LlamaModel(config)
    eval_fn = jax.jit(lambda p, w: next_token_loss(model, p, w))
    batches = epoch_batches(windows, batch_size, seed)
    history, recent = [], []
    start = time.perf_counter()
    out = open(metrics_path, "w") if metrics_path else None
    try:
        with tqdm(range(1, steps + 1), desc="pretrain", unit="step") as bar:
            for step in bar:
                params, opt_state, loss = step_fn(params, opt_state, next(batches))
                recent.append(loss)
                if step % log_every and step != steps:
                    continue
                record = {
                    "step": step,
                    "loss": float(np.mean(jax.device_get(recent))),
                    "lr": float(schedule(step)),
                    "seconds": round(time.perf_counter() - start, 1),
                }
                recent = []
                if eval_windows is not None:
                    chunks = [
                        eval_windows[i : i + batch_size]
                        for i in range(0, eval_batches * batch_size, batch_size)
                    ]
                    record["eval_loss"] = float(np.mean([eval_fn(params, c) for c in chunks]))
                history.append(record)
                bar.set_postfix({k: record[k] for k in ("loss", "eval_loss") if k in record})
                if out:
                    out.write(json.dumps(record) + "\n")
                    out.flush()
    finally:
        if out:
            out.close()
    return params, history
