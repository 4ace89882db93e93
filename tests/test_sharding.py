"""Mesh construction and the logical-axis rules table (8 fake CPU devices from conftest)."""

import jax
import pytest

from bita_jax.config import ConfigError, MeshConfig
from bita_jax.sharding import LOGICAL_AXIS_RULES, make_mesh, rules_from_overrides


def test_mesh_uses_all_devices_or_a_prefix_on_one_host():
    assert dict(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(MeshConfig(data=-1, tensor=2)).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    single = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1))
    assert single.devices.size == 1 and single.devices.flat[0] == jax.devices()[0]


@pytest.mark.parametrize("mesh", ["data=3", "data=4,fsdp=4", "data=-1,fsdp=-1", "tensor=0"])
def test_mesh_that_does_not_fit_is_refused(mesh):
    with pytest.raises(ConfigError, match="mesh|axis"):
        make_mesh(MeshConfig.parse(mesh))


def test_rules_overrides_are_checked():
    assert rules_from_overrides(None) == LOGICAL_AXIS_RULES
    assert dict(rules_from_overrides({"mlp": None}))["mlp"] is None
    with pytest.raises(ConfigError, match="unknown logical axis"):
        rules_from_overrides({"not_an_axis": "data"})
    with pytest.raises(ConfigError, match="not a mesh axis"):
        rules_from_overrides({"mlp": "model"})
    with pytest.raises(ConfigError, match="two axes"):
        rules_from_overrides({"head_dim": "fsdp"})  # embed is already on fsdp in q_proj [D, N, H]
