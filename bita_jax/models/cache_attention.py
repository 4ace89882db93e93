"""The cache part of `layers.attend`: einsums everywhere, one fused Pallas kernel on TPU.

`layers.attend` splits attention into the committed cache, the step's own rows and the BiTA prefix,
and merges the parts by log-sum-exp. Written with einsums, the cache part stores its float32
scores [B, K, G, T, S] in HBM and reads them back for the max, the exponent and the value
contraction: with the T = 52 rows of a tree step that traffic is most of what a tree step reads
beyond an AR step (docs/performance-tpu.md). This kernel streams the cache through VMEM in blocks
of slots, keeps the scores on chip and carries the running max, sum and output from block to block
(online softmax), so the cache is read once and nothing of size T x S leaves the core.

It returns the same three statistics as the einsum version, (max m, sum of exp(s - m), unnormalised
output), so the merge is unchanged; the values differ from the einsum version's within float32
rounding (the exponent is rescaled block by block). Each query row is computed on its own, so a
row's result does not depend on how many rows the step has: a tree step's verified rows equal the
AR step's.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding, PartitionSpec

# Finite, so a row that sees no key yields a uniform (ignored) distribution instead of NaN.
MASKED_SCORE = -1e30
SLOT_BLOCK = 512  # cache slots per kernel grid step: k and v blocks of 512 x K x H, double-buffered


def masked_exp(scores: jax.Array, visible: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One part's softmax statistics: scores [B, K, G, T, S] float32, visible broadcastable to them.

    Returns (max m [B, K, G, T, 1], exp(scores - m) [B, K, G, T, S], their sum [B, K, G, T, 1]).
    A row that sees no key of the part gets m = MASKED_SCORE, so the merge weighs the part 0 as
    soon as any other part has a visible key. The max only shifts the exponent (the merged result
    does not depend on it), so no gradient flows through it.
    """
    scores = jnp.where(visible, scores, MASKED_SCORE)
    m = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    e = jnp.exp(scores - m)
    return m, e, jnp.sum(e, axis=-1, keepdims=True)


def einsum_cache_part(
    q: jax.Array, k: jax.Array, v: jax.Array, length: jax.Array, layer: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The cache part with einsums (XLA): `cache_part`'s arguments and statistics.

    The length mask is an iota compare fused into the scores, never a [B, T, S] tensor; the
    layer's slice of the cache is fused into the contractions.
    """
    k, v = k[layer], v[layer]
    slots = jnp.arange(k.shape[1], dtype=jnp.int32)
    visible = slots < length[:, None, None, :, None]  # [B, 1, 1, T, S]
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    m, e, total = masked_exp(scores, visible)
    return m, total, jnp.einsum("bkgts,bskh->btkgh", e.astype(q.dtype), v, preferred_element_type=jnp.float32)


def _kernel(length_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, m_acc, l_acc, o_acc, *, slot_block):
    """One (sequence, slot block) grid step over every KV head.

    Refs: length [R, 1] int32, q [K, R, H], k and v [slot_block, K, H] (of one layer); outputs
    o [K, R, H] f32, m and l [K, R, 1] f32 (written at the last slot block); VMEM accumulators of
    the same shapes. R = T * G query rows per KV head.
    """
    block = pl.program_id(1)

    @pl.when(block == 0)
    def _init():
        m_acc[...] = jnp.full(m_acc.shape, MASKED_SCORE, jnp.float32)
        l_acc[...] = jnp.zeros(l_acc.shape, jnp.float32)
        o_acc[...] = jnp.zeros(o_acc.shape, jnp.float32)

    rows = q_ref.shape[1]
    slots = block * slot_block + jax.lax.broadcasted_iota(jnp.int32, (rows, slot_block), 1)
    visible = slots < length_ref[...]  # [R, slot_block]
    for head in range(q_ref.shape[0]):  # static: the chip's KV heads
        q, k, v = q_ref[head], k_ref[:, head, :], v_ref[:, head, :]  # [R, H], [S_b, H], [S_b, H]
        scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        scores = jnp.where(visible, scores, MASKED_SCORE)  # [R, S_b]
        m_old = m_acc[head]  # [R, 1]
        m_new = jnp.maximum(m_old, jnp.max(scores, axis=1, keepdims=True))
        e = jnp.exp(scores - m_new)
        rescale = jnp.exp(m_old - m_new)
        m_acc[head] = m_new
        l_acc[head] = rescale * l_acc[head] + jnp.sum(e, axis=1, keepdims=True)
        o_acc[head] = rescale * o_acc[head] + jnp.dot(
            e.astype(v.dtype), v, preferred_element_type=jnp.float32
        )

    @pl.when(block == pl.num_programs(1) - 1)
    def _store():
        o_ref[...], m_ref[...], l_ref[...] = o_acc[...], m_acc[...], l_acc[...]


def pallas_cache_part(
    q: jax.Array, k: jax.Array, v: jax.Array, length: jax.Array, layer: int, interpret: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The cache part as one Pallas kernel: `cache_part`'s arguments and statistics.

    The kernel is given the whole cache and reads the layer's blocks in place (a sliced operand
    would be copied first). interpret: run the kernel in Pallas' interpreter (any backend;
    compiled, it needs a TPU). S must be at most SLOT_BLOCK or a multiple of it.
    """
    B, T, K, G, H = q.shape
    S = k.shape[2]
    slot_block = min(S, SLOT_BLOCK)
    R = T * G
    q_rows = q.transpose(0, 2, 1, 3, 4).reshape(B, K, R, H)  # row r = t * G + g
    length_rows = jnp.repeat(length.astype(jnp.int32), G, axis=1)[..., None]  # [B, R, 1]
    stats = jax.ShapeDtypeStruct((B, K, R, 1), jnp.float32)
    per_sequence = lambda b, s: (b, 0, 0, 0)  # noqa: E731
    slot_blocks = lambda b, s: (layer, b, s, 0, 0)  # noqa: E731
    o, m, total = pl.pallas_call(
        functools.partial(_kernel, slot_block=slot_block),
        grid=(B, S // slot_block),
        in_specs=[
            pl.BlockSpec((None, R, 1), lambda b, s: (b, 0, 0)),
            pl.BlockSpec((None, K, R, H), per_sequence),
            pl.BlockSpec((None, None, slot_block, K, H), slot_blocks),
            pl.BlockSpec((None, None, slot_block, K, H), slot_blocks),
        ],
        out_specs=[
            pl.BlockSpec((None, K, R, H), per_sequence),
            pl.BlockSpec((None, K, R, 1), per_sequence),
            pl.BlockSpec((None, K, R, 1), per_sequence),
        ],
        out_shape=[jax.ShapeDtypeStruct((B, K, R, H), jnp.float32), stats, stats],
        scratch_shapes=[pltpu.VMEM((K, R, 1), jnp.float32)] * 2 + [pltpu.VMEM((K, R, H), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        # What the kernel moves: the cache once, the queries, the statistics (the compiler cannot
        # see into a kernel; its cost analysis adds this estimate to the step's).
        cost_estimate=pl.CostEstimate(
            flops=4 * B * K * R * S * H,
            transcendentals=B * K * R * S,
            bytes_accessed=2 * k[0].nbytes + q.nbytes + B * K * R * (H + 2) * 4,
        ),
        interpret=interpret,
    )(length_rows, q_rows, k, v)
    to_stats = lambda x: x.reshape(B, K, T, G, 1).transpose(0, 1, 3, 2, 4)  # noqa: E731
    return to_stats(m), to_stats(total), o.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _differentiable_pallas_part(q, k, v, length, layer, interpret):
    """The kernel forward; gradients (training) from the einsum version, which computes the same
    function (the kernel has no backward of its own)."""
    return pallas_cache_part(q, k, v, length, layer, interpret)


def _pallas_forward(q, k, v, length, layer, interpret):
    return pallas_cache_part(q, k, v, length, layer, interpret), (q, k, v, length)


def _pallas_backward(layer, interpret, residuals, cotangents):
    del interpret
    return jax.vjp(functools.partial(einsum_cache_part, layer=layer), *residuals)[1](cotangents)


_differentiable_pallas_part.defvjp(_pallas_forward, _pallas_backward)


def _cache_axes() -> tuple:
    """The mesh axes (or None) of the cache's batch, slot, KV-head and head-dim axes, by the
    logical-axis rules in force."""
    return tuple(nn.logical_to_mesh_axes(("cache_batch", "cache_seq", "cache_kv_heads", "cache_head_dim")))


def _kv_heads_per_shard(k: jax.Array) -> int:
    """KV heads of the cache k [L, B, S, K, H] on each device of the context mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return k.shape[3]
    return NamedSharding(mesh, PartitionSpec(None, *_cache_axes())).shard_shape(k.shape)[3]


def _per_shard(fn):
    """fn mapped over the shards of the context mesh (the cache's batch and KV-head shards, by the
    logical-axis rules in force); None where the rules shard the cache's slots or head dim, which
    the kernel needs whole. Without a mesh, fn itself."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn
    batch, slots, heads, head_dim = _cache_axes()
    if slots is not None or head_dim is not None:
        return None
    rows = PartitionSpec(batch, None, heads, None, None)  # q and o [B, T, K, G, H]
    stats = PartitionSpec(batch, heads, None, None, None)  # m, total [B, K, G, T, 1]
    cache = PartitionSpec(None, batch, None, heads, None)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(rows, cache, cache, PartitionSpec(batch, None)),
        out_specs=(stats, stats, rows),
        check_vma=False,
    )


def cache_part(
    q: jax.Array, k: jax.Array, v: jax.Array, length: jax.Array, layer: int, kernel: str = "auto"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Length-masked attention over the committed cache, as softmax statistics.

    Args:
      q: [B, T, K, G, H] queries, already scaled and rotated.
      k, v: [L, B, S, K, H] the cache, of which layer `layer` (a Python int) is attended.
      length: [B, T] int32, row t of sequence b sees slots s < length[b, t].
      kernel: `ModelConfig.attention_kernel`: "auto" = the kernel where the step is compiled for
        TPU and each device holds a multiple of 8 KV heads, einsums elsewhere; "einsum";
        "pallas" everywhere (off TPU interpreted). The kernel needs S <= SLOT_BLOCK or a
        multiple of it and a cache sharded over batch and KV heads only; otherwise the einsums
        run.

    Returns:
      (m [B, K, G, T, 1], total [B, K, G, T, 1], o [B, T, K, G, H]), all float32: the row's largest
      visible score, the sum of exp(score - m) over its visible slots and the exp-weighted sum of
      values. A row that sees no slot gets m = MASKED_SCORE (the merge weighs its part 0).
    """
    S = k.shape[2]
    einsums = functools.partial(einsum_cache_part, layer=layer)
    # With KV heads per device not a multiple of the 8-row tile, XLA:TPU lays the cache out with
    # the heads outside the slots and would copy it whole into the kernel's layout: "auto" keeps
    # the einsums there (LLaMA-2-13B on 4 chips: 10 heads each; docs/performance-tpu.md).
    tiled = _kv_heads_per_shard(k) % 8 == 0
    if kernel not in ("auto", "pallas") or S % min(S, SLOT_BLOCK) or (kernel == "auto" and not tiled):
        return einsums(q, k, v, length)
    on_tpu = _per_shard(functools.partial(_differentiable_pallas_part, layer=layer, interpret=False))
    if on_tpu is None:
        return einsums(q, k, v, length)
    elsewhere = (
        _per_shard(functools.partial(_differentiable_pallas_part, layer=layer, interpret=True))
        if kernel == "pallas"
        else einsums
    )
    return jax.lax.platform_dependent(q, k, v, length, tpu=on_tpu, default=elsewhere)
