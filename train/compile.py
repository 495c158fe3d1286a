"""`python -m train.compile --config X [--topology v5p-64 | v5e:2x2] [--slices N]`: compile
the real train step ahead of time and report what one step costs per chip, without
running it: memory (arguments, outputs, temporaries) against the chip's memory, FLOPs,
and every collective with its bytes per step, grouped by mesh axis.

With --topology the target is a TPU slice (or several) described by libtpu, compiled on
this machine with no TPU present (install the `tpu` extra). Without it, the local
devices (CPU, GPU). Exits 1 when the step does not fit in memory.
"""

from __future__ import annotations

import json
import re
import sys
import time

from train.cli import guarded, parse, parser

GIB = 1024 ** 3
ADVICE = ("shard more (mesh.fsdp, mesh.model), lower train.batch_size, or set "
          "train.microbatches or model.remat=full")


class DoesNotFit(RuntimeError):
    """The compiled step needs more memory per chip than the target has."""


def batch_keys(cfg) -> dict[str, str]:
    """The train step's batch entries and dtypes for this config's data."""
    keys = {"inputs": "int32", "targets": "int32"}
    if cfg.data.path is not None:
        keys["weights"] = "float32"
        if cfg.data.mask_documents:
            keys |= {"segment_ids": "int32", "positions": "int32"}
    return keys


def compile_step(cfg, devices, hbm_bytes: int | None, target: str,
                 hlo_path: str | None = None) -> dict:
    import jax
    
    import sharding
    from train.hlo_collectives import collectives, summarize
    from train.state import batch_shape, batch_sharding, check_batch_fits
    from train.metrics import flops_per_token
    from train.state import plan_state
    from train.step import jit_train_step
    from train.xla_flags import compile_options

    mesh = sharding.make_mesh(cfg.mesh.axes(), devices=devices, dcn=cfg.mesh.dcn())
    check_batch_fits(cfg, mesh)
    rules = sharding.make_rules(cfg.sharding.rules, mesh.axis_names)
    _, abstract, shardings = plan_state(cfg, mesh, rules)
    t = cfg.train
    shape, batch_layout = batch_shape(cfg), batch_sharding(cfg, mesh, rules)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_layout)
             for k, dtype in batch_keys(cfg).items()}
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, shardings)
    t0 = time.perf_counter()
    lowered = jit_train_step(shardings, {k: batch_layout for k in batch}).lower(state, batch)
    lower_seconds = time.perf_counter() - t0
    try:
        compiled = lowered.compile(compile_options(shardings))  # as the train loop does
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses what cannot fit
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        detail = re.search(r"Ran out of memory[^.]*\.?[^.]*?\(([\d.]+G)\)[^(]*\(([\d.]+G)\)",
                           str(e))
        need = f" ({detail.group(1)} needed, {detail.group(2)} available)" if detail else ""
        raise DoesNotFit(f"the train step does not fit in {target}'s memory per chip{need}; "
                         f"{ADVICE}") from None
    seconds = time.perf_counter() - t0

    mem = compiled.memory_analysis()
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    total = args + outs - alias + temp
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    xla_flops = float(cost.get("flops", 0.0))
    model_flops = flops_per_token(cfg.model, t.seq_len) * t.batch_size * t.seq_len
    mesh_shape = dict(mesh.shape)
    hlo = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(hlo)
    items, unknown_loops = collectives(hlo, mesh_shape)
    n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    return {
        "target": target, "devices": mesh.size, "mesh": mesh_shape,
        "rules": cfg.sharding.rules if isinstance(cfg.sharding.rules, str) else "custom",
        "params": n_params, "tokens_per_step": t.batch_size * t.seq_len,
        "compile_s": seconds, "lower_s": lower_seconds,
        "memory_per_chip": {"arguments": args, "outputs": outs - alias, "temporaries": temp,
                            "total": total},
        "hbm_per_chip": hbm_bytes, "fits": None if hbm_bytes is None else total <= hbm_bytes,
        "flops_per_step": model_flops, "flops_per_chip": model_flops / mesh.size,
        "xla_flops_per_chip": xla_flops,
        "collectives": summarize(items), "unknown_trip_counts": unknown_loops,
        "collective_bytes_per_chip": sum(c.bytes_per_step for c in items),
    }


def size(b: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def render(r: dict) -> str:
    m = r["memory_per_chip"]
    mesh = ", ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [f"target {r['target']}: {r['devices']} devices, mesh {mesh}, rules {r['rules']}",
             f"model {r['params'] / 1e6:.1f}M parameters, {r['tokens_per_step']:,} tokens "
             f"per step; compiled in {r['compile_s']:.1f} s "
             f"(tracing and lowering {r['lower_s']:.1f} s)",
             f"memory per chip: arguments {size(m['arguments'])} + outputs {size(m['outputs'])}"
             f" + temporaries {size(m['temporaries'])} = {size(m['total'])}"]
    if r["hbm_per_chip"]:
        verdict = "fits" if r["fits"] else "DOES NOT FIT"
        lines.append(f"  of {size(r['hbm_per_chip'])} per chip: {verdict} "
                     f"({100 * m['total'] / r['hbm_per_chip']:.0f}%)")
    lines.append(f"FLOPs per step (model, 6N + attention, as for MFU): "
                 f"{r['flops_per_step']:.3e}, {r['flops_per_chip']:.3e} per chip; XLA's cost "
                 f"analysis: {r['xla_flops_per_chip']:.3e} per chip (loop bodies, such as "
                 "the scanned layers, counted once)")
    lines.append(f"collectives per step per chip: {size(r['collective_bytes_per_chip'])}")
    for c in r["collectives"]:
        lines.append(f"  {c['op']:<19} over {c['axes']:<16} {size(c['bytes_per_step']):>12}"
                     f"  ({c['executions']} per step)")
    if r["unknown_trip_counts"]:
        lines.append(f"  ({r['unknown_trip_counts']} loops with an unknown trip count were "
                     "counted once)")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = parser("Compile the train step ahead of time and report its cost per chip.")
    p.add_argument("--topology", default=None,
                   help="TPU target, e.g. v5p-64, v5e-256, v5e:2x2 (default: local devices)")
    p.add_argument("--slices", type=int, default=1, help="number of TPU slices (DCN)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--hlo", default=None, help="also write the optimized HLO text here")
    cfg, args = parse(p, argv)

    def go():
        import jax

        from train import topology
        from train.data import resolve_data
        run_cfg, _ = resolve_data(cfg)
        if args.topology:
            topo = topology.parse(args.topology)
            devices = topology.devices(topo, args.slices)
            hbm = topo.generation.hbm_bytes
            target = f"{args.topology}" + (f" x {args.slices} slices" if args.slices > 1 else "")
        else:
            devices = jax.devices()
            stats = devices[0].memory_stats() or {}
            hbm = stats.get("bytes_limit")
            target = f"local {devices[0].platform} ({devices[0].device_kind})"
        try:
            report = compile_step(run_cfg, devices, hbm, target, args.hlo)
        except DoesNotFit as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        print(render(report))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        if report["fits"] is False:
            print(f"error: the train step needs {report['memory_per_chip']['total'] / GIB:.2f} "
                  f"GiB per chip but {target} has {hbm / GIB:.2f} GiB; {ADVICE}",
                  file=sys.stderr)
            raise SystemExit(1)

    guarded(go)


if __name__ == "__main__":
    main()
