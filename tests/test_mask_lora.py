"""Low-rank updates on mask rows (bita.lora_rank): capacity for the drafts that cannot change the output.

Normal rows compute bit-for-bit what they compute without the updates; BiTA's output equals AR's with
random and trained updates (greedy, sampled, float32 and bfloat16 exact); a run continued from a
trained adapter starts exactly there and its updates learn.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bita_jax
from bita_jax.bita import adapter as bita_adapter
from bita_jax.bita import training_mask
from bita_jax.config import BiTAConfig, ConfigError
from bita_jax.io import adapter_files, hf
from bita_jax.models.llama import LlamaModel
from bita_jax.training import loop as train_loop
from tests.distill_data import distill_config, patterned_model_and_data, train_adapter
from tests.test_training import one_batch

BITA = BiTAConfig(num_prompt_tokens=4, num_mask_tokens=3, prefix_dropout=0.0)
LORA = dataclasses.replace(BITA, lora_rank=4)
PROMPTS = ["def add(a, b):", "The quick brown fox", "x", "import os\nimport sys\nprint(os.getcwd())"]
MAX_NEW = 24


def random_lora_adapter(cfg, seed):
    """An adapter whose low-rank factors are all drawn (B too), so every mask row is moved."""
    adapter = bita_adapter.init_adapter(cfg, LORA, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 100), len(adapter)))
    return {
        name: jax.random.normal(next(keys), x.shape) if name.startswith("lora_") else x
        for name, x in adapter.items()
    }


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_updates_move_mask_rows_and_leave_normal_rows_bit_identical(tiny_checkpoint, scan_layers):
    cfg = hf.load_config(tiny_checkpoint, scan_layers=scan_layers)
    params = hf.load_params(tiny_checkpoint, cfg)
    model = LlamaModel(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 12)), jnp.int32)
    tokens = tokens.at[:, 8:].set(cfg.vocab_size + jnp.arange(4) % 3)  # the last 4 rows hold mask ids
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    causal = positions[:, :, None] >= positions[:, None, :]
    visible = tokens >= cfg.vocab_size
    with_lora = random_lora_adapter(cfg, 0)
    without = {n: x for n, x in with_lora.items() if not n.startswith("lora_")}
    run = jax.jit(lambda a: bita_adapter.forward(model, params, a, tokens, positions, causal, visible)[0])
    moved, plain = np.asarray(run(with_lora)), np.asarray(run(without))
    normal = ~np.asarray(visible)
    np.testing.assert_array_equal(moved[normal], plain[normal])
    assert np.abs(moved[~normal] - plain[~normal]).mean() > 0.1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model dir, data path, adapter without updates, adapter with rank-4 updates continued from it,
    the continued run's directory): a tiny model pretrained on period-4 patterns and its own greedy
    generations."""
    root = tmp_path_factory.mktemp("lora")
    model_dir, data_path, _, _ = patterned_model_and_data(str(root))
    base = distill_config(model_dir, data_path, str(root / "tokens"), BITA, steps=40)
    tokens_only = train_adapter(base)
    continued = dataclasses.replace(base, output=str(root / "lora"), bita=LORA, init_adapter=tokens_only)
    return model_dir, data_path, tokens_only, train_adapter(continued), continued


def test_continued_run_starts_at_the_trained_adapter_and_its_updates_learn(trained):
    model_dir, _, tokens_only, with_lora, continued = trained
    cfg = hf.load_config(model_dir)
    start = train_loop.first_adapter(continued, cfg, None, [])
    _, saved = adapter_files.load_adapter(tokens_only, cfg)
    for name, x in saved.items():
        np.testing.assert_array_equal(np.asarray(start[name]), x)
    assert all(not np.asarray(start[n]).any() for n in start if n.endswith("_b"))  # update starts at 0
    _, learned = adapter_files.load_adapter(with_lora, cfg)
    assert all(np.abs(learned[n]).max() > 1e-3 for n in learned if n.endswith("_b"))
    with open(os.path.join(continued.output, train_loop.METRICS_FILE)) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_init_adapter_that_does_not_fit_is_refused(trained):
    model_dir, _, _, _, continued = trained
    other = dataclasses.replace(continued, bita=dataclasses.replace(LORA, num_prompt_tokens=2))
    with pytest.raises(ConfigError, match="does not fit"):
        train_loop.first_adapter(other, hf.load_config(model_dir), None, [])


def _save_random(model_dir, out):
    cfg = hf.load_config(model_dir)
    return adapter_files.save_adapter(out, random_lora_adapter(cfg, 3), LORA, model_dir)


@pytest.mark.parametrize("which", ["trained", "random"])
def test_bita_equals_ar_with_updates(trained, tmp_path, which):
    model_dir, _, _, with_lora, _ = trained
    adapter = with_lora if which == "trained" else _save_random(model_dir, str(tmp_path / "random"))
    for dtype in ("float32", "bfloat16"):  # bfloat16 under the exact precision policy (the default)
        model = bita_jax.load(model_dir, adapter=adapter, dtype=dtype)
        for sampling in ({}, {"temperature": 0.8, "seed": 5}):
            ar = model.run(PROMPTS, mode="ar", max_new_tokens=MAX_NEW, **sampling)
            for tree in ("upper:5", "upper:3+lookup:4"):
                options = dict(mode="bita", tree=tree, max_new_tokens=MAX_NEW, batch_size=3, **sampling)
                bita = model.run(PROMPTS, **options)
                assert [g.output_ids for g in bita.generations] == [g.output_ids for g in ar.generations]
                if which == "trained" and not sampling and dtype == "float32":
                    # The trained drafts are accepted: fewer steps than tokens.
                    tokens = sum(len(g.output_ids) for g in ar.generations)
                    assert sum(g.steps for g in bita.generations) < tokens


def test_split_training_mask_sees_updates_only_on_mask_rows(trained):
    """The training format's normal rows do not move with the updates (the loss's constants)."""
    model_dir, data_path, _, _, _ = trained
    cfg = hf.load_config(model_dir)
    params = hf.load_params(model_dir, cfg)
    b = one_batch(model_dir, data_path, cfg)
    mask = training_mask.attention_mask(b["group"], b["visible_end"], b["positions"])
    rows = (b["tokens"], b["positions"], mask, b["group"] >= 0)
    adapter = random_lora_adapter(cfg, 1)
    without = {n: x for n, x in adapter.items() if not n.startswith("lora_")}
    run = lambda a: np.asarray(bita_adapter.forward(LlamaModel(cfg), params, a, *rows)[0])  # noqa: E731
    moved, plain = run(adapter), run(without)
    normal = b["group"] < 0
    np.testing.assert_array_equal(moved[normal], plain[normal])
    assert not np.allclose(moved[~normal], plain[~normal], atol=1e-2)
