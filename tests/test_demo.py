"""The packaged demo: files present and small, loadable by transformers, and BiTA lossless and fast on it."""

import json
import os

import numpy as np
import pytest

from bita_jax import adapter_io, decoding, demo_files, generation_io, hf_io
from bita_jax.llama import LlamaModel, causal_mask
from bita_jax.tree import parse_tree

MAX_NEW = 64


@pytest.fixture(scope="module")
def demo():
    demo_files.require()
    config = hf_io.load_config(demo_files.MODEL_DIR)
    tokenizer = hf_io.load_tokenizer(demo_files.MODEL_DIR)
    params = hf_io.load_params(demo_files.MODEL_DIR, config)
    bita_cfg, adapter = adapter_io.load_adapter(demo_files.ADAPTER_DIR, config)
    texts = generation_io.read_prompts(demo_files.PROMPTS_FILE)
    return config, tokenizer, params, bita_cfg, adapter, texts


def test_demo_files_are_small_and_held_out():
    demo_files.require()
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(demo_files.DEMO_DIR) for n in ns)
    assert size <= 20 * 2**20, f"demo package data is {size / 2**20:.1f} MiB"
    with open(demo_files.RECIPE_FILE) as f:
        recipe = json.load(f)
    assert recipe["held_out_modules"], "the evaluation prompts must come from held-out modules"


def test_transformers_loads_demo_with_our_logits(demo):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaForCausalLM

    config, tokenizer, params, _, _, texts = demo
    ids = AutoTokenizer.from_pretrained(demo_files.MODEL_DIR)(texts[0])["input_ids"]
    assert ids == tokenizer(texts[0])["input_ids"] and ids[0] == config.bos_token_id
    hf = LlamaForCausalLM.from_pretrained(demo_files.MODEL_DIR, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    model = LlamaModel(config)
    hidden, _ = model.apply(
        {"params": params}, np.asarray([ids]), np.arange(len(ids))[None], causal_mask(1, len(ids))
    )
    ours = np.asarray(model.apply({"params": params}, hidden, method="logits"))[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_demo_bita_equals_ar_with_several_tokens_per_step(demo):
    config, tokenizer, params, bita_cfg, adapter, texts = demo
    prompt_ids = hf_io.encode_prompts(tokenizer, texts[:2], chat=False)
    tree = parse_tree(demo_files.demo_tree("cpu"), bita_cfg.num_mask_tokens)
    ar = decoding.generate_batches(
        decoding.make_ar_generate(config, MAX_NEW), params, prompt_ids, 2, config.pad_id
    )
    bita = decoding.generate_batches(
        decoding.make_bita_generate(config, tree, MAX_NEW), (params, adapter), prompt_ids, 2, config.pad_id
    )
    for a, b in zip(ar, bita, strict=True):
        assert b.output_ids == a.output_ids
    tokens_per_step = sum(len(g.output_ids) for g in bita) / sum(g.steps for g in bita)
    assert tokens_per_step >= 2.0, f"BiTA made {tokens_per_step:.2f} tokens per step on held-out prompts"


@pytest.mark.slow
def test_decode_py_without_arguments_runs_the_demo(capsys):
    import re

    import decode

    assert decode.main([]) == 0
    out, err = capsys.readouterr()
    assert "--- completion 1" in out
    assert "identical outputs: yes" in err
    tokens_per_step = float(re.search(r"tokens per step ([0-9.]+)", err).group(1))
    assert tokens_per_step >= 2.0
