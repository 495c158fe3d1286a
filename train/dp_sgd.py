"""DP-SGD's gradient: each sequence's own gradient clipped to privacy.clip_norm, the
clipped gradients summed over the (Poisson-sampled, padded) batch, Gaussian noise of std
noise_multiplier x clip_norm added once per step, divided by the expected batch size.

A sequence's gradient is of its own loss, normalised by its own tokens (not the batch's).
Per-sequence gradients come from `jax.vmap` over each microbatch's sequences, so a
microbatch holds b gradients at once: gradient accumulation (train.microbatches) bounds
that memory. The sequences are split over the batch's mesh axes that no parameter is
split over (`example_axes`: data, and fsdp under the dp rules); inside one sequence's
gradient the activations keep every other layout of the rules (tensor, context
parallelism) with the batch unsplit. Under FSDP rules the fsdp ways therefore compute the
same sequences, each with its shard of the weights.

The noise key is derived from (train.seed, step), identical on every host, so a resumed
run adds the same noise; its values do not depend on the mesh (JAX's partitionable
threefry), so a sharded run equals a single-device one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

import sharding
from train.config import Config

NOISE_STREAM = 0x4E4F4953  # "NOIS": keeps the noise key apart from other uses of the seed


@dataclasses.dataclass(frozen=True)
class DpStep:
    """DP-SGD's static settings in the train step (part of the jit cache key)."""

    clip_norm: float
    noise_std: float  # noise_multiplier * clip_norm
    expected_batch: float
    seed: int
    example_axes: tuple[str, ...]  # the mesh axes a microbatch's sequences are split over
    constrain: Any  # activation layouts inside one sequence's gradient (batch unsplit)


def example_axes(rules: sharding.rules.Rules) -> tuple[str, ...]:
    """The batch's mesh axes that no other rule uses: per-sequence gradients (each the
    size of the parameters) can be split over these without meeting a parameter's."""
    used = {a for name, axes in rules.items() if name not in ("batch", "act_ids")
            for a in axes}
    return tuple(a for a in rules["batch"] if a not in used)


def make_dp_step(cfg: Config, mesh: Mesh, rules: sharding.rules.Rules,
                 privacy=None) -> DpStep | None:
    """The step's DP-SGD settings (None without privacy.dp_sgd): from the resolved
    `privacy` (train/privacy.py), or, for tools that only compile or lay out the step,
    from the config with stand-ins for what the data decides."""
    p = cfg.privacy
    if not p.dp_sgd:
        return None
    if privacy is not None:
        noise_std, expected = privacy.noise_std, privacy.expected_batch
    else:
        noise_std = (1.0 if p.noise_multiplier is None else p.noise_multiplier) * p.clip
        expected = p.expected_batch_size or cfg.train.batch_size
    inner = {**rules, "batch": (), "act_ids": ()}
    return DpStep(clip_norm=p.clip, noise_std=noise_std, expected_batch=expected,
                  seed=cfg.train.seed, example_axes=example_axes(rules),
                  constrain=sharding.ActivationSharding.create(mesh, inner))


def _f32_zeros(tree):
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), tree)


def clipped_sum(grad_fn: Callable, dp: DpStep, micro: dict[str, jax.Array],
                key: jax.Array | None):
    """Over a microbatch (b, T): the sum of its sequences' clipped gradients, and sums
    of their loss terms, of 1 per sampled sequence (`sequences`) and per clipped one
    (`clipped`). `grad_fn(micro_of_one, total_weight, key, constrain)` is the loss's
    value_and_grad. Padding rows (no weight) count nowhere."""
    b = micro["inputs"].shape[0]

    def one(example, index):
        single = jax.tree.map(lambda x: x[None], example)
        weight = jnp.maximum(jnp.sum(single["weights"]), 1.0)  # its own tokens
        k = None if key is None else jax.random.fold_in(key, index)
        (_, terms), grads = grad_fn(single, weight, k, dp.constrain)
        return terms, grads

    terms_b, grads_b = jax.vmap(one, spmd_axis_name=dp.example_axes or None)(
        micro, jnp.arange(b))
    present_b = jnp.sum(micro["weights"], axis=1) > 0
    sq_b = sum(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim)))
               for g in jax.tree.leaves(grads_b))
    norm_b = jnp.sqrt(sq_b)
    scale_b = jnp.where(present_b, jnp.minimum(1.0, dp.clip_norm / jnp.maximum(norm_b, 1e-30)),
                        0.0)

    def summed(g_b):
        g_b = jnp.where(present_b.reshape((b,) + (1,) * (g_b.ndim - 1)), g_b, 0)
        return jnp.tensordot(scale_b, g_b.astype(jnp.float32), axes=1)

    sums = {k: jnp.sum(jnp.where(present_b, v, 0.0)) for k, v in terms_b.items()}
    sums["sequences"] = jnp.sum(present_b.astype(jnp.float32))
    sums["clipped"] = jnp.sum((present_b & (norm_b > dp.clip_norm)).astype(jnp.float32))
    return sums, jax.tree.map(summed, grads_b)


def private_grads(grad_fn: Callable, dp: DpStep, batch: dict[str, jax.Array], trained,
                  step: jax.Array, micro_key: Callable[[Any], jax.Array | None]):
    """The metrics terms and DP-SGD gradient over a (M, B/M, T) batch: clipped sums
    accumulated over the M microbatches, then noise, then / expected batch. Terms: loss
    and z_loss (the mean over the sampled sequences of each one's own mean), sequences
    (how many were sampled) and clipped_fraction (of those, how many were clipped)."""
    num_micro = batch["inputs"].shape[0]

    def accumulate(carry, xs):
        micro, i = xs
        sums, grads = clipped_sum(grad_fn, dp, micro, micro_key(i))
        return jax.tree.map(jnp.add, carry, (sums, grads)), None

    if num_micro == 1:
        sums, total = clipped_sum(grad_fn, dp, jax.tree.map(lambda x: x[0], batch),
                                  micro_key(0))
    else:
        zero = jnp.zeros((), jnp.float32)
        init = (dict.fromkeys(("loss", "z_loss", "sequences", "clipped"), zero),
                _f32_zeros(trained))
        (sums, total), _ = jax.lax.scan(accumulate, init, (batch, jnp.arange(num_micro)))
    if dp.noise_std:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(dp.seed), NOISE_STREAM),
                                 step)
        leaves, treedef = jax.tree.flatten(total)
        leaves = [s + dp.noise_std * jax.random.normal(jax.random.fold_in(key, i), s.shape,
                                                       jnp.float32)
                  for i, s in enumerate(leaves)]
        total = jax.tree.unflatten(treedef, leaves)
    grads = jax.tree.map(lambda s, p: (s / dp.expected_batch).astype(p.dtype), total, trained)
    count = jnp.maximum(sums["sequences"], 1.0)
    terms = {k: v / count for k, v in sums.items() if k not in ("sequences", "clipped")}
    terms["sequences"] = sums["sequences"]
    terms["clipped_fraction"] = sums["clipped"] / count
    return terms, grads
