"""The one base of the sharding package's errors: settings that cannot work on the
devices at hand (a mesh, a rules table, a multi-process set-up). Each names what to fix."""


class ShardingError(ValueError):
    """A mesh, rules or multi-process setting that cannot be used."""
