"""The optimizers' own cost: one update (tx.update + apply) on a model's parameters.

    python scripts/bench_optimizers.py --config configs/gpt2-124m.yaml [key=value ...]
        [--steps 10] [--names adamw,adafactor,lion,sgd,muon]

Builds the config's model on one device, then for each optimizer jits its update with
random gradients and times `--steps` updates after one warm-up (one host sync at the
end). Prints ms per update and the optimizer state's bytes beside the parameters'. The
train step's own cost (forward, backward) is the same for every optimizer: see
scripts/bench.py --compare for whole steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from models import Transformer  # noqa: E402
from train.config import load_config  # noqa: E402
from train.optimizer import make_optimizer  # noqa: E402

SETTINGS = {"sgd": {"momentum": 0.9}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--names", default="adamw,adafactor,lion,sgd,muon")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    _, params = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(0)))
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape, p.dtype)
                         * 1e-3, params)
    gib = 1024 ** 3
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    print(f"{cfg.model.style}, {param_bytes / 4 / 1e6:.1f}M parameters "
          f"({param_bytes / gib:.3f} GiB), {jax.devices()[0].device_kind}")
    print("optimizer | ms/update | state GiB | state / parameters")
    for name in args.names.split(","):
        opt_cfg = cfg.optimizer.__class__(name=name, **SETTINGS.get(name, {}))
        tx, _ = make_optimizer(opt_cfg, total_steps=100)

        def step(p, s, g, tx=tx):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        step = jax.jit(step, donate_argnums=(0, 1))
        p = jax.tree.map(lambda x: x.copy(), params)
        state = jax.jit(tx.init)(p)  # fresh buffers (init may share its zeros)
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
        p, state = step(p, state, grads)
        jax.block_until_ready(p)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            p, state = step(p, state, grads)
        jax.block_until_ready(p)
        ms = (time.perf_counter() - t0) / args.steps * 1e3
        print(f"{name:9s} | {ms:9.1f} | {state_bytes / gib:9.3f} | "
              f"{state_bytes / param_bytes:.2f}")


if __name__ == "__main__":
    main()
