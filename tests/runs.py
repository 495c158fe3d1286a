"""A small training run driven as a user drives it (subprocesses), shared by the
checkpoint tests."""

import json
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO, cli_env

STEPS = 24
# A small model on a (data=2, fsdp=2, model=2) mesh of 8 fake devices, logging every
# step, a checkpoint every 4 steps (async by default). The lr schedule is fixed to 24
# steps, so runs of other lengths follow the same trajectory.
RUN = ["--config", "configs/tiny.yaml", f"train.steps={STEPS}", "train.log_every=1",
       "train.seq_len=32", "train.batch_size=8", "model.num_layers=2", "model.d_model=64",
       "model.mlp_dim=128", "mesh.data=2", "mesh.fsdp=2", "mesh.model=2",
       "sharding.rules=fsdp_tp", "checkpoint.every_steps=4", "data.max_bytes=2000000",
       f"optimizer.decay_steps={STEPS}", "compile_cache_dir=null"]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def start(out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train", *RUN, f"output_dir={out}", *extra],
                            cwd=REPO, env=env or cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, proc: subprocess.Popen, deadline_s: float = 300) -> None:
    end = time.time() + deadline_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early (rc {proc.returncode}): {proc.stdout.read()}")
        if time.time() > end:
            proc.kill()
            raise AssertionError("deadline passed")
        time.sleep(0.01)


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


MOE_STEPS = 6
# The tiny MoE (configs/tiny-moe.yaml) shrunk, experts over expert=4 x fsdp=2 of the 8
# devices (expert ways split the batch too), logging every step.
MOE_RUN = ["--config", "configs/tiny-moe.yaml", f"train.steps={MOE_STEPS}",
           "train.log_every=1", "train.seq_len=32", "train.batch_size=8",
           "model.num_layers=2", "model.d_model=64", "model.mlp_dim=128",
           "model.moe.expert_mlp_dim=64", "mesh.data=1", "mesh.fsdp=2", "mesh.expert=4",
           "checkpoint.every_steps=0", "data.max_bytes=2000000",
           f"optimizer.decay_steps={MOE_STEPS}", "compile_cache_dir=null"]
