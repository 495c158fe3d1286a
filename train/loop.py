"""run(cfg): the whole training job, top to bottom in data-flow order."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import time

import jax
import yaml
from etils import epath
from tqdm import tqdm

import sharding
from sharding import distributed
from train import init_from, privacy, startup, storage
from train.checkpoint import Checkpoints, start_state
from train.config import Config, to_dict
from train.data.batches import make_batches, tokens_per_step
from train.data.resolve import resolve_data, tokenizer_files
from train.errors import ConfigError, PeerLost, Preempted, StorageError, Terminated, TrainingStopped
from train.evaluate import Evaluator
from train.inference.load import HF_INFO
from train.lock import RunLock
from train.metrics import (
    MetricsLog,
    TensorBoard,
    flops_per_token,
    format_row,
    peak_flops_per_device,
)
from train.plan import plan
from train.profiler import StepProfiler
from train.step import jit_train_step

log = logging.getLogger("train")


def check_writable(path: str, key: str, timeout_s: float) -> None:
    """Fail before any compiling when `path` (the config's `key`) cannot be written."""
    probe = epath.Path(path) / ".write-probe"

    def write():
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    try:
        storage.bounded(f"{key}={path!r}", write, timeout_s)
    except StorageError as e:
        if e.cause is None:  # a storage server that does not answer
            raise
        raise ConfigError(f"{key}={path!r} is not writable ({storage.first_line(e.cause)})"
                          ) from None


class SigtermFlag:
    """Set by SIGTERM; on several hosts JAX's preemption sync point decides, so every
    process stops at the same step."""

    def __init__(self, ckpts: Checkpoints):
        self.ckpts, self.received = ckpts, False
        if jax.process_count() == 1:
            before = signal.signal(signal.SIGTERM, self._handle)
            if getattr(before, "fired", False):  # start-up's SIGTERM, its error lost
                raise Terminated(before.message)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def __call__(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self.ckpts.manager.reached_preemption(step)
        return self.received


class Outputs:
    """What a run writes as it goes: metrics.jsonl, TensorBoard events, a profiler
    trace, the progress bar and the console rows. `close()` ends each once."""

    def __init__(self, cfg: Config, start: int, is_main: bool):
        out_dir, steps = cfg.run_dir.rstrip("/"), cfg.train.steps
        self.is_main, self.rows = is_main, []
        self.metrics = MetricsLog(
            f"{out_dir}/metrics.jsonl", tokens_per_step=tokens_per_step(cfg),
            flops_per_token=flops_per_token(cfg.model, cfg.train.seq_len),
            num_devices=jax.device_count(),
            peak_flops=peak_flops_per_device(jax.devices()[0], cfg.metrics.peak_tflops),
            write=is_main, start_step=start, timeout_s=cfg.checkpoint.save_timeout_s)
        self.board = TensorBoard(f"{out_dir}/tensorboard", cfg.metrics.tensorboard and is_main,
                                 log.warning)
        self.profiler = StepProfiler(cfg.profile.start_step, cfg.profile.steps,
                                     f"{out_dir}/tensorboard", log)
        self.bar = tqdm(total=steps, initial=start, disable=None if is_main else True,
                        dynamic_ncols=True, desc="train", file=sys.stdout)

    def flush(self) -> None:
        """Log the pushed steps: metrics.jsonl, TensorBoard, and the console."""
        new_rows = self.metrics.flush()
        self.board.write(new_rows)
        for row in new_rows:
            self.rows.append(row)
            self.bar.set_postfix(loss=f"{row['loss']:.3f}",
                                 tok_s=f"{row['tokens_per_sec']:,.0f}")
            if self.is_main and not self.bar.disable:
                self.bar.write(format_row(row))
            elif self.is_main:
                log.info(format_row(row))

    def close(self) -> None:
        self.profiler.stop()
        self.board.close()
        self.bar.close()


def run(cfg: Config) -> list[dict]:
    """Train per `cfg`, resuming from its latest checkpoint; returns the logged rows."""
    # Processes: one per host, joined by JAX's multi-controller runtime when several;
    # logging from process 0, the compilation cache.
    is_main = startup.start(cfg)
    timeout_s = cfg.checkpoint.save_timeout_s  # bounds every write to the run's storage
    if is_main:
        check_writable(cfg.run_dir, "output_dir", timeout_s)
        if cfg.checkpoint.dir:
            check_writable(cfg.checkpoint.dir, "checkpoint.dir", timeout_s)

    if cfg.optimizer.lr == 0:
        log.warning("optimizer.lr=0: the parameters will not change (set a peak learning "
                    "rate to train)")

    # Data source: a prepared directory (raw inputs are prepared on the fly) or the
    # embedded corpus; the tokenizer settles the vocabulary size.
    cfg, data_path = resolve_data(cfg)

    # DP-SGD: the sampling rate, noise and clip norm, resolved against the train split's
    # sequences (a target epsilon sets the noise).
    dp = privacy.for_run(cfg, data_path)
    if dp is not None:
        log.info("privacy: %s", dp.describe(cfg.train.steps))

    # Mesh (named axes over all devices), rules (logical axis -> mesh axes), and the
    # state planned on them: abstract arrays and their shardings.
    p = plan(cfg, privacy=dp)
    log.info("mesh %s on %s (%s)", sharding.describe(p.mesh), jax.default_backend(),
             jax.devices()[0].device_kind)

    # Teardown, once on every way out (the end, preemption, a non-finite stop, a failed
    # save, Ctrl-C): outputs, then data workers, then the checkpoint manager, then the
    # run's lock.
    with contextlib.ExitStack() as teardown:
        # One run per output_dir: a second trainer there is refused (train/lock.py).
        if is_main:
            teardown.enter_context(RunLock(cfg.run_dir, timeout_s))
        # State: the latest checkpoint, checkpoint.resume_from, or jit(init), straight
        # into the planned shardings.
        ckpts = teardown.enter_context(Checkpoints(cfg.checkpoint_dir, cfg.checkpoint))
        latest = ckpts.latest_step()  # a directory listing (remote on gs://): read it once
        if latest is not None and latest >= cfg.train.steps:
            log.info("run already finished: checkpoint at step %d in %s (train.steps=%d)",
                     latest, ckpts.directory, cfg.train.steps)
            return []
        state, start, meta = start_state(p, ckpts, latest, init_from.initial_params(cfg, p))
        if meta is not None:  # the budget spent so far assumes these settings every step
            privacy.check_resume(meta.get("privacy"), dp, f"the checkpoint at step {start}")
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        log.info("model %s: %d layers, d_model %d, %.2fM parameters, rules %s",
                 cfg.model.style, cfg.model.num_layers, cfg.model.d_model, n_params / 1e6,
                 cfg.sharding.rules)

        # Data: per-host rows -> global (microbatch, batch, length) arrays; batch i is a
        # function of (data, seed, i), so a resumed run continues the same stream.
        batches = make_batches(cfg, p.batch_sharding, data_path, dp)
        teardown.callback(batches.close)
        batches.check_resume(None if meta is None else meta.get("data"))

        # Step: jit with explicit in/out shardings, donated state; compiled up front.
        first = batches.batch(start)
        t0 = time.perf_counter()
        step_fn = jit_train_step(p.shardings, {k: p.batch_sharding for k in first})
        step_fn = step_fn.lower(state, first).compile(startup.compile_options(p.shardings))
        log.info("train step compiled in %.1f s", time.perf_counter() - t0)
        evaluate = Evaluator(cfg, batches, p.batch_sharding, p.shardings)

        # Outputs: the resolved config and the tokenizer beside the metrics (rows past
        # `start` dropped), so generation and export read what the run trained with.
        config_dict = to_dict(cfg)
        if is_main:
            run_dir = epath.Path(cfg.run_dir)
            storage.write_text(str(run_dir / "config.yaml"),
                               yaml.safe_dump(config_dict, sort_keys=False), timeout_s)
            hf = init_from.hf_info(cfg.model.init_from)
            if hf is not None:  # what train.convert needs to export it to Hugging Face
                storage.write_text(str(run_dir / HF_INFO), json.dumps(hf), timeout_s)
            for src in tokenizer_files(data_path):  # the prepared copies
                storage.bounded(f"writing {run_dir / src.name}", lambda src=src: (
                    run_dir / src.name).write_bytes(src.read_bytes()), timeout_s)
        out = Outputs(cfg, start, is_main)
        teardown.callback(out.close)

        # A lost peer (a failed collective here, a closed lifeline on its own thread):
        # one line that says where a rerun resumes.
        def rerun() -> str:
            resume = (f"resumes from the latest checkpoint (step {ckpts.committed} or later)"
                      if ckpts.committed is not None else "starts over (no checkpoint yet)")
            return f"rerunning all {jax.process_count()} processes {resume}"
        distributed.on_peer_lost(rerun)
        teardown.callback(distributed.on_peer_lost, None)
        try:
            train_loop(cfg, state, start, step_fn, batches, evaluate, ckpts, out, config_dict,
                       dp)
        except jax.errors.JaxRuntimeError as e:
            lost = distributed.lost_peer(e)
            if lost is None:
                raise
            raise PeerLost(lost) from None
    if is_main and out.rows:
        run_dir = cfg.run_dir.rstrip("/")
        log.info("done: %d steps, final loss %.4f | metrics %s/metrics.jsonl | checkpoint "
                 "step %d in %s | next: python -m train.generate --checkpoint %s --prompt "
                 "\"...\"; python -m train.plot %s", cfg.train.steps, out.rows[-1]["loss"],
                 run_dir, cfg.train.steps, ckpts.directory, run_dir, run_dir)
    return out.rows


def train_loop(cfg: Config, state, start: int, step_fn, batches, evaluate: Evaluator,
               ckpts: Checkpoints, out: Outputs, config_dict: dict,
               dp: privacy.Privacy | None = None) -> None:
    """Steps start+1 .. train.steps: metrics and the non-finite flag are read one step
    late, so the host never stalls the device (a checkpointed step's own row is logged
    before its save); checkpoints every checkpoint.every_steps, at the end, on SIGTERM.
    With DP-SGD every row carries the epsilon spent after its step."""
    steps, every = cfg.train.steps, cfg.checkpoint.every_steps
    preempted = SigtermFlag(ckpts)
    out.metrics.start(start)
    previous = None  # (step, metrics) of the step before the one just dispatched
    for step in range(start + 1, steps + 1):
        out.profiler.before(step)
        state, step_metrics = step_fn(state, batches.batch(step - 1))
        out.profiler.after(step, state)
        if previous is not None:
            check_finite(cfg, *previous, ckpts)
        out.flush()
        eval_metrics = evaluate(step, state)
        if step % cfg.train.log_every == 0 or step == steps or eval_metrics:
            spent = {} if dp is None else {"epsilon": dp.epsilon(step)}
            out.metrics.push(step, {**step_metrics, **eval_metrics, **spent})
        previous = (step, step_metrics)
        out.bar.update(1)
        stop = preempted(step)
        if (every and step % every == 0) or step == steps or stop:
            check_finite(cfg, step, step_metrics, ckpts)  # never save past a bad step
            out.flush()  # the step's row is timed and logged before its checkpoint
            meta = {"step": step, "data": batches.position(step)}
            ckpts.save(step, state, meta if dp is None else {**meta, "privacy": dp.record()},
                       config_dict)
        if stop:
            out.profiler.stop(state)
            ckpts.wait()
            log.info("preempted (SIGTERM): saved step %d to %s; rerun the same command to "
                     "resume", step, ckpts.directory)
            raise Preempted(f"preempted at step {step}")
    out.profiler.stop(state)
    ckpts.wait()


def check_finite(cfg: Config, step: int, step_metrics: dict, ckpts: Checkpoints) -> None:
    """Stop on a NaN/Inf loss or gradient norm (unless train.nonfinite=skip). The step's
    update was already dropped in-graph, so nothing bad reaches a checkpoint."""
    if cfg.train.nonfinite == "skip" or not int(step_metrics["nonfinite"]):
        return
    ckpts.wait()
    last = ckpts.latest_step()
    kept = f"the last checkpoint (step {last}) is kept" if last is not None else \
        "no checkpoint was written yet"
    raise TrainingStopped(
        f"non-finite loss or gradient norm at step {step} (loss={float(step_metrics['loss'])},"
        f" grad_norm={float(step_metrics['grad_norm'])}); {kept}; lower optimizer.lr or set "
        "train.nonfinite=skip to skip such steps")
