"""Process start-up, shared by the trainer and every tool: which JAX platforms to use,
the library's XLA flags, jax.distributed when several processes take part, log lines
from process 0 and the persistent compilation cache. `start(cfg)` must run before
anything touches a JAX backend; a later call in the same process only sets up logging
and the cache again.

Also the compile options the library gives each of its own programs (`compile_options`).

XLA flags. Each goes into XLA_FLAGS only when a GPU is visible and the user's own
XLA_FLAGS do not already set it: a flag given by the user always wins. Only
long-standing flags are used, because an unknown flag aborts the process.

--xla_gpu_enable_latency_hiding_scheduler=true
    Schedules collectives (the all-gathers and reduce-scatters of FSDP and tensor
    parallelism) asynchronously so they overlap with compute; NVIDIA's JAX containers
    set it by default. No effect on one GPU, where there are no collectives.

xla_backend_optimization_level=2 (a compile option of CPU programs, unless XLA_FLAGS
    sets it) is LLVM's O2 instead of XLA's default O3 for the loops XLA generates
    itself. A CPU step spends its time in library kernels (the matmuls) and
    collectives, not in those loops, so it runs as fast and compiles faster; a step
    may round the last bit of a few elements differently. Figures: docs/benchmarks.md.

Platforms. libtpu (the `tpu` extra, for the TPU pre-flight) makes JAX try a TPU
backend on every start, which prints several lines of errors on a machine without TPU
chips; there, unless JAX_PLATFORMS says otherwise, JAX is told to use the CPU (and a
visible GPU) only. A pre-flight compile for a TPU topology (`compile_only`) uses the
CPU backend even on a TPU VM, so it never takes chips a training job holds, and lets
libtpu load in several processes at once (ALLOW_MULTIPLE_LIBTPU_LOAD) so concurrent
pre-flights do not collide on libtpu's lockfile.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import logging
import os
import sys
import tempfile
import threading
import traceback

import absl.logging
import jax

from sharding import distributed
from train.config import Config

log = logging.getLogger("train")

GPU_FLAGS = {"xla_gpu_enable_latency_hiding_scheduler": "true"}
CPU_COMPILE_OPTIONS = {"xla_backend_optimization_level": 2}
_started = False


def start(cfg: Config, *, cpu_devices: int | None = None, compile_only: bool = False,
          processes: bool = True) -> bool:
    """Set up this process for `cfg`; returns whether it is process 0 (the one that
    logs and writes). `cpu_devices`: fake that many CPU devices (and use no other
    platform). `compile_only`: compile for devices described by libtpu, not run.
    `processes=False`: a single-process tool (no jax.distributed)."""
    global _started
    joined = None
    if not _started:  # platforms and jax.distributed can be set up once per process
        _started = True
        set_platforms(cpu_devices, compile_only)
        apply_gpu_flags()
        absl.logging.set_verbosity(absl.logging.ERROR)  # Orbax's and Grain's notices
        if not os.environ.get("SHARDLM_DEBUG"):
            background_errors_to_file()
        joined = start_processes(cfg) if processes else None
    is_main = jax.process_index() == 0
    setup_logging(is_main)
    if joined:
        log.info("distributed: %s", joined)
    enable_compile_cache(cfg.compile_cache_dir)
    return is_main


def tpu_present() -> bool:
    """TPU chips on this machine: /dev/accel* (v2-v4) or /dev/vfio/N (v5e and later)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def gpu_visible() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and not any(p in platforms for p in ("cuda", "gpu")):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def set_platforms(cpu_devices: int | None = None, compile_only: bool = False) -> None:
    if compile_only:
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    elif compile_only:
        jax.config.update("jax_platforms", "cpu")
    elif (not os.environ.get("JAX_PLATFORMS") and not tpu_present()
          and importlib.util.find_spec("libtpu") is not None):
        gpu = "cuda," if gpu_visible() else "rocm," if os.path.exists("/dev/kfd") else ""
        jax.config.update("jax_platforms", gpu + "cpu")


def _given(xla_flags: str) -> set[str]:
    return {part.split("=")[0].lstrip("-") for part in xla_flags.split()}


def with_gpu_flags(xla_flags: str) -> str:
    """`xla_flags` plus the GPU flags it does not set already."""
    given = _given(xla_flags)
    extra = [f"--{k}={v}" for k, v in GPU_FLAGS.items() if k not in given]
    return " ".join([xla_flags.strip()] + extra).strip()


def apply_gpu_flags() -> None:
    """Before the first JAX computation (the backend reads XLA_FLAGS once)."""
    if gpu_visible():
        os.environ["XLA_FLAGS"] = with_gpu_flags(os.environ.get("XLA_FLAGS", ""))


def compile_options(shardings) -> dict:
    """Options for `.compile()` of a program laid out by `shardings` (a pytree of them):
    CPU_COMPILE_OPTIONS less those XLA_FLAGS sets, on CPU devices; none elsewhere."""
    device = next(iter(jax.tree.leaves(shardings)[0].device_set))
    if device.platform != "cpu":
        return {}
    given = _given(os.environ.get("XLA_FLAGS", ""))
    return {k: v for k, v in CPU_COMPILE_OPTIONS.items() if k not in given}


def start_processes(cfg: Config) -> str | None:
    """jax.distributed when several processes take part; before any other JAX call."""
    d = cfg.distributed
    mode = {None: "auto", True: "on", False: "off"}[d.enabled]
    cluster = distributed.from_env(d.coordinator, d.num_processes, d.process_id)
    return distributed.initialize(mode, cluster, init_timeout_s=d.init_timeout_s,
                                  heartbeat_timeout_s=d.heartbeat_timeout_s,
                                  shutdown_timeout_s=d.shutdown_timeout_s)


# Where background threads' tracebacks and Orbax's error logs go (SHARDLM_DEBUG=1:
# the console instead), created only when there is something to write. Process ids are
# reused: a file of this name already there is an earlier, finished process's, and
# would make `details()` point at errors this process never had.
DETAILS = os.path.join(tempfile.gettempdir(), f"shardlm-{os.getpid()}.log")
with contextlib.suppress(FileNotFoundError):
    os.remove(DETAILS)


def background_errors_to_file() -> None:
    """Send the tracebacks of background threads (Orbax's async saves, storage clients
    retrying), exceptions Python can only ignore (Orbax's pending reads at exit) and the
    errors Orbax logs to DETAILS: a failure reaches the console once, as the one error
    line, which names the file (train.cli)."""
    handler = logging.FileHandler(DETAILS, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    absl_log = logging.getLogger("absl")
    absl_log.addHandler(handler)
    absl_log.propagate = False

    def to_file(args) -> None:
        if args.exc_type is SystemExit:
            return
        with open(DETAILS, "a") as f:
            print(f"exception in thread {getattr(args.thread, 'name', '?')}:", file=f)
            traceback.print_exception(args.exc_type, args.exc_value, args.exc_traceback,
                                      file=f)
    threading.excepthook = to_file

    def unraisable_to_file(args) -> None:  # e.g. Orbax's coroutines at interpreter exit
        with open(DETAILS, "a") as f:
            print(f"{args.err_msg or 'exception ignored'}: {args.object!r}", file=f)
            traceback.print_exception(args.exc_type, args.exc_value, args.exc_traceback,
                                      file=f)
    sys.unraisablehook = unraisable_to_file


def details() -> str:
    """'; details in PATH' when background errors were written to DETAILS, else ''."""
    return f"; details in {DETAILS}" if os.path.exists(DETAILS) else ""


def setup_logging(is_main: bool = True) -> None:
    """INFO lines on stdout from process 0; other processes only warn."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)


def enable_compile_cache(cache_dir: str | None) -> None:
    """Persistent XLA compilation cache: a second start of the same config skips
    compiling."""
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def echo(text: str) -> None:
    """A tool's output, printed by process 0 only."""
    if jax.process_index() == 0:
        print(text, flush=True)
