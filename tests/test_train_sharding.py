"""A train step on a 2x2x2 (data, fsdp, tensor) mesh of 8 fake CPU devices equals the 1-device step."""

import jax
import jax.numpy as jnp
import numpy as np

from bita_jax.bita import adapter as bita_adapter
from bita_jax.config import BiTAConfig, DataConfig, MeshConfig, OptimizerConfig
from bita_jax.io import hf
from bita_jax.sharding import LOGICAL_AXIS_RULES, make_mesh
from bita_jax.training import data
from bita_jax.training import loop as train_loop
from bita_jax.training import step as train_step
from bita_jax.training.optimizer import make_optimizer

BITA = BiTAConfig(num_prompt_tokens=4, num_mask_tokens=3, prefix_dropout=0.1)


def run_steps(model_dir, mesh, batches, num_steps=2):
    cfg = hf.load_config(model_dir)
    optimizer, schedule = make_optimizer(OptimizerConfig(grad_accum=2), 10)
    adapter = bita_adapter.init_adapter(cfg, BITA, jax.random.key(0))
    sh = train_step.step_shardings(cfg, optimizer, adapter, mesh, LOGICAL_AXIS_RULES)
    params = hf.load_params(model_dir, cfg, sh.base)
    adapter = jax.device_put(adapter, sh.state.adapter)
    state = train_step.TrainState(
        jax.device_put(jnp.zeros((), jnp.int32), sh.state.step),
        adapter,
        jax.jit(optimizer.init, out_shardings=sh.state.opt_state)(adapter),
    )
    step = train_step.make_train_step(cfg, BITA, optimizer, schedule, 8 * 3, 0, sh)
    program = step.lower(state, params, train_loop.global_batch(batches[0], 2, sh.batch)).as_text()
    metrics = []
    for b in batches[:num_steps]:
        state, m = step(state, params, train_loop.global_batch(b, 2, sh.batch))
        metrics.append(jax.device_get(m))
    return state, metrics, program


def test_2x2x2_mesh_matches_one_device(tiny_checkpoint):
    cfg = hf.load_config(tiny_checkpoint)
    rng = np.random.default_rng(0)
    examples = [
        data.Example(tuple(rng.integers(3, 300, 5)), tuple(rng.integers(3, 300, n)) + (2,))
        for n in (12, 20, 9, 30, 15, 7, 25, 18)
    ]
    stream = data.BatchStream(examples, 8, 1, DataConfig(max_groups=8), cfg.vocab_size, 3, 0)
    batches = [data.collate(stream.sequences(e, 0), 64, cfg.pad_id) for e in range(2)]
    one_state, one, _ = run_steps(tiny_checkpoint, make_mesh(MeshConfig(data=1), jax.devices()[:1]), batches)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    many_state, many, program = run_steps(tiny_checkpoint, mesh, batches)
    # The model's activation constraints are live in the step: hidden states [B, T, D] are pinned
    # to the batch axes (the embeddings and every layer's output).
    assert "sharding_constraint" in program and '[{"data", "fsdp"}, {}, {}]' in program
    # The base really is sharded (fsdp on embed, tensor on heads), the batch over data x fsdp.
    assert many_state.adapter["prefix_keys"].sharding.spec == jax.sharding.PartitionSpec(
        None, None, "tensor", None
    )
    # float32 throughout; only the reduction order differs between layouts.
    for a, b in zip(one, many, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["mask_acc"], b["mask_acc"], atol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    # Adam divides by sqrt(v): a near-zero gradient entry whose f32 sum order differs still moves
    # by up to lr = 3e-2, so params are compared at 1e-5 absolute (3e-4 of one step's size).
    for name in one_state.adapter:
        np.testing.assert_allclose(
            np.asarray(one_state.adapter[name]), np.asarray(many_state.adapter[name]), rtol=1e-4, atol=1e-5
        )
