"""Fault injection: every bad input or fault in decode.py / train.py ends in one `error: ...` line and
exit code 2 (no traceback), and no finished work is lost (decode records, training checkpoints)."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import decode
import train
from bita_jax.cli import files, run_main
from bita_jax.io import orbax_checkpoint
from bita_jax.training import resume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_FLAGS = [
    "--batch-size",
    "4",
    "--mesh",
    "data=1",
    "--set",
    "bita.num_prompt_tokens=2",
    "--set",
    "log_every=1",
]
SMALL_DATA = ["--set", "data.max_groups=4", "--set", "data.seq_buckets=[64]"]


PROGRESS = re.compile(r"\d+%\|")  # a tqdm progress bar


def one_error_line(capsys, main, argv) -> str:
    """Runs a CLI in-process; asserts exit code 2 and a single `error:` line without a traceback
    (besides the progress bar, if the run got that far)."""
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err
    lines = [
        line for line in err.replace("\r", "\n").splitlines() if line.strip() and not PROGRESS.search(line)
    ]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def adapter_dir(tiny_checkpoint, tmp_path_factory):
    """A (random) BiTA adapter for the tiny checkpoint, saved as train.py saves it."""
    import jax

    from bita_jax.bita.adapter import init_adapter
    from bita_jax.config import BiTAConfig, ModelConfig
    from bita_jax.io.adapter_files import save_adapter

    bita = BiTAConfig(num_prompt_tokens=2)
    arrays = init_adapter(ModelConfig.from_pretrained(tiny_checkpoint), bita, jax.random.key(0))
    return save_adapter(str(tmp_path_factory.mktemp("adapter")), arrays, bita, tiny_checkpoint)


@pytest.fixture(scope="module")
def ids_data(tmp_path_factory):
    """decode.py-style training records: ids only, responses of 10 tokens."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    rows = [
        {
            "prompt_ids": [1, *rng.integers(3, 300, 5).tolist()],
            "output_ids": rng.integers(3, 300, 10).tolist(),
        }
    ]
    rows += [{**rows[0], "output_ids": rng.integers(3, 300, 10).tolist()} for _ in range(7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def edited_data(source: str, path, edit) -> str:
    rows = [edit(json.loads(line)) for line in open(source)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------
# Checkpoint and adapter files


def truncate_weights(d):
    os.truncate(d / "model.safetensors", os.path.getsize(d / "model.safetensors") // 2)


def garble_header(d):
    with open(d / "model.safetensors", "r+b") as f:
        f.write(b"\xff" * 64)


def edit_config(fn):
    def edit(d):
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(fn(config)))

    return edit


BROKEN_CHECKPOINTS = {
    "weights truncated": (truncate_weights, "model.safetensors is truncated"),
    "weights empty": (lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors is not a"),
    "weights garbled header": (garble_header, "model.safetensors is not a safetensors file"),
    "config missing key": (
        edit_config(lambda c: {k: v for k, v in c.items() if k != "vocab_size"}),
        "config.json has no 'vocab_size'",
    ),
    "config mistyped key": (
        edit_config(lambda c: {**c, "hidden_size": "64"}),
        "hidden_size must be an integer",
    ),
    "config not an object": (edit_config(lambda c: [c]), "config.json: expected a JSON object"),
    "config invalid json": (
        lambda d: (d / "config.json").write_text("{oops"),
        "config.json is not valid JSON",
    ),
    "index invalid json": (
        lambda d: (d / "model.safetensors.index.json").write_text("{oops"),
        "model.safetensors.index.json is not valid JSON",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CHECKPOINTS))
def test_broken_checkpoint_file(tiny_checkpoint, tmp_path, capsys, case):
    break_it, expected = BROKEN_CHECKPOINTS[case]
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    break_it(model)
    assert expected in one_error_line(capsys, decode.main, ["--model", str(model), "--prompt", "x"])


BROKEN_ADAPTERS = {
    "weights garbled": lambda d: (d / "adapter.safetensors").write_bytes(b"\xff" * 64),
    "weights truncated": lambda d: os.truncate(d / "adapter.safetensors", 100),
    "base_model not an object": lambda d: (d / "adapter_config.json").write_text(
        json.dumps({**json.loads((d / "adapter_config.json").read_text()), "base_model": 3})
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_ADAPTERS))
def test_broken_adapter_file(tiny_checkpoint, adapter_dir, tmp_path, capsys, case):
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    BROKEN_ADAPTERS[case](adapter)
    line = one_error_line(
        capsys, decode.main, ["--model", tiny_checkpoint, "--adapter", str(adapter), "--prompt", "x"]
    )
    assert str(adapter) in line


def test_adapter_of_another_base_warns_and_adapter_implies_bita(
    tiny_checkpoint, adapter_dir, tmp_path, capsys
):
    """Equal dimensions, other config.json hash: one warning line; --adapter alone decodes with BiTA."""
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    meta = json.loads((adapter / "adapter_config.json").read_text())
    meta["base_model"]["config_sha256"] = "0" * 64
    (adapter / "adapter_config.json").write_text(json.dumps(meta))
    out = tmp_path / "out.jsonl"
    argv = [
        "--model",
        tiny_checkpoint,
        "--adapter",
        str(adapter),
        "--prompt",
        "a",
        "b",
        "--max-new-tokens",
        "4",
    ]
    assert run_main(decode.main, [*argv, "--output", str(out)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "config.json differs" in warnings[0] and "Traceback" not in err
    assert "decode (bita)" in err  # BiTA ran, not AR
    assert [json.loads(line)["prompt"] for line in open(out)] == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# decode.py inputs


def test_prompts_path_is_a_directory(tiny_checkpoint, tmp_path, capsys):
    line = one_error_line(capsys, decode.main, ["--model", tiny_checkpoint, "--prompts", str(tmp_path)])
    assert "is a directory" in line


def test_prompts_file_not_utf8(tiny_checkpoint, tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    assert "not UTF-8" in one_error_line(
        capsys, decode.main, ["--model", tiny_checkpoint, "--prompts", str(path)]
    )


@pytest.mark.parametrize("where", ["directory", "missing parent", "read-only"])
def test_bad_output_refused_before_loading(tmp_path, capsys, where):
    """--output is checked first: the model path does not even exist."""
    output = {
        "directory": str(tmp_path),
        "missing parent": str(tmp_path / "no" / "out.jsonl"),
        "read-only": "/sys/bita_out.jsonl",  # sysfs refuses new files, to root too
    }[where]
    argv = ["--model", str(tmp_path / "no-model"), "--prompt", "x", "--output", output]
    assert "--output" in one_error_line(capsys, decode.main, argv)


@pytest.mark.parametrize("where", ["a file", "read-only"])
def test_bad_run_directory_refused_before_loading(tmp_path, capsys, where):
    (tmp_path / "f").write_text("x")
    output = str(tmp_path / "f") if where == "a file" else "/sys/bita_run"
    argv = ["--model", str(tmp_path / "no-model"), "--data", "d.jsonl", "--output", output, *TRAIN_FLAGS]
    assert "--output" in one_error_line(capsys, train.main, argv)


@pytest.mark.parametrize(
    "tree, expected",
    [
        ("[[320]]", "beyond the model's vocabulary"),
        ("[[0.5]]", "integer ranks"),
        ("upper:5000", "rows per step; at most"),
    ],
)
def test_bad_tree(tiny_checkpoint, adapter_dir, capsys, tree, expected):
    argv = ["--model", tiny_checkpoint, "--adapter", adapter_dir, "--prompt", "x", "--tree", tree]
    assert expected in one_error_line(capsys, decode.main, argv)


@pytest.mark.parametrize("flag", [["--adapter", "A"], ["--tree", "chain"], ["--compare"]])
def test_bita_flags_refused_in_ar_mode(tiny_checkpoint, capsys, flag):
    argv = ["--model", tiny_checkpoint, "--mode", "ar", "--prompt", "x", *flag]
    assert f"{flag[0]} is for --mode bita" in one_error_line(capsys, decode.main, argv)


def test_mesh_must_divide_heads(tiny_checkpoint, ids_data, tmp_path, capsys):
    mesh = ["--mesh", "data=1,fsdp=1,tensor=8"]  # the tiny model has 4 query and 2 KV heads
    line = one_error_line(capsys, decode.main, ["--model", tiny_checkpoint, "--prompt", "x", *mesh])
    assert "does not divide" in line
    argv = ["--model", tiny_checkpoint, "--data", ids_data, "--output", str(tmp_path / "run"), *TRAIN_FLAGS]
    assert "does not divide" in one_error_line(capsys, train.main, [*argv, *mesh])


def test_batch_size_is_clamped_to_the_prompts(tiny_checkpoint):
    import bita_jax

    model = bita_jax.load(tiny_checkpoint)
    records = model.generate(["a", "b"], max_new_tokens=2, batch_size=64)
    assert [r["prompt"] for r in records] == ["a", "b"]
    (engine,) = model._engines.values()
    assert engine.slots == 2


# ---------------------------------------------------------------------------------------------
# decode.py: no lost records


def test_existing_output_is_never_replaced(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text('{"prompt": "x", "completion": "done"}\n')
    line = one_error_line(
        capsys, decode.main, ["--model", tiny_checkpoint, "--prompt", "x", "--output", str(out)]
    )
    assert "--resume" in line and out.read_text() == '{"prompt": "x", "completion": "done"}\n'


def test_resume_keeps_finished_records_and_drops_a_torn_line(tmp_path):
    out = tmp_path / "out.jsonl"
    done = [{"prompt": "a", "completion": "1"}, {"prompt": "b", "completion": "2"}]
    out.write_text("".join(json.dumps(r) + "\n" for r in done) + '{"prompt": "c", "compl')
    records, offset = files.finished_records(str(out), ["a", "b", "c"], resume=True)
    assert records == done
    writer = files.RecordWriter(str(out), offset)
    writer.write([{"prompt": "c", "completion": "3"}])
    writer.close()
    assert [json.loads(line)["completion"] for line in open(out)] == ["1", "2", "3"]
    with pytest.raises(files.UserError, match="line 1 is not the record of prompt 1"):
        files.finished_records(str(out), ["other", "b", "c"], resume=True)


def test_full_disk_during_output_write_keeps_earlier_batches(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """ENOSPC on the second batch's write: one error line, the first batch's record stays on disk."""
    fsync = os.fsync
    calls = []

    def fsync_then_full(fd):
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync_then_full)
    out = tmp_path / "out.jsonl"
    argv = ["--model", tiny_checkpoint, "--prompt", "a", "b", "--max-new-tokens", "2", "--output", str(out)]
    assert "No space left on device" in one_error_line(capsys, decode.main, argv)
    assert json.loads(out.read_text().splitlines()[0])["prompt"] == "a"


def test_kill_9_after_first_batch_then_resume(tiny_checkpoint, tmp_path, capsys):
    """A decode killed with SIGKILL keeps every finished record; --resume decodes only the rest."""
    prompts = tmp_path / "p.jsonl"
    texts = [f"def f{i}(x):" for i in range(300)]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = tmp_path / "out.jsonl"
    argv = [
        "--model",
        tiny_checkpoint,
        "--prompts",
        str(prompts),
        "--max-new-tokens",
        "24",
        "--output",
        str(out),
    ]
    proc = subprocess.Popen(
        [sys.executable, "decode.py", *argv], cwd=ROOT, env=subprocess_env(), stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while (
        proc.poll() is None and time.time() < deadline and not (out.exists() and out.read_text().count("\n"))
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = out.read_text()
    finished = kept.count("\n")
    assert 1 <= finished < len(texts), "the run must be killed after its first batch and before its last"
    assert [json.loads(line)["prompt"] for line in kept.splitlines()[:finished]] == texts[:finished]

    assert run_main(decode.main, [*argv, "--resume"]) == 0
    assert f"resuming: {finished} of {len(texts)}" in capsys.readouterr().err
    final = out.read_text()
    assert final.startswith(kept[: kept.rindex("\n") + 1])  # finished records untouched
    assert [json.loads(line)["prompt"] for line in final.splitlines()] == texts


# ---------------------------------------------------------------------------------------------
# train.py inputs


@pytest.mark.parametrize(
    "case, edit, expected",
    [
        (
            "id beyond vocab",
            lambda r: {**r, "output_ids": [*r["output_ids"], 1000]},
            "not below the model's vocab",
        ),
        ("mask id", lambda r: {**r, "prompt_ids": [320, *r["prompt_ids"]]}, "BiTA's mask tokens"),
        ("too short", lambda r: {**r, "output_ids": r["output_ids"][:2]}, "nothing to train"),
    ],
)
def test_bad_training_data(tiny_checkpoint, ids_data, tmp_path, capsys, case, edit, expected):
    data = edited_data(ids_data, tmp_path / "d.jsonl", edit)
    argv = ["--model", tiny_checkpoint, "--data", data, "--output", str(tmp_path / "run"), *TRAIN_FLAGS]
    assert expected in one_error_line(capsys, train.main, argv)


def test_training_data_not_utf8(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes('{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"))
    argv = ["--model", tiny_checkpoint, "--data", str(data), "--output", str(tmp_path / "run"), *TRAIN_FLAGS]
    assert "not UTF-8" in one_error_line(capsys, train.main, argv)


# ---------------------------------------------------------------------------------------------
# train.py: no lost work


@pytest.fixture(scope="module")
def interrupted_run(tiny_checkpoint, ids_data, tmp_path_factory):
    """A train.py subprocess stopped by SIGINT between two saves (--save-every 1000).

    Returns (run directory, train argv, exit code, stderr, the step it stopped at).
    """
    out = str(tmp_path_factory.mktemp("run") / "run")
    argv = ["--model", tiny_checkpoint, "--data", ids_data, "--output", out, *TRAIN_FLAGS, *SMALL_DATA]
    argv += ["--steps", "1000", "--save-every", "1000"]
    proc = subprocess.Popen(
        [sys.executable, "train.py", *argv], cwd=ROOT, env=subprocess_env(), stderr=subprocess.PIPE, text=True
    )
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(metrics) and open(metrics).read().count("\n") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    step = orbax_checkpoint.manager(os.path.join(out, "checkpoints"), 2).latest_step()
    return out, argv, proc.returncode, err, step


def test_sigint_saves_a_checkpoint_and_resume_continues(interrupted_run, capsys):
    out, argv, code, err, step = interrupted_run
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 130 and "Traceback" not in err, err
    assert len(lines) == 1 and f"SIGINT at step {step}: checkpoint saved" in lines[0]
    assert step is not None and 2 <= step < 1000  # saved between the every-1000-steps saves

    target = ["--steps", str(step + 2)]
    assert run_main(train.main, [*argv, *target]) == 0
    err = capsys.readouterr().err
    assert f"resumed from step {step} of {step + 2}" in err
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == list(range(1, step + 3))  # each step once
    assert os.path.isfile(os.path.join(out, "adapter", "adapter.safetensors"))

    # Running the finished run again says so and trains nothing.
    assert run_main(train.main, [*argv, *target]) == 0
    assert "is already finished (step" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--set", "bita.num_mask_tokens=4"], "bita.num_mask_tokens 3, not 4"),
        (["--batch-size", "8"], "--batch-size 4, not 8"),
        (["--data", "OTHER"], "--data"),
        (["--model", "OTHER"], "--model"),
    ],
)
def test_resume_refuses_another_run(
    interrupted_run, tiny_checkpoint, ids_data, tmp_path, capsys, change, expected
):
    out, argv, _, _, step = interrupted_run
    if change[1] == "OTHER" and change[0] == "--data":
        change = [
            "--data",
            edited_data(ids_data, tmp_path / "d.jsonl", lambda r: {**r, "output_ids": r["output_ids"][::-1]}),
        ]
    if change[1] == "OTHER" and change[0] == "--model":
        shutil.copytree(tiny_checkpoint, tmp_path / "model")  # same config, another directory
        change = ["--model", str(tmp_path / "model")]
    assert expected in one_error_line(capsys, train.main, [*argv, *change])
    assert orbax_checkpoint.manager(os.path.join(out, "checkpoints"), 2).latest_step() >= step


def test_metrics_hold_each_step_once_after_a_kill(tmp_path):
    """kill -9 after logging steps 4 and 5 but before their checkpoint: resuming at 3 drops them."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    resume.trim_metrics(str(path), 3)
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3]


def test_full_disk_during_checkpoint_save(tiny_checkpoint, ids_data, tmp_path, capsys, monkeypatch):
    """orbax's error for a full disk (tensorstore's RESOURCE_EXHAUSTED) becomes one line."""
    import orbax.checkpoint as ocp

    def full_disk(self, step, *args, **kwargs):
        raise ValueError(
            f'RESOURCE_EXHAUSTED: Error writing "adapter" in OCDBT database at local file "{self.directory}/'
            f"{step}\": Failed to write 356 bytes to file 12: No space left on device [os_error_code='28']"
        )

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    argv = ["--model", tiny_checkpoint, "--data", ids_data, "--output", str(tmp_path / "run"), *TRAIN_FLAGS]
    line = one_error_line(capsys, train.main, [*argv, *SMALL_DATA, "--steps", "1"])
    assert "cannot write checkpoint 1" in line and "no space left on device" in line


def test_nan_loss_stops_before_a_checkpoint(tiny_checkpoint, ids_data, tmp_path, capsys):
    """A learning rate that overflows float32 makes the loss NaN after a few steps: one line, and
    with a checkpoint every step, the last one is the step before (the diverged state is never saved)."""
    out = tmp_path / "run"
    argv = ["--model", tiny_checkpoint, "--data", ids_data, "--output", str(out), *TRAIN_FLAGS, *SMALL_DATA]
    argv += ["--steps", "4", "--save-every", "1", "--set", "optimizer.learning_rate=3e38"]
    step = int(re.search(r"loss is nan at step (\d+)", one_error_line(capsys, train.main, argv)).group(1))
    assert orbax_checkpoint.manager(str(out / "checkpoints"), 2).latest_step() == (step - 1 or None)
