"""scripts/bench.py on the tiny preset (a smoke test of the tool, not a timing assertion)."""

import json
import subprocess
import sys

from conftest import REPO, cli_env


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
