"""A run's loss curves as a PNG: the training loss of every logged step and the
validation loss where it was evaluated, read from <run>/metrics.jsonl (what `python -m
train.plot RUN` draws; TensorBoard shows the same values from <run>/tensorboard)."""

from __future__ import annotations

import json

import matplotlib
from etils import epath

from train.errors import InputError

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend


def read_rows(run_dir: str) -> list[dict]:
    path = epath.Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise InputError(f"{run_dir} has no metrics.jsonl: give a run's output_dir")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise InputError(f"{path} holds no logged steps yet")
    return rows


def plot_run(run_dir: str, output: str | None = None) -> str:
    """Draw the curves into `output` (default <run>/loss.png); returns the line that
    says where."""
    rows = read_rows(run_dir)
    output = output or str(epath.Path(run_dir) / "loss.png")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    evals = [r for r in rows if r.get("eval_loss") is not None]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(str(run_dir))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with epath.Path(output).open("wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return (f"plotted {len(rows)} steps ({len(evals)} evaluations) of {run_dir} to {output}")
