"""XLA flags the library sets on GPUs, before JAX starts its backend.

Each flag goes into XLA_FLAGS only when a GPU is visible (an NVIDIA device node, unless
JAX_PLATFORMS excludes CUDA) and the user's own XLA_FLAGS do not already set it: a
flag given by the user always wins. Only long-standing flags are used, because an
unknown flag aborts the process.

--xla_gpu_enable_latency_hiding_scheduler=true
    Schedules collectives (all-gathers, reduce-scatters of FSDP and tensor parallelism)
    asynchronously so they overlap with compute; NVIDIA's JAX containers set it by
    default. No effect on one GPU, where there are no collectives.

Measured effect on one H200: not yet (no GPU was available to this project); see
docs/benchmarks.md.
"""

from __future__ import annotations

import glob
import os

GPU_FLAGS = {"xla_gpu_enable_latency_hiding_scheduler": "true"}


def gpu_visible() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and not any(p in platforms for p in ("cuda", "gpu")):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def with_gpu_flags(xla_flags: str) -> str:
    """`xla_flags` plus the GPU flags it does not set already."""
    given = {part.split("=")[0].lstrip("-") for part in xla_flags.split()}
    extra = [f"--{k}={v}" for k, v in GPU_FLAGS.items() if k not in given]
    return " ".join([xla_flags.strip()] + extra).strip()


def apply() -> None:
    """Call before the first JAX computation (the backend reads XLA_FLAGS once)."""
    if gpu_visible():
        os.environ["XLA_FLAGS"] = with_gpu_flags(os.environ.get("XLA_FLAGS", ""))
