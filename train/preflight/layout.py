"""The layout of every parameter for a config and mesh (logical axes, the PartitionSpec
the rules give, bytes per device) and the per-device total of parameters + optimizer
state, without allocating anything: the state is abstract (jax.eval_shape)."""

from __future__ import annotations

import math
from typing import Callable

import jax
from flax import nnx

import sharding
from train.config import Config
from train.data.resolve import resolve_data
from train.plan import plan
from train.state import split_trainable


def show_layout(cfg: Config, echo: Callable[[str], None] = print) -> float:
    """Echo the table; returns the per-device GiB of parameters + optimizer state."""
    cfg, _ = resolve_data(cfg)  # the data's tokenizer may set the vocabulary size
    p = plan(cfg, batches=False)
    echo(f"mesh {sharding.describe(p.mesh)}, rules {cfg.sharding.rules}")
    echo(f"{'parameter':34} {'shape':22} {'logical axes':44} {'spec':30} {'MiB/device':>10}")

    def is_var(x):
        return isinstance(x, nnx.Variable)

    flat = jax.tree_util.tree_flatten_with_path(p.abstract.params, is_leaf=is_var)[0]
    flat_sh = jax.tree.leaves(p.shardings.params, is_leaf=is_var)
    for (path, var), sh in zip(flat, flat_sh):
        value, spec = var.get_value(), sh.get_value().spec
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        axes = var.get_metadata()["logical_axes"]
        local = math.prod(sh.get_value().shard_shape(value.shape)) * value.dtype.itemsize
        echo(f"{name:34} {str(value.shape):22} {str(axes):44} {str(spec):30} "
             f"{local / 2**20:>10.2f}")
    def gib(tree, shardings) -> float:
        return sum(math.prod(sh.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                   for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
                   ) / 2**30

    lora = cfg.model.lora.enabled
    trained, frozen = (split_trainable(t, lora) for t in (p.abstract.params, p.shardings.params))
    parts = [("trained parameters", gib(trained[0], frozen[0])),
             ("frozen parameters", gib(trained[1], frozen[1])),
             ("optimizer state", gib(p.abstract.opt_state, p.shardings.opt_state)),
             ("DPO reference copy", gib(p.abstract.reference, p.shardings.reference))]
    echo("per device: " + ", ".join(f"{name} {v:.3f} GiB" for name, v in parts
                                    if v or name == "optimizer state"))
    total = gib(p.abstract, p.shardings)
    echo(f"parameters + optimizer state per device: {total:.3f} GiB")
    return total
