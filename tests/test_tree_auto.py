"""`--tree auto`: the tuner writes trees.json, the API decodes with its choice (a tree or AR), and
whatever auto picks, the output is AR's."""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

import bita_jax
from bita_jax.bita.adapter import init_adapter
from bita_jax.bita.tree import DEFAULT_TREE, DraftTree, parse_tree
from bita_jax.cli import run_main
from bita_jax.cli import tune as tune_cli
from bita_jax.config import BiTAConfig
from bita_jax.io import hf
from bita_jax.io.adapter_files import save_adapter
from bita_jax.sharding import mesh_rules
from bita_jax.training import data
from bita_jax.tuning import auto as auto_module
from bita_jax.tuning import tuner
from bita_jax.tuning.auto import resolve_auto_tree
from bita_jax.tuning.choice import ChoiceKey, StepCosts, TreeStore, choose, load_store, save_store
from bita_jax.tuning.stats import AcceptanceStats
from bita_jax.tuning.step_cost import current_device_kind

BITA = BiTAConfig(num_prompt_tokens=4, num_mask_tokens=3, init_std=1.0)
PROMPTS = ["def add(a, b):", "The quick brown fox", "x", "import os\nimport sys\nfor i in range(10):"]
MAX_NEW = 10


@pytest.fixture(scope="module")
def random_adapter(tiny_checkpoint, tmp_path_factory):
    """A random (untrained) adapter directory for the tiny checkpoint, without trees.json."""
    config = hf.load_config(tiny_checkpoint)
    adapter = init_adapter(config, BITA, jax.random.key(5))
    return save_adapter(str(tmp_path_factory.mktemp("adapter") / "adapter"), adapter, BITA, tiny_checkpoint)


@pytest.fixture
def notes(caplog):
    """A function returning the library's log lines (INFO and up) since its last call, then
    forgetting them."""
    caplog.set_level(logging.INFO, logger="bita_jax")

    def take() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("bita_jax")]
        caplog.clear()
        return lines

    return take


@pytest.fixture
def adapter_dir(random_adapter, tmp_path):
    """A fresh copy per test, so each writes its own trees.json."""
    return shutil.copytree(random_adapter, str(tmp_path / "adapter"))


def decode_both(model, batch_size: int):
    options = dict(max_new_tokens=MAX_NEW, batch_size=batch_size)
    return model.run(PROMPTS, mode="bita", tree="auto", **options), model.run(PROMPTS, mode="ar", **options)


def output_ids(run) -> list[list[int]]:
    return [g.output_ids for g in run.generations]


def test_tune_cli_then_auto_equals_ar(tiny_checkpoint, adapter_dir, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    argv = [
        "--model", tiny_checkpoint, "--adapter", adapter_dir, "--data", str(data), "--batch-sizes", "2",
        "--max-new-tokens", str(MAX_NEW), "--max-rows", "10", "--measure-prompts", "2", "--max-rank", "36",
        "--output-dir", str(tmp_path / "out"),
    ]  # fmt: skip
    assert run_main(tune_cli.main, argv) == 0
    out = capsys.readouterr().out
    assert out.count("tok/s meas") == 1 and "\nAR " in out  # the table: AR first

    store = load_store(adapter_dir)
    kind = current_device_kind()
    assert set(store.choices) == {ChoiceKey(kind, "float32", 2, "greedy", "exact", False)}
    model = bita_jax.load(tiny_checkpoint, adapter=adapter_dir)
    auto_run, ar_run = decode_both(model, batch_size=2)
    # The statistics follow the base model's own greedy outputs: one drafting point per token but the last.
    assert [len(s) for s in store.statistics.sequences] == [len(ids) - 1 for ids in output_ids(ar_run)]
    assert output_ids(auto_run) == output_ids(ar_run)
    chosen = store.lookup(kind, "float32", 2).tree
    assert auto_run.auto.source == "stored" and auto_run.tree == chosen
    assert auto_run.mode == ("ar" if chosen is None else "bita")
    with open(tmp_path / "out" / "tune.json") as f:
        shown = json.load(f)["results"][0]["shown"]
    assert shown[0]["tree"] == "AR" and all(r["tau_measured"] >= 1.0 for r in shown)
    assert os.path.getsize(tmp_path / "out" / "tune.png") > 0


def test_tune_cli_with_chat_on_a_mesh(tiny_checkpoint, adapter_dir, tmp_path, notes):
    """--chat calibrates on the chat-framed prompts and stores the choice for chat; --mesh loads the
    model on the mesh; decoding with chat then takes that choice (not another setting's) and equals AR."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    mesh = "data=1,fsdp=1,tensor=2"
    argv = [
        "--model", tiny_checkpoint, "--adapter", adapter_dir, "--data", str(prompts), "--batch-sizes", "2",
        "--max-new-tokens", str(MAX_NEW), "--max-rows", "10", "--measure-prompts", "0", "--max-rank", "36",
        "--output-dir", str(tmp_path / "out"), "--chat", "--mesh", mesh,
    ]  # fmt: skip
    assert run_main(tune_cli.main, argv) == 0
    store = load_store(adapter_dir)
    assert set(store.choices) == {ChoiceKey(current_device_kind(), "float32", 2, "greedy", "exact", True)}
    model = bita_jax.load(tiny_checkpoint, adapter=adapter_dir, mesh=mesh)
    options = dict(max_new_tokens=MAX_NEW, batch_size=2, chat=True)
    auto_run, ar_run = model.run(PROMPTS, tree="auto", **options), model.run(PROMPTS, mode="ar", **options)
    # The statistics are those of the chat-framed prompts and their greedy outputs.
    assert [r["prompt_ids"] for r in ar_run.records] == model.encode(PROMPTS, chat=True)
    examples = [data.Example(tuple(r["prompt_ids"]), tuple(r["output_ids"])) for r in ar_run.records]
    with mesh_rules(model.mesh):
        expected = tuner.acceptance_statistics(model.config, model.params, model.adapter, examples, 36)
    assert store.statistics.to_json() == expected.to_json()
    assert auto_run.auto.source == "stored" and auto_run.auto.stored_for == auto_run.auto.key
    # Silent for a stored tree; a stored AR decision is said, but never as another setting's choice.
    assert all(note.endswith("stored choice)") for note in notes())
    assert output_ids(auto_run) == output_ids(ar_run)


def hand_statistics() -> AcceptanceStats:
    rng = np.random.default_rng(0)
    return AcceptanceStats.from_ranks([rng.integers(0, 3, size=(20, 3))], max_rank=3)


def test_auto_decodes_a_stored_tree_or_ar_as_stored(tiny_checkpoint, adapter_dir, notes, capsys):
    tree = DraftTree.from_paths([(0,), (1,), (0, 0)])
    kind = current_device_kind()
    wins = choose([(tree, 1.8)], StepCosts(2, 0.01, (4, 20), (0.011, 0.02)))  # 1.8 / 1.35 x AR
    loses = choose([(tree, 1.8)], StepCosts(1, 0.01, (4, 20), (0.02, 0.04)))  # 0.6x AR
    assert wins.tree == tree and loses.tree is None
    store = TreeStore(hand_statistics()).with_choice(kind, "float32", wins)
    store = store.with_choice(kind, "float32", loses)
    save_store(adapter_dir, store)
    model = bita_jax.load(tiny_checkpoint, adapter=adapter_dir)

    tree_run, ar_run = decode_both(model, batch_size=2)
    assert (tree_run.mode, tree_run.tree, tree_run.auto.source) == ("bita", tree, "stored")
    assert output_ids(tree_run) == output_ids(ar_run)
    assert notes() == [] and capsys.readouterr().err == ""  # a stored tree choice is silent

    fallback_run, ar_run = decode_both(model, batch_size=1)
    assert (fallback_run.mode, fallback_run.tree) == ("ar", None)
    assert output_ids(fallback_run) == output_ids(ar_run)
    (note,) = notes()
    assert note.startswith(f"tree auto: AR on {kind} float32 batch 1")


def test_a_sampled_run_does_not_reuse_a_greedy_choice(tiny_checkpoint, adapter_dir, notes):
    tree = DraftTree.from_paths([(0,), (1,), (0, 0)])
    wins = choose([(tree, 1.8)], StepCosts(2, 0.01, (4, 20), (0.011, 0.02)))  # greedy: 1.8 / 1.35 x AR
    save_store(adapter_dir, TreeStore(hand_statistics()).with_choice(current_device_kind(), "float32", wins))
    model = bita_jax.load(tiny_checkpoint, adapter=adapter_dir)
    options = dict(max_new_tokens=MAX_NEW, batch_size=2, temperature=0.8, seed=3)
    sampled = model.run(PROMPTS, mode="bita", tree="auto", **options)
    assert sampled.auto.key.sampling == "sampled" and sampled.auto.source == "default"
    assert sampled.tree == parse_tree(DEFAULT_TREE, BITA.num_mask_tokens)
    (note,) = notes()
    assert "no choice for sampled decoding" in note and "batch 2 sampled" in note
    assert output_ids(sampled) == output_ids(model.run(PROMPTS, mode="ar", **options))
    greedy, _ = decode_both(model, batch_size=2)  # the same Model: greedy still takes the stored tree
    assert (greedy.auto.source, greedy.tree) == ("stored", tree)


def test_auto_without_trees_json_uses_the_default_tree(tiny_checkpoint, adapter_dir, notes):
    model = bita_jax.load(tiny_checkpoint, adapter=adapter_dir)
    default_run, ar_run = decode_both(model, batch_size=2)
    assert default_run.mode == "bita" and default_run.tree == parse_tree(DEFAULT_TREE, BITA.num_mask_tokens)
    assert output_ids(default_run) == output_ids(ar_run)
    (note,) = notes()
    assert "no trees.json statistics" in note and DEFAULT_TREE in note


def test_auto_measures_step_costs_when_no_choice_is_stored(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(auto_module, "ON_THE_SPOT_MAX_ROWS", 10)  # the ladder's 4 and 9 rows
    config = hf.load_config(tiny_checkpoint)
    params = hf.load_params(tiny_checkpoint, config)
    adapter = init_adapter(config, BITA, jax.random.key(5))
    stats = hand_statistics()
    decided = resolve_auto_tree(TreeStore(stats), config, params, adapter, 3, batch_size=2)
    assert decided.source == "measured" and decided.key == ChoiceKey(current_device_kind(), "float32", 2)
    costs = decided.choice
    assert costs.ar.step_seconds > 0 and costs.best_tree.rows <= 9
    # The decision is the choice rule applied to what was measured.
    assert decided.tree == (costs.best_tree.tree if costs.speedup >= 1 + costs.margin else None)
    assert costs.best_tree.tau == pytest.approx(stats.replayed_tokens(costs.best_tree.tree))
