"""XLA flags the library sets: on GPUs, before JAX starts its backend; on CPUs, per
compiled program.

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

On CPUs the library compiles its own programs (the state's init, the train and eval
steps) with one compile option, again unless XLA_FLAGS sets it:

xla_backend_optimization_level=2
    LLVM's O2 instead of XLA's default O3 for the loops XLA generates itself. A CPU
    step spends its time in library kernels (the matmuls) and collectives, not in those
    loops, so it runs as fast while compiling faster: llama-tiny-bench on 8 fake
    devices, init 2.3 -> 1.0 s, train step 3.2 -> 2.6 s (docs/benchmarks.md). Same
    initial values bit for bit; a step may round the last bit of a few elements
    differently (another vectorization of a reduction).
"""

from __future__ import annotations

import glob
import os

GPU_FLAGS = {"xla_gpu_enable_latency_hiding_scheduler": "true"}
CPU_COMPILE_OPTIONS = {"xla_backend_optimization_level": 2}


def gpu_visible() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and not any(p in platforms for p in ("cuda", "gpu")):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def _given(xla_flags: str) -> set[str]:
    return {part.split("=")[0].lstrip("-") for part in xla_flags.split()}


def with_gpu_flags(xla_flags: str) -> str:
    """`xla_flags` plus the GPU flags it does not set already."""
    given = _given(xla_flags)
    extra = [f"--{k}={v}" for k, v in GPU_FLAGS.items() if k not in given]
    return " ".join([xla_flags.strip()] + extra).strip()


def apply() -> None:
    """Call before the first JAX computation (the backend reads XLA_FLAGS once)."""
    if gpu_visible():
        os.environ["XLA_FLAGS"] = with_gpu_flags(os.environ.get("XLA_FLAGS", ""))


def compile_options(shardings) -> dict:
    """Options for `.compile()` of a program laid out by `shardings` (a pytree of them):
    CPU_COMPILE_OPTIONS less those XLA_FLAGS sets, on CPU devices; none elsewhere."""
    import jax
    device = next(iter(jax.tree.leaves(shardings)[0].device_set))
    if device.platform != "cpu":
        return {}
    given = _given(os.environ.get("XLA_FLAGS", ""))
    return {k: v for k, v in CPU_COMPILE_OPTIONS.items() if k not in given}
