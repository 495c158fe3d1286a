"""Evaluation during training: validation loss over a fixed set of batches."""

from __future__ import annotations

import jax.numpy as jnp

from train.config import Config
from train.step import jit_eval_step
from train.xla_flags import compile_options


class Evaluator:
    """`evaluate(step, state)`: every eval.every_steps steps and at the last step, the
    mean loss over the first eval.batches global batches of the validation split (the
    same batches each time), as {"eval_loss": device scalar}; {} on other steps. Nothing
    waits for the device here: the metrics log fetches the value later."""

    def __init__(self, cfg: Config, batches, batch_sharding, state_shardings):
        self.every, self.num_batches, self.last = (cfg.eval.every_steps, cfg.eval.batches,
                                                   cfg.train.steps)
        self.batches, self.batch_sharding = batches, batch_sharding
        self.state_shardings = state_shardings
        self.fn, self.cached = None, None

    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.last)

    def __call__(self, step: int, state) -> dict:
        if not self.due(step):
            return {}
        if self.cached is None:  # a few batches, kept on the devices between evaluations
            self.cached = [self.batches.eval_batch(i) for i in range(self.num_batches)]
            self.fn = jit_eval_step(
                self.state_shardings, {k: self.batch_sharding for k in self.cached[0]}
            ).lower(state, self.cached[0]).compile(compile_options(self.state_shardings))
        loss_sum = weight = jnp.zeros((), jnp.float32)
        for batch in self.cached:
            out = self.fn(state, batch)
            loss_sum, weight = loss_sum + out["loss_sum"], weight + out["weight"]
        return {"eval_loss": loss_sum / jnp.maximum(weight, 1.0)}
