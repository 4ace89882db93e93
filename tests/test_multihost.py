"""Two processes joined by jax.distributed on 127.0.0.1 (CPU, gloo collectives) train a few steps."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training(tiny_checkpoint, tmp_path):
    rng = np.random.default_rng(1)
    data = tmp_path / "d.jsonl"
    with open(data, "w") as f:
        for n in rng.integers(6, 25, 8):
            f.write(
                json.dumps({"prompt_ids": [1, 7, 9], "output_ids": rng.integers(3, 300, n).tolist()}) + "\n"
            )
    port = free_port()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": ROOT,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }  # 2 processes x 2 devices
    argv = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--model",
        tiny_checkpoint,
        "--data",
        str(data),
        "--output",
        str(tmp_path / "run"),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--mesh",
        "data=2,fsdp=2,tensor=1",
        "--set",
        "log_every=1",
        "--set",
        "bita.num_prompt_tokens=2",
        "--set",
        "data.max_groups=4",
        "--set",
        "data.seq_buckets=[64]",
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
    ]
    procs = [
        subprocess.Popen(
            [*argv, "--process-id", str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    logs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in logs] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in logs)
    assert os.path.isfile(tmp_path / "run" / "adapter" / "adapter.safetensors")
