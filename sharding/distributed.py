"""Multi-process set-up: JAX's own multi-controller runtime (`jax.distributed`).

One process per host (TPU VM worker, GPU node, or a test's subprocess); each sees its
local devices, and `jax.devices()` lists every process's. Must run before anything
else touches a JAX backend.

- Explicit (GPU clusters, tests): coordinator address, number of processes and this
  process's id, from the arguments or the environment variables JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID. The coordinator (process 0) binds to the
  configured address only, not to every interface.
- Automatic: on a multi-host Cloud TPU VM or a Slurm job with several tasks, JAX finds
  the coordinator and the process ids itself.

Short timeouts: a peer that never starts, or a host that vanishes mid-run, stops the
others (JAX aborts them) within the heartbeat timeout instead of JAX's default 100 s.
Before JAX's own abort (a fatal error and a C++ stack), each process says in one line
what happened: `Joining` exits a moment before the start-up deadline naming who did not
join, the lifeline (sharding/lifeline.py) names a process that died the moment its
connection closes, and `lost_peer` reads a collective that failed because a peer went
away. `on_peer_lost` adds the caller's advice (how a rerun resumes) to those lines.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from typing import Callable

import jax
import jax._src.distributed as jax_distributed

from sharding import lifeline
from sharding.errors import ShardingError

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


class DistributedError(ShardingError):
    """A multi-process setting that cannot work: one line naming the keys to fix."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def from_env(coordinator: str | None, num_processes: int | None, process_id: int | None
             ) -> Cluster:
    """Settings from the config, filled in from the JAX_* environment variables."""
    def pick(value, key):
        if value is not None:
            return value
        raw = os.environ.get(ENV[key])
        if raw is None or raw == "":
            return None
        if key == "coordinator":
            return raw
        try:
            return int(raw)
        except ValueError:
            raise DistributedError(f"{ENV[key]}={raw!r} is not an integer") from None
    return Cluster(pick(coordinator, "coordinator"), pick(num_processes, "num_processes"),
                   pick(process_id, "process_id"))


def detected_cluster() -> str | None:
    """A multi-host environment JAX configures itself, or None."""
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "Cloud TPU VM"
    if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "Cloud TPU multi-slice"
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return "Slurm"
    return None


def initialize(mode: str, cluster: Cluster, *, init_timeout_s: int, heartbeat_timeout_s: int,
               shutdown_timeout_s: int) -> str | None:
    """Start the multi-controller runtime when asked or needed; returns a description
    of what was done (None: a single process). `mode`: auto, on or off."""
    if mode == "off":
        return None
    explicit = cluster.coordinator is not None or cluster.num_processes is not None
    found = detected_cluster()
    if mode == "auto" and not explicit and not found:
        return None
    timeouts = dict(initialization_timeout=init_timeout_s,
                    heartbeat_timeout_seconds=heartbeat_timeout_s,
                    shutdown_timeout_seconds=shutdown_timeout_s)
    if explicit:
        missing = [k for k in ("coordinator", "num_processes", "process_id")
                   if getattr(cluster, k) is None]
        if missing:
            raise DistributedError(
                "multi-process run needs " + ", ".join(f"distributed.{k} (or {ENV[k]})"
                                                       for k in missing))
        if ":" not in cluster.coordinator:
            raise DistributedError(f"distributed.coordinator={cluster.coordinator!r} must be "
                                   "host:port")
        if not 0 <= cluster.process_id < cluster.num_processes:
            raise DistributedError(f"distributed.process_id={cluster.process_id} is not in "
                                   f"[0, {cluster.num_processes})")
        # CPU processes exchange collectives over gloo (TCP); other backends ignore it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        with Joining(cluster, init_timeout_s):
            jax.distributed.initialize(cluster.coordinator, cluster.num_processes,
                                       cluster.process_id,
                                       coordinator_bind_address=cluster.coordinator,
                                       **timeouts)
        _start_lifeline(init_timeout_s)
        return (f"process {cluster.process_id} of {cluster.num_processes}, coordinator "
                f"{cluster.coordinator}")
    with Joining(cluster, init_timeout_s):
        jax.distributed.initialize(**timeouts)
    _start_lifeline(init_timeout_s)
    return (f"{found or 'cluster'}: process {jax.process_index()} of "
            f"{jax.process_count()}")


def _start_lifeline(timeout_s: float) -> None:
    state = jax_distributed.global_state
    me, n = state.process_id, state.num_processes
    host = state.coordinator_address.rsplit(":", 1)[0].strip("[]")

    def lost(who: int, cause: str) -> None:
        if not _reporting.acquire(blocking=False):
            return  # the main thread is saying it already
        line = f"error: {_line(me, n, f'process {who} of {n}', cause)}\n"
        sys.stdout.flush()
        sys.stderr.flush()
        # JAX's coordination agent may see the loss at the same moment and log its own
        # errors from a C++ thread: both streams go to /dev/null first, then the line goes
        # to a copy of stderr in one write, so it is the last one printed (printed before
        # the redirect, CI once saw two of the agent's lines land after it)
        stderr = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.write(stderr, line.encode())
        os._exit(1)

    lifeline.start(state.client, me, host, timeout_s, lost)


class Joining:
    """Around jax.distributed.initialize: SIGTERM goes back to its default, so JAX's
    preemption notifier can own it; and if the processes have not all joined a moment
    before `init_timeout_s`, one line says so and the process exits (code 1) before
    JAX aborts it with a fatal error."""

    def __init__(self, cluster: Cluster, init_timeout_s: float):
        self.cluster = cluster
        self.timer = threading.Timer(max(init_timeout_s - 2.0, 0.9 * init_timeout_s),
                                     self._give_up, args=(init_timeout_s,))
        self.timer.daemon = True

    def __enter__(self) -> "Joining":
        global _coordinator
        _coordinator = self.cluster.coordinator
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()

    def _give_up(self, init_timeout_s: float) -> None:
        c = self.cluster
        where = f" at {c.coordinator}" if c.coordinator else ""
        if c.process_id == 0 and c.num_processes == 2:
            who = "process 1 did not join"
        elif c.process_id == 0 and c.num_processes:
            who = f"processes 1-{c.num_processes - 1} did not all join"
        else:
            who = "the processes did not all join"
        me = (f"process {c.process_id} of {c.num_processes}" if c.process_id is not None
              else "this process")
        print(f"error: {me}: {who} the coordinator{where} within distributed.init_timeout_s="
              f"{init_timeout_s:g}; start every process (the same command, each with its own "
              "distributed.process_id) and check that the coordinator address is reachable "
              "from every host", file=sys.stderr, flush=True)
        os._exit(1)


_coordinator: str | None = None  # as given; None: found by JAX (a TPU VM, Slurm)

# A collective that failed because a peer went away (CPU: Gloo over TCP; GPU: NCCL).
_PEER_GONE = ("Gloo", "Connection closed by peer", "Connection reset by peer", "NCCL",
              "heartbeat", "UNAVAILABLE")


_advice: Callable[[], str] | None = None  # on_peer_lost's
_reporting = threading.Lock()  # one line per process, from whichever thread sees it first


def on_peer_lost(advice: Callable[[], str] | None) -> None:
    """`advice()` ends the line said when a peer is lost (how rerunning resumes)."""
    global _advice
    _advice = advice


def _line(me: int, n: int, peer: str, cause: str) -> str:
    where = f"; coordinator {_coordinator}" if _coordinator else ""
    advice = f"; {_advice()}" if _advice is not None else ""
    return f"process {me} of {n}: {peer} died or stopped answering ({cause}){where}{advice}"


def lost_peer(error: BaseException) -> str | None:
    """For an error of a collective that a peer process's death made fail, what to
    say ("process 1 of 2 stopped answering ..."); None for any other error."""
    if jax.process_count() == 1 or not isinstance(error, jax.errors.JaxRuntimeError):
        return None
    text = str(error)
    if not any(marker in text for marker in _PEER_GONE):
        return None
    if not _reporting.acquire(blocking=False):
        time.sleep(60)  # the lifeline is saying it and ending the process
    me, n = jax.process_index(), jax.process_count()
    peer = f"process {1 - me} of 2" if n == 2 else "a peer process"
    return _line(me, n, peer, text.strip().splitlines()[0][:200])
