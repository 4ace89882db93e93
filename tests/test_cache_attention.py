"""The attention's cache part as a Pallas kernel (interpreted on this CPU) computes the einsums'
statistics: across slot blocks, for every layer of a stacked cache, differentiably, and per shard
under a device mesh; "auto" off TPU is the einsums themselves."""

import jax
import jax.numpy as jnp
import numpy as np

from bita_jax.config import MeshConfig
from bita_jax.models.cache_attention import (
    MASKED_SCORE,
    SLOT_BLOCK,
    cache_part,
    einsum_cache_part,
    pallas_cache_part,
)
from bita_jax.sharding import logical_sharding, make_mesh, mesh_rules

EPS = float(np.finfo(np.float32).eps)


def cache_inputs(B=4, T=6, K=2, G=3, H=8, S=2 * SLOT_BLOCK, L=2, seed=0):
    """Queries, a stacked cache and per-row lengths: 0, one slot, a block boundary, the whole cache."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32) * 3)  # noqa: E731
    length = rng.integers(0, S + 1, size=(B, T)).astype(np.int32)
    length[0, :4] = [0, 1, SLOT_BLOCK, SLOT_BLOCK + 1]
    length[1] = S
    return f(B, T, K, G, H), f(L, B, S, K, H), f(L, B, S, K, H), jnp.asarray(length)


def normalised(stats):
    m, total, o = stats
    return o / jnp.einsum("bkgt->btkg", total[..., 0])[..., None]


def test_kernel_equals_einsums_across_blocks():
    q, k, v, length = cache_inputs()
    for layer in (0, 1):
        ours = pallas_cache_part(q, k, v, length, layer, interpret=True)
        ref = einsum_cache_part(q, k, v, length, layer)
        # The kernel's q.k rounds in another order than the einsum's: a score (and so the max) may
        # differ by a few ulps of the largest score |s| (absolute), which the exponent turns into
        # the same relative error in every weight. The bound: 8 eps |s|, in both senses.
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k[layer])
        bound = 8 * EPS * float(jnp.abs(scores).max())
        np.testing.assert_allclose(ours[0], ref[0], rtol=0, atol=bound)
        np.testing.assert_allclose(ours[1], ref[1], rtol=bound)
        np.testing.assert_allclose(normalised(ours), normalised(ref), rtol=bound, atol=bound)
    # A row that sees no slot: m = MASKED_SCORE, so any other visible part outweighs it.
    assert ours[0][0, 0, 0, 0, 0] == ref[0][0, 0, 0, 0, 0] == np.float32(MASKED_SCORE)


def test_kernel_gradient_is_the_einsums():
    """Training differentiates through the queries: the kernel's backward is the einsums'."""
    q, k, v, length = cache_inputs(S=SLOT_BLOCK)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape).astype(np.float32))

    def grad(kernel):
        return jax.grad(lambda q: (normalised(cache_part(q, k, v, length, 1, kernel)) * weights).sum())(q)

    ours, ref = grad("pallas"), grad("einsum")
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * float(jnp.abs(ref).max()))


def test_auto_off_tpu_is_the_einsums():
    q, k, v, length = cache_inputs(S=SLOT_BLOCK)
    auto = jax.jit(lambda *a: cache_part(*a, 1, "auto"))(q, k, v, length)
    einsums = jax.jit(lambda *a: cache_part(*a, 1, "einsum"))(q, k, v, length)
    for a, b in zip(auto, einsums, strict=True):
        np.testing.assert_array_equal(a, b)


def test_kernel_per_shard_equals_unsharded():
    """Under a (data=2, tensor=2) mesh the kernel runs on each device's batch rows and KV heads
    (shard_map by the cache's logical axes): the same statistics as one unsharded call."""
    q, k, v, length = cache_inputs(S=SLOT_BLOCK)
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    placed = (
        jax.device_put(q, logical_sharding(("batch", None, "kv_heads", None, None), mesh)),
        jax.device_put(
            k, logical_sharding(("layers", "cache_batch", "cache_seq", "cache_kv_heads", None), mesh)
        ),
        jax.device_put(
            v, logical_sharding(("layers", "cache_batch", "cache_seq", "cache_kv_heads", None), mesh)
        ),
        jax.device_put(length, logical_sharding(("batch", None), mesh)),
    )
    with mesh_rules(mesh):
        sharded = jax.jit(lambda *a: cache_part(*a, 1, "pallas"))(*placed)
    unsharded = jax.jit(lambda *a: cache_part(*a, 1, "pallas"))(q, k, v, length)
    for a, b in zip(sharded, unsharded, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
