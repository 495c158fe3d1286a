"""The `optimizer:` section of the config: which optimizer and schedule, and their settings.

Settings that only some optimizers or schedules read default to None, meaning "that
optimizer's own default" (`OptimizerConfig.get`). A user who sets one that the chosen
optimizer or schedule does not read gets an error, never a silent no-op.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from train.errors import ConfigError

# The settings each optimizer reads beyond lr, weight_decay, no_decay and grad_clip,
# with their defaults. muon: b1, b2 and eps are its AdamW half's (embeddings, head,
# norms, biases); momentum, nesterov, ns_steps and muon_lr its matrices'.
OPTIMIZER_SETTINGS: dict[str, dict[str, object]] = {
    "adamw": {"b1": 0.9, "b2": 0.95, "eps": 1e-8},
    "adafactor": {"momentum": 0.0, "eps": 1e-30},
    "lion": {"b1": 0.9, "b2": 0.99},
    "sgd": {"momentum": 0.0, "nesterov": False},
    "muon": {"b1": 0.9, "b2": 0.95, "eps": 1e-8, "momentum": 0.95, "nesterov": True,
             "ns_steps": 5, "muon_lr": 0.02},
}
# The settings each schedule reads beyond lr and warmup_steps.
SCHEDULE_SETTINGS: dict[str, dict[str, object]] = {
    "cosine": {"decay_steps": None, "min_lr_ratio": 0.1},
    "linear": {"decay_steps": None, "min_lr_ratio": 0.1},
    "constant": {},
    "wsd": {"decay_steps": None, "min_lr_ratio": 0.1, "decay_fraction": 0.2},
    "rsqrt": {},
}
_OPTIONAL = sorted({k for s in (*OPTIMIZER_SETTINGS.values(), *SCHEDULE_SETTINGS.values())
                    for k in s})


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw", "adafactor", "lion", "sgd", "muon"] = "adamw"
    lr: float = 3e-3  # peak learning rate (muon: of its AdamW half; muon_lr for matrices)
    schedule: Literal["cosine", "linear", "constant", "wsd", "rsqrt"] = "cosine"
    warmup_steps: int = 20  # linear from 0 to lr
    decay_steps: Optional[int] = None  # cosine, linear, wsd: where decay ends (train.steps)
    min_lr_ratio: Optional[float] = None  # cosine, linear, wsd: final lr = lr * this (0.1)
    decay_fraction: Optional[float] = None  # wsd: the last fraction of decay_steps (0.2)
    b1: Optional[float] = None
    b2: Optional[float] = None
    eps: Optional[float] = None
    momentum: Optional[float] = None
    nesterov: Optional[bool] = None
    ns_steps: Optional[int] = None  # muon: Newton-Schulz iterations
    muon_lr: Optional[float] = None  # muon: peak learning rate of the block matrices
    weight_decay: float = 0.1  # decoupled: each step subtracts lr * weight_decay * param
    no_decay: list = dataclasses.field(default_factory=lambda: ["norm", "bias", "embedding"])
    grad_clip: float = 1.0  # global-norm clipping; 0 turns it off

    def get(self, key: str):
        """The value of an optimizer- or schedule-specific setting: the user's, else the
        chosen optimizer's (or schedule's) default."""
        value = getattr(self, key)
        if value is not None:
            return value
        defaults = {**OPTIMIZER_SETTINGS[self.name], **SCHEDULE_SETTINGS[self.schedule]}
        return defaults[key]

    def check(self) -> None:
        for key in _OPTIONAL:
            if getattr(self, key) is None:
                continue
            if key in OPTIMIZER_SETTINGS[self.name] or key in SCHEDULE_SETTINGS[self.schedule]:
                continue
            readers = [f"optimizer.name={n}" for n, s in OPTIMIZER_SETTINGS.items() if key in s]
            readers += [f"optimizer.schedule={n}" for n, s in SCHEDULE_SETTINGS.items()
                        if key in s]
            raise ConfigError(f"optimizer.{key} is set but optimizer.name={self.name} with "
                              f"optimizer.schedule={self.schedule} does not use it (only "
                              f"{', '.join(readers)} do); remove it")
        unknown = set(self.no_decay) - {"norm", "bias", "embedding"}
        if unknown:
            raise ConfigError(f"optimizer.no_decay has {sorted(unknown)}; allowed: norm, "
                              "bias, embedding")
        for key in ("lr", "muon_lr"):
            if (getattr(self, key) or 0) < 0:
                raise ConfigError(f"optimizer.{key}={getattr(self, key)} is negative: the run "
                                  "would climb the loss; give a positive peak learning rate")
        for key in ("warmup_steps", "eps", "weight_decay", "grad_clip", "min_lr_ratio"):
            if (getattr(self, key) or 0) < 0:
                raise ConfigError(f"optimizer.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("b1", "b2", "momentum"):
            if getattr(self, key) is not None and not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optimizer.{key}={getattr(self, key)} must be in [0, 1)")
        if self.decay_fraction is not None and not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"optimizer.decay_fraction={self.decay_fraction} must be in "
                              "(0, 1]: the part of decay_steps spent decaying")
        if self.ns_steps is not None and self.ns_steps < 1:
            raise ConfigError(f"optimizer.ns_steps must be at least 1, got {self.ns_steps}")
        if self.nesterov and self.name == "sgd" and not self.momentum:
            raise ConfigError("optimizer.nesterov=true needs optimizer.momentum > 0 (e.g. 0.9)")
