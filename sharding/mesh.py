"""Device mesh construction: named axes sized by the config, one of them may be -1."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

# Order matters: the fastest-varying (innermost) axis is last, so tensor-parallel
# collectives ("model") stay between neighbouring devices.
MESH_AXES = ("data", "fsdp", "model")


class MeshError(ValueError):
    """A mesh request that cannot be satisfied by the available devices."""


def resolve_axis_sizes(requested: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fill at most one -1 axis so the product equals `num_devices`.

    Raises MeshError naming what was asked and what exists.
    """
    asked = ", ".join(f"{a}={requested[a]}" for a in MESH_AXES)
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


def make_mesh(requested: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a `Mesh` over `devices` (default: all devices) with axes MESH_AXES.

    `jax.make_mesh` picks a device order that keeps inner axes on fast links.
    Axes are Auto so shardings propagate through jit as in classic pjit.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(requested, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, auto, devices=devices)
    # A subset of devices (tests, single-device references): keep the given order.
    return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=auto)


def describe(mesh: Mesh) -> str:
    """'data=2, fsdp=2, model=2 (8 devices)' for error messages and logs."""
    axes = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
    return f"{axes} ({mesh.size} devices)"
