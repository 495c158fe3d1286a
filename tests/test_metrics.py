"""FLOPs accounting and peak lookup."""

import json

from models import count_params
from train.config import load_config
from train.metrics import MetricsLog, flops_per_token, peak_flops_per_device

from helpers import REPO


class FakeDevice:
    def __init__(self, kind):
        self.device_kind = kind


def test_flops_per_token_gpt2_small_by_hand():
    """GPT-2 small: per layer q, k, v, o (4 x 768 x 768) and the MLP (2 x 768 x 3072), and
    the tied head (768 x 50304) once; attention 12 L H Q T. Biases, norms and the
    position table run no matmul."""
    cfg = load_config(str(REPO / "configs" / "gpt2-124m.yaml")).model
    matmuls = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768 * 50304
    assert flops_per_token(cfg, 1024) == 6 * matmuls + 12 * 12 * 768 * 1024 == 854_654_976
    assert count_params(cfg) == 123_689_472


def test_an_untied_embedding_lookup_is_not_a_matmul():
    """Llama-3-8B: the untied input embedding (128256 x 4096) is a gather; only the head
    of the same size is a matmul. 32 layers of q (4096 x 4096), k and v (4096 x 1024),
    o (4096 x 4096) and SwiGLU (3 x 4096 x 14336)."""
    cfg = load_config(str(REPO / "configs" / "llama-8b.yaml")).model
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    matmuls = 32 * layer + 4096 * 128256
    assert flops_per_token(cfg, 8192) == 6 * matmuls + 12 * 32 * 4096 * 8192
    embedding, norms = 128256 * 4096, (2 * 32 + 1) * 4096
    assert count_params(cfg) == matmuls + embedding + norms


def test_peak_lookup_and_override():
    assert peak_flops_per_device(FakeDevice("NVIDIA H100 80GB HBM3"), None) == 989e12
    assert peak_flops_per_device(FakeDevice("TPU v5 lite"), None) == 197e12
    assert peak_flops_per_device(FakeDevice("TPU v5p"), None) == 459e12
    assert peak_flops_per_device(FakeDevice("cpu"), None) is None
    assert peak_flops_per_device(FakeDevice("cpu"), 1.5) == 1.5e12


def test_metrics_log_rows(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl", tokens_per_step=100, flops_per_token=10.0,
                     num_devices=2, peak_flops=1e3, write=True)
    log.start(0)
    log.push(5, {"loss": 2.5, "grad_norm": 1.0, "lr": 0.1, "z_loss": 0.0})
    (row,) = log.flush()
    assert row["step"] == 5 and row["loss"] == 2.5
    assert abs(row["tokens_per_sec"] * row["step_time_s"] - 100) < 1e-6
    assert abs(row["mfu"] - row["tokens_per_sec"] * 10 / 2 / 1e3) < 1e-9
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 5


def test_gpu_flags_added_without_overriding_the_users():
    from train.startup import with_gpu_flags
    assert with_gpu_flags("") == "--xla_gpu_enable_latency_hiding_scheduler=true"
    mine = "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/x"
    assert with_gpu_flags(mine) == mine  # the user's value wins
    assert with_gpu_flags("--xla_force_host_platform_device_count=8") == (
        "--xla_force_host_platform_device_count=8 "
        "--xla_gpu_enable_latency_hiding_scheduler=true")


def test_cpu_compile_options_leave_the_users_flags_and_other_platforms_alone(
        devices, monkeypatch):
    import types

    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from train.startup import compile_options
    on_cpu = {"w": NamedSharding(Mesh(np.array(devices), ("x",)), PartitionSpec())}
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert compile_options(on_cpu) == {"xla_backend_optimization_level": 2}
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
    assert compile_options(on_cpu) == {}  # the user's value wins
    on_tpu = types.SimpleNamespace(device_set=[types.SimpleNamespace(platform="tpu")])
    assert compile_options([on_tpu]) == {}


def test_the_run_compiles_init_and_steps_with_the_cpu_options(tmp_path, devices, monkeypatch):
    import re

    import jax.stages

    import train.loop

    from helpers import small_config

    seen = {}
    compile = jax.stages.Lowered.compile

    def recording_compile(self, compiler_options=None, **kwargs):
        name = re.search(r"module @jit_(\w+)", self.as_text()).group(1)
        seen[name] = compiler_options
        return compile(self, compiler_options, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", recording_compile)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    cfg = small_config(f"output_dir={tmp_path / 'run'}", "train.steps=1",
                       "eval.every_steps=1", "eval.batches=1", "compile_cache_dir=null")
    train.loop.run(cfg)
    o2 = {"xla_backend_optimization_level": 2}
    assert {k: seen.get(k) for k in ("init", "train_step", "eval_step")} == {
        "init": o2, "train_step": o2, "eval_step": o2}


def test_a_steps_row_is_logged_before_its_checkpoint(tmp_path, devices, monkeypatch):
    """The step time of a checkpointed step (the last one always is) must not include
    the checkpoint write: its row is logged before the save starts."""
    import train.loop

    from helpers import small_config

    logged_at_save = {}
    save = train.loop.Checkpoints.save

    def recording_save(self, step, *args, **kwargs):
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        logged_at_save[step] = [json.loads(line)["step"] for line in lines]
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(train.loop.Checkpoints, "save", recording_save)
    cfg = small_config(f"output_dir={tmp_path / 'run'}", "train.steps=4",
                       "checkpoint.every_steps=2", "train.log_every=1")
    rows = train.loop.run(cfg)
    assert logged_at_save == {2: [1, 2], 4: [1, 2, 3, 4]}
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
