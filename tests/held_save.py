"""`python tests/held_save.py STEP MARKER train-args...`: `python -m train` with the
asynchronous save of checkpoint STEP held open, for the SIGKILL-inside-a-save test.

Orbax writes a step's arrays into a temporary directory in a background thread and
renames it to the step's number only at its commit. Here that commit of step STEP is
held: the thread writes the temporary directory's path to MARKER and sleeps, so a test
that waits for MARKER kills the run while the save is certainly incomplete.
"""

import os
import runpy
import sys
import time
from pathlib import Path

from orbax.checkpoint._src.checkpointers import async_checkpointer

step, marker = sys.argv[1], Path(sys.argv[2])
commit = async_checkpointer._on_commit_callback


def held_commit(tmpdir, *args, **kwargs):
    if Path(str(tmpdir.get_final())).name == step:
        partial = marker.with_name(marker.name + ".partial")  # the test sees MARKER
        partial.write_text(str(tmpdir.get()))  # only once it holds the whole path
        os.replace(partial, marker)
        time.sleep(3600)
    return commit(tmpdir, *args, **kwargs)


async_checkpointer._on_commit_callback = held_commit
sys.argv = ["train", *sys.argv[3:]]
os.chdir(Path(__file__).resolve().parent.parent)
runpy.run_module("train", run_name="__main__", alter_sys=True)
