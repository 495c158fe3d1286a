"""The shared command line of every tool: `--config PATH key=value ...` plus the tool's
own flags. User mistakes become one `error: ...` line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from train.config import Config, ConfigError, load_config

# Errors a user can cause; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError,)


def user_errors() -> tuple[type[BaseException], ...]:
    from sharding import DistributedError, MeshError, PartitionError, RulesError
    return USER_ERRORS + (DistributedError, MeshError, PartitionError, RulesError)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None,
                   help="YAML config (default: configs/default.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. mesh.data=2 model.num_layers=8")
    return p


def run_errors() -> tuple[type[BaseException], ...]:
    """Failures of a run that are not config mistakes: exit code 1, one line."""
    try:
        from train.checkpoint import CheckpointError
        from train.loop import TrainingStopped
    except ImportError:  # a tool run without the data/checkpoint extras (scripts/bench.py)
        return ()
    return (CheckpointError, TrainingStopped)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None
          ) -> tuple[Config, argparse.Namespace]:
    args = p.parse_intermixed_args(argv)  # key=value before or after the flags
    try:
        return load_config(args.config, args.overrides), args
    except ConfigError as e:
        fail(str(e))
        raise  # unreachable


def start_tool(cfg: Config) -> bool:
    """What every inference tool (generate, eval, convert) does before touching JAX
    devices: the library's XLA flags, jax.distributed when several processes take part,
    log lines from process 0, the compilation cache, and Orbax's read-only notices
    silenced. Returns whether this is process 0."""
    from train import xla_flags
    xla_flags.apply()  # before the backend starts
    import absl.logging
    import jax
    absl.logging.set_verbosity(absl.logging.ERROR)
    from train.loop import enable_compile_cache, setup_logging, start_processes
    start_processes(cfg)
    setup_logging(jax.process_index() == 0)
    enable_compile_cache(cfg.compile_cache_dir)
    return jax.process_index() == 0


def guarded(fn: Callable[[], object]) -> object:
    """Run `fn`; config mistakes become one line and exit 2, a checkpoint that cannot be
    used or a run that stopped itself one line and exit 1."""
    try:
        return fn()
    except user_errors() as e:
        fail(str(e))
    except run_errors() as e:
        from train.checkpoint import SaveError
        if isinstance(e, SaveError):  # storage threads may hang on: do not wait for them
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
        fail(str(e), code=1)
