"""The validation loss of a trained (or converted) model: what `python -m train.eval`
runs, on the batches the run's own evaluation used unless data.* says otherwise. With
serve.quantize, the loss of the model as loaded and as the server runs it (quantized),
and their difference."""

from __future__ import annotations

import json
from typing import Sequence

from train.config import Config
from train.data.batches import make_batches
from train.data.resolve import resolve_data
from train.errors import InputError
from train.evaluate import evaluate
from train.inference.load import load, quantize_weights


def evaluate_checkpoint(user: Config, overrides: Sequence[str], checkpoint: str,
                        num_batches: int | None = None) -> str:
    """Loss and perplexity over the first `num_batches` (default eval.batches) global
    batches of the validation split; returns the summary line and a JSON line."""
    loaded = load(checkpoint, user, overrides)
    n = num_batches or loaded.cfg.eval.batches
    if n < 1:
        raise InputError(f"--batches must be at least 1, got {n}")
    cfg, path = resolve_data(loaded.cfg)  # a tokenizer larger than the model: DataError
    loaded.plan.check_batches()
    batches = make_batches(cfg, loaded.plan.batch_sharding, path)
    mode, note = user.serve.quantize, ""
    try:
        out = evaluate(loaded.model, batches, n)
        if mode is not None:
            unquantized = out["loss"]
            note = quantize_weights(loaded, mode) + "\n"
            out = evaluate(loaded.model, batches, n)
            out |= {"quantize": mode, "loss_unquantized": unquantized,
                    "loss_difference": out["loss"] - unquantized}
            note += (f"loss {out['loss']:.4f} with {mode} weights, {unquantized:.4f} "
                     f"without: {out['loss_difference']:+.4g}\n")
    finally:
        batches.close()
    t = cfg.train
    return (f"{note}eval {loaded.where}: {n} batches of {t.batch_size} x {t.seq_len} "
            f"({out['tokens']:,} tokens) | loss {out['loss']:.4f} | perplexity "
            f"{out['perplexity']:.3f}\n{json.dumps(out)}")
