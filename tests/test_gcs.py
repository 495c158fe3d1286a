"""Checkpoints on gs:// against a local GCS emulator (gcp-storage-emulator) that the
tests start on 127.0.0.1, on disk, and stop. Nothing here can reach a real cloud: every
test first checks that the emulator endpoint variables point at 127.0.0.1."""

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.lock import RunLock

from helpers import cli_env, run_cli
from runs import RUN, logged_steps, start, wait_for

EMULATOR = shutil.which("gcp-storage-emulator") or str(
    Path(sys.executable).parent / "gcp-storage-emulator")
pytestmark = [pytest.mark.skipif(not Path(EMULATOR).exists(),
                                 reason="gcp-storage-emulator is not installed (test extra)"),
              pytest.mark.once]  # CI runs these in its Python 3.11 suite only
ENDPOINT_VARS = ("TENSORSTORE_GCS_HTTP_URL", "STORAGE_EMULATOR_HOST")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """gcp-storage-emulator storing under `root`, on disk."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None

    def start(self) -> None:
        self.log = (self.root / "emulator.log").open("ab")
        self.proc = subprocess.Popen(
            [EMULATOR, "start", "--host", "127.0.0.1", "--port", str(self.port),
             "--default-bucket", "bucket", "-q"], cwd=self.root,
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        tail = (self.root / "emulator.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"GCS emulator did not start (exit {self.proc.poll()}): {tail}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def env(self) -> dict:
        url = f"http://127.0.0.1:{self.port}"
        env = cli_env(TENSORSTORE_GCS_HTTP_URL=url, STORAGE_EMULATOR_HOST=url,
                      GOOGLE_AUTH_TOKEN_FOR_TESTING="dummy", FSSPEC_GCS_TOKEN="anon",
                      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
        # Refuse to touch gs:// unless both clients are pointed at the local emulator.
        for var in ENDPOINT_VARS:
            assert env.get(var, "").startswith("http://127.0.0.1:"), f"{var} not local"
        return env


@pytest.fixture
def emulator(tmp_path):
    emu = Emulator(tmp_path)
    emu.start()
    yield emu
    emu.kill()


def objects(emu: Emulator, prefix: str) -> list[str]:
    root = emu.root / ".cloudstorage" / "bucket"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                  and str(p.relative_to(root)).startswith(prefix))


def test_gs_output_dir_saves_and_resumes_and_is_locked(emulator, reference, monkeypatch):
    env = emulator.env()
    out = "gs://bucket/run1"
    # a metrics row per 4 steps: each row rewrites the whole object on gs://
    quarter = "train.log_every=4"
    proc = run_cli(*RUN, f"output_dir={out}", "train.steps=8", quarter, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = objects(emulator, "run1/")
    assert "run1/metrics.jsonl" in stored and "run1/config.yaml" in stored
    assert any(o.startswith("run1/checkpoints/8/state/") for o in stored)
    assert "run1/run.lock" not in stored  # released at the end
    # While another run holds the lock (here: this process, through the emulator's
    # generation preconditions), a trainer on the same gs:// output_dir is refused.
    for var in ENDPOINT_VARS + ("GOOGLE_AUTH_TOKEN_FOR_TESTING",):
        monkeypatch.setenv(var, env[var])
    with RunLock(out, 30):
        assert "run1/run.lock" in objects(emulator, "run1/")
        refused = run_cli(*RUN, f"output_dir={out}", "train.steps=12", quarter, env=env)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].startswith(
        f"error: output_dir='{out}' is in use by another run (host "), refused.stderr[-2000:]
    proc = run_cli(*RUN, f"output_dir={out}", "train.steps=12", quarter, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 8 (gs://bucket/run1/checkpoints)" in proc.stdout
    text = (emulator.root / ".cloudstorage" / "bucket" / "run1" / "metrics.jsonl")
    steps = [int(ln.split('"step": ')[1].split(",")[0]) for ln in text.read_text().splitlines()]
    assert steps == [4, 8, 12]


TIMEOUT_S = 15  # checkpoint.save_timeout_s: a save here takes about a second


@pytest.mark.parametrize("failure", ["freeze", "kill"])
def test_storage_lost_during_a_run_fails_clearly_and_previous_checkpoint_restores(
        emulator, reference, tmp_path, failure):
    """The storage server stops answering (SIGSTOP: a hung server or a network partition;
    checkpoint.dir on gs://) or dies (SIGKILL; the whole output_dir on gs://: metrics,
    config, lock and checkpoints) after step 7: the run ends within the timeout with the
    one error line last and little else, the earlier checkpoint intact."""
    env = emulator.env()
    out = tmp_path / "run"
    if failure == "freeze":
        extra, ck = ["checkpoint.dir=gs://bucket/ck"], "ck"
        logged = lambda: logged_steps(out)
    else:
        extra, ck = ["output_dir=gs://bucket/run"], "run/checkpoints"
        metrics = emulator.root / ".cloudstorage" / "bucket" / "run" / "metrics.jsonl"
        logged = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0
    proc = start(out, *extra, f"checkpoint.save_timeout_s={TIMEOUT_S}", env=env)
    committed = lambda step: f"{ck}/{step}/commit_success.txt" in objects(emulator, ck)
    if failure == "freeze":  # the step-8 save is about to start
        wait_for(lambda: committed(4) and logged() >= 7, proc)
    else:  # the step-8 save is in flight: its first objects are written, the loop goes on
        wait_for(lambda: objects(emulator, f"{ck}/8/") and not committed(8), proc)
    emulator.proc.send_signal(signal.SIGSTOP if failure == "freeze" else signal.SIGKILL)
    stopped_at = time.time()
    try:
        text, _ = proc.communicate(timeout=180)
    finally:
        if failure == "freeze":
            emulator.proc.send_signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, text[-3000:]
    assert time.time() - stopped_at < TIMEOUT_S + 30, "the run outlived its timeout by far"
    lines = text.strip().splitlines()
    error = [ln for ln in lines if ln.startswith("error: ")]
    assert len(error) == 1 and error[0] == lines[-1], text[-3000:]
    assert "to gs://bucket/" in error[0] or "writing gs://bucket/" in error[0], error[0]
    assert "rerun the same command to resume" in error[0]
    assert "Traceback" not in text and len(lines) < 50, text[-3000:]
    if failure == "kill":
        # gcp-storage-emulator rewrites one metadata file on every change, so a SIGKILL
        # can leave its own store unreadable: it cannot be restarted to read back.
        return
    # The server answers again with what it had stored: the last complete checkpoint
    # (step 4) reads back, the half-written step 8 is ignored.
    proc = run_cli("--checkpoint", "gs://bucket/ck", "--output", str(tmp_path / "export"),
                   *RUN[:2], module="train.export", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported parameters of step 4 " in proc.stdout
