"""Logical axes -> PartitionSpec / NamedSharding, checked against shapes and the mesh."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.errors import ShardingError
from sharding.mesh import describe
from sharding.rules import Rules

# A logical axis for an activation dimension whose layout the partitioner may choose
# (PartitionSpec.UNCONSTRAINED), e.g. the batch dimensions of an array constrained only
# to have its model dimension split like a parameter's.
ANY = "*"


class PartitionError(ShardingError):
    """A tensor whose logical axes cannot be laid out on the mesh."""


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], rules: Rules,
                    mesh: Mesh, path: str) -> PartitionSpec:
    """The PartitionSpec for one tensor.

    Fails loudly (naming `path`, `shape` and the mesh) on a rank mismatch, an unknown
    logical name, a dimension that does not divide by its mesh axes, or a mesh axis used
    by two dimensions.
    """
    where = (f"{path} (shape {tuple(shape)}, logical axes {tuple(logical_axes)}, "
             f"mesh {describe(mesh)})")
    if len(logical_axes) != len(shape):
        raise PartitionError(f"{where}: {len(logical_axes)} logical axes for rank {len(shape)}")
    used: dict[str, str] = {}
    entries: list[Any] = []
    for dim, name in zip(shape, logical_axes):
        if name is None:
            entries.append(None)
            continue
        if name == ANY:  # the partitioner chooses (for activations only)
            entries.append(PartitionSpec.UNCONSTRAINED)
            continue
        if name not in rules:
            raise PartitionError(f"{where}: logical axis {name!r} has no rule; add it to "
                                 "sharding.rules")
        axes = rules[name]
        for axis in axes:
            if axis in used:
                raise PartitionError(f"{where}: mesh axis {axis!r} used twice (by {used[axis]!r} "
                                     f"and {name!r}); change sharding.rules")
            used[axis] = name
        ways = math.prod(mesh.shape[a] for a in axes)
        if dim % ways:
            raise PartitionError(f"{where}: dimension {name!r}={dim} does not divide by "
                                 f"{'x'.join(axes)}={ways}; change the mesh, the model size "
                                 "or sharding.rules")
        entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*entries)


def batch_ways(mesh: Mesh, rules: Rules) -> int:
    """How many ways the rules split the "batch" axis over the mesh: a global batch must
    divide by it."""
    return math.prod(mesh.shape[a] for a in rules["batch"])


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def tree_shardings(abstract_tree: Any, rules: Rules, mesh: Mesh,
                   axes_of: Callable[[Any], Sequence[str | None] | None],
                   is_leaf: Callable[[Any], bool]) -> Any:
    """NamedShardings for a tree of abstract arrays.

    `is_leaf` picks the nodes that carry logical axes (e.g. Flax Variables); `axes_of`
    returns them, or None for nodes without any (replicated, e.g. scalar counters).
    Nodes keep their type: a Variable maps to a Variable holding a NamedSharding.
    """

    def one(path, node):
        axes = axes_of(node)
        value = node.get_value() if hasattr(node, "get_value") else node
        if axes is None:
            if getattr(value, "ndim", 0):
                raise PartitionError(f"{_path_str(path)} (shape {value.shape}) has no logical "
                                     "axes; every non-scalar array needs them")
            sharding = NamedSharding(mesh, PartitionSpec())
        else:
            spec = logical_to_spec(axes, value.shape, rules, mesh, _path_str(path))
            sharding = NamedSharding(mesh, spec)
        return node.replace(sharding) if hasattr(node, "replace") else sharding

    return jax.tree_util.tree_map_with_path(one, abstract_tree, is_leaf=is_leaf)


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
    """Callable given to models: constrain an activation by its logical axes.

    Hashable and frozen, so it can sit in a model's static structure and be part of the
    jit cache key (two meshes never share a trace).
    """

    mesh: Mesh
    rules_items: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def create(cls, mesh: Mesh, rules: Rules) -> "ActivationSharding":
        return cls(mesh, tuple(sorted(rules.items())))

    def __call__(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
        spec = logical_to_spec(logical_axes, x.shape, dict(self.rules_items), self.mesh,
                               "activation")
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    @property
    def platform(self) -> str:
        """The mesh's device platform ("tpu" also for a TPU topology compiled from a CPU)."""
        return self.mesh.devices.flat[0].platform

    def mesh_axes(self, logical_name: str) -> tuple[str, ...]:
        """The mesh axes the rules give `logical_name` (for layers that run collectives
        over them inside `per_shard`)."""
        return dict(self.rules_items)[logical_name]

    def ways(self, logical_name: str) -> int:
        """How many ways the rules split `logical_name` over the mesh."""
        return math.prod(self.mesh.shape[a] for a in self.mesh_axes(logical_name))

    def split_leading(self, x: jax.Array, mesh_axes: Sequence[str]) -> jax.Array:
        """`x` with its first dimension split over `mesh_axes` and the rest whole on
        each device (stacked matrices a device works on one by one)."""
        spec = PartitionSpec(tuple(mesh_axes), *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def per_shard(self, fn: Callable, args: Sequence[jax.Array],
                  logical_axes: Sequence[Sequence[str | None]]) -> jax.Array:
        """fn on each device's shard of `args` (laid out by their logical axes; shard_map),
        for kernels the partitioner cannot split itself, or layers that run their own
        collectives. The result is laid out as args[0]."""
        rules = dict(self.rules_items)
        specs = tuple(logical_to_spec(a, x.shape, rules, self.mesh, "per-shard input")
                      for a, x in zip(logical_axes, args))
        return jax.shard_map(fn, mesh=self.mesh, in_specs=specs, out_specs=specs[0],
                             check_vma=False)(*args)

