"""Meshes, logical-axis rules and their resolution to shardings. Knows nothing about models."""

from sharding.distributed import DistributedError
from sharding.errors import ShardingError
from sharding.mesh import MESH_AXES, MeshError, describe, make_mesh, resolve_axis_sizes
from sharding.partition import (
                                ActivationSharding,
                                PartitionError,
                                batch_ways,
                                logical_to_spec,
                                tree_shardings,
)
from sharding.rules import PRESETS, RulesError, make_rules

__all__ = ["DistributedError", "MESH_AXES", "MeshError", "ShardingError", "describe",
           "make_mesh", "resolve_axis_sizes", "ActivationSharding", "PartitionError",
           "batch_ways", "logical_to_spec", "tree_shardings", "PRESETS", "RulesError",
           "make_rules"]
