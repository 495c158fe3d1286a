"""Throughput benchmark of the real train step on synthetic tokens.

    python scripts/bench.py --config configs/gpt2-124m.yaml [key=value ...]
        [--steps 20] [--warmup 3] [--compare LABEL:key=value,key=value ...]

Builds the config's mesh, sharded state and jitted train step (the same code as
`python -m train`), compiles it, runs `--warmup` steps, then times `--steps` steps with
one host sync at the end (none inside the loop). Prints tokens/s, step time, TFLOP/s
per device, MFU, compile time and peak device memory; the last line is one JSON object.

MFU = tokens_per_sec * flops_per_token / (devices * peak FLOP/s per device), with
flops_per_token = 6 N + 12 L H_q D_head T (train/metrics.py; remat recomputation not
counted). The peak comes from train/metrics.py's table by device kind, or
`metrics.peak_tflops=...`; on a CPU MFU is null.

--compare runs several variants in this one process, each the base config plus its own
overrides (comma-separated), and prints a table; e.g.
    --compare base: cudnn:model.attention=cudnn xla:model.attention=xla \
              remat:model.remat=full bs32:train.batch_size=32
A variant that fails (a kernel the backend lacks, out of memory) is reported and the
others still run. No data loader and no checkpointing are imported (no Grain, no
tensorboardX), so it runs on a bare GPU image.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from models.context import balanced_rows  # noqa: E402
from train import cli, errors, startup  # noqa: E402
from train.config import load_config  # noqa: E402
from train.metrics import flops_per_token, peak_flops_per_device  # noqa: E402
from train.plan import Plan, build_state, plan  # noqa: E402
from train.step import jit_train_step  # noqa: E402

GIB = 1024 ** 3


def synthetic_batch(p: Plan, seed: int) -> dict:
    """Random tokens; with the length split over context axes, in the load-balanced
    layout with its positions, as train/data/batches.py lays a batch out."""
    t = p.cfg.train
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, p.cfg.model.vocab_size, (t.batch_size, t.seq_len + 1), np.int32)
    entries = balanced_rows({"inputs": rows[:, :-1], "targets": rows[:, 1:]}, p.context_ways)
    return {k: jax.device_put(x.reshape(p.batch_shape), p.batch_sharding)
            for k, x in entries.items()}


def peak_memory(compiled) -> tuple[float | None, str]:
    """Peak bytes in use on device 0 (GPU/TPU allocators report it); else the compiled
    program's own per-device total (arguments + outputs - aliased + temporaries)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"], "allocator peak"
    m = compiled.memory_analysis()
    if m is None:
        return None, "unknown"
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)
    return total, "compiled program"


def measure(cfg, steps: int, warmup: int) -> dict:
    """Compile and time the train step of `cfg`; one dict of figures."""
    p = plan(cfg)
    mesh, t = p.mesh, cfg.train
    state, shardings = build_state(cfg, mesh, p.rules)
    batches = [synthetic_batch(p, seed) for seed in (0, 1)]

    t0 = time.perf_counter()
    step = jit_train_step(shardings, {k: p.batch_sharding for k in batches[0]})
    compiled = step.lower(state, batches[0]).compile(startup.compile_options(shardings))
    compile_s = time.perf_counter() - t0

    for i in range(warmup):
        state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for i in range(steps):  # no host sync inside: the device queue stays full
        state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / steps

    tokens = t.batch_size * t.seq_len
    fpt = flops_per_token(cfg.model, t.seq_len)
    tflops = tokens / step_s * fpt / mesh.size / 1e12
    peak = peak_flops_per_device(jax.devices()[0], cfg.metrics.peak_tflops)
    memory, memory_kind = peak_memory(compiled)
    return {
        "tokens_per_sec": tokens / step_s, "step_time_s": step_s, "compile_time_s": compile_s,
        "tflops_per_device": tflops, "mfu": tflops * 1e12 / peak if peak else None,
        "peak_memory_gib": None if memory is None else memory / GIB,
        "memory_kind": memory_kind, "loss": float(metrics["loss"]),
        "devices": mesh.size, "device_kind": jax.devices()[0].device_kind,
        "mesh": dict(mesh.shape), "tokens_per_step": tokens, "flops_per_token": fpt,
        "steps": steps,
    }


def describe(r: dict) -> str:
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    mem = "n/a" if r["peak_memory_gib"] is None else \
        f"{r['peak_memory_gib']:.2f} GiB ({r['memory_kind']})"
    return (f"{r['tokens_per_sec']:,.0f} tokens/s | {1e3 * r['step_time_s']:.1f} ms/step | "
            f"{r['tflops_per_device']:.3f} TFLOP/s/device | MFU {mfu} | compile "
            f"{r['compile_time_s']:.1f} s | peak memory {mem} | loss {r['loss']:.3f}")


def table(results: list[tuple[str, dict | str]]) -> str:
    head = ("variant", "tokens/s", "ms/step", "TFLOP/s/dev", "MFU", "compile s", "memory GiB")
    rows = [head]
    for label, r in results:
        if isinstance(r, str):
            rows.append((label, f"failed: {r}", "", "", "", "", ""))
            continue
        rows.append((label, f"{r['tokens_per_sec']:,.0f}", f"{1e3 * r['step_time_s']:.1f}",
                     f"{r['tflops_per_device']:.3f}",
                     "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                     f"{r['compile_time_s']:.1f}",
                     "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def variants(specs: list[str]) -> list[tuple[str, list[str]]]:
    """'label:k=v,k=v' -> (label, [k=v, k=v]); a bare 'label:' is the base config."""
    out = []
    for spec in specs:
        label, _, rest = spec.partition(":")
        out.append((label or rest, [kv for kv in rest.split(",") if kv]))
    return out


def main(argv=None) -> None:
    p = cli.parser("Benchmark the train step on synthetic data.")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    p.add_argument("--compare", nargs="+", default=None, metavar="LABEL:K=V,K=V",
                   help="variants to run one after another in this process")
    cli.main(p, argv, lambda cfg, args: run(cfg, args), start={"processes": False})


def run(cfg, args) -> None:
    # time real compiles: a persistent cache (JAX_COMPILATION_CACHE_DIR) would hide them
    jax.config.update("jax_enable_compilation_cache", False)
    if not args.compare:
        result = measure(cfg, args.steps, args.warmup)
        print(describe(result))
        print(json.dumps(result))
        return
    results = []
    for label, overrides in variants(args.compare):
        try:
            c = load_config(args.config, list(args.overrides) + overrides)
            r = measure(c, args.steps, args.warmup)
        except Exception as e:  # noqa: BLE001 - e.g. a kernel this backend lacks, OOM
            first = str(e).splitlines()[0][:120] if str(e) else ""
            r = (f"invalid config: {first}" if errors.exit_code(e) == errors.USAGE
                 else f"{type(e).__name__}: {first}")
        results.append((label, r))
        print(f"{label}: {describe(r) if isinstance(r, dict) else r}", flush=True)
    print(table(results))
    ok = [(label, r) for label, r in results if isinstance(r, dict)]
    best = max(ok, key=lambda x: x[1]["tokens_per_sec"]) if ok else None
    summary = dict(best[1], variant=best[0]) if best else {}
    summary["variants"] = [dict(r, variant=label) if isinstance(r, dict)
                           else {"variant": label, "error": r} for label, r in results]
    print(json.dumps(summary))
    if not ok:
        raise errors.RunError("every variant failed")


if __name__ == "__main__":
    main()
