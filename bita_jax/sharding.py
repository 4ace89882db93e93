"""Device mesh and the one logical-axis rules table that maps every param, cache and batch axis.

Params declare logical axis names where they are created (`nn.with_logical_partitioning`); this
module resolves them to mesh axes. Nothing else writes a PartitionSpec by hand.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bita_jax.config import ConfigError, MeshConfig, ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]

# Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
LOGICAL_AXIS_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("prompt", None),
    ("mask", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_seq", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
)


def rules_from_overrides(overrides: dict[str, Any] | None) -> Rules:
    """The default rules with entries replaced from a YAML mapping {logical: mesh axis/list/null}."""
    rules = dict(LOGICAL_AXIS_RULES)
    for name, target in (overrides or {}).items():
        if name not in rules:
            raise ConfigError(f"unknown logical axis {name!r} in sharding rules (known: {sorted(rules)})")
        targets = target if isinstance(target, (list, tuple)) else [target]
        for t in targets:
            if t is not None and t not in MESH_AXES:
                raise ConfigError(f"sharding rule {name}: {t!r} is not a mesh axis {MESH_AXES}")
        rules[name] = tuple(target) if isinstance(target, list) else target
    check_rules(tuple(rules.items()))
    return tuple(rules.items())


def check_rules(rules: Rules) -> None:
    """Refuses tables where one param's logical axes would reuse a mesh axis (collision check)."""
    groups = [
        ("embed", "q_heads", "head_dim"),
        ("embed", "kv_heads", "head_dim"),
        ("q_heads", "head_dim", "embed"),
        ("embed", "mlp"),
        ("vocab", "embed"),
        ("cache_batch", "cache_seq", "cache_kv_heads", "cache_head_dim"),
        # Not activations ("batch", "seq", "embed"): under FSDP batch and embed both name `fsdp`,
        # and flax resolves that by rule order (batch first, embed left unsharded), as intended.
    ]
    table = dict(rules)
    for group in groups:
        used: list[str] = []
        for name in group:
            target = table.get(name)
            for t in target if isinstance(target, tuple) else [target]:
                if t is not None and t in used:
                    raise ConfigError(f"sharding rules map two axes of {group} to mesh axis {t!r}")
                if t is not None:
                    used.append(t)


def check_platform() -> None:
    """Refuses in one line a JAX_PLATFORMS that JAX cannot start here, naming the platforms this
    JAX installation has (JAX's own error for an absent GPU can be a bare AssertionError)."""
    try:
        jax.devices()
    except (RuntimeError, AssertionError) as e:
        from jax._src import xla_bridge

        asked = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "(default)"
        available = []
        for name, registration in sorted(getattr(xla_bridge, "_backend_factories", {}).items()):
            try:  # only on this error path: start each platform this JAX knows, to list those that run
                registration.factory()
                available.append(name)
            except Exception:  # noqa: BLE001 - a platform that fails to start in any way is absent
                continue
        reason = str(e).split(":")[0] if str(e) else "no such device"
        raise ConfigError(
            f"JAX_PLATFORMS={asked}: JAX cannot start it here ({reason}); available here: "
            f"{', '.join(available) or 'none'} (unset JAX_PLATFORMS to use them)"
        ) from None


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh over all (or the given) devices.

    On a single host a mesh smaller than the device count uses the first devices; across hosts
    the mesh must cover every device.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = [config.data, config.fsdp, config.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError("at most one mesh axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ConfigError(
            f"mesh data={sizes[0]},fsdp={sizes[1]},tensor={sizes[2]} does not fit {len(devices)} devices"
        )
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) < len(devices) and jax.process_count() == 1:
        # A smaller mesh on one host takes the first devices (e.g. a 1-device reference run).
        devices = devices[: math.prod(sizes)]
    if math.prod(sizes) != len(devices):
        raise ConfigError(
            f"mesh data={sizes[0]},fsdp={sizes[1]},tensor={sizes[2]} needs {math.prod(sizes)} devices, "
            f"have {len(devices)}"
        )
    # Auto axes: shardings come from the rules via in/out shardings and GSPMD propagation
    # (jax.make_mesh defaults to Explicit axes, which would demand out_sharding on every gather).
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def check_mesh_fits(config: ModelConfig, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> None:
    """Refuses a mesh whose axes do not divide the model dimensions they shard (e.g. tensor vs KV heads)."""
    dims = {
        "q_heads": ("attention heads", config.num_heads),
        "kv_heads": ("KV heads", config.num_kv_heads),
        "mlp": ("intermediate_size", config.intermediate_size),
        "vocab": ("vocab_size", config.vocab_size),
        "embed": ("hidden_size", config.hidden_size),
    }
    table = dict(rules)
    for logical, (label, size) in dims.items():
        target = table.get(logical)
        axes = [a for a in (target if isinstance(target, tuple) else (target,)) if a is not None]
        ways = math.prod(mesh.shape[a] for a in axes)
        if size % ways:
            raise ConfigError(f"mesh axis {'*'.join(axes)}={ways} does not divide the model's {size} {label}")


def logical_sharding(
    axes: Sequence[str | None], mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES
) -> NamedSharding:
    """NamedSharding for an array whose dimensions carry the given logical names."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(axes), rules))


def tree_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """Shardings for a tree of `nn.LogicallyPartitioned` boxes (e.g. `eval_shape(model.init)`)."""
    specs = nn.get_partition_spec(boxed_tree)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(spec), rules)),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def mesh_rules(mesh: Mesh | None, rules: Rules = LOGICAL_AXIS_RULES) -> Iterator[None]:
    """Traces under the mesh and the rules, so the model's logical constraints (activations, the
    KV cache) take effect; without a mesh, a no-op. Enter it after placing arrays, around jit calls."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
