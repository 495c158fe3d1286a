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


def test_gs_output_dir_saves_and_resumes(emulator, reference):
    env = emulator.env()
    out = "gs://bucket/run1"
    proc = run_cli(*RUN, f"output_dir={out}", "train.steps=8", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = objects(emulator, "run1/")
    assert "run1/metrics.jsonl" in stored and "run1/config.yaml" in stored
    assert any(o.startswith("run1/checkpoints/8/state/") for o in stored)
    proc = run_cli(*RUN, f"output_dir={out}", "train.steps=12", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 8 (gs://bucket/run1/checkpoints)" in proc.stdout
    text = (emulator.root / ".cloudstorage" / "bucket" / "run1" / "metrics.jsonl")
    steps = [int(ln.split('"step": ')[1].split(",")[0]) for ln in text.read_text().splitlines()]
    assert steps == list(range(1, 13))


@pytest.mark.parametrize("failure", ["freeze", "kill"])
def test_storage_lost_during_save_fails_clearly_and_previous_checkpoint_restores(
        emulator, reference, tmp_path, failure):
    """The storage server stops answering (SIGSTOP: a hung server or a network partition)
    or dies (SIGKILL) while the step-8 save is in flight or about to start."""
    env = emulator.env()
    out = tmp_path / "run"
    extra = ["checkpoint.dir=gs://bucket/ck", "checkpoint.save_timeout_s=30"]
    proc = start(out, *extra, env=env)
    committed = lambda: "ck/4/commit_success.txt" in objects(emulator, "ck/4/")
    wait_for(lambda: committed() and logged_steps(out) >= 7, proc)
    emulator.proc.send_signal(signal.SIGSTOP if failure == "freeze" else signal.SIGKILL)
    try:
        text, _ = proc.communicate(timeout=180)
    finally:
        if failure == "freeze":
            emulator.proc.send_signal(signal.SIGCONT)
    assert proc.returncode == 1, text[-3000:]
    error = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    assert len(error) == 1 and "to gs://bucket/ck " in error[0], text[-3000:]
    assert "rerun the same command to resume" in error[0]
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
