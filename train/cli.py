"""The command line every tool shares: `--config PATH key=value ...` plus the tool's own
flags; and the one place where an error becomes the one-line `error: ...` and the exit
code of train.errors' table (130 for Ctrl-C)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any, Callable, Sequence

from train import errors, startup
from train.config import Config, load_config

INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


def parser(description: str) -> argparse.ArgumentParser:
    """A tool's parser with --config; `main` adds the key=value overrides after the
    tool's own positional arguments."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None,
                   help="YAML config (default: configs/default.yaml)")
    return p


def main(p: argparse.ArgumentParser, argv: Sequence[str] | None,
         body: Callable[[Config, argparse.Namespace], Any],
         start: dict | Callable[[argparse.Namespace], dict] | None = None,
         terminated: str = "stopped by SIGTERM") -> None:
    """Parse the command line, load the config, start the process (`startup.start`
    with `start`'s keywords; None: a tool that needs no JAX start-up), run `body`.
    Every error of the table ends the process here; SIGTERM is `terminated`'s line."""
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. mesh.data=2 model.num_layers=8")
    args = p.parse_intermixed_args(argv)  # key=value before or after the flags
    # SIGTERM before the trainer's loop takes it over (start-up, compiling) or in a tool:
    # one line, exit 143.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, StartUpSigterm(terminated))

    def go():
        cfg = load_config(args.config, args.overrides)
        if start is not None:
            startup.start(cfg, **(start(args) if callable(start) else start))
        return body(cfg, args)

    guarded(go)


class StartUpSigterm:
    """SIGTERM's handler until the trainer's loop takes it over (start-up, compiling),
    and in tools: raises Terminated wherever the main thread is. It remembers that it
    fired: where the error is lost anyway (raised inside a finalizer, whose errors Python
    only prints, or swallowed by a library), the loop raises it again when it takes
    SIGTERM over (train/loop.py SigtermFlag), so no run trains on after a SIGTERM."""

    def __init__(self, message: str):
        self.message, self.fired = message, False

    def __call__(self, signum, frame) -> None:
        self.fired = True
        raise errors.Terminated(self.message)


def sigterm_behind(e: BaseException) -> BaseException:
    """`e`, or Terminated where start-up's SIGTERM fired first: a library that catches
    every error (jax's mesh_utils turns any error of int() into a ValueError) can swallow
    the handler's Terminated and raise its own in its place."""
    handler = signal.getsignal(signal.SIGTERM)
    if isinstance(handler, StartUpSigterm) and handler.fired and not isinstance(
            e, errors.Terminated):
        return errors.Terminated(handler.message)
    return e


def guarded(fn: Callable[[], Any]) -> Any:
    """Run `fn`; an error of the table prints its one line and exits with its code."""
    try:
        return fn()
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED)
    except (Exception, errors.Terminated) as e:
        e = sigterm_behind(e)
        code = errors.exit_code(e)
        if code is None:
            raise  # a bug: keep the traceback
        # storage threads may hang on, JAX's shutdown waits for a lost peer, and after a
        # SIGTERM in the middle of a compile the interpreter's teardown crashed
        # (SIGSEGV, seen 4 times in 4 at 0.5-1 s into start-up): do not wait
        if isinstance(e, (errors.StorageError, errors.PeerLost, errors.Terminated)):
            errors.exit_now(str(e) + startup.details(), code)
        if not isinstance(e, errors.Preempted):  # preemption is logged where it happens
            print(errors.error_line(e) + startup.details(), file=sys.stderr, flush=True)
        sys.exit(code)
