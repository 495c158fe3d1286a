"""`python -m train` end to end, as a user runs it, in a subprocess."""

import json
import subprocess
import sys

import pytest

from helpers import REPO, cli_env, run_cli, tensorboard_scalars


def test_tiny_run_writes_metrics_with_falling_loss(tmp_path):
    """Also: TensorBoard scalars equal metrics.jsonl, and profile.* leaves a trace."""
    out = tmp_path / "run"
    proc = run_cli("--config", "configs/tiny.yaml", f"output_dir={out}", "train.steps=40",
                   "train.log_every=10", "train.seq_len=64", "mesh.data=2", "mesh.fsdp=2",
                   "mesh.model=2", "sharding.rules=fsdp_tp", "compile_cache_dir=null",
                   "profile.start_step=21", "profile.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unigram entropy" in proc.stdout and "data=2, fsdp=2, model=2" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    for row in rows:
        assert {"step", "loss", "tokens_per_sec", "grad_norm", "lr", "mfu"} <= set(row)
        assert row["tokens_per_sec"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert (out / "config.yaml").exists()
    board = tensorboard_scalars(out / "tensorboard")
    for key in ("loss", "grad_norm", "lr", "tokens_per_sec"):
        assert sorted(board[key]) == [10, 20, 30, 40]
        for r in rows:
            assert board[key][r["step"]] == pytest.approx(r[key], rel=1e-6)
    traces = list((out / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    assert "profile: steps 21-22 traced" in proc.stdout
    # the last line says where everything is and what to run next
    last = proc.stdout.strip().splitlines()[-1]
    for part in (f"metrics {out}/metrics.jsonl", f"checkpoint step 40 in {out / 'checkpoints'}",
                 f"python -m train.generate --checkpoint {out}", f"python -m train.plot {out}"):
        assert part in last, last
    plot = run_cli(str(out), module="train.plot")
    assert plot.returncode == 0, plot.stderr[-2000:]
    assert plot.stdout.strip() == f"plotted 4 steps (0 evaluations) of {out} to {out}/loss.png"
    import matplotlib.image
    assert matplotlib.image.imread(out / "loss.png").shape[:2] == (480, 840)


@pytest.mark.once  # a whole CLI run: the tiny run above is the second Python's
def test_no_config_means_default_yaml_and_relative_paths_work(tmp_path):
    """As the quick start runs it, from another working directory: no --config is
    configs/default.yaml (data parallel over the devices), the run goes to runs/<name>
    relative to the working directory, and generation reads it back by that path."""
    env = cli_env(2)
    env["PYTHONPATH"] = str(REPO)
    common = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "train", "train.steps=4", "train.log_every=1",
                           "checkpoint.every_steps=2", "compile_cache_dir=null"], **common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data=2, fsdp=1, model=1" in proc.stdout  # default.yaml: data=-1 over 2 devices
    run = tmp_path / "runs" / "default"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    gen = subprocess.run([sys.executable, "-m", "train.generate", "--checkpoint",
                          "runs/default", "--prompt", "def ", "compile_cache_dir=null"],
                         **common)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert "runs/default/checkpoints step 4" in gen.stdout


@pytest.mark.parametrize("args, message", [
    (["train.stpes=3"], "error: unknown config key 'train.stpes'; did you mean 'train.steps'?"),
    (["--config", "configs/nope.yaml"], "error: config file 'configs/nope.yaml' not found"),
    pytest.param(["mesh.data=3", "mesh.fsdp=-1"], "error: mesh (data=3, fsdp=-1, model=1) "
                 "cannot fill -1: 8 devices do not divide by 3", marks=pytest.mark.once),
    pytest.param(["mesh.data=4", "mesh.fsdp=4"], "error: mesh (data=4, fsdp=4, model=1) needs "
                 "16 devices but 8 exist; change the sizes or set one axis to -1",
                 marks=pytest.mark.once),
    (["mesh.data=1", "mesh.fsdp=8", "model.style=gpt2", "model.d_model=100",
      "model.num_heads=4", "model.num_kv_heads=null"],
     "error: params/blocks/w_in (shape (4, 100, 512), logical axes ('layers', 'embed', 'mlp'), "
     "mesh "
     "data=1, fsdp=8, model=1 (8 devices)): dimension 'embed'=100 does not divide by fsdp=8"),
    pytest.param(["train.batch_size=12"], "error: train.batch_size=12 / train.microbatches=1 = "
                 "12 sequences per microbatch do not divide by mesh data x fsdp = 8",
                 marks=pytest.mark.once),
])
def test_bad_config_exits_2_with_one_line(args, message, tmp_path):
    proc = run_cli(*args, f"output_dir={tmp_path}", "compile_cache_dir=null", "train.steps=2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def python_c(code: str) -> subprocess.CompletedProcess:
    """`python -c code` from the repository root, one fake device."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(1),
                          capture_output=True, text=True, timeout=120)


def test_a_details_file_left_by_an_earlier_process_with_our_pid_is_not_ours():
    """Process ids are reused: a /tmp/shardlm-<pid>.log from a finished process must not
    make this process's error line point at it."""
    code = ("import os, tempfile\n"
            "path = os.path.join(tempfile.gettempdir(), f'shardlm-{os.getpid()}.log')\n"
            "open(path, 'w').write('an earlier process')\n"
            "from train import startup\n"
            "print(repr(startup.details()), os.path.exists(path))\n")
    proc = python_c(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["''", "False"]


def test_sigterm_is_not_swallowed_by_a_librarys_except_exception():
    """The start-up SIGTERM handler's error is no Exception: JAX's or Orbax's `except
    Exception` around the code it interrupts cannot swallow it (the run would go on)."""
    code = ("import os, signal, time\n"
            "from train import cli, errors\n"
            "signal.signal(signal.SIGTERM, cli.StartUpSigterm('stopped'))\n"
            "try:\n"
            "    try:\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(5)\n"
            "    except Exception:\n"
            "        print('swallowed')\n"
            "except errors.Terminated as e:\n"
            "    print('terminated', errors.exit_code(e))\n")
    proc = python_c(code)
    assert proc.stdout.split() == ["terminated", "143"], proc.stdout + proc.stderr[-2000:]


def test_a_sigterm_turned_into_a_librarys_own_error_is_still_the_sigterms_line():
    """A bare `except:` (jax's mesh_utils around int()) turns the handler's error into its
    own ValueError: the process still ends with SIGTERM's line and 143, no traceback (CI
    saw the ValueError's traceback and exit 1)."""
    code = ("import os, signal, time\n"
            "from train import cli\n"
            "signal.signal(signal.SIGTERM, cli.StartUpSigterm('stopped at start-up'))\n"
            "def library():\n"
            "    try:\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(5)\n"
            "    except:\n"
            "        raise ValueError('mesh_shape should be a sequence of ints')\n"
            "cli.guarded(library)\n")
    proc = python_c(code)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: stopped at start-up"), (
        proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr


def test_a_start_up_sigterm_whose_error_was_lost_stops_the_run_before_training():
    """Raised inside a finalizer, the handler's error is only printed by Python (and a
    library may catch anything): the loop, taking SIGTERM over, raises it again, so the
    run never trains on after a SIGTERM (CI saw one train to the end, exit 0)."""
    code = ("import gc, os, signal, time\n"
            "from train import cli, errors\n"
            "from train.loop import SigtermFlag\n"
            "signal.signal(signal.SIGTERM, cli.StartUpSigterm('stopped'))\n"
            "class Finalized:\n"
            "    def __del__(self):\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(1)\n"
            "Finalized()\n"
            "gc.collect()\n"
            "print('went on')\n"
            "try:\n"
            "    SigtermFlag(None)\n"
            "except errors.Terminated as e:\n"
            "    print('terminated', e)\n")
    proc = python_c(code)
    assert proc.stdout.split() == ["went", "on", "terminated", "stopped"], (
        proc.stdout + proc.stderr[-2000:])
