"""Serving benchmark: continuous batching (`python -m train.serve`, called over HTTP)
against static batching (train.generate's Generator) on the same prompts.

    python scripts/bench_serve.py [--checkpoint PATH] [--config X.yaml key=value ...]
        [--requests 32] [--prompt-len 8 96] [--new-tokens 16 128] [--seed 0] [--repeats 3]
        [--no-server]

The workload is fixed by --seed: --requests requests, each with a prompt of random token
ids and a number of new tokens, both drawn log-uniformly from their ranges (8x and more
apart by default), all sent at once with `ignore_eos`, so each produces exactly its
number of tokens. Without --checkpoint the model is the config's, randomly initialized
(written as an export to a temporary directory, then served).

Continuous: the server (serve.max_batch slots, from the config) started in a
subprocess; every request streamed by its own client thread; time to first token per
request from the arrival of its first chunk, inter-token latency (ITL) as the gaps
between its chunks (a chunk holds the tokens of one engine call, serve.decode_steps of
them, less any held back for a character or stop string not yet whole); throughput =
all new tokens / the wall time from the first request sent to the last token received.
The same requests also go through the engine in this process (`Engine.generate`, no
HTTP): what the server costs beyond its engine. `--no-server` measures only that and
static batching (jax and flax alone: scripts/gpu_check.py runs it on a GPU image).

Static: the same model loaded in this process after the server has stopped, the same
requests in arrival order in batches of serve.max_batch rows (the server's KV cache
memory; --static-rows sets another number, e.g. 8 against serve.max_batch=32 with
serve.kv_pages=128: a paged cache of the same 2,048 tokens as 8 rows of 256), each batch
prefilled together and decoded on the device until its
longest member is done; a request's first token comes with its batch's prefill, its later
tokens at the batch's mean step time (its ITL). Throughput counts each request's own
tokens only (a batch's rows that ran past their own length produce nothing anyone asked
for).

Each side runs the workload --repeats times; the run of median wall time is reported.
With serve.quantize=int8 every side serves the same int8 weights (the server quantizes
its own copy; the parameter sizes before and after are in the JSON).

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def workload(n: int, prompt_len: tuple[int, int], new_tokens: tuple[int, int], vocab: int,
             seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)

    def log_uniform(lo, hi):
        return np.exp(rng.uniform(np.log(lo), np.log(hi + 1), n)).astype(int).clip(lo, hi)
    lengths, news = log_uniform(*prompt_len), log_uniform(*new_tokens)
    lengths[0], lengths[1], news[0], news[1] = prompt_len[0], prompt_len[1], new_tokens[1], \
        new_tokens[0]  # both ends of each range are in it
    return [(rng.integers(0, vocab, int(p)).tolist(), int(m)) for p, m in zip(lengths, news)]


def percentiles(xs) -> dict:
    xs = np.asarray(xs, float) * 1000
    return {"p50_ms": round(float(np.percentile(xs, 50)), 2),
            "p99_ms": round(float(np.percentile(xs, 99)), 2)}


def continuous(checkpoint: str, args, requests) -> dict:
    import openai
    cmd = [sys.executable, "-m", "train.serve", "--checkpoint", checkpoint, "--port", "0",
           "serve.model_name=bench", *(["--config", args.config] if args.config else []),
           *args.overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                     daemon=True).start()
    url = None
    while not any(line.startswith("serving") for line in lines):
        if proc.poll() is not None:
            sys.exit("the server failed to start:\n" + "".join(lines))
        url = url or next((m.group(1) for line in lines
                           if (m := re.search(r"listening on (\S+)", line))), None)
        time.sleep(0.1)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                           timeout=3600)

    def one(prompt, new):
        times = []
        stream = client.completions.create(
            model="bench", prompt=prompt, max_tokens=new, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        tokens = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter())
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return times, tokens

    def run():
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            done = list(pool.map(lambda r: one(*r), requests))
        wall = time.perf_counter() - t0
        tokens = sum(t for _, t in done)
        assert tokens == sum(n for _, n in requests), "a request made fewer tokens than asked"
        return summary(tokens, wall, ttft=[times[0] - t0 for times, _ in done],
                       itl=[b - a for times, _ in done for a, b in zip(times, times[1:])])

    one(*requests[0])  # one request first: connections, the first steps
    try:
        return median_run([run() for _ in range(args.repeats)])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def summary(tokens: int, wall: float, **latencies) -> dict:
    return {"tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            **{k: percentiles(v) for k, v in latencies.items()}}


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]


def engine_alone(loaded, cfg, args, requests) -> dict:
    """The same requests through the server's engine in this process, all submitted at
    once (no HTTP, no streaming): its throughput."""
    from train.inference.engine import Engine, Sampling
    engine = Engine.of_config(loaded.model, loaded.mesh, loaded.rules, cfg.serve, eos_id=-1)
    prompts = [p for p, _ in requests]
    each = [Sampling(max_tokens=n, ignore_eos=True) for _, n in requests]
    engine.generate(prompts[:2], each[:2])  # the first steps

    def run():
        t0 = time.perf_counter()
        done = engine.generate(prompts, each)
        return summary(sum(len(r.tokens) for r in done), time.perf_counter() - t0)
    return median_run([run() for _ in range(args.repeats)])


def static(loaded, args, requests, rows: int) -> dict:
    from train.inference.generate import Generator
    gen = Generator(loaded.model, loaded.mesh, loaded.rules, eos_id=-1)  # never stops early
    batches = [requests[i:i + rows] for i in range(0, len(requests), rows)]
    for batch in batches:  # compile each batch's shapes first (the server compiles too)
        gen.generate([p for p, _ in batch], max(n for _, n in batch))

    def run():
        ttft, itl, t = [], [], 0.0
        for batch in batches:
            out = gen.generate([p for p, _ in batch], max(n for _, n in batch))
            steps = max(n for _, n in batch) - 1
            step_s = out.decode_s / max(steps, 1)
            for _, n in batch:
                ttft.append(t + out.prefill_s)
                itl += [step_s] * (n - 1)
            t += out.prefill_s + out.decode_s
        return summary(sum(n for _, n in requests), t, ttft=ttft, itl=itl)
    return {**median_run([run() for _ in range(args.repeats)]), "batch_rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="what train.serve reads (default: a random model)")
    p.add_argument("--config", default=None)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, nargs=2, default=[8, 96])
    p.add_argument("--new-tokens", type=int, nargs=2, default=[16, 128])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs of each side (median)")
    p.add_argument("--static-rows", type=int, default=None,
                   help="static batching's rows (default serve.max_batch: the server's KV "
                        "memory)")
    p.add_argument("--no-server", action="store_true",
                   help="static batching and the engine alone, no HTTP server")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args()

    import jax

    from train import startup
    from train.config import load_config
    cfg = load_config(args.config, args.overrides)
    startup.start(cfg, processes=False)
    vocab = min(256, cfg.model.vocab_size or 256)
    requests = workload(args.requests, tuple(args.prompt_len), tuple(args.new_tokens), vocab,
                        args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, loaded = args.checkpoint, None
        if checkpoint is None:  # a random model, as an export the server can read
            sys.path.insert(0, os.path.join(ROOT, "scripts"))
            from bench_decode import random_model
            from flax import nnx
            model, p = random_model(cfg)
            if args.no_server:
                loaded = types.SimpleNamespace(model=model, mesh=p.mesh, rules=p.rules)
            else:
                from train.inference.export import write_export
                checkpoint = os.path.join(tmp, "random")
                write_export(checkpoint, nnx.state(model, nnx.Param), cfg, {"step": 0})
            del model
        cont = None if args.no_server else continuous(checkpoint, args, requests)
        if loaded is None:
            from train.inference.load import load
            loaded = load(checkpoint, cfg, args.overrides)
        param_mib = None
        if cfg.serve.quantize:  # static batching serves the same weights as the server
            from models.quantize import quantize
            param_mib = [round(b / 2**20, 1) for b in quantize(loaded.model,
                                                              cfg.serve.quantize)]
            print(f"serve.quantize={cfg.serve.quantize}: parameters {param_mib[0]} MiB -> "
                  f"{param_mib[1]} MiB", flush=True)
        static_rows = args.static_rows or cfg.serve.max_batch
        stat = static(loaded, args, requests, static_rows)
        alone = engine_alone(loaded, cfg, args, requests)
    # decode steps each needs at the least: static, its batches' longest members; continuous,
    # every token over all slots (were prefill free and no slot ever idle), and the
    # longest request's tokens one after another
    rows = cfg.serve.max_batch
    news = [n for _, n in requests]
    static_steps = sum(max(news[i:i + static_rows]) for i in range(0, len(news), static_rows))
    least = max(-(-sum(news) // rows), max(news))
    bound = round(static_steps / least, 2)
    # KV cache memory, in tokens: the server's (its rows' slots, or its pages), and what
    # static batching's rows need to take any request the server takes
    max_len = cfg.serve.max_len or cfg.model.max_seq_len
    kv_tokens = {"continuous": (cfg.serve.kv_pages * cfg.serve.page_size if cfg.serve.kv_pages
                                else rows * max_len), "static": static_rows * max_len}
    result = {"requests": args.requests, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "seed": args.seed,
              "max_batch": cfg.serve.max_batch, "decode_steps": cfg.serve.decode_steps,
              "quantize": cfg.serve.quantize, "param_mib": param_mib,
              "repeats": args.repeats, "devices": jax.device_count(),
              "device": jax.devices()[0].device_kind, "continuous": cont, "static": stat,
              "engine_alone": alone,
              "speedup": cont and round(cont["tokens_per_s"] / stat["tokens_per_s"], 2),
              "engine_alone_speedup": round(alone["tokens_per_s"] / stat["tokens_per_s"], 2),
              "step_bound": bound, "kv_tokens": kv_tokens}
    for name, r in (("continuous", cont), ("static", stat))[args.no_server:]:
        print(f"{name:>10}: {r['tokens']} tokens in {r['wall_s']:.2f} s = "
              f"{r['tokens_per_s']:,.0f} tokens/s | TTFT p50 {r['ttft']['p50_ms']:.0f} ms p99 "
              f"{r['ttft']['p99_ms']:.0f} ms | ITL p50 {r['itl']['p50_ms']:.1f} ms p99 "
              f"{r['itl']['p99_ms']:.1f} ms")
    print(f"    engine: {alone['tokens']} tokens in {alone['wall_s']:.2f} s = "
          f"{alone['tokens_per_s']:,.0f} tokens/s (the server's engine in this process, "
          "no HTTP)")
    print(("" if args.no_server else f"continuous / static throughput: "
           f"{result['speedup']:.2f}x, ") + "engine alone / static: "
          f"{result['engine_alone_speedup']:.2f}x (decode steps: static {static_steps}, "
          f"continuous at least {least}: a {bound:.2f}x bound at equal step cost)")
    print(f"KV cache: continuous {kv_tokens['continuous']:,} tokens "
          f"({'serve.kv_pages' if cfg.serve.kv_pages else 'serve.max_batch x max_len'}), "
          f"static {kv_tokens['static']:,} ({static_rows} rows x {max_len})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
