"""Device mesh construction: named axes sized by the config, one of them may be -1."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from sharding.errors import ShardingError

# Order matters: the fastest-varying (innermost) axis is last, so tensor-parallel
# collectives ("model") stay between neighbouring devices, and the expert all-to-all
# next to them.
MESH_AXES = ("data", "fsdp", "context", "expert", "model")
# Axes a mesh may leave out (size 1): descriptions name them only when they are used.
OPTIONAL_AXES = ("context", "expert")


def shown_axes(sizes: dict[str, int]) -> list[str]:
    """The axes worth naming: all but the optional ones of size 1."""
    return [a for a in MESH_AXES if a not in OPTIONAL_AXES or sizes.get(a, 1) != 1]


class MeshError(ShardingError):
    """A mesh request that cannot be satisfied by the available devices."""


def resolve_axis_sizes(requested: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fill at most one -1 axis so the product equals `num_devices`.

    Axes left out are 1. Raises MeshError naming what was asked and what exists.
    """
    requested = {a: 1 for a in MESH_AXES} | dict(requested)
    asked = ", ".join(f"{a}={requested[a]}" for a in shown_axes(requested))
    for axis in MESH_AXES:
        size = requested[axis]
        if size == 0 or size < -1:
            raise MeshError(f"mesh.{axis}={size} is not allowed: use a positive size or -1 (fill)")
    fill = [a for a in MESH_AXES if requested[a] == -1]
    if len(fill) > 1:
        raise MeshError(f"only one mesh axis may be -1, got {asked}")
    known = math.prod(requested[a] for a in MESH_AXES if requested[a] != -1)
    sizes = dict(requested)
    if fill:
        if num_devices % known:
            raise MeshError(
                f"mesh ({asked}) cannot fill -1: {num_devices} devices do not divide by {known}")
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise MeshError(
            f"mesh ({asked}) needs {known} devices but {num_devices} exist; "
            "change the sizes or set one axis to -1")
    return sizes


def make_mesh(requested: dict[str, int], devices: Sequence[jax.Device] | None = None,
              dcn: dict[str, int] | None = None) -> Mesh:
    """Build a `Mesh` over `devices` (default: all devices) with axes MESH_AXES.

    `jax.make_mesh` picks a device order that keeps inner axes on fast links.
    Axes are Auto so shardings propagate through jit as in classic pjit. `dcn` gives,
    per axis, how many of its ways span slices (TPU multi-slice) or, on other devices,
    processes: such a mesh is built by `mesh_utils.create_hybrid_device_mesh`.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(requested, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (AxisType.Auto,) * len(MESH_AXES)
    dcn = {a: 1 for a in MESH_AXES} | dict(dcn or {})
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if math.prod(dcn.values()) > 1 or len(slices) > 1:
        return Mesh(hybrid_devices(sizes, dcn, devices), MESH_AXES, axis_types=auto)
    if devices[0].platform == "tpu" and len(devices) != len(jax.devices()):
        # A TPU topology compiled for from another machine: order by the chip grid.
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, auto, devices=devices)
    # A subset of devices (tests, single-device references): keep the given order.
    return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=auto)


def hybrid_devices(sizes: dict[str, int], dcn: dict[str, int], devices) -> np.ndarray:
    """Devices arranged as ICI x DCN: each axis' size is dcn[axis] ways across granules
    (TPU slices, or processes where devices have no slice) times the rest within one.
    Axes left out of `sizes` or `dcn` are 1."""
    sizes = {a: 1 for a in MESH_AXES} | dict(sizes)
    dcn = {a: 1 for a in MESH_AXES} | dict(dcn)
    for axis in MESH_AXES:
        if dcn[axis] < 1 or sizes[axis] % dcn[axis]:
            raise MeshError(f"mesh.{axis}={sizes[axis]} does not divide by mesh.dcn_{axis}="
                            f"{dcn[axis]}")
    by_slice = hasattr(devices[0], "slice_index")
    granules = len({d.slice_index if by_slice else d.process_index for d in devices})
    wanted = math.prod(dcn.values())
    if granules != wanted:
        kind = "TPU slices" if by_slice else "processes (no TPU slices on this backend)"
        raise MeshError(f"mesh.dcn_* ask for {wanted} granules but the devices span {granules} "
                        f"{kind}; set the dcn_* factors to multiply to {granules}")
    ici = tuple(sizes[a] // dcn[a] for a in MESH_AXES)
    return mesh_utils.create_hybrid_device_mesh(ici, tuple(dcn[a] for a in MESH_AXES), devices,
                                                process_is_granule=not by_slice)


def describe(mesh: Mesh) -> str:
    """'data=2, fsdp=2, model=2 (8 devices)' for error messages and logs (context and
    expert named only when used)."""
    sizes = dict(mesh.shape)
    axes = ", ".join(f"{name}={sizes[name]}" for name in shown_axes(sizes) if name in sizes)
    return f"{axes} ({mesh.size} devices)"
