"""Checkpoints, resume and preemption, run as a user runs them (subprocesses killed at
chosen moments), compared bit for bit with an uninterrupted run."""

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, cli_env, run_cli
from runs import RUN, STEPS, logged_steps, losses, start, wait_for


def test_sigkill_anywhere_then_rerun_is_bit_identical(reference, tmp_path):
    out, ckpt_dir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # 1) killed mid-run, between checkpoints
    proc = start(out)
    wait_for(lambda: logged_steps(out) >= 10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # 2) killed inside the asynchronous save of step 16: the launcher holds its commit
    # open and says so, so the kill lands while the save is incomplete, every time
    marker = tmp_path / "in-save"
    proc = subprocess.Popen([sys.executable, "tests/held_save.py", "16", str(marker), *RUN,
                             f"output_dir={out}"], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    in_save = Path(marker.read_text())
    assert in_save.parent == ckpt_dir and in_save.name.startswith("16.orbax-checkpoint-tmp")
    assert in_save.exists() and not (ckpt_dir / "16").exists()
    # 3) run to the end: resumed from the last complete step, the half-written one gone
    proc = run_cli(*RUN, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 12" in proc.stdout
    assert losses(out) == reference  # every step once, bit-identical floats
    assert not any("tmp" in p.name for p in ckpt_dir.iterdir())


def test_rerun_of_finished_run_exits_0(run8, tmp_path):
    out = copy_run(run8, tmp_path)
    proc = run_cli(*RUN, f"output_dir={out}", "train.steps=8")
    assert proc.returncode == 0
    assert "run already finished: checkpoint at step 8" in proc.stdout


@pytest.mark.once  # a restart test: Python 3.11's suite (the SIGKILL one runs on both)
def test_sigterm_saves_and_exits_then_resumes(reference, tmp_path):
    out = tmp_path / "run"
    proc = start(out, "checkpoint.every_steps=0")  # no periodic saves: only the SIGTERM one
    wait_for(lambda: logged_steps(out) >= 5, proc)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, text[-3000:]
    line = next(ln for ln in text.splitlines() if "preempted (SIGTERM): saved step" in ln)
    step = int(line.split("saved step ")[1].split()[0])
    assert (out / "checkpoints" / str(step)).is_dir() and step < STEPS
    proc = run_cli(*RUN, f"output_dir={out}", "checkpoint.every_steps=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {step}" in proc.stdout
    assert losses(out) == reference


def copy_run(run, tmp_path: Path) -> Path:
    """A copy of a finished run's directory, for a test that changes it."""
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.once
def test_keep_and_keep_every(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*RUN, f"output_dir={out}", "checkpoint.every_steps=2", "checkpoint.keep=2",
                   "checkpoint.keep_every=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir())
    assert steps == [10, 20, 22, 24]
    saved = json.loads((out / "checkpoints" / "24" / "config" / "metadata").read_text())
    assert saved["train"]["steps"] == STEPS and saved["mesh"]["model"] == 2
    meta = json.loads((out / "checkpoints" / "24" / "meta" / "metadata").read_text())
    assert meta["data"]["next_batch"] == 24


@pytest.mark.once
def test_half_written_step_is_ignored_and_cleaned(reference, run8, tmp_path):
    out = copy_run(run8, tmp_path)
    junk = out / "checkpoints" / "12.orbax-checkpoint-tmp-1234567"
    (junk / "state").mkdir(parents=True)
    (junk / "state" / "garbage").write_bytes(b"\0" * 100)
    proc = run_cli(*RUN, f"output_dir={out}", "train.steps=12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 8" in proc.stdout
    assert not junk.exists()
    assert losses(out) == {s: reference[s] for s in range(1, 13)}


@pytest.mark.once
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    explode = ["optimizer.lr=1e12", "optimizer.grad_clip=0", "optimizer.warmup_steps=0",
               "checkpoint.every_steps=1"]
    proc = run_cli(*RUN, f"output_dir={out}", *explode)
    assert proc.returncode == 1
    # XLA may log compiler warnings to stderr too; ours is the one `error:` line, last.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0]
    assert errors[0].startswith("error: non-finite loss or gradient norm at step 2"), errors
    assert "the last checkpoint (step 1) is kept" in errors[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]
    # skip mode: such steps are dropped, counted, and the run finishes
    proc = run_cli(*RUN, f"output_dir={tmp_path / 'skip'}", *explode, "train.nonfinite=skip",
                   "train.steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in (tmp_path / "skip" / "metrics.jsonl").read_text().split("\n")
            if ln]
    assert rows[-1]["skipped_steps"] == 5 and rows[0]["nonfinite"] == 0


@pytest.mark.once
def test_resume_from_and_init_from(reference, run8, tmp_path):
    base = run8  # read only: the runs below write their own output_dir
    # continue another run's checkpoint in a new directory: same trajectory
    proc = run_cli(*RUN, f"output_dir={tmp_path / 'cont'}", f"checkpoint.resume_from={base}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 8 of" in proc.stdout
    cont = losses(tmp_path / "cont")
    assert cont == {s: reference[s] for s in range(9, STEPS + 1)}
    # fine-tuning: parameters only, from a step directory; step and optimizer start over
    step8 = base / "checkpoints" / "8"
    proc = run_cli(*RUN, f"output_dir={tmp_path / 'ft'}", "train.steps=4",
                   f"model.init_from={step8}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initial parameters from {step8}; new optimizer state" in proc.stdout
    ft = losses(tmp_path / "ft")
    assert sorted(ft) == [1, 2, 3, 4]
    assert ft[1] < reference[1] - 0.2  # starts from trained weights, not from scratch
    # the key it replaced is a one-line error naming the new one
    proc = run_cli(*RUN, f"output_dir={tmp_path / 'old'}", f"checkpoint.resume_from={step8}",
                   "checkpoint.load_params_only=true")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: checkpoint.load_params_only is gone: set model.init_from=PATH instead (a run, "
        "an export or hf:DIR; parameters only, a new optimizer state) and leave "
        "checkpoint.resume_from out"], proc.stderr[-3000:]


@pytest.mark.once
def test_an_output_dir_holding_another_model_is_a_one_line_error(run8, tmp_path):
    """The same output_dir reused for another model: say so, and what to do."""
    out = copy_run(run8, tmp_path)
    proc = run_cli(*RUN, f"output_dir={out}", "train.steps=12", "model.d_model=128")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {out / 'checkpoints'} holds a run of another model "
                     "(blocks/attn_norm_scale has shape (2, 64) there and (2, 128) in this "
                     "config); choose another output_dir for this one (or delete that run)"]


@pytest.mark.once
def test_corrupt_checkpoint_names_path_step_and_fallback(run8, tmp_path):
    out = copy_run(run8, tmp_path)
    state_dir = out / "checkpoints" / "8" / "state"
    for f in state_dir.rglob("*"):
        if f.is_file():
            f.write_bytes(b"corrupt")
    proc = run_cli(*RUN, f"output_dir={out}", "train.steps=12")
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: checkpoint step 8 in {out / 'checkpoints'} cannot be read")
    assert f"delete {out / 'checkpoints'}/8 to fall back to step 4" in line


def test_unwritable_output_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_cli(*RUN, f"output_dir={blocker}/run")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: output_dir='{blocker}/run' is not "
                                                   "writable")


@pytest.mark.once
def test_unwritable_checkpoint_dir_and_data_cache_dir_are_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_cli(*RUN, f"output_dir={tmp_path / 'run'}", f"checkpoint.dir={blocker}/ck")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: checkpoint.dir='{blocker}/ck' is not writable (NotADirectoryError: [Errno 20] "
        f"Not a directory: '{blocker}/ck')"], proc.stderr[-3000:]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.txt").write_text("some text to prepare\n" * 50)
    proc = run_cli(*RUN, f"output_dir={tmp_path / 'run'}", f"data.path={tmp_path / 'raw'}",
                   f"data.cache_dir={blocker}/cache")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: data.cache_dir='{blocker}/cache' cannot be written (Not a directory: "
        f"{blocker}/cache); set data.cache_dir to a writable directory, or prepare the data "
        "with python -m train.prepare"], proc.stderr[-3000:]


@pytest.mark.once
def test_sigterm_during_start_up_says_so_and_lr_0_warns(tmp_path):
    out = tmp_path / "run"
    proc = start(out, "optimizer.lr=0")
    first = ""
    while "optimizer.lr=0" not in first and proc.poll() is None:  # logged before the
        first += proc.stdout.readline()  # mesh, the state and the compile
    proc.send_signal(signal.SIGTERM)
    text = first + proc.communicate(timeout=60)[0]
    assert "optimizer.lr=0: the parameters will not change" in first, text[-3000:]
    assert proc.returncode == 143, text[-3000:]
    # a background error before the signal (Orbax's, TensorStore's) adds where it went
    assert re.fullmatch(re.escape(
        "error: stopped by SIGTERM before training began: nothing new was saved; rerun the "
        "same command to start") + r"(; details in /tmp/shardlm-\d+\.log)?",
        text.strip().splitlines()[-1]), text[-3000:]
    assert "Traceback" not in text
