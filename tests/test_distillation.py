"""The soft-label (KL) objective, per-offset weights and the activation initialisation of the adapter."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from bita_jax.bita import adapter as bita_adapter
from bita_jax.config import BiTAConfig, DataConfig, LossConfig
from bita_jax.io import hf
from bita_jax.models.llama import LlamaModel, forward
from bita_jax.training import data
from bita_jax.training import loop as train_loop
from bita_jax.training import step as train_step
from tests.single_forward import single_forward_loss_terms
from tests.test_split_step import BITA, G, M, R, mixed_batch


def test_kl_is_zero_exactly_when_distributions_agree():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 40)) * 3
    other = jax.random.normal(jax.random.key(1), (2, 5, 40)) * 3
    for top_k in (0, 8):
        np.testing.assert_allclose(train_step.distillation_kl(logits, logits, top_k), 0.0, atol=1e-6)
        # A shift of all logits is the same distribution.
        np.testing.assert_allclose(train_step.distillation_kl(logits + 7.0, logits, top_k), 0.0, atol=1e-5)
        assert (train_step.distillation_kl(other, logits, top_k) > 1e-3).all()


def test_kl_matches_its_definition_and_finite_differences():
    student = jax.random.normal(jax.random.key(2), (3, 11))
    teacher = jax.random.normal(jax.random.key(3), (3, 11)) * 2
    p, q = jax.nn.softmax(teacher), jax.nn.softmax(student)
    np.testing.assert_allclose(
        train_step.distillation_kl(student, teacher, 0), np.sum(p * np.log(p / q), axis=-1), rtol=1e-5
    )
    check_grads(lambda s: train_step.distillation_kl(s, teacher, 0).sum(), (student,), order=1, modes=["rev"])
    check_grads(lambda s: train_step.distillation_kl(s, teacher, 4).sum(), (student,), order=1, modes=["rev"])


def test_split_objective_with_kl_and_offset_weights_equals_single_forward(tiny_checkpoint):
    """The teacher rows the split step gathers from its prefill are the single forward's own rows."""
    cfg = hf.load_config(tiny_checkpoint)
    params = hf.load_params(tiny_checkpoint, cfg)
    model = LlamaModel(cfg)
    batch = {k: jnp.asarray(v) for k, v in mixed_batch(cfg, seed=3).items()}
    adapter = bita_adapter.init_adapter(cfg, dataclasses.replace(BITA, init_std=1.0), jax.random.key(4))
    losses = {}
    for cfg_loss in (LossConfig(), LossConfig(kl_weight=0.5, offset_decay=0.7), LossConfig(0.0, 1.0, 16)):
        split, single = (
            jax.jit(jax.value_and_grad(lambda a, f=f: f(model, params, a, batch, M, R, cfg_loss)[0]))(adapter)
            for f in (train_step.loss_terms, single_forward_loss_terms)
        )
        np.testing.assert_allclose(split[0], single[0], rtol=1e-5)
        for name in adapter:
            scale = np.abs(single[1][name]).max()
            assert scale > 0
            np.testing.assert_allclose(split[1][name], single[1][name], rtol=1e-4, atol=1e-5 * scale)
        losses[cfg_loss] = float(split[0])
    assert len(set(losses.values())) == 3  # the KL term and the weights change the objective


def test_teacher_rows_predict_the_labels_of_self_distilled_data(tiny_checkpoint):
    """On the model's own greedy continuation, the teacher's argmax at every label is the label."""
    cfg = hf.load_config(tiny_checkpoint)
    params = hf.load_params(tiny_checkpoint, cfg)
    model = LlamaModel(cfg)
    tokens = [5, 17, 42, 8]
    for _ in range(14):  # greedy continuation, recomputed from scratch (small)
        t = jnp.asarray([tokens])
        pos = jnp.arange(len(tokens))[None]
        hidden, _ = forward(model, params, t, pos, pos[:, :, None] >= pos[:, None, :])
        tokens.append(int(jnp.argmax(model.apply({"params": params}, hidden[:, -1], method="logits"))))
    example = data.Example(tuple(tokens[:4]), tuple(tokens[4:]))
    stream = data.BatchStream([example], 1, 1, DataConfig(max_groups=G), cfg.vocab_size, M, 0)
    sequences = stream.sequences(0, 0)
    local = data.collate(sequences, train_loop.agreed_length(stream, sequences), cfg.pad_id)
    batch = {k: jnp.asarray(v) for k, v in local.items()}
    adapter = bita_adapter.init_adapter(cfg, BITA, jax.random.key(0))
    rows = train_step.mask_row_forward(model, params, adapter, batch, R)
    teacher = model.apply({"params": params}, rows.teacher, method="logits")
    valid = np.asarray(rows.valid)
    assert valid.sum() == G * M
    np.testing.assert_array_equal(np.asarray(jnp.argmax(teacher, -1))[valid], np.asarray(rows.labels)[valid])


def test_init_from_text_takes_the_models_own_keys_values_and_embeddings(tiny_checkpoint):
    cfg = hf.load_config(tiny_checkpoint)
    params = hf.load_params(tiny_checkpoint, cfg)
    model = LlamaModel(cfg)
    bita = BiTAConfig(num_prompt_tokens=5, num_mask_tokens=3)
    text = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, 21), jnp.int32)
    adapter = bita_adapter.init_from_text(model, params, bita, text, jax.random.key(1))
    shapes = bita_adapter.adapter_shapes(cfg, bita)
    assert {k: v.shape for k, v in adapter.items()} == shapes
    assert all(v.dtype == jnp.float32 for v in adapter.values())
    pos = jnp.arange(21)[None]
    _, (k, v) = forward(model, params, text[None], pos, pos[:, :, None] >= pos[:, None, :])  # [L, 1, T, K, H]
    group = cfg.num_heads // cfg.num_kv_heads
    picks = [0, 5, 10, 15, 20]  # evenly spread over 21 tokens
    for name, kv in (("prefix_keys", k), ("prefix_values", v)):
        # Query head n reads KV head n // G (the layers' reshape to [P, K, G, H]).
        expected = np.repeat(np.asarray(kv[:, 0, picks]), group, axis=2)
        np.testing.assert_allclose(adapter[name], expected, rtol=1e-6)
    table = np.asarray(params["embed_tokens"])
    text_rows = table[np.asarray(text)]
    for row in np.asarray(adapter["mask_embeddings"]):
        assert np.isclose(text_rows, row).all(axis=1).any()  # each mask starts as a token of the text
