"""Validation loss over a fixed set of batches: during training (`Evaluator`) and for a
trained model (`evaluate`, what `python -m train.eval` runs)."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from train.config import Config
from train.startup import compile_options
from train.step import eval_sums, jit_eval_step


def mean_loss(eval_fn: Callable, arg, batches) -> tuple[jax.Array, jax.Array]:
    """(mean loss, tokens counted) of eval_fn(arg, batch) sums over `batches`, as device
    scalars: nothing here waits for the device."""
    loss_sum = weight = jnp.zeros((), jnp.float32)
    for batch in batches:
        out = eval_fn(arg, batch)
        loss_sum, weight = loss_sum + out["loss_sum"], weight + out["weight"]
    return loss_sum / jnp.maximum(weight, 1.0), weight


class Evaluator:
    """`evaluate(step, state)`: every eval.every_steps steps and at the last step, the
    mean loss over the first eval.batches global batches of the validation split (the
    same batches each time), as {"eval_loss": device scalar} (DPO: its loss, and
    eval_reward_margin and eval_reward_accuracy, per pair); {} on other steps. Nothing
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
        if state.step_cfg.objective == "dpo":  # DPO's loss, margin and accuracy
            sums = [self.fn(state, batch) for batch in self.cached]
            total = {k: sum(s[k] for s in sums) for k in sums[0]}
            pairs = jnp.maximum(total.pop("weight"), 1.0)
            return {"eval_" + k.removesuffix("_sum"): v / pairs for k, v in total.items()}
        return {"eval_loss": mean_loss(self.fn, state, self.cached)[0]}


def evaluate(model, batches, num_batches: int) -> dict:
    """{"loss", "perplexity", "tokens", "batches"} of `model` (an nnx Transformer) over
    the first `num_batches` global batches of the validation split of `batches`."""
    graphdef, params = nnx.split(model)
    fn = jax.jit(lambda p, b: eval_sums(nnx.merge(graphdef, p), b))
    if jax.default_backend() == "cpu":
        # one batch at a time: with fake CPU devices, a second evaluation's programs in
        # flight behind each other deadlocked XLA:CPU's all-reduce rendezvous (3 of 5
        # tries, 8 devices, a process evaluating twice: train.eval with serve.quantize)
        fn = lambda p, b, jitted=fn: jax.block_until_ready(jitted(p, b))  # noqa: E731
    loss, weight = mean_loss(fn, params, (batches.eval_batch(i) for i in range(num_batches)))
    loss = float(loss)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(weight),
            "batches": num_batches}
