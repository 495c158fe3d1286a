"""Test set-up: 8 fake CPU devices, configured before JAX initializes its backend."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from train.config import load_config  # noqa: E402

# A model small enough to compile in seconds, with every dimension divisible by 8 so
# each mesh up to 8 devices applies.
SMALL = ["model.num_layers=2", "model.d_model=64", "model.num_heads=8", "model.num_kv_heads=4",
         "model.mlp_dim=128", "model.max_seq_len=64", "model.dtype=float32",
         "train.seq_len=16", "train.batch_size=8", "data.source=synthetic",
         "compile_cache_dir=null"]


def small_config(*overrides: str):
    """configs/tiny.yaml shrunk further (SMALL) plus `overrides`."""
    return load_config(str(REPO / "configs" / "tiny.yaml"), SMALL + list(overrides))


def padded_spec(x) -> tuple:
    """An array's PartitionSpec as a tuple of its rank (jax 0.10 drops trailing Nones)."""
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) == 8, "tests need 8 fake CPU devices (see conftest.py)"
    return jax.devices()


def cli_env(devices: int = 8, **extra: str) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)


def run_cli(*args: str, module: str = "train", devices: int = 8, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m <module> args...` from the repository root, as a user runs it."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                          env=env or cli_env(devices), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """Per-step losses of the uninterrupted run that resumed runs must reproduce."""
    from runs import RUN, STEPS, losses
    out = tmp_path_factory.mktemp("reference")
    proc = run_cli(*RUN, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = losses(out)
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A short run of the tiny Llama on the stdlib bytes (2x2x2 mesh), checkpointed and
    evaluated at its last step: what generation, evaluation and export read."""
    from runs import RUN, STEPS
    out = tmp_path_factory.mktemp("trained")
    proc = run_cli(*RUN, f"output_dir={out}", f"eval.every_steps={STEPS}", "eval.batches=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
