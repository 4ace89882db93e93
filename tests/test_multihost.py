"""Two processes joined by jax.distributed on 127.0.0.1 (CPU, gloo collectives) train as one process does."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from bita_jax.cli import train
from bita_jax.io import adapter_files, hf
from bita_jax.training import loop as train_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, train_loop.METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


def test_two_processes_train_as_one_process(tiny_checkpoint, tmp_path):
    """The same run (data, seed, mesh data=2 x fsdp=2) on 2 processes x 2 devices and on 1 process x
    4 devices: the same losses, mask accuracies and saved adapter.

    The data is one global batch of 4 examples, so every step of both runs trains on all of them
    (each host on its half: lines 0, 2 and 1, 3). Responses of 6-14 tokens + EOS have at most 12
    group offsets, all used (data.max_groups=12), so no random mask window depends on which host
    holds an example or at which index.
    """
    rng = np.random.default_rng(1)
    data = tmp_path / "d.jsonl"
    with open(data, "w") as f:
        for n in rng.integers(6, 15, 4):
            f.write(
                json.dumps({"prompt_ids": [1, 7, 9], "output_ids": rng.integers(3, 300, n).tolist()}) + "\n"
            )
    common = ["--model", tiny_checkpoint, "--data", str(data), "--steps", "3", "--batch-size", "4"]
    common += [
        "--mesh",
        "data=2,fsdp=2,tensor=1",
        "--set",
        "log_every=1",
        "--set",
        "bita.num_prompt_tokens=2",
    ]
    common += ["--set", "data.max_groups=12", "--set", "data.seq_buckets=[64]"]
    port = free_port()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": ROOT,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }  # 2 processes x 2 devices
    argv = [sys.executable, os.path.join(ROOT, "train.py"), *common, "--output", str(tmp_path / "two")]
    argv += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
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
    # Meanwhile the one-process run, here: the mesh takes the first 4 of this process's 8 devices.
    assert train.main([*common, "--output", str(tmp_path / "one")]) == 0
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

    two, one = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in one)
    # Both runs sum the same rows in float32 in another order (the rows sit on other devices and each
    # process permutes its half apart), so every sum (a few hundred label terms, vocabulary-wide
    # softmaxes) may differ by a few ulps: losses at 1e-5 relative. Adam divides by sqrt(v): an
    # entry whose gradient cancels to near zero moves by up to lr = 3e-2 whatever its last bits, so
    # the adapter is compared at 1e-5 absolute (3e-4 of one step) beside 1e-4 relative, as
    # tests/test_train_sharding.py compares mesh layouts. (Observed: losses within 1 ulp, the
    # adapter within 2e-7.)
    for a, b in zip(two, one, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["mask_acc"], b["mask_acc"], atol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    model_cfg = hf.load_config(tiny_checkpoint)
    bita_two, adapter_two = adapter_files.load_adapter(
        str(tmp_path / "two" / train_loop.ADAPTER_DIR), model_cfg
    )
    bita_one, adapter_one = adapter_files.load_adapter(
        str(tmp_path / "one" / train_loop.ADAPTER_DIR), model_cfg
    )
    assert bita_two == bita_one
    print("max |two - one|:", {k: float(np.abs(adapter_two[k] - adapter_one[k]).max()) for k in adapter_one})
    for name in adapter_one:
        np.testing.assert_allclose(adapter_two[name], adapter_one[name], rtol=1e-4, atol=1e-5, err_msg=name)
