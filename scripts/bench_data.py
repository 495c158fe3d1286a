"""Data loader throughput (tokens/s per host) from pre-tokenized data, next to what the
tiny model's train step consumes.

    python scripts/bench_data.py --input "/usr/lib/python3*/**/*.py" --workdir /tmp/bench-data

Prepares the input once (byte tokenizer unless --tokenizer), then reads batches through
the same Grain pipeline the trainer uses (PackedBatches, this process's rows) with 0 and
N worker processes, with and without document masking, at the tiny config's batch shape
and at a larger one. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from train.config import load_config  # noqa: E402
from train.data.batches import PackedBatches  # noqa: E402
from train.data.prepared import is_prepared, prepare  # noqa: E402
from train.data.resolve import resolve_data  # noqa: E402
from train.plan import build_state, plan  # noqa: E402
from train.step import jit_train_step  # noqa: E402


def loader_tokens_per_s(cfg, path: str, steps: int) -> float:
    batches = PackedBatches(cfg, None, path)
    batches.local(0)  # start the iterator (and its workers) outside the timing
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        batches.local(step)
    seconds = time.perf_counter() - t0
    batches.close()
    return steps * cfg.train.batch_size * cfg.train.seq_len / seconds


def train_tokens_per_s(cfg, path: str, steps: int = 10) -> float:
    p = plan(cfg)
    state, shardings = build_state(cfg, p.mesh, p.rules)
    spec = p.batch_sharding
    batches = PackedBatches(cfg, spec, path)
    first = batches.batch(0)
    step = jit_train_step(shardings, {k: spec for k in first})
    state, m = step(state, first)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        state, m = step(state, batches.batch(i))
    jax.block_until_ready(m)
    batches.close()
    return steps * cfg.train.batch_size * cfg.train.seq_len / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="corpus to prepare (path, dir or glob)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--tokenizer", default="byte")
    p.add_argument("--workers", type=int, default=2, help="N for the N-worker measurement")
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args()
    path = Path(args.workdir) / "prepared"
    if not is_prepared(path):
        t0 = time.perf_counter()
        meta = prepare(args.input, path, args.tokenizer, progress=False)
        tokens = sum(s["tokens"] for s in meta["splits"].values())
        print(json.dumps({"prepare_s": round(time.perf_counter() - t0, 1), "tokens": tokens,
                          "prepare_tokens_per_s": round(tokens / (time.perf_counter() - t0))}))
    shapes = {"tiny (16 x 128)": ["train.batch_size=16", "train.seq_len=128"],
              "32 x 1024": ["train.batch_size=32", "train.seq_len=1024",
                            "model.max_seq_len=1024"]}
    for name, shape in shapes.items():
        for mask in (False, True):
            for workers in (0, 1, args.workers):
                cfg, data_path = resolve_data(load_config("configs/tiny.yaml", [
                    f"data.path={path}", *shape, f"data.num_workers={workers}",
                    f"data.mask_documents={mask}"]))
                steps = args.steps if "tiny" in name else max(args.steps // 8, 50)
                tps = loader_tokens_per_s(cfg, data_path, steps)
                print(json.dumps({"batch": name, "mask_documents": mask, "workers": workers,
                                  "loader_tokens_per_s": round(tps)}), flush=True)
    cfg, data_path = resolve_data(load_config("configs/tiny.yaml", [
        f"data.path={path}", "mesh.data=-1", "mesh.fsdp=1", "sharding.rules=dp"]))
    print(json.dumps({"tiny_train_step_tokens_per_s": round(train_tokens_per_s(cfg, data_path)),
                      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                      "jax": jax.__version__}))


if __name__ == "__main__":
    main()
