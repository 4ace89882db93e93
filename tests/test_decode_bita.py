"""decode.py --mode bita: output ids equal --mode ar for adapters trained by the training code and
saved by save_adapter, at batch 1 and 3; --compare, --tree, --mesh; one-line errors."""

import json

import jax
import pytest

import decode
from bita_jax.bita import adapter as bita_adapter
from bita_jax.cli import run_main
from bita_jax.config import BiTAConfig
from bita_jax.io import adapter_files, hf
from tests.distill_data import distill_config, patterned_model_and_data, train_adapter

PROMPTS = ["def add(a, b):", "The quick brown fox", "x", "import os\nimport sys\nprint(os.getcwd())"]
MAX_NEW = 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model dir, adapter dir): a tiny model pretrained to continue period-4 patterns (its greedy
    output on these prompts is periodic too) and an adapter trained for a few steps on its own
    greedy generations, from the mean embedding (the start that learns it in 40 steps)."""
    root = tmp_path_factory.mktemp("bita_cli")
    model_dir, data_path, _, _ = patterned_model_and_data(str(root))
    bita = BiTAConfig(num_prompt_tokens=4, num_mask_tokens=3, prefix_dropout=0.0, init="mean")
    return model_dir, train_adapter(distill_config(model_dir, data_path, str(root / "run"), bita, steps=40))


def run_decode(model_dir, out_file, *extra):
    argv = ["--model", model_dir, "--max-new-tokens", str(MAX_NEW), "--output", str(out_file)]
    assert run_main(decode.main, argv + ["--prompt", *PROMPTS, *extra]) == 0
    with open(out_file) as f:
        return [json.loads(line) for line in f]


def test_bita_cli_equals_ar(trained, tmp_path, capsys):
    model_dir, adapter_dir = trained
    ar = run_decode(model_dir, tmp_path / "ar.jsonl", "--mode", "ar", "--batch-size", "3")
    ar_ids = [r["output_ids"] for r in ar]
    for batch_size, tree in [(1, "upper:5"), (3, "chain")]:
        bita = run_decode(
            model_dir,
            tmp_path / f"bita{batch_size}.jsonl",
            *("--mode", "bita", "--adapter", adapter_dir, "--batch-size", str(batch_size), "--tree", tree),
            *(["--compare"] if batch_size == 1 else []),
        )
        assert [r["output_ids"] for r in bita] == ar_ids, (batch_size, tree)
        assert [r["completion"] for r in bita] == [r["completion"] for r in ar]
        out = capsys.readouterr().out
        assert "acceptance per draft level" in out
        assert batch_size > 1 or "identical outputs: yes" in out
        # The trained drafts are accepted: at least two tokens per tree step (3.2 observed with
        # either tree; an untrained adapter gets about 1).
        assert 2 * sum(r["steps"] for r in bita) <= sum(r["steps"] for r in ar), out


def test_bita_cli_tensor_parallel(trained, tmp_path):
    model_dir, adapter_dir = trained
    single = run_decode(
        model_dir, tmp_path / "one.jsonl", "--mode", "bita", "--adapter", adapter_dir, "--batch-size", "4"
    )
    mesh = ("--mesh", "data=4,fsdp=1,tensor=2", "--batch-size", "4")
    for mode in ("ar", "bita"):
        adapter = ("--adapter", adapter_dir) if mode == "bita" else ()  # --adapter is refused in AR mode
        sharded = run_decode(model_dir, tmp_path / f"{mode}8.jsonl", "--mode", mode, *adapter, *mesh)
        assert [r["output_ids"] for r in sharded] == [r["output_ids"] for r in single], mode


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mode", "bita"], "needs --adapter"),
        (["--mode", "bita", "--adapter", "/nonexistent"], "adapter directory not found"),
        (["--mode", "bita", "--adapter", "ADAPTER", "--tree", "upper:x"], "bad tree spec"),
        (["--mode", "bita", "--adapter", "ADAPTER", "--tree", "[[0],[0,0],[0,0,0],[0,0,0,0]]"], "exceeds"),
        (["--mode", "ar", "--mesh", "data=4,fsdp=1,tensor=2", "--batch-size", "3"], "multiple of"),
        (["--mode", "ar", "--mesh", "data=3"], "mesh"),
    ],
)
def test_bita_cli_errors(tiny_checkpoint, tmp_path, capsys, extra, message):
    config = hf.load_config(tiny_checkpoint)
    adapter_dir = str(tmp_path / "adapter")
    adapter_files.save_adapter(
        adapter_dir,
        bita_adapter.init_adapter(config, BiTAConfig(), jax.random.key(0)),
        BiTAConfig(),
        tiny_checkpoint,
    )
    extra = [adapter_dir if x == "ADAPTER" else x for x in extra]
    argv = ["--model", tiny_checkpoint, "--prompt", "x", "--max-new-tokens", "4", *extra]
    assert run_main(decode.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err


@pytest.mark.parametrize("batch_size", [1, 3])
def test_sampled_bita_cli_equals_sampled_ar(trained, tmp_path, capsys, batch_size):
    """Same options and seed: BiTA's sampled ids equal AR's (trained adapter, mixed prompt lengths);
    --compare compares against AR sampling; the records carry the options and the seed."""
    model_dir, adapter_dir = trained
    sampling = ("--temperature", "0.8", "--top-p", "0.9", "--seed", "7", "--batch-size", str(batch_size))
    ar = run_decode(model_dir, tmp_path / "ar.jsonl", "--mode", "ar", *sampling)
    bita = run_decode(
        model_dir, tmp_path / "bita.jsonl", "--mode", "bita", "--adapter", adapter_dir, "--compare", *sampling
    )
    assert [r["output_ids"] for r in bita] == [r["output_ids"] for r in ar]
    assert "identical outputs: yes" in capsys.readouterr().out
    assert all((r["temperature"], r["top_p"], r["top_k"], r["seed"]) == (0.8, 0.9, 0, 7) for r in bita)
    greedy = run_decode(model_dir, tmp_path / "greedy.jsonl", "--mode", "ar", "--batch-size", str(batch_size))
    assert [r["output_ids"] for r in ar] != [r["output_ids"] for r in greedy]  # it did sample
    assert sum(r["steps"] for r in bita) < sum(r["steps"] for r in ar)  # and drafts were accepted
