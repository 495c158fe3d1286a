"""Two JAX processes x 4 CPU devices on 127.0.0.1 (gloo collectives) train one model on
a (data=2, fsdp=2, model=2) mesh spanning both, as `python -m train` subprocesses joined
by jax.distributed. Every wait has a deadline; workers are killed by PID."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import REPO, cli_env
from runs import RUN, logged_steps

pytestmark = pytest.mark.once  # CI runs these in its Python 3.11 suite only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out, port: int, *extra: str, ids=(0, 1)) -> list[subprocess.Popen]:
    procs = []
    for i in ids:
        env = cli_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                      JAX_PROCESS_ID=str(i))
        log = open(out.parent / f"{out.name}-process{i}.log", "a")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "train", *RUN, f"output_dir={out}",
             "distributed.heartbeat_timeout_s=10", "distributed.init_timeout_s=60", *extra],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def wait_all(procs, deadline_s: float) -> list[int]:
    end = time.time() + deadline_s
    try:
        while any(p.poll() is None for p in procs):
            if time.time() > end:
                raise AssertionError(f"workers still running after {deadline_s} s")
            time.sleep(0.1)
    finally:
        kill_all(procs)
    return [p.returncode for p in procs]


def log_text(out, i: int) -> str:
    return (out.parent / f"{out.name}-process{i}.log").read_text()


def test_two_processes_train_checkpoint_resume_and_match_one_process(reference, tmp_path):
    out = tmp_path / "run"
    procs = launch(out, free_port())
    try:
        end = time.time() + 300
        while logged_steps(out) < 10:  # a checkpoint at step 8 is committed by now
            assert all(p.poll() is None for p in procs), log_text(out, 0)[-3000:]
            assert time.time() < end, "no progress"
            time.sleep(0.05)
    finally:
        kill_all(procs)  # both hosts lost at once
    codes = wait_all(launch(out, free_port()), 400)
    assert codes == [0, 0], log_text(out, 0)[-3000:] + log_text(out, 1)[-3000:]
    first = log_text(out, 0)
    assert "distributed: process 0 of 2, coordinator 127.0.0.1:" in first
    assert "resumed from step" in first
    assert "| loss " in first and "| loss " not in log_text(out, 1)  # process 0 logs rows
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows}
    assert sorted(losses) == sorted(reference)  # every step once
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step


@pytest.mark.parametrize("killed", [1, 0], ids=["worker", "coordinator"])
def test_a_killed_peer_stops_the_other_within_30_s_with_one_line(tmp_path, killed):
    """Wherever the survivor is blocked (a collective, a barrier, a new collective group's
    rendezvous), the lifeline names the dead process before JAX's heartbeat abort."""
    out, alive = tmp_path / "run", 1 - killed
    procs = launch(out, free_port(), "train.steps=100000", "checkpoint.every_steps=2")
    try:
        end = time.time() + 300
        while logged_steps(out) < 5:
            assert all(p.poll() is None for p in procs), log_text(out, 0)[-3000:]
            assert time.time() < end, "no progress"
            time.sleep(0.05)
        os.kill(procs[killed].pid, signal.SIGKILL)
        killed_at = time.time()
        while procs[alive].poll() is None and time.time() - killed_at < 30:
            time.sleep(0.1)
        assert procs[alive].poll() is not None, "still running 30 s after its peer died"
        assert procs[alive].returncode == 1, log_text(out, alive)[-3000:]
    finally:
        kill_all(procs)
    text = log_text(out, alive)
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"error: process {alive} of 2: process {killed} of 2 died or "
                           "stopped answering ("), text[-3000:]
    assert "; coordinator 127.0.0.1:" in last and "rerunning all 2 processes resumes from the " \
        "latest checkpoint (step " in last, last
    assert "Traceback" not in text and "Check failure" not in text, text[-3000:]


def test_a_peer_that_never_starts_is_named_before_the_init_timeout(tmp_path):
    out, port = tmp_path / "run", free_port()
    codes = wait_all(launch(out, port, "distributed.init_timeout_s=8", ids=(0,)), 60)
    text = log_text(out, 0)
    assert codes == [1], text[-3000:]
    assert text.strip().splitlines()[-1].startswith(
        f"error: process 0 of 2: process 1 did not join the coordinator at 127.0.0.1:{port} "
        "within distributed.init_timeout_s=8; start every process"), text[-3000:]
    assert "Check failure" not in text, text[-3000:]


def test_two_processes_generate_what_one_process_generates(trained_run, tmp_path):
    """python -m train.generate as two processes (a mesh over both) prints, on process 0
    only, the continuations of one process with 8 devices."""
    args = ["-m", "train.generate", "--checkpoint", str(trained_run), "--prompt", "def f(",
            "--prompt", "class A:\n", "--max-new-tokens", "16", "mesh.data=2", "mesh.fsdp=2",
            "mesh.model=2", "sharding.rules=fsdp_tp", "compile_cache_dir=null"]
    one = subprocess.run([sys.executable, *args], cwd=REPO, env=cli_env(8),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    port, procs, logs = free_port(), [], []
    for i in range(2):
        env = cli_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                      JAX_PROCESS_ID=str(i))
        logs.append(tmp_path / f"gen{i}.log")
        procs.append(subprocess.Popen([sys.executable, *args], cwd=REPO, env=env,
                                      stdout=open(logs[i], "w"), stderr=subprocess.DEVNULL))
    assert wait_all(procs, 300) == [0, 0]
    texts = [log.read_text() for log in logs]
    assert "--- 0:" not in texts[1] and "prefill" not in texts[1]  # only process 0 prints
    # from the first header to the timing line (gloo prints its own connection lines)
    strip = lambda s: s[s.index("--- 0:"):s.index("\nprefill ")]  # noqa: E731
    assert "--- 1: 16 new tokens" in texts[0]
    assert strip(texts[0]) == strip(one.stdout)


def test_two_processes_train_the_tiny_moe_as_one_process_does(moe_run, tmp_path):
    """The tiny MoE with its experts over expert=4 of a mesh spanning both processes:
    the same per-step losses and expert load as one process with 8 devices."""
    from runs import MOE_RUN
    port, procs, out = free_port(), [], tmp_path / "run"
    for i in range(2):
        env = cli_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                      JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "train", *MOE_RUN, f"output_dir={out}"], cwd=REPO, env=env,
            stdout=open(tmp_path / f"p{i}.log", "w"), stderr=subprocess.STDOUT))
    codes = wait_all(procs, 400)
    assert codes == [0, 0], (tmp_path / "p0.log").read_text()[-3000:]
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    one, two = read(moe_run), read(out)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two):
        for key in ("loss", "moe_aux_loss", "expert_load", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
