"""Generation benchmark: prefill and decode throughput with the KV cache.

    python scripts/bench_decode.py --config configs/gpt2-124m.yaml [key=value ...]
        [--batch 1 32] [--prompt-len 128] [--new-tokens 128] [--repeats 3]

A randomly initialized model of the config (no checkpoint needed) on the config's mesh,
the same Generator as `python -m train.generate` (jitted prefill, on-device decode
loop), random prompts of --prompt-len tokens and exactly --new-tokens new tokens (EOS
never produced). After one untimed run per batch size (it compiles), the best of
--repeats runs is reported: prefill tokens/s, decode tokens/s (= batch x decode steps /
decode time), milliseconds per decode step and, where the device's peak bandwidth is
known (GPU/TPU, train/metrics.py), memory-bandwidth utilization:

    MBU = (weight bytes + KV cache bytes) / decode step time / (devices x peak bytes/s)

i.e. each step reads every weight (in the compute dtype) and the whole cache once.
The last line is one JSON object.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from train import cli  # noqa: E402
from train.inference.generate import Generator  # noqa: E402
from train.metrics import peak_bandwidth_per_device  # noqa: E402
from train.plan import build_state, plan  # noqa: E402


def random_model(cfg):
    """A randomly initialized Transformer of cfg.model, built sharded on cfg's mesh (the
    parameters of a fresh train state), and its plan."""
    p = plan(cfg, batches=False)
    state, _ = build_state(cfg, p.mesh, p.rules)
    return state.model(), p


def measure(gen, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    cfg = gen.cfg
    rng = np.random.default_rng(batch)
    prompts = rng.integers(0, gen.vocab_limit, (batch, prompt_len)).tolist()
    first = gen.generate(prompts, new_tokens)  # compiles
    runs = [gen.generate(prompts, new_tokens) for _ in range(repeats)]
    steps = new_tokens - 1
    decode_s = min(r.decode_s for r in runs)
    prefill_s = min(r.prefill_s for r in runs)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(gen.params))
    cache = 2 * cfg.num_layers * gen.padded(batch) * (prompt_len + new_tokens) * \
        cfg.kv_heads * cfg.head_size * np.dtype(cfg.dtype).itemsize  # keys and values
    step_s = decode_s / steps
    peak = peak_bandwidth_per_device(jax.devices()[0])
    devices = gen.mesh.size
    assert all(len(t) == new_tokens for t in runs[0].tokens), "EOS must not stop the benchmark"
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "prefill_tokens_per_sec": batch * prompt_len / prefill_s,
            "decode_tokens_per_sec": batch * steps / decode_s,
            "decode_step_ms": 1e3 * step_s, "compile_s": first.compile_s,
            "weight_bytes": weights, "cache_bytes": cache,
            "mbu": (weights + cache) / step_s / (devices * peak) if peak else None,
            "devices": devices, "device_kind": jax.devices()[0].device_kind}


def describe(r: dict) -> str:
    mbu = "n/a" if r["mbu"] is None else f"{100 * r['mbu']:.1f}%"
    return (f"batch {r['batch']:>3} | prefill {r['prefill_tokens_per_sec']:,.0f} tokens/s | "
            f"decode {r['decode_tokens_per_sec']:,.0f} tokens/s ({r['decode_step_ms']:.2f} "
            f"ms/step) | MBU {mbu} | weights {r['weight_bytes'] / 2**20:.0f} MiB, cache "
            f"{r['cache_bytes'] / 2**20:.1f} MiB | compile {r['compile_s']:.1f} s")


def main(argv=None) -> None:
    p = cli.parser("Benchmark generation (prefill and KV-cache decode).")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    cli.main(p, argv, lambda cfg, args: run(cfg, args), start={"processes": False})


def run(cfg, args) -> None:
    jax.config.update("jax_enable_compilation_cache", False)
    model, p = random_model(cfg)
    V = cfg.model.vocab_size
    gen = Generator(model, p.mesh, p.rules, eos_id=V - 1, vocab_limit=V - 1)  # no EOS
    print(f"{cfg.name}: {jax.devices()[0].device_kind} x {p.mesh.size}, dtype "
          f"{cfg.model.dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens",
          flush=True)
    results = []
    for b in args.batch:
        r = measure(gen, b, args.prompt_len, args.new_tokens, args.repeats)
        print(describe(r), flush=True)
        results.append(r)
    print(json.dumps({"config": cfg.name, "results": results}))


if __name__ == "__main__":
    main()
