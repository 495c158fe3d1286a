"""Writes to a run's storage (local disk, a shared file system, gs://) that end in time.

A storage server that dies or stops answering makes its clients retry for a long time
(or forever); a run must instead stop with the one `error:` line of a StorageError
(exit 1, train.errors) within its time limit, leaving earlier checkpoints as they were.
`bounded` runs a write in a daemon thread and gives up on it after `timeout_s`; the
process then exits without waiting for that thread (train.cli).
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

from etils import epath

from train.errors import StorageError

T = TypeVar("T")
TIMEOUT_KEY = "checkpoint.save_timeout_s"
KEPT = ("earlier complete checkpoints are untouched: rerun the same command to resume "
        "from the latest")


def first_line(error: BaseException) -> str:
    """'TypeName: first line of the message' (at most 200 characters of it)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else \
        type(error).__name__


def bounded(what: str, fn: Callable[[], T], timeout_s: float,
            error: type[StorageError] = StorageError, advice: str = "; " + KEPT) -> T:
    """fn(), or `error` when it raises ("<what> failed (...)", the exception as the
    error's `cause`) or takes longer than `timeout_s` ("<what> did not finish within
    ...", no cause). `advice` ends the message."""
    done, result, errors = threading.Event(), [], []

    def target():
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=target, daemon=True, name=f"bounded: {what}").start()
    if not done.wait(timeout_s):
        raise error(f"{what} did not finish within {TIMEOUT_KEY}={timeout_s:g}{advice}")
    if errors:
        failure = error(f"{what} failed ({first_line(errors[0])}){advice}")
        failure.cause = errors[0]
        raise failure from None
    return result[0]


def write_text(path: str, text: str, timeout_s: float) -> None:
    """Write a whole file (created with its parent directories) within `timeout_s`."""
    def write():
        p = epath.Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    bounded(f"writing {path}", write, timeout_s)
