"""The recipe (python -m bita_jax.recipe) on a tiny checkpoint and a small ShareGPT-format file:
the prompt filters and split, and every stage resuming where it stopped."""

import json
import os

import pytest

from bita_jax import api, demo
from bita_jax.cli import run_main
from bita_jax.errors import UserError
from bita_jax.io.prompts import read_prompts
from bita_jax.recipe import pipeline, report
from bita_jax.recipe import prompts as sharegpt
from bita_jax.recipe.__main__ import main as recipe_main
from bita_jax.training import loop


def write_sharegpt(path, count=40):
    """ShareGPT V3's layout, cut off inside a record as the packaged file is."""
    records = []
    for i in range(count):
        records.append({"id": f"h{i}", "conversations": [
            {"from": "human", "value": f"Question number {i}: explain topic {i * 7 % 13} in detail."},
            {"from": "gpt", "value": "An answer."},
        ]})  # fmt: skip
    records.append({"id": "dup", "conversations": [{"from": "human", "value": "QUESTION number 3:  explain "
                                                     "topic 8 in detail."}]})  # fmt: skip
    records.append({"id": "gpt-first", "conversations": [{"from": "gpt", "value": "I start the talk here."}]})
    records.append({"id": "short", "conversations": [{"from": "human", "value": "hi"}]})
    records.append({"id": "zh", "conversations": [{"from": "human", "value": "请解释一下这个问题的详细内容和背景知识"}]})
    records.append({"id": "eval", "conversations": [{"from": "human", "value": "An evaluation question, kept out."}]})
    text = json.dumps(records, indent=2)
    with open(path, "w") as f:
        f.write(text[:-1] + ',\n  {"id": "cut", "conversations": [{"from": "human", "value": "this record never en')


def test_prompts_are_filtered_deduplicated_and_split_apart(tmp_path):
    source = tmp_path / "sharegpt.json"
    write_sharegpt(source)
    dataset, counts = sharegpt.load_sharegpt_prompts(str(source), sharegpt.PromptFilter())
    assert counts == {"records": 45, "first_turn_human": 44, "length_kept": 43, "language_kept": 42, "distinct": 41}
    texts = dataset["prompt"]
    assert "Question number 3: explain topic 8 in detail." in texts
    assert not any(t.startswith("QUESTION") for t in texts)  # the later duplicate is dropped
    train, heldout = sharegpt.split_prompts(dataset, 30, 8, seed=1)
    assert len(train) == 30 and len(heldout) == 8 and not set(train) & set(heldout)
    assert sharegpt.split_prompts(dataset, 30, 8, seed=1) == (train, heldout)  # fixed by the seed
    with pytest.raises(UserError, match="only 41 distinct"):
        sharegpt.split_prompts(dataset, 40, 8, seed=1)


def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def decoded(path):
    """(prompt, prompt ids, output ids) of each record (records also carry their timing)."""
    return [(r["prompt"], r["prompt_ids"], r["output_ids"]) for r in map(json.loads, read_lines(path))]


def test_recipe_stages_resume_where_they_stopped(tiny_checkpoint, tmp_path, capsys):
    source, exclude, run = tmp_path / "sharegpt.json", tmp_path / "eval.jsonl", str(tmp_path / "run")
    write_sharegpt(source)
    exclude.write_text(json.dumps({"turns": ["An evaluation question, kept out.", "second turn"]}) + "\n")
    args = [
        "--model", tiny_checkpoint, "--output", run, "--source", str(source), "--exclude", str(exclude),
        "--train-prompts", "12", "--heldout-prompts", "4", "--max-new-tokens", "12", "--batch-size", "4",
        "--eval-examples", "2", "--eval-points", "4", "--set", "steps=2", "--set", "batch_size=2",
        "--set", "save_every=1", "--set", "eval_every=2", "--set", "data.max_groups=4", "--set", "mesh.data=1",
    ]  # fmt: skip
    assert recipe_main(args + ["--stages", "prompts,responses"]) == 0
    train_prompts = read_lines(os.path.join(run, "prompts", "train.jsonl"))
    heldout = read_lines(os.path.join(run, "prompts", "heldout.jsonl"))
    assert len(train_prompts) == 12 and len(heldout) == 4 and not set(train_prompts) & set(heldout)
    assert not any("evaluation question" in p for p in train_prompts + heldout)
    joined = os.path.join(run, "responses", "train.jsonl")
    records = decoded(joined)
    assert sorted(r[0] for r in records) == sorted(json.loads(p)["prompt"] for p in train_prompts)
    assert all(r[2] for r in records)

    # A worker killed mid-write: its shard keeps one record and a torn line; the joined file is gone.
    shard = os.path.join(run, "responses", "train-1of2.jsonl")
    before, lines = decoded(shard), read_lines(shard)
    with open(shard, "w") as f:
        f.write(lines[0] + "\n" + lines[1][:20])
    os.remove(joined)
    assert recipe_main(args + ["--stages", "prompts,responses"]) == 0
    assert decoded(shard) == before
    assert decoded(joined) == records

    # Training interrupted after 2 of 4 steps resumes from its checkpoint; evaluations are logged once each.
    assert recipe_main(args + ["--stages", "train"]) == 0
    # Through run_main, as `python -m bita_jax.recipe` runs: the library's log lines reach stderr.
    assert run_main(recipe_main, args + ["--set", "steps=4", "--stages", "train,curve"]) == 0
    assert "resumed from step 2" in capsys.readouterr().err
    evals = [json.loads(line) for line in read_lines(os.path.join(run, "train", loop.EVAL_FILE))]
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert [e["sequences"] for e in evals] == [0, 4, 8]
    for e in evals:
        assert len(e["mask_acc"]) == 3 and all(0 <= a <= 1 for a in e["mask_acc"])
        assert all(1.0 <= t <= 4.0 for t in e["tau"].values())
    assert os.path.isfile(os.path.join(run, "train", "adapter", "adapter.safetensors"))
    assert os.path.getsize(os.path.join(run, "learning_curve.png")) > 0

    # Other data-defining settings are refused, naming the setting.
    changed = list(args)
    changed[changed.index("--max-new-tokens") + 1] = "16"
    with pytest.raises(UserError, match="max_new_tokens=12"):
        recipe_main(changed + ["--stages", "prompts"])


def test_replayed_tau_is_what_greedy_decoding_accepts():
    """The report's replay (teacher-forced ranks and lookup runs on the AR outputs) gives the tau that
    decoding each tree measures, lookup chains included, on the packaged demo model and adapter."""
    model = api.load(demo.MODEL_DIR, adapter=demo.ADAPTER_DIR)
    prompts = read_prompts(demo.PROMPTS_FILE)[:6]
    ar = model.run(prompts, mode="ar", max_new_tokens=48, batch_size=2)
    outputs = [g.output_ids for g in ar.generations]
    specs = ("upper:3+lookup:4", "lookup:4", "upper:5")
    replayed = report.replay(model, model.encode(prompts, False), outputs, specs)["tau"]
    for spec in specs:
        run = model.run(prompts, mode="bita", tree=spec, max_new_tokens=48, batch_size=2)
        assert [g.output_ids for g in run.generations] == outputs
        measured = sum(len(g.output_ids) for g in run.generations) / sum(g.steps for g in run.generations)
        assert replayed[spec] == pytest.approx(measured, abs=5e-5)  # the replay rounds to 4 decimals
