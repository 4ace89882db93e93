"""Shared fixtures: 8 fake CPU devices and tiny random Hugging Face LLaMA checkpoints on disk."""

import os

# Must precede the first jax import anywhere in the test session.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from tests.tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

VARIANTS = {
    # GQA (4 query heads, 2 KV heads), llama3 rope scaling, untied embeddings.
    "llama3": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        tie_word_embeddings=False,
    ),
    # Linear rope scaling, tied embeddings.
    "linear_tied": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True),
    # No rope scaling, multi-head attention (no GQA), untied.
    "plain_mha": dict(num_key_value_heads=4, tie_word_embeddings=False),
}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{variant name: directory} of tiny random LlamaForCausalLM checkpoints with a tokenizer."""
    root = tmp_path_factory.mktemp("ckpts")
    return {
        name: make_tiny_checkpoint(str(root / name), seed=i, **kw)
        for i, (name, kw) in enumerate(VARIANTS.items())
    }


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoints):
    """The GQA + llama3-rope checkpoint directory."""
    return tiny_checkpoints["llama3"]
