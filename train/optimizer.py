"""The optimizer (optimizer.name) and its learning-rate schedule (optimizer.schedule),
with global-norm clipping first and decoupled weight decay under a mask."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train.matrices import adafactor_direction, muon_matrices, weight_matrix
from train.optimizer_config import OptimizerConfig

BLOCK_STACKS = ("blocks", "dense_blocks", "moe_blocks")


def param_kind(name: str) -> str:
    """'norm', 'bias', 'embedding' or 'weight', from a parameter's attribute name."""
    if "norm" in name:
        return "norm"
    if name.endswith("_bias"):
        return "bias"
    if name in ("embedding", "pos_embedding"):
        return "embedding"
    return "weight"


def _keys(path) -> list[str]:
    return [str(k.key) for k in path if hasattr(k, "key")]


def decay_mask(params: Any, no_decay: list[str]) -> Any:
    """True where weight decay applies; same tree structure as `params`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: param_kind(_keys(path)[-1]) not in no_decay, params)


def muon_labels(params: Any) -> Any:
    """'muon' for the blocks' matrices, 'adamw' for the rest (embeddings, head, norms,
    biases), as Muon's authors split them; a label per Variable."""

    def one(path, var):
        keys = _keys(path)
        inside = keys[0] in BLOCK_STACKS and param_kind(keys[-1]) == "weight"
        return "muon" if inside and weight_matrix(var) is not None else "adamw"

    return jax.tree_util.tree_map_with_path(
        one, params, is_leaf=lambda node: isinstance(node, nnx.Variable))


def make_schedule(cfg: OptimizerConfig, total_steps: int, peak: float | None = None
                  ) -> optax.Schedule:
    """Linear warmup from 0 to `peak` (optimizer.lr) over warmup_steps, then cosine or
    linear decay to peak * min_lr_ratio at decay_steps, constant, wsd (constant, then
    linear decay over the last decay_fraction of decay_steps) or rsqrt
    (peak * sqrt(warmup / step))."""
    peak = cfg.lr if peak is None else peak
    kind = cfg.schedule
    decay_steps = (cfg.decay_steps or total_steps) if kind in ("cosine", "linear", "wsd") \
        else total_steps
    warmup = min(cfg.warmup_steps, max(decay_steps - 1, 0))
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup,
            decay_steps=max(decay_steps, warmup + 1), end_value=peak * cfg.get("min_lr_ratio"))
    if kind == "rsqrt":
        def rsqrt(step):
            step = jnp.asarray(step, jnp.float32)
            ramp = peak * step / max(warmup, 1)
            return jnp.where(step < warmup, ramp,
                             peak * jnp.sqrt(max(warmup, 1) / jnp.maximum(step, 1.0)))
        return rsqrt
    parts, bounds = [optax.linear_schedule(0.0, peak, max(warmup, 1))], [warmup]
    if kind == "constant":
        parts.append(optax.constant_schedule(peak))
    else:
        end = peak * cfg.get("min_lr_ratio")
        start = warmup
        if kind == "wsd":
            start = max(warmup, decay_steps - round(cfg.get("decay_fraction") * decay_steps))
            parts.append(optax.constant_schedule(peak))
            bounds.append(start)
        parts.append(optax.linear_schedule(peak, end, max(decay_steps - start, 1)))
    return optax.join_schedules(parts, bounds)


def make_optimizer(cfg: OptimizerConfig, total_steps: int, constrain: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(the optimizer, its schedule of optimizer.lr). The updates of every optimizer
    subtract lr * weight_decay * param where the decay mask allows (decoupled).
    `constrain` (sharding.ActivationSharding) lets Muon place whole matrices on the
    devices; without it the same updates run wherever XLA puts them."""
    schedule = make_schedule(cfg, total_steps)
    mask = lambda params: decay_mask(params, list(cfg.no_decay))  # noqa: E731
    get, name = cfg.get, cfg.name
    if name == "adamw":
        tx = optax.adamw(schedule, b1=get("b1"), b2=get("b2"), eps=get("eps"),
                         weight_decay=cfg.weight_decay, mask=mask)
    elif name == "lion":
        tx = optax.lion(schedule, b1=get("b1"), b2=get("b2"),
                        weight_decay=cfg.weight_decay, mask=mask)
    elif name == "sgd":
        tx = optax.chain(
            optax.trace(get("momentum"), get("nesterov")) if get("momentum")
            else optax.identity(),
            optax.add_decayed_weights(cfg.weight_decay, mask),
            optax.scale_by_learning_rate(schedule))
    elif name == "adafactor":
        tx = optax.chain(
            adafactor_direction(get("eps")),
            optax.ema(get("momentum"), debias=False) if get("momentum") else optax.identity(),
            optax.add_decayed_weights(cfg.weight_decay, mask),
            optax.scale_by_learning_rate(schedule))
    else:  # muon: the blocks' matrices; AdamW for the rest
        matrices = optax.chain(
            muon_matrices(get("momentum"), get("nesterov"), get("ns_steps"), constrain),
            optax.add_decayed_weights(cfg.weight_decay),
            optax.scale_by_learning_rate(make_schedule(cfg, total_steps, get("muon_lr"))))
        rest = optax.adamw(schedule, b1=get("b1"), b2=get("b2"), eps=get("eps"),
                           weight_decay=cfg.weight_decay, mask=mask)
        tx = optax.partition({"muon": matrices, "adamw": rest}, muon_labels)
    clip = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*clip, tx), schedule


__all__ = ["make_optimizer", "make_schedule", "decay_mask", "param_kind", "muon_labels"]
