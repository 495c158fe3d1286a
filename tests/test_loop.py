"""The train loop's teardown: every way out of a run closes its outputs (TensorBoard,
progress bar, profiler), its data workers and its checkpoint manager, once each."""

import collections

import pytest

import train.loop
from train.data.batches import WindowBatches
from train.errors import Preempted, SaveError, TrainingStopped

from helpers import small_config


# Ctrl-C on both Pythons; the end and the other exits on CI's first only
@pytest.mark.parametrize("failure", [KeyboardInterrupt] + [
    pytest.param(f, marks=pytest.mark.once) for f in (None, TrainingStopped, SaveError,
                                                      Preempted)],
    ids=lambda f: f.__name__ if f else "end")
def test_teardown_runs_once_on_every_way_out(tmp_path, devices, monkeypatch, failure):
    closed = collections.Counter()
    for cls, name in ((train.loop.Outputs, "outputs"), (WindowBatches, "batches"),
                      (train.loop.Checkpoints, "checkpoints")):
        def close(self, _original=cls.close, _name=name):
            closed[_name] += 1
            return _original(self)
        monkeypatch.setattr(cls, "close", close)
    batch = WindowBatches.batch

    def failing_batch(self, step, *args):
        if failure is not None and step == 2:
            raise failure("stopped here")
        return batch(self, step, *args)

    monkeypatch.setattr(WindowBatches, "batch", failing_batch)
    cfg = small_config(f"output_dir={tmp_path / 'run'}", "train.steps=4", "train.log_every=1")
    if failure is None:
        assert [row["step"] for row in train.loop.run(cfg)] == [1, 2, 3, 4]
    else:
        with pytest.raises(failure):
            train.loop.run(cfg)
    assert closed == {"outputs": 1, "batches": 1, "checkpoints": 1}
