"""The pre-flight: compile the real train step ahead of time and report what one step
costs per chip, without running it: memory (arguments, outputs, temporaries) against
the chip's memory, FLOPs, and every collective with its bytes per step, grouped by mesh
axis. The target is a TPU slice (or several) described by libtpu, compiled on this
machine with no TPU present, or the local devices.
"""

from __future__ import annotations

import json
import re
import time
from typing import Callable

import jax
import numpy as np

from sharding.mesh import shown_axes
from train.config import Config
from train.data.resolve import resolve_data
from train.errors import DoesNotFit
from train.metrics import flops_per_token
from train.plan import plan
from train.preflight import topology
from train.preflight.hlo_collectives import collectives, summarize
from train.startup import compile_options
from train.step import jit_train_step

GIB = 1024 ** 3
ADVICE = ("shard more (mesh.fsdp, mesh.model), lower train.batch_size, or set "
          "train.microbatches or model.remat=full")


def batch_keys(cfg) -> dict[str, str]:
    """The train step's batch entries and dtypes for this config's data."""
    keys = {"inputs": "int32", "targets": "int32"}
    if cfg.data.path is not None:
        keys["weights"] = "float32"
        if cfg.data.mask_documents or cfg.train.objective == "dpo":  # DPO: packed pairs
            keys |= {"segment_ids": "int32", "positions": "int32"}
    return keys


def compile_step(cfg: Config, devices, hbm_bytes: int | None, target: str,
                 hlo_path: str | None = None) -> dict:
    """Compile cfg's train step for `devices` and measure it (the report's dict)."""
    p = plan(cfg, devices)
    mesh, t = p.mesh, cfg.train
    keys = batch_keys(cfg)
    if p.context_ways > 1:
        keys["positions"] = "int32"  # the load-balanced layout's (train/data/batches.py)
    batch = {k: jax.ShapeDtypeStruct(p.batch_shape, dtype, sharding=p.batch_sharding)
             for k, dtype in keys.items()}
    t0 = time.perf_counter()
    lowered = jit_train_step(p.shardings, {k: p.batch_sharding for k in batch}).lower(
        p.abstract_state(), batch)
    lower_seconds = time.perf_counter() - t0
    try:
        compiled = lowered.compile(compile_options(p.shardings))  # as the train loop does
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
    n_params = sum(x.size for x in jax.tree.leaves(p.abstract.params))
    return {
        "target": target, "devices": mesh.size, "mesh": mesh_shape,
        "dcn_axes": dcn_axes(compiled),
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
    mesh = ", ".join(f"{k}={r['mesh'][k]}" for k in shown_axes(r["mesh"]))
    lines = [f"target {r['target']}: {r['devices']} devices, mesh {mesh}, rules {r['rules']}"]
    if r["dcn_axes"]:
        within = [a for a in shown_axes(r["mesh"]) if a not in r["dcn_axes"]]
        lines.append(f"across slices (DCN): {', '.join(r['dcn_axes'])}; within each slice "
                     f"(ICI): {', '.join(within)}")
    lines.append(f"model {r['params'] / 1e6:.1f}M parameters, {r['tokens_per_step']:,} "
                 f"tokens per step; compiled in {r['compile_s']:.1f} s (tracing and lowering "
                 f"{r['lower_s']:.1f} s)")
    lines.append(f"memory per chip: arguments {size(m['arguments'])} + outputs "
                 f"{size(m['outputs'])} + temporaries {size(m['temporaries'])} = "
                 f"{size(m['total'])}")
    if r["hbm_per_chip"]:
        verdict = "fits" if r["fits"] else "DOES NOT FIT"
        lines.append(f"  of {size(r['hbm_per_chip'])} per chip: {verdict} "
                     f"({100 * m['total'] / r['hbm_per_chip']:.0f}%)")
    lines.append(f"FLOPs per step (model: matmuls + attention, as for MFU): "
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


def dcn_axes(compiled) -> list[str]:
    """The mesh axes along which the devices the program was compiled for change TPU
    slice (slice_index): the axes whose transfers cross the data-center network."""
    mesh = jax.tree.leaves(compiled.input_shardings)[0].mesh
    slice_of = np.vectorize(lambda d: getattr(d, "slice_index", 0))(mesh.devices)
    return [name for axis, name in enumerate(mesh.axis_names)
            if (np.diff(slice_of, axis=axis) != 0).any()]


def preflight(cfg: Config, topology_name: str | None = None, slices: int = 1, *,
              hlo_path: str | None = None, json_path: str | None = None,
              echo: Callable[[str], None] = print) -> dict:
    """Compile cfg's train step for a TPU topology (`v5p-64`, `v5e:2x2`; `slices` of
    them) or, without one, for the local devices; echo the report (and write it as
    JSON), then raise DoesNotFit if the step does not fit in the chip's memory."""
    run_cfg, _ = resolve_data(cfg)
    if topology_name:
        topo = topology.parse(topology_name)
        devices = topology.devices(topo, slices)
        hbm = topo.generation.hbm_bytes
        target = topology_name + (f" x {slices} slices" if slices > 1 else "")
    else:
        devices = jax.devices()
        hbm = (devices[0].memory_stats() or {}).get("bytes_limit")
        target = f"local {devices[0].platform} ({devices[0].device_kind})"
    report = compile_step(run_cfg, devices, hbm, target, hlo_path)
    echo(render(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    if report["fits"] is False:
        raise DoesNotFit(f"the train step needs {report['memory_per_chip']['total'] / GIB:.2f} "
                         f"GiB per chip but {target} has {hbm / GIB:.2f} GiB; {ADVICE}")
    return report
