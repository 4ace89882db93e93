"""Our Flax LLaMA against PyTorch LlamaForCausalLM, and the KV cache against the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from bita_jax.decoding import runner
from bita_jax.decoding.cache import KVCache
from bita_jax.decoding.loop import prefill
from bita_jax.io import hf
from bita_jax.models.llama import LlamaModel, causal_mask, forward
from tests.conftest import VARIANTS

TOL = 1e-4


def full_logits(model: LlamaModel, params, tokens: np.ndarray) -> np.ndarray:
    """[B, T] -> [B, T, V] float32 logits of one causal forward."""

    @jax.jit
    def full(params, tokens):
        batch, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        hidden, _ = forward(model, params, tokens, positions, causal_mask(batch, length))
        return model.apply({"params": params}, hidden, method="logits")

    return np.asarray(full(params, jnp.asarray(tokens)))


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_torch(tiny_checkpoints, variant, scan_layers):
    path = tiny_checkpoints[variant]
    config = hf.load_config(path, scan_layers=scan_layers)
    params = hf.load_params(path, config)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        expected = LlamaForCausalLM.from_pretrained(path).eval()(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(full_logits(LlamaModel(config), params, tokens), expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("variant", ["llama3", "linear_tied"])
def test_prefill_and_cached_steps_equal_full_forward(tiny_checkpoints, variant, scan_layers):
    path = tiny_checkpoints[variant]
    config = hf.load_config(path, scan_layers=scan_layers)
    params = hf.load_params(path, config)
    model = LlamaModel(config)
    rng = np.random.RandomState(1)
    prompt_lens = np.array([5, 11], np.int32)
    steps = 6
    sequences = rng.randint(3, config.vocab_size, (2, 11 + steps))  # [B, T]
    # Row b's step s feeds token prompt_lens[b] - 1 + s and must give that position's logits.
    tokens, lens, _ = runner.pad_batch(
        [list(s[:n]) for s, n in zip(sequences, prompt_lens, strict=True)], 0, 2, config.pad_id
    )
    run_prefill = jax.jit(lambda p, t, n: prefill(model, p, t, n, KVCache.init(config, 2, 64)))
    cache = run_prefill(params, tokens, lens)
    # Causal attention: each row's logits up to its own length ignore the tokens after it.
    expected = full_logits(model, params, sequences)  # [B, T, V]

    @jax.jit
    def step(params, cache, pending):
        hidden, (k, v) = forward(
            model, params, pending[:, None], cache.length[:, None], jnp.ones((2, 1, 1), bool),
            **cache.model_inputs(1),
        )  # fmt: skip
        logits = model.apply({"params": params}, hidden[:, 0], method="logits")
        return logits, cache.commit(k, v, jnp.ones((2,), jnp.int32))

    rows = np.arange(2)
    for s in range(steps):
        logits, cache = step(params, cache, jnp.asarray(sequences[rows, prompt_lens - 1 + s]))
        np.testing.assert_allclose(logits, expected[rows, prompt_lens - 1 + s], rtol=TOL, atol=TOL)
