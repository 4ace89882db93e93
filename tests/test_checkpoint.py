"""Orbax resume: an interrupted run continues at the right step with the same params; CLI errors."""

import json

import numpy as np
import pytest

import train
from bita_jax.cli import run_main
from bita_jax.config import BiTAConfig, DataConfig, MeshConfig, ModelConfig, TrainConfig
from bita_jax.io import orbax_checkpoint
from bita_jax.io.adapter_files import load_adapter
from bita_jax.training import loop as train_loop


@pytest.fixture(scope="module")
def ids_data(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    with open(path, "w") as f:
        for n in rng.integers(6, 30, 12):
            f.write(
                json.dumps(
                    {
                        "prompt_ids": [1, *rng.integers(3, 300, 4).tolist()],
                        "output_ids": rng.integers(3, 300, n).tolist(),
                    }
                )
                + "\n"
            )
    return str(path)


def config(model_dir, data_path, output, steps):
    return TrainConfig(
        model=model_dir,
        output=output,
        steps=steps,
        batch_size=4,
        dtype="float32",
        log_every=1,
        save_every=2,
        bita=BiTAConfig(num_prompt_tokens=2),
        data=DataConfig(path=data_path, max_groups=4, seq_buckets=(64,)),
        mesh=MeshConfig(data=2, fsdp=2, tensor=2),  # sharded save and restore
    )


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_params(tiny_checkpoint, ids_data, tmp_path, monkeypatch):
    model_cfg = ModelConfig.from_pretrained(tiny_checkpoint)
    train_loop.run(config(tiny_checkpoint, ids_data, str(tmp_path / "clean"), 6))
    _, clean = load_adapter(str(tmp_path / "clean" / "adapter"), model_cfg)

    save = orbax_checkpoint.save

    def save_then_die(mngr, step, state, position):
        save(mngr, step, state, position)
        if step == 4:
            mngr.wait_until_finished()
            raise Interrupted  # the process dies right after the step-4 checkpoint

    monkeypatch.setattr(orbax_checkpoint, "save", save_then_die)
    out = str(tmp_path / "resumed")
    with pytest.raises(Interrupted):
        train_loop.run(config(tiny_checkpoint, ids_data, out, 6))
    monkeypatch.setattr(orbax_checkpoint, "save", save)
    last = train_loop.run(config(tiny_checkpoint, ids_data, out, 6))
    assert last["step"] == 6
    steps = [json.loads(line)["step"] for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at 5, nothing repeated or skipped
    _, resumed = load_adapter(out + "/adapter", model_cfg)
    for name in clean:
        np.testing.assert_array_equal(resumed[name], clean[name])

    # A larger --steps continues from the last orbax_checkpoint.
    assert train_loop.run(config(tiny_checkpoint, ids_data, out, 8))["step"] == 8
    assert orbax_checkpoint.manager(out + "/checkpoints", 2).latest_step() == 8


def error_of(capsys, argv):
    assert run_main(train.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_clear_errors(tiny_checkpoint, ids_data, tmp_path, capsys):
    base = [
        "--model",
        tiny_checkpoint,
        "--data",
        ids_data,
        "--output",
        str(tmp_path / "o"),
        "--batch-size",
        "8",
    ]
    assert "unknown config key train.optimizer.lr" in error_of(capsys, [*base, "--set", "optimizer.lr=1"])
    assert "unknown config key train.foo" in error_of(capsys, [*base, "--set", "foo=1"])
    assert "does not fit 8 devices" in error_of(capsys, [*base, "--mesh", "data=3,fsdp=1,tensor=1"])
    assert "model directory not found" in error_of(
        capsys, ["--model", str(tmp_path / "none"), "--data", ids_data, "--output", str(tmp_path / "o")]
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_ids": [1], "output_ids": [5, 2]}\n{"prompt_ids": [1,\n')
    assert f"{bad} line 2: not valid JSON" in error_of(capsys, [*base[:2], "--data", str(bad), *base[4:]])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("bita:\n  num_mask: 3\n")
    assert "unknown config key train.bita.num_mask" in error_of(capsys, ["--config", str(yaml_file), *base])
