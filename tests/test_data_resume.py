"""A run on the user's own data (raw JSONL prepared on the fly, packed with document
masking, read by Grain workers, evaluated every few steps), killed with SIGKILL and
rerun, logs the losses of an uninterrupted run bit for bit."""

import json
import signal

import pytest

from helpers import run_cli
from runs import RUN, logged_steps, start, wait_for

pytestmark = pytest.mark.once  # CI runs these in its Python 3.11 suite only


def rows(out) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(ln)["step"] for ln in lines]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {json.loads(ln)["step"]: json.loads(ln) for ln in lines}


def test_sigkill_then_rerun_on_prepared_data_is_bit_identical(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"record {i}: " + "abc def ghi " * (i % 9)})
                              + "\n" for i in range(300)))
    data = [f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.mask_documents=true", "data.num_workers=1", "eval.every_steps=8",
            "eval.batches=2", "train.microbatches=2"]
    ref_out = tmp_path / "reference"
    proc = run_cli(*RUN, *data, f"output_dir={ref_out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data: preparing" in proc.stdout and "documents masked" in proc.stdout
    reference = rows(ref_out)
    assert sorted(reference) == list(range(1, 25))
    assert all("eval_loss" in reference[s] for s in (8, 16, 24))
    assert reference[24]["eval_loss"] < reference[8]["eval_loss"]

    out = tmp_path / "run"
    proc = start(out, *data)
    wait_for(lambda: logged_steps(out) >= 10, proc)  # checkpoint 8 exists, step 10 done
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc = run_cli(*RUN, *data, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already prepared" in proc.stdout and "continuing at batch" in proc.stdout
    resumed = rows(out)
    for step, row in reference.items():
        for key in ("loss", "grad_norm", "eval_loss"):
            assert resumed[step].get(key) == row.get(key), (step, key)
