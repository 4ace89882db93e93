"""The decoding precision policy: bfloat16 weights with float32 activations keep BiTA's greedy output
equal to AR's where an all-bfloat16 forward does not (docs/bf16.md)."""

import jax
import jax.numpy as jnp
import pytest

import bita_jax
from bita_jax.bita import adapter as bita_adapter
from bita_jax.config import BiTAConfig, ConfigError, decoding_dtypes
from bita_jax.decoding.cache import KVCache
from bita_jax.io import adapter_files, hf
from tests.tiny_checkpoint import CORPUS, make_tiny_checkpoint

# Wide enough that XLA:CPU fuses the bfloat16 elementwise ops around the dots differently for one
# row and for a tree step's rows (at width 64 the rows stay equal); the larger init gives logits
# with a spread, so a rounding difference can flip a greedy choice.
WIDE = dict(
    hidden_size=288,
    intermediate_size=768,
    num_attention_heads=9,
    num_key_value_heads=3,
    initializer_range=0.1,
)
TEXT = "".join(CORPUS)
PROMPTS = [TEXT[i * 7 : i * 7 + 5 + i] for i in range(12)]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """(checkpoint dir, random adapter dir) of the wide tiny model."""
    root = tmp_path_factory.mktemp("wide")
    ckpt = make_tiny_checkpoint(str(root / "model"), seed=0, **WIDE)
    config = hf.load_config(ckpt)
    adapter = bita_adapter.init_adapter(config, BiTAConfig(), jax.random.key(0))
    return ckpt, adapter_files.save_adapter(str(root / "adapter"), adapter, BiTAConfig(), ckpt)


def differing_prompts(model_dir: str, adapter_dir: str, precision: str) -> list[int]:
    """Indices of PROMPTS whose greedy BiTA output (tree upper:5) differs from AR's in bfloat16."""
    model = bita_jax.load(model_dir, adapter=adapter_dir, dtype="bfloat16", precision=precision)
    bita = model.run(PROMPTS, mode="bita", tree="upper:5", max_new_tokens=NEW_TOKENS)
    ar = model.run(PROMPTS, mode="ar", max_new_tokens=NEW_TOKENS)
    pairs = zip(bita.generations, ar.generations, strict=True)
    return [i for i, (b, a) in enumerate(pairs) if b.output_ids != a.output_ids]


def test_exact_precision_makes_bf16_bita_equal_ar(wide_model):
    # The premise: computing in bfloat16, the tree step's rows part from AR's one-row step.
    assert differing_prompts(*wide_model, precision="fast"), "all-bf16 BiTA matched AR on every prompt"
    assert differing_prompts(*wide_model, precision="exact") == []


def test_exact_precision_keeps_weights_bf16_and_computes_in_f32(wide_model):
    config = hf.load_config(wide_model[0], **decoding_dtypes("bfloat16", "exact"))
    params = hf.load_params(wide_model[0], config)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert config.compute_dtype == "float32"
    assert KVCache.abstract(config, 1, 16).k.dtype == jnp.float32
    fast = hf.load_config(wide_model[0], **decoding_dtypes("bfloat16", "fast"))
    assert fast.compute_dtype == "bfloat16" and KVCache.abstract(fast, 1, 16).k.dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype, precision", [("float16", "exact"), ("bfloat16", "approximate")])
def test_decoding_dtypes_refuses_unknown_names(dtype, precision):
    with pytest.raises(ConfigError):
        decoding_dtypes(dtype, precision)
