"""benchmarks/accelerator.sh --small: the accelerator suite end to end on tiny shapes (a CPU check
that every part runs and reports consistent figures; the real figures need an accelerator)."""

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_suite_small(tmp_path):
    out = tmp_path / "acc"
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = ""  # one CPU device, as on an accelerator host (conftest asks for 8)
    done = subprocess.run(
        ["bash", "benchmarks/accelerator.sh", "--small", "--output-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "accelerator.json").read_text())
    costs = result["verification_cost"]
    assert {(r["batch"], r["tree"]) for r in costs} == {
        (b, t) for b in (1, 2) for t in ("chain", "upper:3", "upper:5", "json (30 nodes)")
    }
    assert all(r["tree_ms"] > 0 and r["ratio"] == pytest.approx(r["tree_ms"] / r["ar_ms"]) for r in costs)
    for r in result["ar_vs_bound"]:
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["ar_ms"])
        assert r["bound_tokens_per_s"] == pytest.approx(
            r["batch"] * result["bandwidth_gb_s"] / r["weight_gb"]
        )
    (demo,) = result["demo"]["runs"]
    assert demo["identical"] and demo["mode"] in ("ar", "bita")
    assert (demo["tokens_per_step"] == 1.0) if demo["mode"] == "ar" else (demo["tokens_per_step"] > 1.0)
    table = (out / "accelerator.md").read_text()
    assert "## Verification cost" in table and "## Demo" in table
