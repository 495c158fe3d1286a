"""Named TPU topologies to compile for from a CPU machine (needs libtpu: the `tpu` extra).

A topology is an accelerator type as Cloud TPU names it (`v5p-64`, `v5e-256`, `v4-32`,
`v6e-16`; v4 and v5p count TensorCores, two per chip, v5e and v6e count chips) or a chip
grid (`v5e:2x2`, `v5p:2x4x4`). `--slices N` makes N such slices joined by DCN.
"""

from __future__ import annotations

import dataclasses
import os
import re

from jax.experimental import topologies

from sharding.mesh import MeshError

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str  # as libtpu's topology descriptions spell it
    hbm_bytes: int  # per chip
    cores_per_chip: int  # in accelerator-type names
    dims: int  # 2-D torus (v5e, v6e) or 3-D (v4, v5p)


GENERATIONS = {
    "v4": Generation("v4", 32 * GIB, 2, 3),
    "v5e": Generation("v5e", 16 * GIB, 1, 2),
    "v5p": Generation("v5p", 95 * GIB, 2, 3),
    "v6e": Generation("v6e", 32 * GIB, 1, 2),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}
GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
POD_SIDE_2D = 16  # a v5e/v6e pod is 16 x 16 chips


def known() -> list[str]:
    names = []
    for gen, g in GENERATIONS.items():
        grids = GRIDS_2D if g.dims == 2 else GRIDS_3D
        names += [f"{gen}-{chips * g.cores_per_chip}" for chips in grids]
    return names


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user wrote it
    generation: Generation
    grid: str  # e.g. "2x4x4"
    chips: int  # per slice

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation.name}:{self.grid}"

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Which grid dimensions close into rings (wraparound links), as on the real slice:
        v4/v5p slices whose every dimension is a multiple of 4 (whole 4x4x4 cubes) are 3-D
        tori, smaller ones meshes; on v5e/v6e a dimension spanning the pod's full side (16
        chips) wraps. The compiler routes collectives (all-to-alls above all) by these
        links, so a slice described without them compiles to other code, more slowly."""
        dims = [int(x) for x in self.grid.split("x")]
        if self.generation.dims == 3:
            torus = all(d % 4 == 0 for d in dims)
            return (torus, torus, torus)
        return (dims[0] == POD_SIDE_2D, dims[1] == POD_SIDE_2D, False)


def parse(name: str) -> Topology:
    """`v5p-64` or `v5e:2x2` -> Topology; unknown names list the known ones."""
    m = re.fullmatch(r"([a-z0-9]+)[:](\d+(?:x\d+){1,2})", name)
    if m:
        gen = GENERATIONS.get(ALIASES.get(m.group(1), m.group(1)))
        dims = [int(x) for x in m.group(2).split("x")]
        if gen and len(dims) == gen.dims:
            chips = 1
            for d in dims:
                chips *= d
            return Topology(name, gen, m.group(2), chips)
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
    if m and ALIASES.get(m.group(1), m.group(1)) in GENERATIONS:
        gen = GENERATIONS[ALIASES.get(m.group(1), m.group(1))]
        chips, rest = divmod(int(m.group(2)), gen.cores_per_chip)
        grid = (GRIDS_2D if gen.dims == 2 else GRIDS_3D).get(chips)
        if grid and not rest:
            return Topology(name, gen, grid, chips)
    raise MeshError(f"unknown TPU topology {name!r}; known: {', '.join(known())}, or a chip "
                    "grid such as v5e:2x2, v6e:4x4, v4:2x2x2, v5p:2x4x4")


def devices(topology: Topology, slices: int = 1) -> list:
    """Abstract devices of `slices` x topology, for compiling on a machine without TPUs."""
    gen = topology.generation
    accelerator = {"v5e": "v5litepod"}.get(gen.name, gen.name)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                          f"{accelerator}-{topology.chips * gen.cores_per_chip}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's warnings
    try:
        desc = topologies.get_topology_desc(topology.libtpu_name, "tpu", num_slices=slices,
                                            wrap=topology.wrap)
    except Exception as e:  # noqa: BLE001 - libtpu missing or the name unsupported
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = (" (install the TPU extra: pip install -e '.[tpu]')"
                if "not installed" in text.lower() or "tpu" in text.lower() else "")
        raise MeshError(f"cannot describe TPU topology {topology.libtpu_name} x {slices} "
                        f"slice(s): {text}{hint}") from None
    return list(desc.devices)
