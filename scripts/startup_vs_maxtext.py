"""Start-up and CPU throughput of `python -m train` beside MaxText's trainer, same tiny
Llama, same machine, 8 fake CPU devices (issue 6). Each tool is started as a user starts
it; the clock runs from the command's start to the log line of its first step; the
steady step time is the wall clock between the log lines of steps 10 and the last
(`--steps`, 30 by default), per step (both tools log every step, so both pay one host
sync per step).

    python3.12 -m venv /tmp/vmax && /tmp/vmax/bin/pip install "maxtext[tpu]==0.2.5"
    python scripts/startup_vs_maxtext.py --maxtext-python /tmp/vmax/bin/python [--repeats 2]

Ours runs twice per repeat: with an empty compilation cache, then again with the cache
the first run filled (a second start of the same config). MaxText runs with its
defaults (its own cache in ~/jax_cache is cleared before each run, so it compiles).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from statistics import mean

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAXTEXT_ARGS = [
    "hardware=cpu", "skip_jax_distributed_system=true", "dataset_type=synthetic",
    "enable_checkpointing=false", "base_num_decoder_layers=4",
    "base_emb_dim=256", "base_num_query_heads=4", "base_num_kv_heads=4", "head_dim=64",
    "base_mlp_dim=1024", "vocab_size=512", "max_target_length=256",
    "per_device_batch_size=1", "ici_fsdp_parallelism=-1", "remat_policy=full",
    "scan_layers=true", "dtype=bfloat16", "attention=dot_product",
    "run_name=startup-bench", "enable_tensorboard=false"]


def timed(cmd: list[str], env: dict, step_line: re.Pattern, cwd: str
          ) -> tuple[float, float]:
    """(seconds from the command's start to its first step's log line, steady seconds
    per step: wall clock between the log lines of step 10 and the last, over the steps
    between; both tools log every step)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen, lines = {}, []
    for line in proc.stdout:
        lines.append(line)
        m = step_line.search(line)
        if m:
            seen.setdefault(int(m.group(1)), time.perf_counter() - t0)
    proc.wait()
    if proc.returncode or not seen:
        raise RuntimeError(f"{cmd[:4]} failed (rc {proc.returncode}):\n{''.join(lines[-30:])}")
    first, last = min(seen), max(seen)
    return seen[first], (seen[last] - seen[first + 9]) / (last - first - 9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maxtext-python", required=True)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="steps per run (>= 12)")
    args = p.parse_args()
    if args.steps < 12:
        p.error(f"--steps {args.steps} leaves no steady window after step 10; use >= 12")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    base_yml = subprocess.run(
        [args.maxtext_python, "-c", "import maxtext, os; print(os.path.join(os.path.dirname("
         "maxtext.__file__), 'configs', 'base.yml'))"],
        capture_output=True, text=True, check=True).stdout.strip()
    results = []
    for _ in range(args.repeats):
        out = tempfile.mkdtemp()
        shutil.rmtree(os.path.expanduser("~/jax_cache"), ignore_errors=True)
        results.append(("maxtext", *timed(
            [args.maxtext_python, "-m", "maxtext.trainers.pre_train.train", base_yml,
             f"base_output_directory={out}/maxtext", f"steps={args.steps}"] + MAXTEXT_ARGS,
            env,
            re.compile(r"completed step: (\d+),"), REPO)))
        cache = f"{out}/cache"
        for label in ("shardlm (empty cache)", "shardlm (second start)"):
            results.append((label, *timed(
                [sys.executable, "-m", "train", "--config", "configs/llama-tiny-bench.yaml",
                 f"output_dir={out}/ours-{len(results)}", f"compile_cache_dir={cache}",
                 f"train.steps={args.steps}"], env,
                re.compile(r"\bstep\s+(\d+) \|"), REPO)))
        shutil.rmtree(out, ignore_errors=True)
    print(f"{'tool':24s} {'to first step s':>16s} {'steady s/step':>14s} {'tokens/s':>9s}")
    for label, first, steady in results:
        print(f"{label:24s} {first:16.1f} {steady:14.3f} {8 * 256 / steady:9,.0f}")
    print(summary(results))


def summary(results: list[tuple[str, float, float]]) -> str:
    """Each of our runs against the MaxText run of the same repeat (the rows come in
    repeats of three: MaxText, ours cold, ours cached): mean ratios of the time to the
    first step and of the steady step time, and how many repeats ours was faster in."""
    lines = []
    for k, label in ((1, "empty cache"), (2, "second start")):
        pairs = [(results[i + k], results[i]) for i in range(0, len(results), 3)]
        first = [o[1] / m[1] for o, m in pairs]
        steady = [o[2] / m[2] for o, m in pairs]
        lines.append(
            f"ours ({label}) / maxtext: first step {mean(first):.2f}x "
            f"({min(first):.2f}-{max(first):.2f}), steady s/step {mean(steady):.3f}x "
            f"({min(steady):.3f}-{max(steady):.3f}), faster steady step in "
            f"{sum(r < 1 for r in steady)} of {len(steady)} repeats")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
