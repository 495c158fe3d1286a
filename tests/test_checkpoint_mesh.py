"""Checkpoints in-process: restore onto another mesh, and the params-only export."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sharding
from models import Transformer
from train.checkpoint import Checkpoints
from train.config import to_dict
from train.data.batches import WindowBatches
from train.inference import export, load_exported
from train.plan import build_state, plan
from train.step import jit_train_step

from helpers import small_config


def setup(cfg, shape, rules):
    mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "model"), shape)))
    rules = sharding.make_rules(rules, mesh.axis_names)
    batch_sharding = NamedSharding(mesh, P(None, ("data", "fsdp"), None))
    return mesh, rules, WindowBatches(cfg, batch_sharding, None), batch_sharding


@pytest.mark.parametrize("optimizer", [
    [], ["optimizer.name=adafactor", "model.d_model=128", "model.mlp_dim=128"]],
    ids=["adamw", "adafactor"])
def test_restore_onto_another_mesh_continues_with_same_loss(optimizer, tmp_path, devices):
    """Parameters and optimizer state (AdamW's moments; Adafactor's factored ones, at
    widths where it factors, whose shapes are not the parameters') restore onto another
    mesh exactly."""
    cfg = small_config("optimizer.warmup_steps=0", *optimizer)
    # train 2 steps on fsdp=8, save, take a 3rd step there
    mesh, rules, batches, bs = setup(cfg, (1, 8, 1), "fsdp")
    state, shardings = build_state(cfg, mesh, rules)
    step = jit_train_step(shardings, {"inputs": bs, "targets": bs})
    for i in range(2):
        state, _ = step(state, batches.batch(i))
    ckpts = Checkpoints(str(tmp_path / "ckpt"))
    ckpts.save(2, state, {"step": 2}, to_dict(cfg))
    ckpts.wait()
    saved_opt_state = jax.device_get(jax.tree.leaves(state.opt_state))
    after_same, m_same = step(state, batches.batch(2))
    # restore onto data=2 x model=4 with tensor parallelism and take the same 3rd step
    mesh2, rules2, batches2, bs2 = setup(cfg, (2, 1, 4), "fsdp_tp")
    p = plan(cfg, mesh=mesh2, rules=rules2)
    shardings2 = p.shardings
    arrays, meta = Checkpoints(str(tmp_path / "ckpt")).restore(
        2, p.state_target(), cfg.optimizer.name)
    state2 = p.abstract.replace(**arrays)
    assert meta == {"step": 2} and int(state2.step) == 2
    wq = state2.params["blocks"]["wq"].get_value()
    assert wq.sharding.spec == P(None, "fsdp", "model", None)  # fsdp has size 1 here
    assert wq.sharding.mesh.shape == mesh2.shape
    step2 = jit_train_step(shardings2, {"inputs": bs2, "targets": bs2})
    for a, b in zip(jax.tree.leaves(state2.opt_state), saved_opt_state, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    after_other, m_other = step2(state2, batches2.batch(2))
    np.testing.assert_allclose(float(m_other["loss"]), float(m_same["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_other["grad_norm"]), float(m_same["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(after_other.params), jax.tree.leaves(after_same.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_export_params_only_roundtrip(tmp_path, devices):
    cfg = small_config(f"output_dir={tmp_path / 'run'}")
    mesh, rules, _, _ = setup(cfg, (1, 8, 1), "fsdp")
    state, _ = build_state(cfg, mesh, rules)
    ckpts = Checkpoints(cfg.checkpoint_dir)
    ckpts.save(5, state, {"step": 5}, to_dict(cfg))
    ckpts.wait()
    assert export(cfg.run_dir, str(tmp_path / "export"), cfg) == 5
    assert not any((tmp_path / "export").rglob("*mu*"))  # no optimizer state
    mesh2 = sharding.make_mesh({"data": 1, "fsdp": 2, "model": 4})
    cfg2, params = load_exported(str(tmp_path / "export"), mesh2,
                                 sharding.make_rules("fsdp_tp", mesh2.axis_names))
    assert cfg2.model == cfg.model
    for (_, a), (_, b) in zip(nnx.to_flat_state(state.params), nnx.to_flat_state(params)):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg2.model, rngs=nnx.Rngs(0))))
    tokens = jax.device_put(np.zeros((2, 8), np.int32), NamedSharding(mesh2, P()))
    assert nnx.merge(graphdef, params)(tokens).shape == (2, 8, 256)
