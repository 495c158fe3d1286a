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

Short timeouts: a peer that never starts, or dies mid-run, stops the others (JAX aborts
them) within the heartbeat timeout instead of JAX's default 100 s.
"""

from __future__ import annotations

import dataclasses
import os

import jax

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
        jax.distributed.initialize(cluster.coordinator, cluster.num_processes,
                                   cluster.process_id,
                                   coordinator_bind_address=cluster.coordinator, **timeouts)
        return (f"process {cluster.process_id} of {cluster.num_processes}, coordinator "
                f"{cluster.coordinator}")
    jax.distributed.initialize(**timeouts)
    return (f"{found or 'cluster'}: process {jax.process_index()} of "
            f"{jax.process_count()}")
