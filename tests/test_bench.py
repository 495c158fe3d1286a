"""The benchmark scripts: scripts/bench.py on the tiny preset (a smoke test of the tool, not
a timing assertion) and scripts/startup_vs_maxtext.py's arithmetic."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, cli_env


@pytest.mark.once
def test_bench_compare_reports_every_variant_and_mfu_by_formula():
    out = subprocess.run(
        [sys.executable, "scripts/bench.py", "--config", "configs/tiny.yaml", "--steps", "2",
         "--warmup", "1", "train.batch_size=8", "metrics.peak_tflops=0.5", "--compare",
         "base:", "remat:model.remat=full,mesh.data=4", "cudnn:model.attention=cudnn"],
        cwd=REPO, env=cli_env(4), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    rows = {v["variant"]: v for v in summary["variants"]}
    assert set(rows) == {"base", "remat", "cudnn"}
    assert "error" in rows["cudnn"]  # no cuDNN on a CPU: reported, the others still ran
    assert any(line.startswith("cudnn ") and "failed" in line for line in lines)
    for name in ("base", "remat"):
        r = rows[name]
        assert r["tokens_per_step"] == 8 * 128
        assert abs(r["tokens_per_sec"] * r["step_time_s"] - 8 * 128) < 1e-6 * 8 * 128
        # MFU = tokens/s x flops/token / (devices x peak), the peak given as 0.5 TFLOP/s
        expected = r["tokens_per_sec"] * r["flops_per_token"] / (r["devices"] * 0.5e12)
        assert abs(r["mfu"] - expected) < 1e-9 * max(expected, 1)
        assert r["compile_time_s"] > 0 and r["peak_memory_gib"] > 0
    assert rows["remat"]["devices"] == 4 and rows["remat"]["mesh"]["data"] == 4
    # remat changes the schedule, not the math: the same loss after the same steps
    assert abs(rows["remat"]["loss"] - rows["base"]["loss"]) < 1e-4
    assert summary["variant"] in ("base", "remat")
    for key in ("tokens_per_sec", "step_time_s", "compile_time_s", "mfu"):
        assert key in summary


def test_side_by_side_script_times_the_window_and_pairs_each_repeat(monkeypatch):
    """scripts/startup_vs_maxtext.py's arithmetic on a fake clock (no MaxText here): the
    first step's time, the steady window from step 10 to the last step, and the summary
    that pairs each of our runs with the MaxText run of its repeat."""
    import re
    monkeypatch.syspath_prepend(f"{REPO}/scripts")
    import startup_vs_maxtext as side_by_side
    ticks = iter(range(1000))  # the n-th reading of the clock says n**2 seconds
    monkeypatch.setattr(side_by_side.time, "perf_counter", lambda: float(next(ticks) ** 2))
    lines = "".join(f"noise\nstep {i} |\n" for i in range(1, 21))
    first, steady = side_by_side.timed(
        [sys.executable, "-c", f"print({lines!r}, end='')"], dict(os.environ),
        re.compile(r"step (\d+) \|"), REPO)
    # t0 is reading 0, step i's line reading i: first step at 1 s, steps 10 to 20 take
    # 400 - 100 s
    assert first == 1.0 and steady == (400 - 100) / (20 - 10)
    results = [("maxtext", 20.0, 0.40), ("ours cold", 8.0, 0.36), ("ours cached", 4.0, 0.44),
               ("maxtext", 10.0, 0.50), ("ours cold", 6.0, 0.40), ("ours cached", 2.0, 0.45)]
    cold, cached = side_by_side.summary(results).splitlines()
    assert "first step 0.50x (0.40-0.60)" in cold
    assert "steady s/step 0.850x (0.800-0.900), faster steady step in 2 of 2" in cold
    assert "first step 0.20x (0.20-0.20)" in cached
    assert "steady s/step 1.000x (0.900-1.100), faster steady step in 1 of 2" in cached


@pytest.mark.once
def test_gpu_check_runs_its_checks_and_benchmark_on_tiny_shapes(tmp_path):
    """scripts/gpu_check.sh is meant for a GPU machine; its --smoke run takes the same
    code paths on the CPU (XLA's attention standing in for cuDNN), so it cannot rot
    unseen."""
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke"], cwd=REPO,
                          env=dict(cli_env(2), PYTHON=sys.executable), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["checks"] == {"cudnn-attention": "pass", "bf16-step": "pass",
                                 "generation": "pass", "bench gpt2-124m": "ran",
                                 "bench serve": "ran", "bench serve int8": "ran",
                                 "bench serve paged": "ran"}
    assert summary["bench"]["configs/gpt2-124m.yaml"]["tokens_per_step"] == 2 * 64
    serve = summary["bench"]["serve"]
    assert serve["continuous"] is None and serve["static"]["tokens"] == \
        serve["engine_alone"]["tokens"] > 0
    int8 = summary["bench"]["serve int8"]
    assert int8["quantize"] == "int8" and int8["param_mib"][1] < int8["param_mib"][0]
    paged = summary["bench"]["serve paged"]
    assert paged["kv_tokens"] == {"continuous": 32 * 16, "static": 2 * 256}
    assert paged["static"]["tokens"] == paged["engine_alone"]["tokens"] > 0


@pytest.mark.once
def test_serving_benchmark_runs_both_sides_on_its_workload(monkeypatch):
    """scripts/bench_serve.py on the tiny model and a small workload (a smoke test, not
    a timing assertion): the server, static batching (in batches of 3 rows here) and the
    engine alone each produce every token asked for, on int8 weights, and the printed
    step bound is the workload's, by hand."""
    monkeypatch.syspath_prepend(f"{REPO}/scripts")
    from bench_serve import workload
    proc = subprocess.run(
        [sys.executable, "scripts/bench_serve.py", "--config", "configs/tiny.yaml",
         "--requests", "6", "--prompt-len", "2", "20", "--new-tokens", "2", "16",
         "--repeats", "1", "--static-rows", "3", "serve.max_batch=2", "serve.max_len=64",
         "serve.quantize=int8", "compile_cache_dir=null"],
        cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    news = [n for _, n in workload(6, (2, 20), (2, 16), 256, 0)]
    assert 16 in news and 2 in news
    for side in ("continuous", "static", "engine_alone"):
        assert result[side]["tokens"] == sum(news), side
    # static: each batch of 3's longest; continuous: every token over 2 slots, and no
    # fewer than the longest request's
    static_steps = sum(max(news[i:i + 3]) for i in range(0, 6, 3))
    assert result["step_bound"] == round(static_steps / max(-(-sum(news) // 2), 16), 2)
    assert result["static"]["batch_rows"] == 3 and result["quantize"] == "int8"
    before, after = result["param_mib"]
    assert 0 < after < before
    assert result["speedup"] == round(result["continuous"]["tokens_per_s"]
                                      / result["static"]["tokens_per_s"], 2)
