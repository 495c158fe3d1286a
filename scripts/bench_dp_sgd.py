"""DP-SGD's cost against plain training: the same train step with and without
privacy.dp_sgd, on the same batch.

    python scripts/bench_dp_sgd.py [--config configs/tiny.yaml] [--steps 10]
        [--microbatches 1,4] [key=value ...]

Builds the config's state on the local devices (mesh and rules from the config), then
for plain training and DP-SGD at each `--microbatches` count compiles the train
step, reports the compiled program's memory per device (arguments + outputs + temporaries
- aliased, XLA's memory analysis) and times `--steps` steps after one warm-up on a
fixed batch whose rows are all sampled sequences (so both process the same tokens).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from train.config import load_config  # noqa: E402
from train.data.batches import to_global  # noqa: E402
from train.plan import plan  # noqa: E402
from train.privacy import Privacy  # noqa: E402
from train.startup import compile_options  # noqa: E402
from train.state import init_state  # noqa: E402
from train.step import jit_train_step  # noqa: E402

GIB = 1024 ** 3


def measure(cfg, privacy, steps: int) -> tuple[float, float]:
    """(ms per step, compiled memory per device in GiB) of cfg's train step."""
    p = plan(cfg, privacy=privacy)
    state = init_state(p.init, p.shardings, cfg.train.seed)
    t = cfg.train
    rng = np.random.default_rng(0)
    rows = {"inputs": rng.integers(0, cfg.model.vocab_size, (t.batch_size, t.seq_len),
                                   dtype=np.int32),
            "targets": rng.integers(0, cfg.model.vocab_size, (t.batch_size, t.seq_len),
                                    dtype=np.int32),
            "weights": np.ones((t.batch_size, t.seq_len), np.float32)}
    batch = to_global(rows, cfg, p.batch_sharding)
    step = jit_train_step(p.shardings, {k: p.batch_sharding for k in batch})
    compiled = step.lower(state, batch).compile(compile_options(p.shardings))
    m = compiled.memory_analysis()
    memory = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
              - m.alias_size_in_bytes) / GIB
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps * 1e3, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--microbatches", default="1,4")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = ["compile_cache_dir=null", "data.source=synthetic"]
    plain = load_config(args.config, base + args.overrides)
    if plain.model.vocab_size is None:
        plain = load_config(args.config, base + ["model.vocab_size=256"] + args.overrides)
    t = plain.train
    tokens = t.batch_size * t.seq_len
    print(f"{plain.model.style}, batch {t.batch_size} x {t.seq_len} tokens, "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("run | microbatches | ms/step | tokens/s | memory GiB/device")
    vocab = f"model.vocab_size={plain.model.vocab_size}"
    for m in map(int, args.microbatches.split(",")):
        cfg = load_config(args.config, base + [vocab, f"train.microbatches={m}"] + args.overrides)
        ms, mem = measure(cfg, None, args.steps)
        print(f"plain | {m} | {ms:.1f} | {tokens / ms * 1e3:,.0f} | {mem:.4f}")
        cfg = load_config(args.config, base + [vocab, "data.path=unused", "privacy.dp_sgd=true",
                                               "privacy.noise_multiplier=1.0",
                                               f"train.microbatches={m}"] + args.overrides)
        privacy = Privacy(num_sequences=100 * t.batch_size, expected_batch=t.batch_size,
                          noise_multiplier=1.0, clip_norm=1.0, delta=1e-5)
        ms, mem = measure(cfg, privacy, args.steps)
        print(f"dp_sgd | {m} | {ms:.1f} | {tokens / ms * 1e3:,.0f} | {mem:.4f}")


if __name__ == "__main__":
    main()
