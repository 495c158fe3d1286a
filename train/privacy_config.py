"""The `privacy:` section of the config: differentially private training (DP-SGD).

The privacy unit is one training sequence (a packed sequence of the prepared data).
Every key but `dp_sgd` defaults to None; with DP-SGD off, a key that is set is an
error (it would do nothing). train/privacy.py resolves the settings against the data.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from train.errors import ConfigError

DEFAULT_CLIP_NORM = 1.0
DEFAULT_DELTA = 1e-5


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    dp_sgd: bool = False
    # each sequence's gradient is scaled to at most this L2 norm (default 1.0)
    clip_norm: Optional[float] = None
    # Gaussian noise of std noise_multiplier * clip_norm on the summed clipped gradients;
    # give it, or a target `epsilon` (spent by the end of train.steps) to derive it from
    noise_multiplier: Optional[float] = None
    epsilon: Optional[float] = None
    delta: Optional[float] = None  # epsilon is reported at this delta (default 1e-5)
    # Poisson sampling: each sequence joins a step's batch with probability
    # expected_batch_size / (sequences in the train split); train.batch_size is the
    # padded batch the step compiles for. Default: the largest expected batch that
    # overflows train.batch_size with probability under 1e-6 per step.
    expected_batch_size: Optional[float] = None

    def check(self) -> None:
        optional = ("clip_norm", "noise_multiplier", "epsilon", "delta", "expected_batch_size")
        if not self.dp_sgd:
            for key in optional:
                if getattr(self, key) is not None:
                    raise ConfigError(f"privacy.{key} is set but privacy.dp_sgd is false; "
                                      "set privacy.dp_sgd=true or remove it")
            return
        if (self.noise_multiplier is None) == (self.epsilon is None):
            raise ConfigError("privacy.dp_sgd=true needs exactly one of "
                              "privacy.noise_multiplier (the noise) and privacy.epsilon (a "
                              f"budget to derive it from); got "
                              f"noise_multiplier={self.noise_multiplier}, "
                              f"epsilon={self.epsilon}")
        for key in ("clip_norm", "epsilon", "expected_batch_size"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"privacy.{key}={value} must be > 0")
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise ConfigError(f"privacy.noise_multiplier={self.noise_multiplier} must be >= 0")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta={self.delta} must be in (0, 1), e.g. 1e-5 "
                              "(below 1 / the number of training sequences)")

    def check_run(self, cfg) -> None:
        """What DP-SGD's accounting covers, against the rest of the config `cfg`:
        Poisson-sampled sequences of a prepared data set, each with a loss of its own."""
        if not self.dp_sgd:
            return
        if cfg.data.path is None:
            raise ConfigError("privacy.dp_sgd=true samples the sequences of a prepared data "
                              "set (Poisson sampling, what the accountant assumes), not the "
                              f"embedded {cfg.data.source} data: set data.path")
        if cfg.train.objective != "lm":
            raise ConfigError("privacy.dp_sgd=true needs train.objective=lm: a DPO pair's "
                              "loss depends on its reference log-probs and partner, which "
                              "per-sequence accounting does not cover")
        if cfg.model.moe.enabled:
            raise ConfigError("privacy.dp_sgd=true cannot train a mixture of experts: its "
                              "load-balancing loss and expert capacity couple the sequences "
                              "of a batch; use a dense model (model.moe.num_experts=0)")
        expected = self.expected_batch_size
        if expected is not None and expected > cfg.train.batch_size:
            raise ConfigError(f"privacy.expected_batch_size={expected:g} exceeds "
                              f"train.batch_size={cfg.train.batch_size}, the padded batch a "
                              "step holds; raise train.batch_size well above it (mean + 5 x "
                              "sqrt(mean))")

    @property
    def clip(self) -> float:
        return DEFAULT_CLIP_NORM if self.clip_norm is None else self.clip_norm

    @property
    def target_delta(self) -> float:
        return DEFAULT_DELTA if self.delta is None else self.delta
