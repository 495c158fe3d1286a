"""Sharded == unsharded: the same loss, gradients and training trajectory on every mesh."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import sharding
from conftest import small_config
from train.data import Batches
from train.state import build_state
from train.step import compute_grads, jit_train_step

MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8)]
STEPS = 3


def run_on_mesh(cfg, shape, devices, steps=STEPS):
    """(loss, grads, per-step losses) of `cfg` on a (data, fsdp, model) mesh."""
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)),
                              devices=devices[:int(np.prod(shape))])
    rules = sharding.make_rules("fsdp_tp", mesh.axis_names)
    state, state_shardings = build_state(cfg, mesh, rules)
    batch_sharding = NamedSharding(mesh, P(None, ("data", "fsdp"), None))
    batches = Batches(cfg, batch_sharding, corpus=None)
    ce, _, grads = jax.jit(compute_grads)(state, batches.batch(0))
    step = jit_train_step(state_shardings, {"inputs": batch_sharding, "targets": batch_sharding})
    losses = []
    for i in range(steps):
        state, metrics = step(state, batches.batch(i))
        losses.append(float(metrics["loss"]))
    return float(ce), jax.device_get(jax.tree.leaves(grads)), losses


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def style_reference(request, devices):
    heads = ["model.num_kv_heads=8"] if request.param == "gpt2" else []
    # warmup_steps=1: steps after the first use a non-zero learning rate.
    cfg = small_config(f"model.style={request.param}", "optimizer.warmup_steps=1", *heads)
    return cfg, run_on_mesh(cfg, (1, 1, 1), devices)


@pytest.mark.parametrize("shape", MESHES[1:], ids=lambda s: "x".join(map(str, s)))
def test_sharded_matches_single_device(style_reference, shape, devices):
    cfg, (ref_loss, ref_grads, ref_losses) = style_reference
    if cfg.model.kv_heads % shape[2]:
        pytest.skip(f"{cfg.model.kv_heads} kv heads do not divide by model={shape[2]}")
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
