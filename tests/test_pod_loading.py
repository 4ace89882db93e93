"""Pod-scale loading: two processes joined by jax.distributed on 127.0.0.1 load a checkpoint onto a
mesh split in two; each reads only its devices' blocks of the files (about half) and gets the same
values as a single-process load."""

import json
import os
import subprocess
import sys

from tests.test_multihost import ROOT, free_port

# Run in each process: load sharded (tensor=2 over the two processes' one device each), count the
# bytes read from the memory-mapped files, compare every local shard with a plain local load.
WORKER = """
import json, sys
import jax
import numpy as np
jax.distributed.initialize(sys.argv[2], num_processes=2, process_id=int(sys.argv[3]))
from bita_jax.config import MeshConfig
from bita_jax.io import hf
from bita_jax.models.llama import abstract_params
from bita_jax.sharding import make_mesh, tree_shardings

read = [0]
plain_read_block = hf._read_block
def counting_read_block(tensor, *args):
    block = plain_read_block(tensor, *args)
    read[0] += block.size * tensor.dtype.itemsize
    return block
hf._read_block = counting_read_block

config = hf.load_config(sys.argv[1], scan_layers=False)
mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=2))
sharded = hf.load_params(sys.argv[1], config, tree_shardings(abstract_params(config), mesh))
sharded_bytes = read[0]
read[0] = 0
local = hf.load_params(sys.argv[1], config)  # one process's plain load onto its own device
equal = all(
    np.array_equal(np.asarray(shard.data), np.asarray(full)[shard.index])
    for s, full in zip(jax.tree.leaves(sharded), jax.tree.leaves(local), strict=True)
    for shard in s.addressable_shards
)
split = sum(not s.sharding.is_fully_replicated for s in jax.tree.leaves(sharded))
print(json.dumps({"read": sharded_bytes, "full_read": read[0], "equal": equal, "split": split,
                  "process": jax.process_index(), "devices": len(jax.devices())}))
"""


def test_each_process_reads_its_half(tiny_checkpoint, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}  # fmt: skip
    address = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), tiny_checkpoint, address, str(i)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    file_bytes = os.path.getsize(os.path.join(tiny_checkpoint, "model.safetensors"))
    for i, r in enumerate(results):
        assert r["process"] == i and r["devices"] == 2 and r["split"] > 0
        assert r["equal"]
        # The plain load reads every tensor; the sharded one about half (norms are replicated).
        assert 0.98 * file_bytes < r["full_read"] <= file_bytes
        assert 0.45 < r["read"] / r["full_read"] < 0.55, r
