"""run(cfg): the whole training job, top to bottom in data-flow order."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import jax
import yaml
from etils import epath
from tqdm import tqdm

import sharding
from sharding import distributed
from train.checkpoint import Checkpoints, start_state
from train.config import Config, ConfigError, to_dict
from train.data import make_batches, resolve_data, tokens_per_step
from train.metrics import (MetricsLog, TensorBoard, flops_per_token, format_row,
                           peak_flops_per_device)
from train.profiler import StepProfiler
from train.state import batch_sharding, check_batch_fits, plan_state
from train.evaluate import Evaluator
from train.step import jit_train_step
from train.xla_flags import compile_options

log = logging.getLogger("train")


def setup_logging(is_main: bool = True) -> None:
    """INFO lines on stdout from process 0; other processes only warn."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)


def start_processes(cfg: Config) -> str | None:
    """jax.distributed when several processes take part; before any other JAX call."""
    d = cfg.distributed
    mode = {None: "auto", True: "on", False: "off"}[d.enabled]
    cluster = distributed.from_env(d.coordinator, d.num_processes, d.process_id)
    return distributed.initialize(mode, cluster, init_timeout_s=d.init_timeout_s,
                                  heartbeat_timeout_s=d.heartbeat_timeout_s,
                                  shutdown_timeout_s=d.shutdown_timeout_s)


def enable_compile_cache(cache_dir: str | None) -> None:
    """Persistent XLA compilation cache: a second start of the same config skips
    compiling."""
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class TrainingStopped(RuntimeError):
    """The run stopped itself (non-finite loss); the message says why and what to do."""


class Preempted(SystemExit):
    """SIGTERM: a checkpoint was written; exit 143 (128 + SIGTERM) so schedulers see an
    incomplete run, and a rerun of the same command resumes."""

    def __init__(self):
        super().__init__(143)


def check_writable(path: str) -> None:
    """Fail before any compiling when output_dir cannot be written."""
    probe = epath.Path(path) / ".write-probe"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:
        raise ConfigError(f"output_dir={path!r} is not writable ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None


class SigtermFlag:
    """Set by SIGTERM; on several hosts JAX's preemption sync point decides, so every
    process stops at the same step."""

    def __init__(self, ckpts: Checkpoints):
        self.ckpts, self.received = ckpts, False
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def __call__(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self.ckpts.manager.reached_preemption(step)
        return self.received


def run(cfg: Config) -> list[dict]:
    """Train per `cfg`, resuming from its latest checkpoint; returns the logged rows."""
    # Processes: one per host, joined by JAX's multi-controller runtime when several.
    processes = start_processes(cfg)
    is_main = jax.process_index() == 0
    setup_logging(is_main)
    if processes:
        log.info("distributed: %s", processes)
    out_dir = cfg.run_dir
    enable_compile_cache(cfg.compile_cache_dir)
    if is_main:
        check_writable(out_dir)

    # Data source: a prepared directory (raw inputs are prepared on the fly) or the
    # embedded corpus; the tokenizer settles the vocabulary size.
    cfg, data_path = resolve_data(cfg)

    # Mesh: named axes over all devices; one -1 axis takes the rest.
    mesh = sharding.make_mesh(cfg.mesh.axes(), dcn=cfg.mesh.dcn())
    check_batch_fits(cfg, mesh)
    log.info("mesh %s on %s (%s)", sharding.describe(mesh), jax.default_backend(),
             jax.devices()[0].device_kind)

    # Rules: logical axis -> mesh axes.
    rules = sharding.make_rules(cfg.sharding.rules, mesh.axis_names)

    # State: abstract plan -> shardings -> latest checkpoint, resume_from, or jit(init).
    init, abstract, state_shardings = plan_state(cfg, mesh, rules)
    ckpts = Checkpoints(cfg.checkpoint_dir, cfg.checkpoint)
    steps = cfg.train.steps
    latest = ckpts.latest_step()  # a directory listing (remote on gs://): read it once
    if latest is not None and latest >= steps:
        log.info("run already finished: checkpoint at step %d in %s (train.steps=%d)",
                 latest, ckpts.directory, steps)
        ckpts.close()
        return []
    state, start, data_position = start_state(cfg, ckpts, init, abstract, state_shardings, log)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log.info("model %s: %d layers, d_model %d, %.2fM parameters, rules %s",
             cfg.model.style, cfg.model.num_layers, cfg.model.d_model, n_params / 1e6,
             cfg.sharding.rules)

    # Data: per-host rows -> global (microbatch, batch, length) arrays; batch i is a
    # function of (data, seed, i), so a resumed run continues the same stream.
    batch_layout = batch_sharding(cfg, mesh, rules)
    batches = make_batches(cfg, batch_layout, data_path)
    batches.check_resume(data_position)
    try:
        return train_loop(cfg, ckpts, batches, batch_layout, state, state_shardings, start)
    finally:
        batches.close()


def train_loop(cfg: Config, ckpts: Checkpoints, batches, batch_layout, state,
               state_shardings, start: int) -> list[dict]:
    """Compile, then step from `start` to train.steps with metrics, evaluation and
    checkpoints."""
    is_main, out_dir, steps = jax.process_index() == 0, cfg.run_dir, cfg.train.steps

    # Step: jit with explicit in/out shardings, donated state; compiled up front.
    first = batches.batch(start)
    step_fn = jit_train_step(state_shardings, {k: batch_layout for k in first})
    t0 = time.perf_counter()
    step_fn = step_fn.lower(state, first).compile(compile_options(state_shardings))
    log.info("train step compiled in %.1f s", time.perf_counter() - t0)
    evaluate = Evaluator(cfg, batches, batch_layout, state_shardings)

    # Output: resolved config beside the metrics; metrics past `start` are dropped.
    config_dict = to_dict(cfg)
    if is_main:
        (epath.Path(out_dir) / "config.yaml").write_text(
            yaml.safe_dump(config_dict, sort_keys=False))
    metrics = MetricsLog(f"{out_dir.rstrip('/')}/metrics.jsonl",
                         tokens_per_step=tokens_per_step(cfg),
                         flops_per_token=flops_per_token(cfg.model, cfg.train.seq_len),
                         num_devices=jax.device_count(),
                         peak_flops=peak_flops_per_device(jax.devices()[0],
                                                          cfg.metrics.peak_tflops),
                         write=is_main, start_step=start)

    board = TensorBoard(f"{out_dir.rstrip('/')}/tensorboard", cfg.metrics.tensorboard and is_main,
                        log.warning)
    profiler = StepProfiler(cfg.profile.start_step, cfg.profile.steps,
                            f"{out_dir.rstrip('/')}/tensorboard", log)

    rows: list[dict] = []
    bar = tqdm(total=steps, initial=start, disable=None if is_main else True,
               dynamic_ncols=True, desc="train", file=sys.stdout)

    def flush() -> None:
        """Log the pushed steps: metrics.jsonl, TensorBoard, and the console."""
        new_rows = metrics.flush()
        board.write(new_rows)
        for row in new_rows:
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:,.0f}")
            if is_main and not bar.disable:
                bar.write(format_row(row))
            elif is_main:
                log.info(format_row(row))

    def save(step: int) -> None:
        meta = {"step": step, "data": batches.position(step)}
        ckpts.save(step, state, meta, config_dict)

    # Loop: metrics and the non-finite flag are read one step late, so the host never
    # stalls the device (a checkpointed step's own row is logged before its save);
    # checkpoints every checkpoint.every_steps, at the end, on SIGTERM.
    preempted = SigtermFlag(ckpts)
    metrics.start(start)
    previous = None  # (step, metrics) of the step before the one just dispatched
    every = cfg.checkpoint.every_steps
    for step in range(start + 1, steps + 1):
        profiler.before(step)
        state, step_metrics = step_fn(state, batches.batch(step - 1))
        profiler.after(step, state)
        if previous is not None:
            check_finite(cfg, *previous, ckpts)
        flush()
        eval_metrics = evaluate(step, state)
        if step % cfg.train.log_every == 0 or step == steps or eval_metrics:
            metrics.push(step, {**step_metrics, **eval_metrics})
        previous = (step, step_metrics)
        bar.update(1)
        stop = preempted(step)
        if (every and step % every == 0) or step == steps or stop:
            check_finite(cfg, step, step_metrics, ckpts)  # never save past a bad step
            flush()  # the step's row is timed and logged before its checkpoint is written
            save(step)
        if stop:
            profiler.stop(state)
            ckpts.wait()
            board.close()
            bar.close()
            log.info("preempted (SIGTERM): saved step %d to %s; rerun the same command to "
                     "resume", step, ckpts.directory)
            ckpts.close()
            raise Preempted()
    profiler.stop(state)
    board.close()
    bar.close()
    ckpts.wait()
    ckpts.close()
    if is_main and rows:
        log.info("done: %d steps, final loss %.4f, metrics in %s", steps, rows[-1]["loss"],
                 f"{out_dir.rstrip('/')}/metrics.jsonl")
    return rows


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
