"""A jax.profiler trace of a few training steps (profile.start_step, profile.steps),
written where TensorBoard's profile tab and xprof look: <log_dir>/plugins/profile/<run>/."""

from __future__ import annotations

import jax


class StepProfiler:
    def __init__(self, start_step: int | None, steps: int, log_dir: str, log):
        self.first = start_step
        self.last = None if start_step is None else start_step + steps - 1
        self.log_dir, self.log, self.active = log_dir, log, False

    def before(self, step: int) -> None:
        """Call before dispatching `step`."""
        if step == self.first:
            jax.profiler.start_trace(self.log_dir)
            self.active = True

    def after(self, step: int, state) -> None:
        """Call after dispatching `step`: the trace ends once its last step has run."""
        if self.active and step == self.last:
            self.stop(state)

    def stop(self, state=None) -> None:
        if not self.active:
            return
        jax.block_until_ready(state)  # the traced steps' device work, not just dispatch
        jax.profiler.stop_trace()
        self.active = False
        self.log.info("profile: steps %d-%d traced to %s/plugins/profile (tensorboard "
                      "--logdir %s, Profile tab)", self.first, self.last, self.log_dir,
                      self.log_dir)
