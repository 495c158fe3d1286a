"""One run per output_dir: `output_dir/run.lock`, held by process 0 while it trains.

Two trainers on one directory (a scheduler restarting a job whose old copy still runs)
would overwrite each other's checkpoints; the second is refused with one line naming
the holder. The lock is a small JSON object (host, pid, start time, heartbeat) written
with a conditional write of TensorStore's key-value store (the library Orbax writes
checkpoints with): created only if absent, refreshed and deleted only if still ours,
on local disk, shared file systems and gs:// alike (a GCS generation precondition).

A lock left by a dead run never blocks a rerun: on the same host a holder whose process
is gone is taken over at once; elsewhere a holder whose heartbeat (every HEARTBEAT_S)
is older than STALE_S. A live holder on another host is waited for up to STALE_S
before the refusal, in case it is just exiting.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import tensorstore as ts

from train.errors import RunLocked, StorageError
from train.storage import bounded

NAME = "run.lock"
HEARTBEAT_S = 10.0
STALE_S = 60.0
log = logging.getLogger("train")


def _kvstore_url(directory: str) -> str:
    if "://" in directory:
        return directory.rstrip("/") + "/"
    return "file://" + os.path.abspath(os.path.expanduser(directory)).rstrip("/") + "/"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """The lock of one run directory; `with RunLock(dir, timeout_s):` holds it."""

    def __init__(self, directory: str, timeout_s: float):
        self.directory, self.timeout_s = directory.rstrip("/"), timeout_s
        self.path = f"{self.directory}/{NAME}"
        self.generation: bytes | None = None  # of our last write; None: not held
        self.stopped, self.mutex = threading.Event(), threading.Lock()
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    def _io(self, what: str, fn):
        return bounded(f"{what} {self.path}", fn, self.timeout_s)

    def _write(self, if_equal: bytes) -> bytes | None:
        """Write our record if the lock's generation is `if_equal`; the new generation,
        or None when someone else's write came first."""
        record = json.dumps({**self.me, "heartbeat": time.time()}).encode()
        stamp = self._io("writing", lambda: self.kv.write(NAME, record,
                                                          if_equal=if_equal).result())
        return stamp.generation or None

    def __enter__(self) -> "RunLock":
        self.kv = self._io("opening", lambda: ts.KvStore.open(
            _kvstore_url(self.directory)).result())
        deadline = time.time() + STALE_S
        while True:
            read = self._io("reading", lambda: self.kv.read(NAME).result())
            holder = self._holder(read)
            if holder is None or self._dead(holder):
                if holder is not None:
                    log.info("taking over %s from a run that is gone (%s)", self.path,
                             self._who(holder))
                self.generation = self._write(read.stamp.generation)
                if self.generation is not None:
                    break
                continue  # another run wrote first: read again
            if holder["host"] == self.me["host"] or time.time() > deadline:
                raise RunLocked(
                    f"output_dir={self.directory!r} is in use by another run "
                    f"({self._who(holder)}); stop that run or choose another output_dir "
                    "(the lock of a run that is gone is taken over at the next start)")
            time.sleep(2.0)
        threading.Thread(target=self._heartbeat, daemon=True, name="run lock").start()
        return self

    @staticmethod
    def _holder(read) -> dict | None:
        if read.state != "value":
            return None
        try:
            holder = json.loads(read.value)
            return {"host": str(holder["host"]), "pid": int(holder["pid"]),
                    "started": str(holder.get("started", "?")),
                    "heartbeat": float(holder["heartbeat"])}
        except (ValueError, KeyError, TypeError):  # not ours or cut short: stale
            return {"host": "?", "pid": -1, "started": "?", "heartbeat": 0.0}

    def _dead(self, holder: dict) -> bool:
        if time.time() - holder["heartbeat"] > STALE_S:
            return True
        return holder["host"] == self.me["host"] and not _alive(holder["pid"])

    @staticmethod
    def _who(holder: dict) -> str:
        age = time.time() - holder["heartbeat"]
        return (f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}, "
                f"last heartbeat {age:.0f} s ago")

    def _heartbeat(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S):
            with self.mutex:
                if self.stopped.is_set():
                    return
                try:
                    generation = self._write(self.generation)
                except StorageError as e:
                    log.warning("could not refresh %s: %s", self.path, e)
                    continue
                if generation is None:
                    log.warning("%s was taken over by another run", self.path)
                    return
                self.generation = generation

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stopped.set()
        if isinstance(exc, StorageError):
            return  # the storage is gone: the lock expires by itself
        with self.mutex:
            generation, self.generation = self.generation, None
        if generation is not None:
            self._io("removing", lambda: self.kv.write(NAME, None,
                                                       if_equal=generation).result())
