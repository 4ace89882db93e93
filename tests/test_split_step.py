"""The split train step (normal tokens as a prefill, only mask rows with the adapter) equals one
forward over the whole multi-group sequence: visibility, loss, gradients and whole steps."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax.bita import adapter as bita_adapter
from bita_jax.bita import training_mask
from bita_jax.config import BiTAConfig, DataConfig, MeshConfig, OptimizerConfig
from bita_jax.io import hf
from bita_jax.models.llama import LlamaModel
from bita_jax.sharding import LOGICAL_AXIS_RULES, make_mesh
from bita_jax.training import data
from bita_jax.training import loop as train_loop
from bita_jax.training import step as train_step
from bita_jax.training.optimizer import make_optimizer
from tests.single_forward import single_forward_loss_terms

M, G = 3, 8
R = G * M
BITA = BiTAConfig(num_prompt_tokens=4, num_mask_tokens=M, prefix_dropout=0.0)


def mixed_batch(cfg, seed=0):
    """Sequences with no group (target <= M), fewer than G groups, and a window of G groups."""
    rng = np.random.default_rng(seed)
    examples = [
        data.Example(tuple(rng.integers(3, 300, s)), tuple(rng.integers(3, 300, n)) + (2,))
        for s, n in ((4, 2), (9, 5), (3, 11), (6, 25), (12, 40), (5, 31))
    ]
    stream = data.BatchStream(examples, 6, 1, DataConfig(max_groups=G), cfg.vocab_size, M, seed)
    sequences = stream.sequences(0, 0)
    return data.collate(sequences, train_loop.agreed_length(stream, sequences), cfg.pad_id)


def test_mask_row_visibility_is_the_mask_rows_block(tiny_checkpoint):
    cfg = hf.load_config(tiny_checkpoint)
    b = mixed_batch(cfg)
    T = b["tokens"].shape[1]
    full = np.asarray(training_mask.attention_mask(b["group"], b["visible_end"], b["positions"]))
    rows, valid = (np.asarray(x) for x in train_step.mask_rows(jnp.asarray(b["group"]), R))
    take = lambda x: np.take_along_axis(x, rows, axis=1)  # noqa: E731
    group, visible_end, positions = take(b["group"]), take(b["visible_end"]), take(b["positions"])
    visibility = training_mask.mask_row_visibility(group, visible_end, positions)
    cache_length, self_mask = (np.asarray(m) for m in visibility)  # [B, R], [B, R, R]
    cache_mask = np.arange(T - R)[None, None, :] < cache_length[:, :, None]  # [B, R, T - R]
    assert valid.sum() == (b["group"] >= 0).sum() > 0 and not valid.all()
    for i in range(len(rows)):
        v = rows[i][valid[i]]
        seen_cache, seen_self = cache_mask[i][valid[i]], self_mask[i][valid[i]][:, valid[i]]
        # The prefill block shows only normal tokens (the masks in those slots are plain tokens there).
        assert not seen_cache[:, b["group"][i, : T - R] >= 0].any()
        # Both blocks together, at their places in the sequence, are the single forward's mask rows.
        joined = np.zeros((len(v), T), bool)
        joined[:, : T - R] = seen_cache
        joined[:, v] |= seen_self
        np.testing.assert_array_equal(joined, full[i][v])
        # Padding rows are seen by no mask row.
        assert not self_mask[i][valid[i]][:, ~valid[i]].any()


CASES = {  # checkpoint variant, ModelConfig overrides
    "scan": ("llama3", {}),
    "remat_tied": ("linear_tied", {"remat": True}),
    "unrolled_mha": ("plain_mha", {"scan_layers": False}),
}


@pytest.mark.parametrize("case", CASES)
def test_split_loss_and_grads_equal_single_forward(tiny_checkpoints, case):
    variant, overrides = CASES[case]
    cfg = dataclasses.replace(hf.load_config(tiny_checkpoints[variant]), **overrides)
    params = hf.load_params(tiny_checkpoints[variant], cfg)
    model = LlamaModel(cfg)
    b = {k: jnp.asarray(v) for k, v in mixed_batch(cfg).items()}
    for seed in (1, 2):  # random adapters of std 1: the prefix and masks matter
        adapter = bita_adapter.init_adapter(
            cfg, dataclasses.replace(BITA, init_std=1.0), jax.random.key(seed)
        )
        results = [
            jax.jit(jax.value_and_grad(lambda a, f=f: f(model, params, a, b, M, R), has_aux=True))(adapter)
            for f in (train_step.loss_terms, single_forward_loss_terms)
        ]
        ((split, split_stats), split_grads), ((single, single_stats), single_grads) = results
        assert float(single_stats["labels"]) == float((b["labels"] >= 0).sum()) > 0
        np.testing.assert_allclose(split, single, rtol=1e-5)
        for name in split_stats:
            np.testing.assert_array_equal(split_stats[name], single_stats[name])
        for name in adapter:
            g_split, g_single = np.asarray(split_grads[name]), np.asarray(single_grads[name])
            assert np.abs(g_single).max() > 0
            # float32: entries equal to 1e-5 of the largest gradient of the tensor.
            np.testing.assert_allclose(g_split, g_single, rtol=1e-4, atol=1e-5 * np.abs(g_single).max())


def step_results(cfg, params, batch, loss, bita, accum):
    optimizer, schedule = make_optimizer(OptimizerConfig(grad_accum=accum), 10)
    adapter = bita_adapter.init_adapter(cfg, dataclasses.replace(bita, init_std=1.0), jax.random.key(3))
    sh = train_step.step_shardings(
        cfg, optimizer, adapter, make_mesh(MeshConfig(data=1), jax.devices()[:1]), LOGICAL_AXIS_RULES
    )
    state = train_step.TrainState(jnp.zeros((), jnp.int32), adapter, jax.jit(optimizer.init)(adapter))
    step = train_step.make_train_step(cfg, bita, optimizer, schedule, R, 0, sh, loss=loss)
    return step(state, params, train_loop.global_batch(batch, accum, sh.batch))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_split_step_equals_single_forward_step(tiny_checkpoint, dtype):
    """A whole step with 2 accumulated micro-batches and prefix dropout (same draws in both)."""
    cfg = hf.load_config(tiny_checkpoint, dtype=dtype)
    params = hf.load_params(tiny_checkpoint, cfg)
    batch = mixed_batch(cfg, seed=1)
    bita = dataclasses.replace(BITA, prefix_dropout=0.1)
    (s_split, m_split), (s_single, m_single) = (
        step_results(cfg, params, batch, loss, bita, accum=2)
        for loss in (train_step.loss_terms, single_forward_loss_terms)
    )
    assert all(s.adapter[name].dtype == jnp.float32 for s in (s_split, s_single) for name in s.adapter)
    # bfloat16 compute (8 mantissa bits) in two orders of reduction: 2 % apart at most.
    rtol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(m_split["loss"], m_single["loss"], rtol=rtol)
    np.testing.assert_allclose(m_split["grad_norm"], m_single["grad_norm"], rtol=10 * rtol)
    np.testing.assert_array_equal(m_split["label_tokens"], m_single["label_tokens"])
    if dtype == "float32":
        np.testing.assert_allclose(m_split["mask_acc"], m_single["mask_acc"], atol=1e-6)
        # One Adam step moves every entry by about lr; near-zero gradients may differ in sign.
        for name in s_split.adapter:
            np.testing.assert_allclose(s_split.adapter[name], s_single.adapter[name], rtol=1e-4, atol=1e-5)
