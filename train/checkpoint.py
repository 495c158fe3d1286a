"""Orbax checkpoints of the train state, its data position and the resolved config.

Layout (Orbax CheckpointManager): <dir>/<step>/{state, meta, config}. `state` holds step,
skipped, params and optimizer state as sharded arrays; `meta` the data position and seed;
`config` the resolved config as JSON. Orbax writes a step into a temporary directory and
renames it (local disk) or writes a commit marker (gs://) only when it is complete, so a
crash mid-save leaves nothing that restores; leftovers are removed on the next start.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from train import storage
from train.config import CheckpointConfig
from train.errors import CheckpointError, ConfigError, PeerLost, SaveError, StorageError, exit_now
from train.plan import Plan, state_arrays
from train.state import combine, init_state, split_trainable, state_with_params

STATE, META, CONFIG = "state", "meta", "config"
log = logging.getLogger("train")


def absolute(path: str) -> str:
    """A local path made absolute (Orbax refuses relative ones); URLs as they are."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


@dataclasses.dataclass(eq=False)
class Mismatch(CheckpointError):
    """A checkpoint of another model: its first parameter that differs from ours."""

    where: str
    name: str
    saved: tuple | None  # None: the checkpoint has no such parameter
    model: tuple

    def __str__(self) -> str:
        if self.saved is None:
            return (f"{self.where} does not match the model: it has no parameter "
                    f"{self.name} (model shape {self.model})")
        return (f"{self.where} does not match the model: {self.name} has shape "
                f"{self.saved} in the checkpoint and {self.model} in the model")


def split_step_dir(path: str) -> tuple[str, int | None]:
    """'.../checkpoints/500' -> ('.../checkpoints', 500); a run's directory -> (path, None)."""
    p = epath.Path(path)
    if p.name.isdigit() and (p / STATE).exists():
        return str(p.parent), int(p.name)
    return path, None


class Checkpoints:
    """A directory of numbered checkpoints (an Orbax CheckpointManager)."""

    def __init__(self, directory: str, cfg: CheckpointConfig | None = None, *,
                 read_only: bool = False):
        cfg = cfg or CheckpointConfig()
        directory = absolute(directory)
        self.directory = directory
        self.timeout_s, self.pending = cfg.save_timeout_s, None
        self.failed = False  # a save failed: its storage threads may hang, do not wait
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else cfg.keep, keep_period=cfg.keep_every,
            enable_async_checkpointing=cfg.async_save and not read_only,
            create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only)
        # On gs:// one array per object set (no OCDBT): OCDBT's conditional manifest
        # writes fail intermittently against the GCS emulator the tests use
        # ("Malformed StorageGeneration"); the per-array layout needs no such writes.
        use_ocdbt = not directory.startswith("gs://")
        handlers = {STATE: ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt),
                    META: ocp.JsonCheckpointHandler(),
                    CONFIG: ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
        self.committed = None  # the newest step known complete (set by latest_step, wait)
        if not read_only and jax.process_index() == 0:
            self._remove_incomplete()
        if not read_only and jax.process_count() > 1:  # nobody saves before it is done
            multihost_utils.sync_global_devices("shardlm:checkpoints-ready")

    def _remove_incomplete(self) -> None:
        """Delete step directories a crash left half-written. Orbax already ignores them
        (on gs:// a step counts once its commit marker exists; locally once renamed from
        its temporary name) and removes local temporary ones; this removes the rest, so a
        later save of the same step starts clean."""
        root = epath.Path(self.directory)
        complete = set(self.all_steps())
        for child in root.iterdir() if root.exists() else []:
            if child.name.isdigit() and int(child.name) not in complete:
                child.rmtree()

    def latest_step(self) -> int | None:
        latest = self.manager.latest_step()
        if latest is not None and self.pending is None:
            self.committed = latest
        return latest

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def _bounded(self, what: str, fn: Callable[[], Any]) -> Any:
        """fn(), a failure or a hang past save_timeout_s turned into a SaveError (storage
        clients retry for a long time when the server is gone)."""
        try:
            return storage.bounded(f"{what} to {self.directory}", fn, self.timeout_s,
                                   SaveError)
        except SaveError:
            self.failed = True
            raise

    def save(self, step: int, state, meta: dict, config: dict) -> None:
        """Start saving; with async saves this returns once the arrays are copied off
        the devices, and the write continues in the background."""
        self.wait()
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state_arrays(state)),
            META: ocp.args.JsonSave(meta), CONFIG: ocp.args.JsonSave(config)})
        self.pending = step
        # In this thread (Orbax's async machinery is bound to the caller's thread), so a
        # storage server that stops answering could block it forever: a watchdog ends
        # the run with the usual error line once save_timeout_s has passed.
        watchdog = threading.Timer(self.timeout_s, self._stuck, args=(step,))
        watchdog.daemon = True
        watchdog.start()
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as e:
            self.failed = True
            raise SaveError(f"saving step {step} to {self.directory} failed "
                            f"({storage.first_line(e)}); {storage.KEPT}") from None
        finally:
            watchdog.cancel()

    def _stuck(self, step: int) -> None:
        exit_now(f"saving step {step} to {self.directory} did not start within "
                 f"checkpoint.save_timeout_s={self.timeout_s:g}; {storage.KEPT}")

    def wait(self) -> None:
        """Block until every started save is committed (raises SaveError if one failed)."""
        if self.pending is not None:
            self._bounded(f"saving step {self.pending}", self.manager.wait_until_finished)
            self.committed, self.pending = self.pending, None

    def close(self) -> None:
        """Finish pending saves and release the manager, within save_timeout_s (not
        after a failed save, whose storage threads may never return)."""
        if not self.failed:
            self._bounded("finishing the checkpoint saves", self.manager.close)

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if isinstance(exc, (StorageError, PeerLost)):  # nothing to wait for: storage or
            self.failed = True  # a peer is gone (Orbax's close would wait for both)
        self.close()

    def _where(self, step: int) -> str:
        return f"checkpoint step {step} in {self.directory}"

    def check_params(self, step: int, abstract_params: nnx.State) -> None:
        """Raise CheckpointError naming the first parameter whose shape differs."""
        try:
            saved = self.manager.item_metadata(step)[STATE]
            saved = getattr(saved, "tree", saved)["params"]
        except Exception as e:  # unreadable metadata: report path and step
            raise self._unreadable(step, e) from None
        check_param_shapes(saved, abstract_params, self._where(step))

    def fallback(self, step: int) -> str:
        """What to delete to fall back from an unreadable checkpoint `step`."""
        older = [s for s in self.all_steps() if s < step]
        return (f"delete {self.directory}/{step} to fall back to step {older[-1]}"
                if older else f"delete {self.directory}/{step} to start over")

    def _unreadable(self, step: int, error: Exception) -> CheckpointError:
        reason = storage.first_line(error)
        if any(word in str(error) for word in ("TensorStore", "OCDBT", "zarr")):
            # TensorStore's own text is a spec dump or a cut-off path: name the files
            reason = f"the arrays under {self.directory}/{step}/{STATE} are damaged or cut short"
        return CheckpointError(f"{self._where(step)} cannot be read ({reason}); "
                               f"{self.fallback(step)}")

    def restore(self, step: int, target: dict[str, Any], optimizer: str
                ) -> tuple[dict[str, Any], dict]:
        """(state arrays laid out as `target`, meta) of checkpoint `step`, written by a
        run of the same optimizer.name as `optimizer` (else a ConfigError)."""
        self.check_params(step, target["params"])
        self.check_optimizer(step, optimizer)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(target), META: ocp.args.JsonRestore()}))
        except Exception as e:
            raise self._unreadable(step, e) from None
        return out[STATE], out[META]

    def check_optimizer(self, step: int, optimizer: str) -> None:
        """A ConfigError unless checkpoint `step` holds `optimizer`'s state (its config's
        optimizer.name; checkpoints from before the key are AdamW's)."""
        saved = {}
        try:
            if (epath.Path(self.directory) / str(step) / CONFIG).exists():
                saved = self.manager.restore(step, args=ocp.args.Composite(
                    **{CONFIG: ocp.args.JsonRestore()}))[CONFIG] or {}
        except Exception as e:
            raise self._unreadable(step, e) from None
        name = (saved.get("optimizer") or {}).get("name", "adamw")
        if name != optimizer:
            raise ConfigError(
                f"{self._where(step)} holds the state of optimizer.name={name}, not "
                f"{optimizer}: resume with optimizer.name={name}, or start a new "
                f"output_dir from its weights (model.init_from={self.directory}/{step})")

    def restore_params(self, step: int, target_params: nnx.State) -> nnx.State:
        """Only the parameters of checkpoint `step` (no optimizer state)."""
        self.check_params(step, target_params)
        item = {"params": target_params}
        path = epath.Path(self.directory) / str(step) / STATE
        try:
            with ocp.PyTreeCheckpointer() as reader:
                out = reader.restore(path, args=ocp.args.PyTreeRestore(
                    item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                    partial_restore=True))
        except Exception as e:
            raise self._unreadable(step, e) from None
        return out["params"]


def check_param_shapes(saved: Any, target: nnx.State, where: str) -> None:
    """Mismatch naming the first parameter of `target` that the saved metadata tree
    lacks or holds with another shape."""
    for path, var in nnx.to_flat_state(target):
        node = saved
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        node = node.get("value") if isinstance(node, dict) else node
        name, want = "/".join(map(str, path)), tuple(var.get_value().shape)
        if node is None or tuple(node.shape) != want:
            raise Mismatch(where, name, None if node is None else tuple(node.shape), want)


def find_checkpoint(path: str, flag: str = "checkpoint.resume_from"
                    ) -> tuple[Checkpoints, int]:
    """A checkpoint to start from: a step directory, a checkpoint directory (its
    latest step) or a run's output_dir (its checkpoints/ subdirectory). `flag` is what
    the user gave the path as, for the error messages."""
    given = f"{flag} {path!r}" if flag.startswith("-") else f"{flag}={path!r}"
    root, step = split_step_dir(absolute(path))
    if step is None and (epath.Path(root) / "checkpoints").exists():
        root = str(epath.Path(root) / "checkpoints")
    if not epath.Path(root).exists():
        raise CheckpointError(f"{given} does not exist")
    source = Checkpoints(root, read_only=True)
    step = step if step is not None else source.latest_step()
    if step is None:
        raise CheckpointError(f"{given} holds no complete checkpoint")
    return source, step


def start_state(plan: Plan, ckpts: Checkpoints, latest: int | None,
                initial_params: Callable[[], Any] | None = None
                ) -> tuple[Any, int, dict | None]:
    """(state, first step, the checkpoint's metadata (its data position under "data",
    DP-SGD's settings under "privacy") or None): the run's own latest
    checkpoint, else checkpoint.resume_from, else fresh: the parameters
    `initial_params()` reads (model.init_from, train/init_from.py) or a sharded init.
    Restores go straight into the plan's shardings, whatever mesh the checkpoint was
    written on."""
    cfg, target = plan.cfg, plan.state_target()
    if latest is not None:
        try:
            arrays, meta = ckpts.restore(latest, target, cfg.optimizer.name)
        except Mismatch as e:
            raise CheckpointError(
                f"{ckpts.directory} holds a run of another model ({e.name} has shape "
                f"{e.saved} there and {e.model} in this config); choose another output_dir "
                "for this one (or delete that run)") from None
        log.info("resumed from step %d (%s)", latest, ckpts.directory)
        return with_base(plan, arrays, initial_params), latest, meta
    if cfg.checkpoint.resume_from:
        source, step = find_checkpoint(cfg.checkpoint.resume_from)
        arrays, meta = source.restore(step, target, cfg.optimizer.name)
        log.info("resumed from step %d of %s", step, source.directory)
        return with_base(plan, arrays, initial_params), step, meta
    if initial_params is not None:
        return state_with_params(plan.init, plan.shardings, cfg.train.seed,
                                 initial_params()), 0, None
    return init_state(plan.init, plan.shardings, cfg.train.seed), 0, None


def with_base(plan: Plan, arrays: dict[str, Any],
              initial_params: Callable[[], Any] | None) -> Any:
    """The state of restored checkpoint arrays, with what checkpoints leave out read
    again from where the run started (model.init_from: `initial_params`, or, without
    one, the seeded init): a LoRA run's frozen base (its checkpoints hold the adapters)
    and a full fine-tuning DPO run's frozen reference model."""
    state = plan.abstract.replace(**arrays)
    lora = plan.cfg.model.lora.enabled
    if not lora and state.reference is None:
        return state
    if initial_params is not None:
        source = initial_params()
    else:
        source = init_state(plan.init, plan.shardings, plan.cfg.train.seed).params
        source = split_trainable(source, True)[1] if lora else source
    if lora:
        return state.replace(params=combine(arrays["params"], source))
    return state.replace(reference=source)
