"""`python -m bita_jax.aot` on fake CPU devices: the AR, tree and train steps of a tiny LLaMA shape
compile, and the report carries the compiler's per-device memory and cost figures."""

import json

import pytest

from bita_jax.cli import aot
from bita_jax.cli import run_main

TINY = {**aot.LLAMA2_7B, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 512}  # fmt: skip


@pytest.mark.parametrize("kernel", ["auto", "pallas"])  # pallas: the TPU kernel's path, interpreted
def test_aot_cpu_reports_every_step(tmp_path, capsys, kernel):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    B, S = 2, 32
    argv = ["--target", "cpu:2", "--model", str(config), "--steps", "ar,tree,train", "--trees", "chain",
            "--batch-sizes", str(B), "--cache", str(S), "--attention-kernel", kernel, "--json"]  # fmt: skip
    assert run_main(aot.main, argv) == 0
    records = {r["step"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(records) == {"ar", "tree", "train"}  # no projection for a CPU target
    for r in records.values():
        assert r["fits"] and r["batch"] == B and r["chips"] == 2
        assert r["argument_bytes"] > 0 and r["flops"] > 0 and r["bytes_accessed"] > 0
    ar, tree = records["ar"], records["tree"]
    assert (ar["rows"], tree["rows"], records["train"]["rows"]) == (1, 16, 64 * 3)  # M = 3 masks
    # Per device (KV heads split over tensor=2), in bf16: the cache's k and v.
    cache_bytes = 2 * TINY["num_hidden_layers"] * B * S * 1 * 16 * 2
    # Both decode steps donate the cache, so it comes back aliased in place.
    assert ar["alias_bytes"] >= cache_bytes and tree["alias_bytes"] >= cache_bytes
    assert tree["flops"] > ar["flops"] and tree["bytes_accessed"] > ar["bytes_accessed"]


def test_aot_bad_target_is_one_line_error(capsys):
    assert run_main(aot.main, ["--target", "v9:2x2"]) == 2
    assert capsys.readouterr().err.startswith("error: bad --target 'v9:2x2'")
