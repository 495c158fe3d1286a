"""Checkpoint save/restore timing for a ~100M-parameter train state.

    python scripts/bench_checkpoint.py --dir /tmp/ckpt-bench \
        [--config configs/gpt2-124m.yaml key=value ...]

Builds the config's sharded train state (parameters + AdamW moments), times one train
step, then an async save (how long the loop is blocked, and until committed), a
restore, and the disk's own sequential write speed (dd, 1 GiB, O_DIRECT) for reference.
`--dir gs://bucket/path` times cloud storage (set the emulator or GCS variables first).
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from train.checkpoint import Checkpoints  # noqa: E402
from train.config import load_config, to_dict  # noqa: E402
from train.data.batches import WindowBatches  # noqa: E402
from train.plan import build_state, plan  # noqa: E402
from train.step import jit_train_step  # noqa: E402


def dd_write_mb_s(directory: str) -> float | None:
    if "://" in directory:
        return None
    Path(directory).mkdir(parents=True, exist_ok=True)
    target = Path(directory) / "dd.bin"
    out = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", "count=1024",
                          "oflag=direct"], capture_output=True, text=True)
    target.unlink(missing_ok=True)
    last = out.stderr.strip().splitlines()[-1]  # "... copied, 1.2 s, 900 MB/s"
    value, unit = last.rsplit(",", 1)[1].split()
    return float(value) * {"kB/s": 1e-3, "MB/s": 1.0, "GB/s": 1e3}[unit]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="where to write (local path or gs://)")
    p.add_argument("--config", default="configs/gpt2-124m.yaml")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, ["data.source=synthetic", "train.batch_size=4",
                                    "train.seq_len=256", "mesh.data=1", "mesh.fsdp=-1",
                                    *args.overrides])
    p = plan(cfg)
    state, shardings = build_state(cfg, p.mesh, p.rules)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    nbytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))

    batch_sharding = p.batch_sharding
    batches = WindowBatches(cfg, batch_sharding, None)
    step = jit_train_step(shardings, {"inputs": batch_sharding, "targets": batch_sharding})
    state, m = step(state, batches.batch(0))
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(1, 3):
        state, m = step(state, batches.batch(i))
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / 2

    if "://" not in args.dir:
        shutil.rmtree(args.dir, ignore_errors=True)
    ckpts = Checkpoints(args.dir)
    t0 = time.perf_counter()
    ckpts.save(1, state, {"step": 1}, to_dict(cfg))
    blocked_s = time.perf_counter() - t0
    ckpts.wait()
    total_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    arrays, _ = ckpts.restore(1, p.state_target(), p.cfg.optimizer.name)
    jax.block_until_ready(arrays)
    restore_s = time.perf_counter() - t0
    ckpts.close()

    mb = nbytes / 1e6
    print(json.dumps({
        "dir": args.dir, "params": n_params, "state_mb": round(mb, 1),
        "train_step_s": round(step_s, 3), "save_blocked_s": round(blocked_s, 3),
        "blocked_pct_of_step": round(100 * blocked_s / step_s, 1),
        "save_total_s": round(total_s, 2), "save_mb_s": round(mb / total_s, 1),
        "restore_s": round(restore_s, 2), "restore_mb_s": round(mb / restore_s, 1),
        "dd_write_mb_s": dd_write_mb_s(args.dir), "jax": jax.__version__,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}))


if __name__ == "__main__":
    main()
