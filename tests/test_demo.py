"""The packaged demo: files present and small, loadable by transformers, and BiTA lossless and fast on it."""

import json
import os

import numpy as np
import pytest

import bita_jax
from bita_jax import demo
from bita_jax.io.prompts import read_prompts
from bita_jax.models.llama import LlamaModel, causal_mask, forward

MAX_NEW = 64


@pytest.fixture(scope="module")
def demo_model():
    demo.require()
    return bita_jax.load(demo.MODEL_DIR, adapter=demo.ADAPTER_DIR), read_prompts(demo.PROMPTS_FILE)


def test_demo_files_are_small_and_held_out():
    demo.require()
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(demo.DEMO_DIR) for n in ns)
    assert size <= 20 * 2**20, f"demo package data is {size / 2**20:.1f} MiB"
    with open(demo.RECIPE_FILE) as f:
        recipe = json.load(f)
    assert recipe["held_out_modules"], "the evaluation prompts must come from held-out modules"


def test_transformers_loads_demo_with_our_logits(demo_model):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, texts = demo_model
    ids = AutoTokenizer.from_pretrained(demo.MODEL_DIR)(texts[0])["input_ids"]
    assert ids == model.encode(texts[:1])[0] and ids[0] == model.config.bos_token_id
    reference = LlamaForCausalLM.from_pretrained(demo.MODEL_DIR, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0].numpy()
    llama = LlamaModel(model.config)
    hidden, _ = forward(
        llama, model.params, np.asarray([ids]), np.arange(len(ids))[None], causal_mask(1, len(ids))
    )
    ours = np.asarray(llama.apply({"params": model.params}, hidden, method="logits"))[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_demo_bita_equals_ar_with_several_tokens_per_step(demo_model):
    model, texts = demo_model
    options = dict(max_new_tokens=MAX_NEW, batch_size=2)
    ar = model.generate(texts[:2], mode="ar", **options)
    bita = model.generate(texts[:2], mode="bita", tree=demo.WIDE_TREE, **options)
    for a, b in zip(ar, bita, strict=True):
        assert b["output_ids"] == a["output_ids"]
    tokens_per_step = sum(r["new_tokens"] for r in bita) / sum(r["steps"] for r in bita)
    assert tokens_per_step >= 2.0, f"BiTA made {tokens_per_step:.2f} tokens per step on held-out prompts"


def test_demo_ships_statistics_that_predict_tokens_per_step(demo_model):
    """trees.json holds statistics of the calibration prompts (held out, not the demo's) and a CPU
    choice; on the unseen demo prompts its best tree's replayed tokens per step is within 15%."""
    model, _ = demo_model
    store = model.tree_store
    assert len(store.statistics.sequences) == len(demo.calibration_prompts())
    assert {key[2] for key in store.choices if key[:2] == ("cpu", "float32")} >= {1}
    best = store.lookup("cpu", "float32", 1).best_tree
    spec = json.dumps([list(p) for p in best.tree.paths])
    runs = model.generate(read_prompts(demo.DEMO_PROMPTS_FILE), max_new_tokens=128, mode="bita", tree=spec)
    measured = sum(r["new_tokens"] for r in runs) / sum(r["steps"] for r in runs)
    assert best.tau == pytest.approx(store.statistics.replayed_tokens(best.tree))
    assert abs(best.tau / measured - 1) <= 0.15, (best.tau, measured)


def test_decode_py_without_arguments_runs_the_demo(capsys):
    import re

    import decode

    assert decode.main([]) == 0
    out, _ = capsys.readouterr()
    assert "--- completion 1" in out
    *_, identical, tokens, chose, speedup, why = out.strip().splitlines()
    assert identical == "identical outputs (BiTA vs AR): yes"
    assert float(re.match(r"tokens per step: ([0-9.]+) with BiTA", tokens).group(1)) > 1.0
    assert chose.startswith("tree auto chose on cpu float32 batch 1: ")
    assert re.match(r"(measured )?speedup of --tree auto over AR: [0-9.]+x", speedup)
    assert why.startswith("why little on a CPU") and "accelerator figures" in why
