"""Optax AdamW with linear warmup, cosine decay, global-norm clipping and a decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax

from train.config import OptimizerConfig


def param_kind(name: str) -> str:
    """'norm', 'bias', 'embedding' or 'weight', from a parameter's attribute name."""
    if "norm" in name:
        return "norm"
    if name.endswith("_bias"):
        return "bias"
    if name in ("embedding", "pos_embedding"):
        return "embedding"
    return "weight"


def decay_mask(params: Any, no_decay: list[str]) -> Any:
    """True where weight decay applies; same tree structure as `params`."""

    def one(path, _):
        return param_kind(str(path[-1].key)) not in no_decay

    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: one([k for k in path if hasattr(k, "key")], leaf), params)


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    decay_steps = cfg.decay_steps or total_steps
    warmup = min(cfg.warmup_steps, max(decay_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(decay_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: OptimizerConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay,
                             mask=lambda params: decay_mask(params, list(cfg.no_decay))))
    return optax.chain(*parts), schedule


__all__ = ["make_optimizer", "make_schedule", "decay_mask", "param_kind"]
