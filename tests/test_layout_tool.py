"""`python -m train.layout`: the per-device memory it reports, checked by hand."""

import importlib.util
import os
import subprocess
import sys

import pytest

from helpers import REPO


def test_llama8b_layout_on_64_fake_devices():
    """--devices fakes CPU devices even where JAX would pick another platform (JAX_PLATFORMS
    unset here)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    proc = subprocess.run(
        [sys.executable, "-m", "train.layout", "--config", "configs/llama-8b.yaml",
         "--devices", "64", "mesh.fsdp=8", "mesh.model=8", "sharding.rules=fsdp_tp"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("mesh data=1, fsdp=8, model=8 (64 devices)")
    wq = next(line for line in lines if line.startswith("blocks/wq "))
    assert "P(None, 'fsdp', 'model', None)" in wq
    # fp32 parameters + two fp32 Adam moments, split evenly over 64 devices, except the
    # 65 replicated norm scales of 4096 ("vector" axis: every device holds them whole).
    vectors = (2 * 32 + 1) * 4096
    expected_gib = ((8_030_261_248 - vectors) * 4 * 3 / 64 + vectors * 4 * 3) / 2**30
    reported = float(lines[-1].split(":")[1].split()[0])
    assert abs(reported - expected_gib) < 0.001


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_a_cpu_machine_with_libtpu_installed_hears_nothing_from_it():
    """The `tpu` extra brings libtpu; on a machine without TPU chips JAX must not try the
    TPU backend (whose start prints several lines of errors), with JAX_PLATFORMS unset."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    proc = subprocess.run([sys.executable, "-m", "train.layout", "--config",
                           "configs/tiny.yaml"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("mesh data=1, fsdp=1, model=1 (1 devices)")
    assert "TPU" not in proc.stderr and "libtpu" not in proc.stderr, proc.stderr
