"""`python -m train.layout --config X.yaml [--devices N] key=value ...`

Prints how every parameter is laid out on the configured mesh (logical axes, the
PartitionSpec the rules give, bytes per device) and the per-device total of
parameters + optimizer state, without allocating anything: the state is abstract
(jax.eval_shape). With --devices N it fakes N CPU devices, so a pod-sized mesh can be
checked on a laptop.
"""

from __future__ import annotations

import math
import os
import sys

from train.cli import guarded, parse, parser


def main(argv=None) -> None:
    p = parser("Show the sharded layout of a config's parameters.")
    p.add_argument("--devices", type=int, default=None,
                   help="fake this many CPU devices (default: the real devices)")
    cfg, args = parse(p, argv)
    if args.devices:
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax
        jax.config.update("jax_num_cpu_devices", args.devices)
    guarded(lambda: show(cfg))


def show(cfg) -> None:
    import jax
    from flax import nnx

    import sharding
    from train.data import resolve_data
    from train.state import make_init, state_shardings

    cfg, _ = resolve_data(cfg)  # the data's tokenizer may set the vocabulary size
    mesh = sharding.make_mesh(cfg.mesh.axes(), dcn=cfg.mesh.dcn())
    rules = sharding.make_rules(cfg.sharding.rules, mesh.axis_names)
    abstract = jax.eval_shape(make_init(cfg, mesh, rules), jax.random.key(0))
    shardings = state_shardings(abstract, mesh, rules)
    print(f"mesh {sharding.describe(mesh)}, rules {cfg.sharding.rules}")
    print(f"{'parameter':34} {'shape':22} {'logical axes':44} {'spec':30} {'MiB/device':>10}")
    is_var = lambda x: isinstance(x, nnx.Variable)
    flat = jax.tree_util.tree_flatten_with_path(abstract.params, is_leaf=is_var)[0]
    flat_sh = jax.tree.leaves(shardings.params, is_leaf=is_var)
    for (path, var), sh in zip(flat, flat_sh):
        value, spec = var.get_value(), sh.get_value().spec
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        axes = var.get_metadata()["logical_axes"]
        local = math.prod(sh.get_value().shard_shape(value.shape)) * value.dtype.itemsize
        print(f"{name:34} {str(value.shape):22} {str(axes):44} {str(spec):30} "
              f"{local / 2**20:>10.2f}")
    total = 0
    for leaf, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        total += math.prod(sh.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    print(f"parameters + optimizer state per device: {total / 2**30:.3f} GiB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
