"""Streaming and continuous batching through the API and decode.py: deltas concatenate to the
records (ids and text, never half a character), continuous equals static, per-prompt budgets from a
prompts file, kill -9 mid-run keeps every finished record and --resume completes it exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import bita_jax
import decode
from bita_jax.api import _TextDeltas
from bita_jax.cli import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["def add(a, b):", "x", "The quick brown fox jumps", "import os", "class Point:"]
BUDGETS = [7, 1, 12, 3, 9]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return bita_jax.load(tiny_checkpoint)


def test_stream_deltas_concatenate_to_records(model):
    options = dict(max_new_tokens=BUDGETS, batch_size=2, temperature=0.9, seed=3, chunk_steps=2)
    ids = {i: [] for i in range(len(TEXTS))}
    text = {i: "" for i in range(len(TEXTS))}
    records = {}
    for delta in model.stream(TEXTS, **options):
        assert delta.index not in records  # nothing after done
        ids[delta.index] += delta.token_ids
        text[delta.index] += delta.text
        if delta.done:
            records[delta.index] = delta.record
    static = model.generate(TEXTS, batching="static", **options)
    assert [records[i]["output_ids"] for i in range(len(TEXTS))] == [r["output_ids"] for r in static]
    for i, record in enumerate(static):
        assert ids[i] == record["output_ids"] and text[i] == record["completion"]
        assert len(ids[i]) <= BUDGETS[i]
    one = model.generate(TEXTS, **{**options, "batch_size": 1})
    assert [r["output_ids"] for r in one] == [r["output_ids"] for r in static]


def test_text_deltas_hold_back_partial_characters(model):
    word = "héllo wörld 日本語 ok"
    ids = model.tokenizer.encode(word, add_special_tokens=False)
    assert len(ids) > len(word.split())  # multi-byte characters span several tokens
    deltas = _TextDeltas(model.tokenizer)
    pieces = [deltas.add([t], False) for t in ids] + [deltas.add([], True)]
    assert "".join(pieces) == model.tokenizer.decode(ids) and not any("\ufffd" in p for p in pieces)


def test_prompts_file_budgets_and_stream_cli(tiny_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": t, "max_new_tokens": b} if i % 2 else {"prompt": t}
        for i, (t, b) in enumerate(zip(TEXTS, BUDGETS))
    ]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    argv = ["--model", tiny_checkpoint, "--prompts", str(prompts), "--max-new-tokens", "5", "--ignore-eos"]
    assert run_main(decode.main, argv + ["--batch-size", "3", "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == TEXTS
    assert [r["new_tokens"] for r in records] == [5 if i % 2 == 0 else b for i, b in enumerate(BUDGETS)]
    assert [r["max_new_tokens"] for r in records] == [r["new_tokens"] for r in records]
    # A prompts file whose budget for a finished prompt changed: --resume refuses to mix the two.
    lines[1]["max_new_tokens"] += 1
    out.write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    capsys.readouterr()
    assert run_main(decode.main, argv + ["--output", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"line 2 was decoded with max_new_tokens {BUDGETS[1]}, this input asks {BUDGETS[1] + 1}" in err
    argv = ["--model", tiny_checkpoint, "--prompt", TEXTS[2], "--max-new-tokens", "5", "--ignore-eos"]
    assert run_main(decode.main, argv + ["--stream", "--chunk-steps", "2"]) == 0
    streamed = capsys.readouterr().out
    assert streamed == records[2]["completion"] + "\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "max_new_tokens": 0}\n')
    assert run_main(decode.main, ["--model", tiny_checkpoint, "--prompts", str(bad)]) == 2
    assert "max_new_tokens" in capsys.readouterr().err


def test_kill_mid_run_then_resume(tiny_checkpoint, model, tmp_path):
    """kill -9 once the first records are on disk: they survive whole; --resume adds exactly the rest."""
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(10)]
    budgets = [2, 3] + [160] * 8
    prompts = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": t, "max_new_tokens": b}) + "\n" for t, b in zip(texts, budgets)]
    prompts.write_text("".join(lines))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "decode.py"), "--model", tiny_checkpoint,
           "--prompts", str(prompts), "--batch-size", "2", "--ignore-eos", "--chunk-steps", "1",
           "--output", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (out.exists() and out.read_text().count("\n") >= 1) and time.time() < deadline:
        assert proc.poll() is None, "decode.py ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    text = out.read_text()
    kept = text[: text.rfind("\n") + 1].splitlines()  # a line torn by the kill is not a record
    assert 1 <= len(kept) < len(texts)
    assert [json.loads(line)["prompt"] for line in kept] == texts[: len(kept)]
    assert run_main(decode.main, cmd[2:] + ["--resume"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == texts  # no duplicates, input order
    expected = model.generate(texts, max_new_tokens=budgets, batch_size=2, ignore_eos=True)
    assert [r["output_ids"] for r in records] == [r["output_ids"] for r in expected]
