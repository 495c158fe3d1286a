"""Mesh construction and the rules table: every failure names what was asked."""

import pytest
from jax.sharding import PartitionSpec as P

import sharding
from sharding import MeshError, PartitionError, RulesError


def test_minus_one_fills_remaining_devices(devices):
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "model": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "expert": 1, "model": 2}
    assert sharding.resolve_axis_sizes({"data": -1, "fsdp": 1, "model": 4}, 8) == {
        "data": 2, "fsdp": 1, "context": 1, "expert": 1, "model": 4}


def test_device_count_mismatch_says_asked_and_available(devices):
    with pytest.raises(MeshError, match=r"data=2, fsdp=2, model=3.*needs 12 devices but 8 exist"):
        sharding.make_mesh({"data": 2, "fsdp": 2, "model": 3})
    with pytest.raises(MeshError, match="8 devices do not divide by 3"):
        sharding.make_mesh({"data": 3, "fsdp": -1, "model": 1})
    with pytest.raises(MeshError, match="only one mesh axis may be -1"):
        sharding.make_mesh({"data": -1, "fsdp": -1, "model": 1})
    with pytest.raises(MeshError, match="mesh.model=0"):
        sharding.make_mesh({"data": -1, "fsdp": 1, "model": 0})


def test_presets_resolve_to_expected_specs(devices):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    shape = (4, 64, 8, 8)  # (layers, embed, heads, head_dim)
    axes = ("layers", "embed", "heads", "head_dim")
    expected = {"dp": P(None, None, None, None), "fsdp": P(None, "fsdp", None, None),
                "tp": P(None, None, "model", None), "fsdp_tp": P(None, "fsdp", "model", None)}
    for preset, spec in expected.items():
        rules = sharding.make_rules(preset, mesh.axis_names)
        assert sharding.logical_to_spec(axes, shape, rules, mesh, "wq") == spec, preset
    rules = sharding.make_rules("fsdp", mesh.axis_names)
    assert sharding.logical_to_spec(("batch", None), (8, 3), rules, mesh, "x") == P(
        ("data", "fsdp"), None)


def test_act_ids_follows_the_batch_unless_the_embed_dimension_takes_a_batch_axis(devices):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    derived = {preset: sharding.make_rules(preset, mesh.axis_names)["act_ids"]
               for preset in ("dp", "tp", "fsdp", "fsdp_tp")}
    assert derived == {"dp": ("data", "fsdp"), "tp": ("data", "fsdp"), "fsdp": (), "fsdp_tp": ()}
    assert sharding.make_rules({"preset": "dp", "embed": "model"},
                               mesh.axis_names)["act_ids"] == ("data", "fsdp")
    assert sharding.make_rules({"preset": "fsdp", "act_ids": "data"},
                               mesh.axis_names)["act_ids"] == ("data",)


def test_non_divisible_dimension_names_path_shape_and_mesh(devices):
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "model": 1})
    rules = sharding.make_rules("fsdp", mesh.axis_names)
    with pytest.raises(PartitionError) as err:
        sharding.logical_to_spec(("vocab", "embed"), (256, 60), rules, mesh, "embedding")
    msg = str(err.value)
    assert "embedding" in msg and "(256, 60)" in msg and "fsdp=8" in msg
    assert "'embed'=60 does not divide by fsdp=8" in msg


def test_axis_used_twice_is_an_error(devices):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    rules = sharding.make_rules({"preset": "tp", "embed": "model"}, mesh.axis_names)
    with pytest.raises(PartitionError, match=r"wo .*mesh axis 'model' used twice"):
        sharding.logical_to_spec(("heads", "embed"), (8, 64), rules, mesh, "wo")


def test_unknown_names_and_axes_fail(devices):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    with pytest.raises(RulesError, match="unknown rules preset 'zero3'"):
        sharding.make_rules("zero3", mesh.axis_names)
    with pytest.raises(RulesError, match="unknown logical axis 'embd'"):
        sharding.make_rules({"embd": "fsdp"}, mesh.axis_names)
    with pytest.raises(RulesError, match="'mlp' -> 'tensor': no such mesh axis"):
        sharding.make_rules({"mlp": "tensor"}, mesh.axis_names)
    rules = sharding.make_rules("dp", mesh.axis_names)
    with pytest.raises(PartitionError, match="logical axis 'adapters' has no rule"):
        sharding.logical_to_spec(("adapters",), (8,), rules, mesh, "lora")


def test_multislice_mesh_puts_the_dcn_axis_across_slices():
    """Two 4-device slices, data across them: each data row is one whole slice."""
    import dataclasses

    from sharding.mesh import hybrid_devices

    @dataclasses.dataclass(frozen=True)
    class FakeDevice:
        id: int
        slice_index: int
        process_index: int = 0
        platform: str = "cpu"
        device_kind: str = "cpu"

    devices = [FakeDevice(i, i // 4) for i in range(8)]
    grid = hybrid_devices({"data": 2, "fsdp": 4, "model": 1},
                          {"data": 2, "fsdp": 1, "model": 1}, devices)
    assert grid.shape == (2, 4, 1, 1, 1)
    assert [{d.slice_index for d in row.flat} for row in grid] == [{0}, {1}]
    with pytest.raises(sharding.MeshError, match="span 2 TPU slices"):
        hybrid_devices({"data": 2, "fsdp": 4, "model": 1}, {"data": 1, "fsdp": 4, "model": 1},
                       devices)
    with pytest.raises(sharding.MeshError, match="does not divide by mesh.dcn_fsdp=3"):
        hybrid_devices({"data": 2, "fsdp": 4, "model": 1}, {"data": 1, "fsdp": 3, "model": 1},
                       devices)
