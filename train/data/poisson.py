"""Poisson sampling for DP-SGD: each step, every sequence of the train split joins the
batch independently with probability q (what the privacy accountant assumes), the
batch padded to train.batch_size rows of weight 0 so the step's shapes never change.

Step `s`'s sample is a pure function of (seed, s), the same on every host, so a resumed
or multi-host run draws the same batches. Drawing K ~ Binomial(N, q) and then K distinct
sequences uniformly is the same distribution as N independent coin flips, at a cost of
O(K) rather than O(N) per step.
"""

from __future__ import annotations

import numpy as np

from train.errors import DataError

STREAM = 0x44505347  # "DPSG": keeps these draws apart from any other use of the seed


def sample(seed: int, step: int, num_sequences: int, rate: float) -> np.ndarray:
    """The indices of the sequences in step `step`'s batch (K,), in draw order."""
    rng = np.random.default_rng((seed, STREAM, step))
    k = rng.binomial(num_sequences, rate)
    return rng.choice(num_sequences, size=k, replace=False)


class PoissonRows:
    """step -> this process's rows of Poisson-sampled batch `step`: row r of the padded
    global batch is the r-th sampled sequence, or padding (every entry 0, weight 0) past
    the K sampled. A K over `global_batch` is a DataError (never a silent cut)."""

    def __init__(self, sequences, global_batch: int, rows: range, seed: int, rate: float):
        self.sequences, self.global_batch, self.rows = sequences, global_batch, rows
        self.seed, self.rate = seed, rate

    def indices(self, step: int) -> np.ndarray:
        picked = sample(self.seed, int(step), len(self.sequences), self.rate)
        if len(picked) > self.global_batch:
            raise DataError(
                f"step {int(step) + 1}'s Poisson sample holds {len(picked)} sequences, more "
                f"than train.batch_size={self.global_batch} rows (expected "
                f"{self.rate * len(self.sequences):.4g}): raise train.batch_size or lower "
                "privacy.expected_batch_size")
        return picked

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        picked = self.indices(step)
        items = [self.sequences[int(picked[r])] if r < len(picked) else None
                 for r in self.rows]
        like = next((item for item in items if item is not None), None)
        if like is None:
            like = self.sequences[0]
        return {key: np.stack([item[key] if item is not None else np.zeros_like(like[key])
                               for item in items]) for key in like}
