"""run(cfg): the whole training job, top to bottom in data-flow order."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import jax
import yaml
from jax.sharding import NamedSharding
from tqdm import tqdm

import sharding
from train.config import Config, ConfigError, to_dict
from train.data import Batches, load_stdlib_corpus, tokens_per_step
from train.metrics import MetricsLog, flops_per_token, format_row, peak_flops_per_device
from train.state import build_state
from train.step import jit_train_step

log = logging.getLogger("train")


def setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def enable_compile_cache(cache_dir: str | None) -> None:
    """Persistent XLA compilation cache: a second start of the same config skips
    compiling."""
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def check_batch_fits(cfg: Config, mesh) -> None:
    """The per-microbatch batch must split evenly over the batch mesh axes."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.train.batch_size // cfg.train.microbatches
    if micro % ways:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} / train.microbatches="
            f"{cfg.train.microbatches} = {micro} sequences per microbatch do not divide by "
            f"mesh data x fsdp = {ways}; change the batch size or the mesh")


def run(cfg: Config) -> list[dict]:
    """Train per `cfg`; returns the logged metric rows."""
    setup_logging()
    is_main = jax.process_index() == 0
    out_dir = Path(cfg.run_dir)
    enable_compile_cache(cfg.compile_cache_dir)

    # Mesh: named axes over all devices; one -1 axis takes the rest.
    mesh = sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                               "model": cfg.mesh.model})
    check_batch_fits(cfg, mesh)
    log.info("mesh %s on %s (%s)", sharding.describe(mesh), jax.default_backend(),
             jax.devices()[0].device_kind)

    # Rules: logical axis -> mesh axes.
    rules = sharding.make_rules(cfg.sharding.rules, mesh.axis_names)

    # State: abstract init -> shardings -> jit(init, out_shardings).
    state, state_shardings = build_state(cfg, mesh, rules)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log.info("model %s: %d layers, d_model %d, %.2fM parameters, rules %s",
             cfg.model.style, cfg.model.num_layers, cfg.model.d_model, n_params / 1e6,
             cfg.sharding.rules)

    # Data: per-host rows -> global (microbatch, batch, length) arrays.
    batch_spec = sharding.logical_to_spec((None, "batch", None), (
        cfg.train.microbatches, cfg.train.batch_size // cfg.train.microbatches,
        cfg.train.seq_len), rules, mesh, "batch")
    batch_sharding = NamedSharding(mesh, batch_spec)
    corpus = None
    if cfg.data.source == "stdlib":
        corpus = load_stdlib_corpus(cfg.data.max_bytes, cfg.data.val_fraction)
        log.info("data: stdlib corpus, %d files, %.1fM train / %.2fM val bytes; reference: "
                 "unigram entropy %.3f nats/token", corpus.num_files,
                 corpus.train_BYTES.size / 1e6, corpus.val_BYTES.size / 1e6,
                 corpus.unigram_entropy())
    batches = Batches(cfg, batch_sharding, corpus)

    # Step: jit with explicit in/out shardings, donated state; compiled up front.
    step_fn = jit_train_step(state_shardings, {"inputs": batch_sharding,
                                               "targets": batch_sharding})
    t0 = time.perf_counter()
    step_fn = step_fn.lower(state, batches.batch(0)).compile()
    log.info("train step compiled in %.1f s", time.perf_counter() - t0)

    # Output: resolved config beside the metrics.
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    metrics = MetricsLog(out_dir / "metrics.jsonl", tokens_per_step=tokens_per_step(cfg),
                         flops_per_token=flops_per_token(cfg.model, cfg.train.seq_len),
                         num_devices=jax.device_count(),
                         peak_flops=peak_flops_per_device(jax.devices()[0],
                                                          cfg.metrics.peak_tflops),
                         write=is_main)

    # Loop: metrics are fetched one step late so the host never stalls the device.
    rows: list[dict] = []
    steps = cfg.train.steps
    bar = tqdm(total=steps, disable=None if is_main else True, dynamic_ncols=True,
               desc="train", file=sys.stdout)
    metrics.start(0)
    for step in range(1, steps + 1):
        state, step_metrics = step_fn(state, batches.batch(step - 1))
        for row in metrics.flush():
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:,.0f}")
            if is_main and not bar.disable:
                bar.write(format_row(row))
            elif is_main:
                log.info(format_row(row))
        if step % cfg.train.log_every == 0 or step == steps:
            metrics.push(step, step_metrics)
        bar.update(1)
    rows.extend(metrics.flush())
    bar.close()
    if is_main and rows:
        log.info(format_row(rows[-1]))
        log.info("done: %d steps, final loss %.4f, metrics in %s", steps, rows[-1]["loss"],
                 out_dir / "metrics.jsonl")
    return rows
