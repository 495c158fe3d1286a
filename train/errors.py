"""The library's errors and the exit code of each: one table for every command.

Library code raises these (never SystemExit); `train.cli` catches them in one place,
prints the one-line `error: ...` and exits with the code of the table:

| code | what                                                                        |
| ---- | --------------------------------------------------------------------------- |
| 2    | UsageError: the user's input or config (ConfigError, DataError,              |
|      | ConversionError, InputError; the mesh, rules and multi-process settings of   |
|      | `sharding`, whose errors derive from sharding.ShardingError)                 |
| 1    | RunError: a runtime failure (CheckpointError, StorageError and its SaveError,|
|      | TrainingStopped, DoesNotFit, RunLocked, PeerLost)                            |
| 143  | Preempted: SIGTERM, a checkpoint was written (128 + SIGTERM); no error line; |
|      | Terminated: SIGTERM before training began (an error line says so)           |

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

from sharding import ShardingError

USAGE, RUNTIME, PREEMPTED = 2, 1, 143


class ShardlmError(Exception):
    """Base of every error the library reports as one line."""

    exit_code = RUNTIME


class UsageError(ShardlmError, ValueError):
    """A mistake in what the user gave: config, flags, input files."""

    exit_code = USAGE


class ConfigError(UsageError):
    """A config key or value that is not allowed."""


class DataError(UsageError):
    """Input data that cannot be read or tokenized."""


class ConversionError(UsageError):
    """A Hugging Face checkpoint that cannot be converted."""


class InputError(UsageError):
    """A tool's own flags or inputs (a prompt, a path) that cannot be used."""


class RunError(ShardlmError, RuntimeError):
    """A run that failed or stopped itself."""

    exit_code = RUNTIME


class CheckpointError(RunError):
    """A checkpoint that cannot be found, read or used for this model."""


class StorageError(RunError):
    """A write to the run's storage (metrics, config, checkpoints) that failed or did
    not finish in time. Storage threads may still be stuck retrying, so the process
    exits at once after printing it."""

    cause: BaseException | None = None  # what the storage raised; None: it hung


class SaveError(StorageError, CheckpointError):
    """A checkpoint save that failed or did not finish in time."""


class PeerLost(RunError):
    """Another process of a multi-process run died or stopped answering. JAX's shutdown
    would wait for it and then abort, so the process exits at once after printing it."""


class RunLocked(RunError):
    """Another run holds the lock of this output_dir."""


class TrainingStopped(RunError):
    """The run stopped itself (a non-finite loss)."""


class DoesNotFit(RunError):
    """A compiled step needs more memory per chip than the target has."""


class Preempted(ShardlmError):
    """SIGTERM: a checkpoint was written; a rerun of the same command resumes."""

    exit_code = PREEMPTED


class Terminated(BaseException):
    """SIGTERM before training began (start-up, compiling) or during a tool: nothing was
    saved. Raised by the signal handler wherever the main thread is, so, like
    KeyboardInterrupt, it is no Exception: a library's `except Exception` around the
    code it interrupts (JAX's and Orbax's have some) must not swallow it."""

    exit_code = PREEMPTED


def exit_code(error: BaseException) -> int | None:
    """The table's exit code for `error`, or None for an error that is a bug."""
    if isinstance(error, (ShardlmError, Terminated)):
        return error.exit_code
    if isinstance(error, ShardingError):
        return USAGE
    return None


def error_line(error: BaseException) -> str:
    return f"error: {error}"


def exit_now(message: str, code: int = RUNTIME) -> None:
    """Print the error line and end the process at once, without waiting for threads
    (a storage call that hangs cannot be interrupted). Only for watchdogs."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)
