"""Sharded == unsharded: the same loss, gradients and training trajectory on every mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sharding
from models import layers
from sharding.partition import ActivationSharding
from train.data.batches import WindowBatches
from train.plan import build_state
from train.step import compute_grads, jit_train_step

from helpers import small_config

ONCE = pytest.mark.once
STEPS = 3


def run_on_mesh(cfg, shape, devices, steps=STEPS):
    """(loss, grads, per-step losses) of `cfg` on a (data, fsdp, model) mesh."""
    mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "model"), shape)),
                              devices=devices[:int(np.prod(shape))])
    rules = sharding.make_rules("fsdp_tp", mesh.axis_names)
    state, state_shardings = build_state(cfg, mesh, rules)
    batch_sharding = NamedSharding(mesh, P(None, ("data", "fsdp"), None))
    batches = WindowBatches(cfg, batch_sharding, corpus=None)
    terms, grads = jax.jit(compute_grads)(state, batches.batch(0))
    ce = terms["loss"]
    step = jit_train_step(state_shardings, {"inputs": batch_sharding, "targets": batch_sharding})
    losses = []
    for i in range(steps):
        state, metrics = step(state, batches.batch(i))
        losses.append(float(metrics["loss"]))
    return float(ce), jax.device_get(jax.tree.leaves(grads)), losses


@functools.lru_cache(maxsize=None)
def style_reference(style: str):
    heads = ["model.num_kv_heads=8"] if style == "gpt2" else []
    # warmup_steps=1: steps after the first use a non-zero learning rate.
    cfg = small_config(f"model.style={style}", "optimizer.warmup_steps=1", *heads)
    return cfg, run_on_mesh(cfg, (1, 1, 1), jax.devices())


# Every mesh once, the families taking turns (each family splits every axis somewhere):
# Llama on 2x2x2 on both Pythons, the others on CI's first only.
CASES = [("gpt2", (8, 1, 1)), ("llama", (1, 8, 1)), ("llama", (2, 2, 2)),
         ("gpt2", (1, 4, 2)), ("gpt2", (1, 1, 8))]


@pytest.mark.parametrize("style,shape", [
    pytest.param(style, shape, marks=() if shape == (2, 2, 2) else ONCE,
                 id=f"{style}-{'x'.join(map(str, shape))}") for style, shape in CASES])
def test_sharded_matches_single_device(style, shape, devices):
    cfg, (ref_loss, ref_grads, ref_losses) = style_reference(style)
    loss, grads, losses = run_on_mesh(cfg, shape, devices)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert len(grads) == len(ref_grads)
    # Absolute slack relative to the largest gradient anywhere: some gradients are exactly
    # zero in exact arithmetic (a key bias shifts all scores equally) and only noise here.
    scale = max(np.abs(ref).max() for ref in ref_grads)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


def test_chunked_loss_and_blocked_attention_sharded(devices):
    """The vocabulary-slice and query-block loops (4 slices, blocks of 8 queries) under
    FSDP + TP give the single-device loss and gradients."""
    cfg = small_config("model.vocab_chunks=4", "model.attention_block=8")
    ref_loss, ref_grads, _ = run_on_mesh(cfg, (1, 1, 1), devices, steps=0)
    loss, grads, _ = run_on_mesh(cfg, (2, 2, 2), devices, steps=0)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    scale = max(np.abs(ref).max() for ref in ref_grads)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6 * scale)


def test_splash_attention_sharded(devices):
    """The splash kernel (interpreted on the CPU) runs per device under shard_map, batch
    and heads split: FSDP + TP gives the single-device loss and gradients of blocked
    attention."""
    long = ("train.seq_len=128", "model.max_seq_len=128", "train.batch_size=4")
    ref_loss, ref_grads, _ = run_on_mesh(small_config(*long), (1, 1, 1), devices, steps=0)
    cfg = small_config("model.attention=splash", *long)
    loss, grads, _ = run_on_mesh(cfg, (1, 2, 2), devices, steps=0)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    scale = max(np.abs(ref).max() for ref in ref_grads)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5 * scale)


def all_eqns(jaxpr):
    """A jaxpr's equations, with those of the jaxprs nested in them."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            inner = getattr(v, "jaxpr", v)
            if hasattr(inner, "eqns"):
                yield from all_eqns(inner)


def test_weight_gradients_go_straight_to_the_parameter_layout(devices):
    """A gathered weight's gradient is constrained to the parameter's (FSDP-sharded)
    layout only, never to the gathered one (autodiff's transpose of the gather, which
    makes the partitioner all-reduce the whole gradient before slicing it); its value is
    the gradient of the plain cast."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "model": 1}, devices=devices)
    constrain = ActivationSharding.create(mesh, sharding.make_rules("fsdp", mesh.axis_names))
    w_DF = jax.random.normal(jax.random.key(0), (64, 32), jnp.float32)
    x_BD = jax.random.normal(jax.random.key(1), (16, 64), jnp.float32)

    def loss(w_DF, cast):
        w = cast(w_DF)
        return jnp.sum(jnp.sin(x_BD.astype(jnp.bfloat16) @ w).astype(jnp.float32))

    gathered = functools.partial(layers.for_compute, axes=("embed", "mlp"),
                                 dtype=jnp.bfloat16, constrain=constrain)
    jaxpr = jax.make_jaxpr(jax.grad(functools.partial(loss, cast=gathered)))(w_DF)
    specs = [tuple(e.params["sharding"].spec) for e in all_eqns(jaxpr.jaxpr)
             if e.primitive.name == "sharding_constraint"]
    # forward: the cast weight sharded, then gathered; backward: the gradient sharded
    assert specs == [("fsdp", None), (None, None), ("fsdp", None)]
    grad = jax.jit(jax.grad(functools.partial(loss, cast=gathered)))(w_DF)
    ref = jax.grad(loss)(w_DF, lambda w: w.astype(jnp.bfloat16))
    assert grad.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(ref))
