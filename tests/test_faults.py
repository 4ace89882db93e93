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
    run = {"model": "m", "max_new_tokens": 2}
    done = [{"prompt": p, "output_ids": [i], "run": run} for i, p in enumerate("ab")]
    out.write_text("".join(json.dumps(r) + "\n" for r in done) + '{"prompt": "c", "outp')
    with files.ResultsFile(str(out), ["a", "b", "c"], resume=True) as results:
        assert results.records == done
        results.check(run)
        results.write([{"prompt": "c", "output_ids": [2]}], run)
    assert [json.loads(line)["output_ids"] for line in open(out)] == [[0], [1], [2]]
    with pytest.raises(files.UserError, match="line 1 is not the record of prompt 1"):
        files.ResultsFile(str(out), ["other", "b", "c"], resume=True).__enter__()


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
    """A second run on a busy output is refused; a decode killed with SIGKILL keeps every finished
    record; --resume decodes only the rest."""
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
    # A second run on the same output while the first writes: one line naming the first, nothing
    # written by it (the first run's records only grow).
    before = out.read_text()
    line = one_error_line(capsys, decode.main, argv)
    assert proc.poll() is None, "the first run must still be writing"
    assert f"--output {out} is in use by another run (pid {proc.pid}: " in line and "decode.py" in line
    assert out.read_text().startswith(before)
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
    data.write_text('{"prompt": "ok", "completion": "x"}\n{"prompt": "caf\\udce9", "completion": "x"}\n')
    assert f"{data} line 2: 'prompt' holds invalid Unicode" in one_error_line(capsys, train.main, argv)


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


# ---------------------------------------------------------------------------------------------
# One writer per output


def test_busy_output_refused_before_loading(tmp_path, capsys):
    """The output is locked by another open file (as by another run): one line naming this
    process as its holder; the model path does not even exist, so nothing was loaded."""
    from bita_jax.io import lock

    out = tmp_path / "out.jsonl"
    with lock.exclusive(str(out), "test"):
        argv = ["--model", str(tmp_path / "no-model"), "--prompt", "x", "--output", str(out)]
        line = one_error_line(capsys, decode.main, argv)
    assert f"--output {out} is in use by another run (pid {os.getpid()}: " in line
    assert out.read_text() == ""


def test_busy_run_directory_refused(tmp_path, capsys):
    """train.py and the tuner hold their run directory (the tuner: the adapter it writes
    trees.json into) for the whole run; a second run is refused before loading."""
    from bita_jax.cli import tune
    from bita_jax.io import lock

    run = tmp_path / "run"
    run.mkdir()
    with lock.exclusive(str(run), "test", directory=True):
        argv = ["--model", str(tmp_path / "no-model"), "--data", "d.jsonl", "--output", str(run)]
        assert f"--output {run} is in use by another run (pid {os.getpid()}" in one_error_line(
            capsys, train.main, argv
        )
        argv = ["--model", str(tmp_path / "no-model"), "--adapter", str(run), "--data", "d.jsonl"]
        argv += ["--output-dir", str(tmp_path / "tune")]
        assert f"--adapter {run} is in use by another run" in one_error_line(capsys, tune.main, argv)


# ---------------------------------------------------------------------------------------------
# --resume checks what it resumes


@pytest.fixture(scope="module")
def partial_output(tiny_checkpoint, tmp_path_factory):
    """(prompts file, output holding the records of its first 2 of 3 prompts, the decode argv)."""
    root = tmp_path_factory.mktemp("resume")
    prompts, out = root / "p.jsonl", root / "out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["def f(x):", "import os", "x = 1"]))
    argv = ["--model", tiny_checkpoint, "--max-new-tokens", "3", "--batch-size", "2"]
    two = root / "two.jsonl"
    two.write_text("".join(prompts.read_text().splitlines(keepends=True)[:2]))
    assert run_main(decode.main, [*argv, "--prompts", str(two), "--output", str(out)]) == 0
    return str(prompts), str(out), [*argv, "--prompts", str(prompts)]


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--max-new-tokens", "4"], "--max-new-tokens 3, not 4"),
        (["--temperature", "0.7"], "--temperature 0.0, not 0.7"),
        (["--chat"], "--chat false, not true"),
        (["--dtype", "bfloat16"], "--dtype float32, not bfloat16"),
        (["--adapter", "ADAPTER"], "--adapter (fingerprint) none, not "),
        (["--model", "OTHER"], "--model (weights fingerprint) "),
    ],
)
def test_resume_refuses_records_of_another_run(
    partial_output, tiny_checkpoints, adapter_dir, tmp_path, capsys, change, expected
):
    _, made, argv = partial_output
    out = tmp_path / "out.jsonl"
    shutil.copy(made, out)
    change = [{"ADAPTER": adapter_dir, "OTHER": tiny_checkpoints["plain_mha"]}.get(c, c) for c in change]
    line = one_error_line(capsys, decode.main, [*argv, *change, "--output", str(out), "--resume"])
    assert line.startswith(f"error: --resume: {out} line 1 was made with {expected}"), line
    assert out.read_text() == open(made).read()


def test_resume_with_the_same_run_appends(partial_output, tmp_path, capsys):
    _, made, argv = partial_output
    out = tmp_path / "out.jsonl"
    shutil.copy(made, out)
    assert run_main(decode.main, [*argv, "--output", str(out), "--resume"]) == 0
    assert "resuming: 2 of 3" in capsys.readouterr().err
    records = [json.loads(line) for line in open(out)]
    assert [r["prompt"] for r in records] == ["def f(x):", "import os", "x = 1"]
    assert len({json.dumps(r["run"], sort_keys=True) for r in records}) == 1


def test_resume_refuses_lines_that_are_not_results(partial_output, tmp_path, capsys):
    """The prompts file as its own --output is refused; prompt-only lines are not finished records
    (a --resume that counted them would decode nothing and exit 0)."""
    prompts, _, argv = partial_output
    line = one_error_line(capsys, decode.main, [*argv, "--output", prompts, "--resume"])
    assert "is the --prompts file" in line
    copy = tmp_path / "copy.jsonl"
    shutil.copy(prompts, copy)
    line = one_error_line(capsys, decode.main, [*argv, "--output", str(copy), "--resume"])
    assert "line 1 is not a finished decode.py record (no output_ids" in line


# ---------------------------------------------------------------------------------------------
# Options mean what they say


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--top-p", "0.9"], "--top-p is for sampling, but --temperature is 0"),
        (["--top-k", "5"], "--top-k is for sampling"),
        (["--seed", "3"], "--seed is for sampling"),
        (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
        (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
        (["--temperature", "1", "--top-p", "nan"], "--top-p must be a finite number"),
        (["--prompt", "PROMPTS"], "names a file: to decode its prompts, use --prompts"),
        (["--prompt", "a", ""], "--prompt 2 is empty"),
        (["--prompt", "   "], "--prompt 1 is only whitespace"),
    ],
)
def test_options_that_would_mean_nothing(tmp_path, capsys, flags, expected):
    """Refused before the model is loaded (its path does not exist)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    flags = [str(prompts) if f == "PROMPTS" else f for f in flags]
    argv = ["--model", str(tmp_path / "no-model"), *(["--prompt", "x"] if "--prompt" not in flags else [])]
    line = one_error_line(capsys, decode.main, [*argv, *flags])
    assert expected in line, line


def test_empty_prompt_refused_on_every_model(tiny_checkpoint, tmp_path, capsys):
    """The tiny model's tokenizer adds BOS (an empty prompt would still be one token): refused as
    text, so no model's tokenizer decides."""
    import bita_jax
    from bita_jax.errors import PromptError

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n\n{"prompt": ""}\n')
    line = one_error_line(capsys, decode.main, ["--model", tiny_checkpoint, "--prompts", str(prompts)])
    assert f"{prompts} line 3: the prompt is empty" in line
    with pytest.raises(PromptError, match=r"prompts\[1\] is empty"):
        bita_jax.load(tiny_checkpoint).generate(["a", ""], max_new_tokens=2)


def test_output_dash_is_stdout(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--model", tiny_checkpoint, "--prompt", "a", "--max-new-tokens", "2", "--output", "-"]
    assert run_main(decode.main, argv) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["prompt"] == "a"
    assert not os.path.exists(tmp_path / "-")


def test_api_inputs(tiny_checkpoint):
    """A bare string is refused (not one prompt per character); [] gives []; a lone surrogate is
    named by its index; greedy records do not claim unused sampling options."""
    import bita_jax
    from bita_jax.errors import ConfigError, PromptError

    model = bita_jax.load(tiny_checkpoint)
    with pytest.raises(ConfigError, match="prompts must be a list of strings, got str"):
        model.generate("def f(x):", max_new_tokens=2)
    assert model.generate([], max_new_tokens=2) == []
    with pytest.raises(PromptError, match=r"prompts\[1\] holds invalid Unicode"):
        model.generate(["a", "b\ud800"], max_new_tokens=2)
    with pytest.raises(ConfigError, match="temperature must be a finite number"):
        model.generate(["a"], max_new_tokens=2, temperature=float("inf"))
    with pytest.warns(UserWarning, match="top_p, seed ignored: temperature 0"):
        (record,) = model.generate(["a"], max_new_tokens=2, top_p=0.5, seed=3)
    assert record["temperature"] == 0.0 and not {"top_k", "top_p", "seed"} & set(record)


# ---------------------------------------------------------------------------------------------
# No tracebacks, and messages that name the culprit


def test_lone_surrogate_in_prompts_file(tmp_path, capsys):
    """Valid JSON ("\\ud800"), invalid Unicode: refused, with its line, before anything is decoded
    (so no valid prompt is lost: none was started)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "bad \\ud800"}\n')
    argv = ["--model", str(tmp_path / "no-model"), "--prompts", str(prompts)]
    line = one_error_line(capsys, decode.main, argv)
    assert f"{prompts} line 2: the prompt holds invalid Unicode (lone surrogate" in line


def test_too_long_prompt_named_by_its_line(tiny_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n' + json.dumps({"prompt": "x " * 2000}) + "\n")
    line = one_error_line(capsys, decode.main, ["--model", tiny_checkpoint, "--prompts", str(prompts)])
    assert f"prompt 2 ({prompts} line 2) has " in line and "exceeds the model's" in line


def test_unavailable_platform():
    """JAX_PLATFORMS naming a platform this machine lacks: one line naming it and those available."""
    env = {**subprocess_env(), "JAX_PLATFORMS": "cuda"}
    argv = [sys.executable, "decode.py", "--model", "bita_jax/demo/model", "--prompt", "x"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: JAX_PLATFORMS=cuda: JAX cannot start it here")
    assert "available here: cpu" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_missing_tokenizer_file_named(tiny_checkpoint, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    os.remove(model / "tokenizer.json")
    line = one_error_line(capsys, decode.main, ["--model", str(model), "--prompt", "x"])
    assert "tokenizer.json is missing" in line


def test_max_length_named_when_it_cut_the_data(tiny_checkpoint, ids_data, tmp_path, capsys):
    argv = ["--model", tiny_checkpoint, "--data", ids_data, "--output", str(tmp_path / "run"), *TRAIN_FLAGS]
    line = one_error_line(capsys, train.main, [*argv, "--set", "data.max_length=8"])
    assert "once data.max_length=8 cut prompt + response (8 of 8 examples reach it" in line


def test_trees_json_read_only_for_tree_auto(tiny_checkpoint, adapter_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    (adapter / "trees.json").write_text("{oops")
    argv = ["--model", tiny_checkpoint, "--adapter", str(adapter), "--prompt", "x", "--max-new-tokens", "2"]
    assert run_main(decode.main, [*argv, "--tree", "upper:2"]) == 0
    capsys.readouterr()
    assert "trees.json" in one_error_line(capsys, decode.main, argv)  # --tree auto reads it


def string_values(value):
    """Every string value (not key) inside parsed JSON."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from string_values(v)
    elif isinstance(value, list):
        for v in value:
            yield from string_values(v)


def test_no_build_paths_shipped():
    """The packaged demo names no directory of the machine it was built on: no JSON value is an
    absolute path of two or more components (a lone "/" is a vocabulary entry of the tokenizer)."""
    demo = os.path.join(ROOT, "bita_jax", "demo")
    absolute = re.compile(r"^(/[^/\s]+){2,}/?$|^[A-Za-z]:\\")
    for directory, _, names in os.walk(demo):
        for name in names:
            if name.endswith(".json"):
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    found = [v for v in string_values(json.load(f)) if absolute.search(v)]
                assert not found, (name, found[:3])