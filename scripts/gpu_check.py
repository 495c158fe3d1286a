"""The checks and benchmarks that need an NVIDIA GPU, as plain Python (no pytest), on the
GPU machine's own image (`scripts/gpu_check.sh` runs it there); one summary table at the
end, then one JSON line.

    python scripts/gpu_check.py            # on a GPU: the checks, then the benchmarks
    python scripts/gpu_check.py --smoke    # anywhere: the same code on tiny shapes (CI)

Checks (each one row: pass/FAIL and its measured figure):
  cudnn-attention  jax.nn.dot_product_attention's cuDNN kernel against our blocked
                   attention, bf16, GQA, causal: outputs and the three input gradients
  bf16-step        one train step of a small Llama in bf16 against fp32 on the same
                   parameters: loss within u = 2^-8, each weight gradient within 8 u
  generation       greedy KV-cache generation of mixed-length prompts equals each prompt
                   alone, and the cached logits equal the full forward pass
Benchmarks: scripts/bench.py on configs/gpt2-124m.yaml and configs/gpt2-1.3b.yaml (the
one-GPU targets of docs/benchmarks.md), each in its own process; then serving, scripts/
bench_serve.py --no-server on GPT-2 124M: the continuous-batching engine against static
batching on the benchmark's 32 mixed-length requests (the image has no HTTP stack), in
bf16, with int8 layer weights (serve.quantize=int8), and with a paged KV cache of the
same memory as static batching's 8 rows (32 rows sharing serve.kv_pages=128 pages of 16
tokens against 8 rows of 256).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models.attention import blocked_attention  # noqa: E402
from train.config import load_config  # noqa: E402
from train.inference.generate import Generator  # noqa: E402
from train.plan import build_state, plan  # noqa: E402
from train.step import compute_grads  # noqa: E402

U = 2.0 ** -8  # bfloat16's unit roundoff


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_cudnn_attention(smoke: bool) -> tuple[bool, str]:
    """cuDNN's fused attention equals blocked attention to bf16 rounding (a few u)."""
    B, T, N, K, H = (1, 64, 4, 2, 32) if smoke else (2, 2048, 16, 4, 128)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, T, K, H), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, T, K, H), jnp.bfloat16)
    g = jax.random.normal(keys[3], (B, T, N, H), jnp.bfloat16)
    impl = "xla" if smoke else "cudnn"  # no cuDNN off GPUs: the smoke run checks the code

    def fused(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

    def ours(q, k, v):
        return blocked_attention(q, k, v, 512)

    outs = []
    for fn in (fused, ours):
        out, vjp = jax.vjp(jax.jit(fn), q, k, v)
        outs.append((out, *vjp(g)))
    errors = [rel(a.astype(jnp.float32), b.astype(jnp.float32)) for a, b in zip(*outs)]
    worst = max(errors)
    return worst <= 8 * U, (f"{impl} vs blocked, B{B} T{T} N{N} K{K} H{H}: relative error "
                            f"out {errors[0] / U:.2f} u, dq/dk/dv "
                            f"{', '.join(f'{e / U:.2f}' for e in errors[1:])} u (limit 8 u)")


def small(smoke: bool, *extra: str):
    """A 2-layer Llama: d 256, 4 heads of 64 (2 kv heads), T 256 (d 64, T 64 to smoke)."""
    d, t = (64, 64) if smoke else (256, 256)
    return load_config(str(REPO / "configs" / "tiny.yaml"), [
        "model.num_layers=2", f"model.d_model={d}", "model.num_heads=4",
        "model.num_kv_heads=2", f"model.mlp_dim={4 * d}", "model.max_seq_len=512",
        f"train.seq_len={t}", "train.batch_size=8", "data.source=synthetic",
        "compile_cache_dir=null", "mesh.data=1", "mesh.fsdp=-1", "model.init_std=0.1", *extra])


def check_bf16_step(smoke: bool) -> tuple[bool, str]:
    """The train step in bf16 (cuDNN attention where it applies) against fp32."""
    states = {}
    for dtype in ("float32", "bfloat16"):
        cfg = small(smoke, f"model.dtype={dtype}")
        p = plan(cfg)
        state, _ = build_state(cfg, p.mesh, p.rules)
        rows = np.random.default_rng(0).integers(0, 256, (8, cfg.train.seq_len + 1), np.int32)
        batch = {k: jax.device_put(x.reshape(p.batch_shape), p.batch_sharding)
                 for k, x in (("inputs", rows[:, :-1]), ("targets", rows[:, 1:]))}
        states[dtype] = jax.jit(compute_grads)(state, batch)
    (t32, g32), (t16, g16) = states["float32"], states["bfloat16"]
    ce32, ce16 = t32["loss"], t16["loss"]
    loss_error = abs(float(ce16) - float(ce32)) / float(ce32)
    total = float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g32))))
    worst, name = 0.0, ""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g32), jax.tree.leaves(g16)):
        size = float(jnp.linalg.norm(a))
        if size >= U * total and rel(b, a) > worst:  # leaves not zero but for rounding
            worst, name = rel(b, a), jax.tree_util.keystr(path)
    ok = loss_error <= U and worst <= 16 * U
    return ok, (f"loss {float(ce32):.4f}: bf16 off by {loss_error / U:.3f} u (limit 1 u); "
                f"worst weight gradient {name} {worst / U:.2f} u (limit 16 u)")


def check_generation(smoke: bool) -> tuple[bool, str]:
    """Greedy generation: a mixed-length batch equals each prompt alone, and the KV
    cache's logits equal the full forward pass."""
    cfg = small(smoke, "model.dtype=float32", "model.vocab_size=512")
    p = plan(cfg, batches=False)
    state, _ = build_state(cfg, p.mesh, p.rules)
    model = state.model()
    gen = Generator(model, p.mesh, p.rules, eos_id=511, vocab_limit=511)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 511, n).tolist() for n in (7, 1, 30)]
    new = 8 if smoke else 32
    batch = gen.generate(prompts, new).tokens
    alone = [gen.generate([q], new).tokens[0] for q in prompts]
    tokens = jnp.asarray(rng.integers(0, 511, (2, 24)), jnp.int32)
    full = model(tokens)
    cache = model.init_cache(2, 24)
    logits, cache = model.extend(tokens[:, :16], cache.at(0), all_logits=True)
    error = rel(logits, full[:, :16])
    for t in range(16, 24):
        step, cache = model.extend(tokens[:, t:t + 1], cache.at(t))
        error = max(error, rel(step, full[:, t]))
    ok = batch == alone and error <= 1e-4
    return ok, (f"batch == one by one: {batch == alone}; cached logits vs full forward: "
                f"relative error {error:.1e} (limit 1e-4); {len(prompts)} prompts x {new} "
                "tokens")


def bench(config: str, smoke: bool) -> tuple[bool, str, dict | None]:
    args = ["--steps", "2", "--warmup", "1", "model.num_layers=2", "model.d_model=64",
            "model.num_heads=4", "model.mlp_dim=128", "train.batch_size=2",
            "train.seq_len=64"] if smoke else []
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--config", config, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return False, f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}", None
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    memory = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f} GiB"
    return True, (f"{r['tokens_per_sec']:,.0f} tokens/s, {1e3 * r['step_time_s']:.1f} ms/step, "
                  f"MFU {mfu}, compile {r['compile_time_s']:.1f} s, peak memory {memory} "
                  f"({seconds:.0f} s in all)"), r


def bench_serve(smoke: bool, *extra: str) -> tuple[bool, str, dict | None]:
    args = ["--config", "configs/tiny.yaml", "--requests", "4", "--new-tokens", "2", "8",
            "--prompt-len", "2", "16", "--repeats", "1", "serve.max_batch=2"] if smoke else \
        ["--config", "configs/gpt2-124m.yaml", "serve.max_len=256"]
    args += extra
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "scripts/bench_serve.py", "--no-server", *args,
                           "compile_cache_dir=null"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return False, f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}", None
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return True, (f"engine {r['engine_alone']['tokens_per_s']:,.0f} tokens/s, static "
                  f"{r['static']['tokens_per_s']:,.0f} tokens/s: "
                  f"{r['engine_alone_speedup']:.2f}x (step bound {r['step_bound']:.2f}x; "
                  f"{seconds:.0f} s in all)"), r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on any backend (checks the script, not the GPU)")
    args = p.parse_args()
    device = jax.devices()[0]
    if device.platform != "gpu" and not args.smoke:
        raise SystemExit(f"no GPU: JAX sees {device.platform} ({device.device_kind}); "
                         "use --smoke to try the script elsewhere")
    print(f"jax {jax.__version__} on {jax.device_count()} x {device.device_kind}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    rows, results = [], {}
    for name, check in (("cudnn-attention", check_cudnn_attention),
                        ("bf16-step", check_bf16_step), ("generation", check_generation)):
        t0 = time.perf_counter()
        try:
            ok, detail = check(args.smoke)
        except Exception as e:  # noqa: BLE001 - report it and go on with the rest
            first = str(e).splitlines()[0][:200] if str(e) else ""
            ok, detail = False, f"{type(e).__name__}: {first}"
        seconds = time.perf_counter() - t0
        rows.append((name, "pass" if ok else "FAIL", f"{detail} [{seconds:.0f} s]"))
        print(" | ".join(rows[-1]), flush=True)
    # the smoke run tries the benchmark path once, on tiny shapes
    configs = ["configs/gpt2-124m.yaml"] + ([] if args.smoke else ["configs/gpt2-1.3b.yaml"])
    for config in configs:
        ok, detail, r = bench(config, args.smoke)
        results[config] = r
        rows.append((f"bench {Path(config).stem}", "ran" if ok else "FAIL", detail))
        print(" | ".join(rows[-1]), flush=True)
    paged = ("--static-rows", "2", "serve.max_batch=4", "serve.kv_pages=32") if args.smoke \
        else ("--static-rows", "8", "serve.max_batch=32", "serve.kv_pages=128")
    for name, extra in (("serve", ()), ("serve int8", ("serve.quantize=int8",)),
                        ("serve paged", paged)):
        ok, detail, results[name] = bench_serve(args.smoke, *extra)
        if ok and name == "serve int8":
            detail += f", parameters {results[name]['param_mib'][0]:,.1f} -> " \
                f"{results[name]['param_mib'][1]:,.1f} MiB"
        rows.append((f"bench {name}", "ran" if ok else "FAIL", detail))
        print(" | ".join(rows[-1]), flush=True)
    width = max(len(r[0]) for r in rows)
    print("\n" + "\n".join(f"{n:<{width}}  {s:<4}  {d}" for n, s, d in rows))
    print(json.dumps({"device": device.device_kind, "jax": jax.__version__,
                      "checks": {n: s for n, s, _ in rows}, "bench": results}))
    if any(s == "FAIL" for _, s, _ in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
