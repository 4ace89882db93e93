"""decode.py end to end: greedy ids equal transformers' generate; bad input gives one-line errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import decode
from bita_jax.cli import run_main
from tests.conftest import VARIANTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Mixed lengths; the last one is longer than the smallest prompt bucket (16 tokens).
PROMPTS = [
    "def add(a, b):",
    "The quick brown fox",
    "x",
    "import os\nimport sys\nprint(os.getcwd(), sys.argv)\nfor i in range(10):",
]
MAX_NEW = 12


def hf_greedy(path: str, prompts: list[str], max_new: int, eos_id: int | None = None) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time: generated ids (EOS included)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path).eval()
    eos_id = model.config.eos_token_id if eos_id is None else eos_id
    outputs = []
    for text in prompts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            out = model.generate(
                ids, do_sample=False, max_new_tokens=max_new, eos_token_id=eos_id, pad_token_id=eos_id
            )
        outputs.append(out[0, ids.shape[1] :].tolist())
    return outputs


def run_decode(path: str, out_file, *extra: str) -> list[dict]:
    argv = ["--model", path, "--mode", "ar", "--max-new-tokens", str(MAX_NEW), "--output", str(out_file)]
    assert run_main(decode.main, argv + ["--prompt", *PROMPTS, *extra]) == 0
    with open(out_file) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_ids_equal_transformers(tiny_checkpoints, tmp_path, variant):
    path = tiny_checkpoints[variant]
    expected = hf_greedy(path, PROMPTS, MAX_NEW)
    tokenizer = AutoTokenizer.from_pretrained(path)
    for batch_size in (1, 4):
        records = run_decode(path, tmp_path / f"b{batch_size}.jsonl", "--batch-size", str(batch_size))
        assert [r["prompt"] for r in records] == PROMPTS
        assert [r["output_ids"] for r in records] == expected, f"batch {batch_size}"
        for record, text in zip(records, PROMPTS, strict=True):
            assert record["prompt_ids"] == tokenizer(text)["input_ids"]
            assert record["new_tokens"] == len(record["output_ids"]) == record["steps"]
            assert record["completion"] == tokenizer.decode(record["output_ids"], skip_special_tokens=True)
    # Decoding unrolls the layers by default; scanned layers must give the same ids.
    scanned = run_decode(path, tmp_path / "scan.jsonl", "--batch-size", "4", "--scan-layers")
    assert [r["output_ids"] for r in scanned] == expected


def test_rows_stop_at_eos(tiny_checkpoint, tmp_path):
    """With EOS set to a token the model emits mid-sequence, rows stop there (EOS kept), others go on."""
    free_run = hf_greedy(tiny_checkpoint, PROMPTS[:1], MAX_NEW)[0]
    eos_id = free_run[4]
    path = tmp_path / "eos"
    shutil.copytree(tiny_checkpoint, path)
    with open(path / "config.json") as f:
        config = json.load(f)
    with open(path / "config.json", "w") as f:
        json.dump({**config, "eos_token_id": eos_id}, f)
    expected = hf_greedy(str(path), PROMPTS, MAX_NEW, eos_id=eos_id)
    assert expected[0][-1] == eos_id and len(expected[0]) <= 5
    assert any(len(ids) == MAX_NEW for ids in expected)
    records = run_decode(str(path), tmp_path / "out.jsonl", "--batch-size", "4")
    assert [r["output_ids"] for r in records] == expected


def test_subprocess_jsonl_and_chat(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "decode.py"),
        "--model",
        tiny_checkpoint,
        "--prompts",
        str(prompts),
    ]
    cmd += ["--max-new-tokens", "5", "--batch-size", "2", "--chat", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stdout and "compile" in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    for record, text in zip(records, PROMPTS[:2], strict=True):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        assert record["prompt_ids"] == list(chat["input_ids"]) and record["new_tokens"] == 5


def assert_user_error(capsys, argv: list[str], message: str) -> None:
    assert run_main(decode.main, argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err and "Traceback" not in err, err


def test_missing_model_dir_subprocess(tmp_path):
    missing = str(tmp_path / "nowhere")
    cmd = [sys.executable, os.path.join(ROOT, "decode.py"), "--model", missing, "--prompt", "hi"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"error: model directory not found: {missing}"


def test_bad_inputs_give_one_line_errors(tiny_checkpoint, tmp_path, capsys):
    unsupported = tmp_path / "mistral"
    shutil.copytree(tiny_checkpoint, unsupported)
    config = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    assert_user_error(capsys, ["--model", str(unsupported), "--prompt", "hi"], "unsupported architecture")

    long_prompt = ["--model", tiny_checkpoint, "--prompt", "def add " * 300, "--max-new-tokens", "8"]
    assert_user_error(capsys, long_prompt, "exceeds the model's 512 positions")

    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert_user_error(
        capsys, ["--model", tiny_checkpoint, "--prompts", str(malformed)], f"{malformed} line 2:"
    )
    wrong_key = tmp_path / "wrong.jsonl"
    wrong_key.write_text('{"text": "ok"}\n')
    assert_user_error(capsys, ["--model", tiny_checkpoint, "--prompts", str(wrong_key)], "line 1:")

    assert_user_error(capsys, ["--prompt", "hi"], "--model DIR is required")
    assert_user_error(capsys, ["--model", tiny_checkpoint], "no prompts")


@pytest.mark.parametrize("script", ["bita-decode", "bita-train", "bita-tune"])
def test_console_scripts_run_the_command_lines(script, monkeypatch, capsys):
    """pyproject.toml's console scripts name each command line's `console`, which answers --help."""
    import importlib
    import tomllib

    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "pyproject.toml"), "rb") as f:
        target = tomllib.load(f)["project"]["scripts"][script]
    module, function = target.split(":")
    assert module == f"bita_jax.cli.{script.removeprefix('bita-')}" and function == "console"
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_:
        getattr(importlib.import_module(module), function)()
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out
