"""FLOPs, MFU and metric logging (metrics.jsonl), without a host sync every step; and a
plot of a run's losses.

MFU formula: the matmuls that run, forward and backward (the PaLM paper's count):
    flops_per_token = 6 * M + 12 * L * D_attn * T
M: the weights that multiply activations: every layer's projections and the output
head (a tied head is the embedding table, counted once; an untied model's input
embedding is a lookup, not a matmul, and is left out, as are the position table, norm
scales and biases). L: layers, D_attn: num_heads * head_size, T: sequence length; the
12*L*D*T term is attention's QK^T and AV over every (query, key) pair.
    MFU = tokens_per_sec * flops_per_token / (num_devices * peak_flops_per_device)
Remat recomputation is not counted (it is overhead, not useful work). The README
compares this with nanoGPT's and MaxText's counts.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import jax
from etils import epath

from models import ModelConfig, count_matmul_params
from train import storage

# Dense bf16 peak FLOP/s per device (no sparsity), by substring of jax's device_kind.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
    "L40S": 362e12, "L4": 121e12, "A10G": 125e12, "B200": 2250e12, "GB200": 2500e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12,
    "TPU v5e": 197e12, "TPU v5": 459e12, "TPU v4": 275e12, "TPU v3": 123e12,
}


def peak_flops_per_device(device: jax.Device, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device: the override, else the table, else None (CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    return _lookup(PEAK_FLOPS, device)


# Peak HBM bandwidth (bytes/s) of one device, from the vendors' data sheets, for
# memory-bandwidth utilization of decoding (scripts/bench_decode.py).
PEAK_BANDWIDTH = {
    "H200": 4.8e12, "H100": 3.35e12, "H800": 3.35e12, "A100": 2.0e12, "A800": 2.0e12,
    "L40S": 0.864e12, "L4": 0.3e12, "A10G": 0.6e12, "B200": 8.0e12, "GB200": 8.0e12,
    "TPU v6 lite": 1.64e12, "TPU v6e": 1.64e12, "TPU v5p": 2.765e12, "TPU v5 lite": 0.819e12,
    "TPU v5e": 0.819e12, "TPU v5": 2.765e12, "TPU v4": 1.2e12, "TPU v3": 0.9e12,
}


def _lookup(table: dict, device: jax.Device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name in sorted(table, key=len, reverse=True):
        if name in kind:
            return table[name]
    return None


def peak_bandwidth_per_device(device: jax.Device) -> float | None:
    """Peak memory bandwidth (bytes/s) of one device from the table; None (CPU) if unknown."""
    return _lookup(PEAK_BANDWIDTH, device)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq_len
    return 6 * count_matmul_params(cfg) + attn


class MetricsLog:
    """Writes one JSON line per logged step to output_dir/metrics.jsonl (process 0).

    `push(step, device_metrics)` stores device arrays without waiting for them;
    `flush()` turns the stored ones into numbers. The loop flushes one step later, once
    the next step is already queued, so the device never idles waiting for the host.
    """

    def __init__(self, path: str, *, tokens_per_step: int, flops_per_token: float,
                 num_devices: int, peak_flops: float | None, write: bool, start_step: int = 0,
                 timeout_s: float = 1800.0):
        self.path, self.write, self.timeout_s = epath.Path(path), write, timeout_s
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.num_devices, self.peak_flops = num_devices, peak_flops
        self.pending: list[tuple[int, dict]] = []
        self.last_time: float | None = None
        self.last_step: int | None = None
        # Rows already logged up to start_step (a resumed run) are kept, later ones
        # dropped, so every step appears once. Remote files (gs://) cannot be appended
        # to: they are rewritten whole at each flush.
        self.remote = "://" in str(path)
        self.lines: list[str] = []
        if write:
            storage.bounded(f"writing {path}", lambda: self._begin(start_step), timeout_s)

    def _begin(self, start_step: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step and self.path.exists():
            self.lines = [line for line in self.path.read_text().splitlines()
                          if line.strip() and json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in self.lines))

    def start(self, step: int) -> None:
        self.last_time, self.last_step = time.perf_counter(), step

    def push(self, step: int, metrics: dict[str, Any]) -> None:
        self.pending.append((step, metrics))

    def flush(self) -> list[dict]:
        """Fetch pending metrics (blocks until they are computed) and log them."""
        rows = []
        for step, metrics in self.pending:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if "eval_loss" in values and "eval_reward_accuracy" not in values:
                values["eval_ppl"] = math.exp(min(values["eval_loss"], 700.0))
            now = time.perf_counter()
            steps = step - self.last_step
            dt = (now - self.last_time) / max(steps, 1)
            self.last_time, self.last_step = now, step
            tps = self.tokens_per_step / dt
            tflops = tps * self.flops_per_token / self.num_devices / 1e12
            row = {"step": step, **values, "tokens_per_sec": tps, "step_time_s": dt,
                   "tflops_per_device": tflops,
                   "mfu": tflops * 1e12 / self.peak_flops if self.peak_flops else None}
            rows.append(row)
        self.pending.clear()
        if self.write and rows:
            new = [json.dumps(row) for row in rows]
            storage.bounded(f"writing {self.path}", lambda: self._append(new),
                            self.timeout_s)
        return rows

    def _append(self, new: list[str]) -> None:
        if self.remote:
            self.lines += new
            self.path.write_text("".join(line + "\n" for line in self.lines))
        else:
            with self.path.open("a") as f:
                f.write("".join(line + "\n" for line in new))


def format_row(row: dict) -> str:
    mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
    lr = ("update dropped (non-finite)" if row.get("nonfinite") else f"lr {row['lr']:.2e}")
    return (f"step {row['step']:>6} | loss {row['loss']:.4f} | grad_norm {row['grad_norm']:.3f}"
            f" | {lr} | {row['tokens_per_sec']:,.0f} tok/s"
            f" | {1000 * row['step_time_s']:.1f} ms/step"
            f" | {row['tflops_per_device']:.3f} TFLOP/s/device | MFU {mfu}"
            + (f" | moe_aux {row['moe_aux_loss']:.3f} expert_load {row['expert_load']:.2f}"
               if "expert_load" in row else "")
            + (f" | reward_margin {row['reward_margin']:.3f} accuracy "
               f"{row['reward_accuracy']:.2f}" if "reward_margin" in row else "")
            + (f" | epsilon {row['epsilon']:.4g} ({row['sequences']:.0f} sequences, "
               f"{100 * row['clipped_fraction']:.0f}% clipped)" if "epsilon" in row else "")
            + (f" | eval_loss {row['eval_loss']:.4f} ppl {row['eval_ppl']:.2f}"
               if "eval_ppl" in row else "")
            + (f" | eval_loss {row['eval_loss']:.4f} accuracy {row['eval_reward_accuracy']:.2f}"
               if "eval_reward_accuracy" in row else ""))


class TensorBoard:
    """Scalars of the logged rows as TensorBoard event files (tensorboardX), beside
    metrics.jsonl. Process 0 only; a local run directory only (tensorboardX cannot write
    gs:// without TensorFlow); without tensorboardX installed, one warning and no files."""

    def __init__(self, log_dir: str, enabled: bool, warn):
        self.writer = None
        if not enabled:
            return
        if "://" in log_dir:
            warn("TensorBoard events are written for local output directories only; "
                 "metrics.jsonl has every value")
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            warn("tensorboardX is not installed: no TensorBoard events "
                 "(pip install tensorboardX); metrics.jsonl has every value")
            return
        self.writer = SummaryWriter(log_dir, flush_secs=30)

    def write(self, rows: list[dict]) -> None:
        if self.writer is None:
            return
        for row in rows:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])
        # no flush here: the writer's thread flushes every 30 s and at close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
