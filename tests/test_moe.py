"""Mixture of experts: the layer against a per-token loop, the auxiliary losses against
transformers and by hand, sharded (expert, FSDP, tensor parallel) against one device,
generation and checkpoints on expert meshes, and the config errors."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sharding
from models import experts, moe
from models.config import ModelConfig, MoeConfig
from models.layers import no_constraint
from train.config import ConfigError
from train.data.batches import WindowBatches
from train.inference import Generator
from train.plan import build_state, plan
from train.step import compute_grads, jit_train_step

from helpers import small_config, tensorboard_scalars
from runs import MOE_STEPS

ONCE = pytest.mark.once
E, K, D, F = 8, 2, 16, 24
# A small MoE model: one dense layer, then MoE layers with a shared expert and q/k norms;
# both auxiliary losses on, so their gradients are checked too.
MOE = ["model.num_layers=2", "model.moe.num_experts=8", "model.moe.experts_per_token=2",
       "model.moe.expert_mlp_dim=32", "model.moe.first_dense_layers=1",
       "model.moe.shared_experts=1", "model.qk_norm=true", "model.moe.aux_loss_coef=0.1",
       "model.moe.router_z_loss_coef=0.01", "model.init_std=0.2", "optimizer.warmup_steps=1"]


def _layer_params(key, shared: bool):
    ks = jax.random.split(key, 7)
    p = {"router": jax.random.normal(ks[0], (D, E)),
         "w_gate": 0.3 * jax.random.normal(ks[1], (E, D, F)),
         "w_up": 0.3 * jax.random.normal(ks[2], (E, D, F)),
         "w_out": 0.3 * jax.random.normal(ks[3], (E, F, D))}
    if shared:
        p |= {"shared_gate": 0.3 * jax.random.normal(ks[4], (D, F)),
              "shared_up": 0.3 * jax.random.normal(ks[5], (D, F)),
              "shared_out": 0.3 * jax.random.normal(ks[6], (F, D))}
    return p


def _swiglu(x_D, gate, up, out):
    return (jax.nn.silu(x_D @ gate) * (x_D @ up)) @ out


def _per_token_loop(p, h_BTD, renormalise: bool):
    """The MoE MLP one token at a time (vmapped over tokens): softmax, top k, optional
    renormalisation, each chosen expert's SwiGLU with its own weights, weighted, plus
    the shared expert."""
    def one_token(x):
        probs = jax.nn.softmax(x @ p["router"])
        weights, experts = jax.lax.top_k(probs, K)
        if renormalise:
            weights = weights / weights.sum()
        y = sum(weights[j] * _swiglu(x, p["w_gate"][experts[j]], p["w_up"][experts[j]],
                                     p["w_out"][experts[j]]) for j in range(K))
        if "shared_gate" in p:
            y = y + _swiglu(x, p["shared_gate"], p["shared_up"], p["shared_out"])
        return y

    B, T, _ = h_BTD.shape
    return jax.vmap(one_token)(h_BTD.reshape(B * T, D)).reshape(B, T, D)


@functools.lru_cache(maxsize=None)
def _reference(renormalise: bool, shared: bool):
    """The loop's output and gradients on the layer test's inputs (once per variant)."""
    p = _layer_params(jax.random.key(0), shared)
    h_BTD = jax.random.normal(jax.random.key(1), (8, 2, D))
    ref = lambda p, h: _per_token_loop(p, h, renormalise)  # noqa: E731
    grads = jax.jit(jax.grad(lambda p, h: jnp.sum(jnp.sin(ref(p, h))), argnums=(0, 1)))
    return p, h_BTD, jax.jit(ref)(p, h_BTD), grads(p, h_BTD)


def _layer_cfg(renormalise: bool, shared: bool, row_chunks: int = 1) -> ModelConfig:
    return ModelConfig(vocab_size=256, d_model=D, num_heads=2, mlp_dim=F, dtype="float32",
                       moe=MoeConfig(num_experts=E, experts_per_token=K,
                                     norm_topk_prob=renormalise, shared_experts=int(shared),
                                     row_chunks=row_chunks))


@pytest.mark.parametrize("renormalise,shared", [(True, False), (False, True)],
                         ids=["mixtral", "qwen_shared"])
# row_chunks 3: the 32 (token, expert) pairs of one device (and the 64 rows an expert
# device receives) in chunks of 11 (22) rows, the last one padded, cutting groups
@pytest.mark.parametrize("mesh_shape,rules,row_chunks", [
    (None, None, 1),
    pytest.param(None, None, 3, marks=ONCE),  # both Pythons: test_row_chunks_equal_one_pass
    pytest.param({"fsdp": 2, "expert": 4}, "fsdp_ep", 1, marks=ONCE),
    ({"fsdp": 2, "expert": 2, "model": 2}, "fsdp_tp_ep", 1),
    pytest.param({"fsdp": 2, "expert": 2, "model": 2}, "fsdp_tp_ep", 3, marks=ONCE)],
    ids=["one_device", "one_device_row_chunks", "fsdp_x_expert", "fsdp_x_expert_x_model",
         "fsdp_x_expert_x_model_row_chunks"])
def test_moe_layer_equals_a_per_token_loop(renormalise, shared, mesh_shape, rules, row_chunks,
                                           devices):
    cfg = _layer_cfg(renormalise, shared, row_chunks)
    p, h_BTD, ref_out, ref_grads = _reference(renormalise, shared)
    constrain = no_constraint
    if mesh_shape is not None:
        mesh = sharding.make_mesh(mesh_shape)
        constrain = sharding.ActivationSharding.create(
            mesh, sharding.make_rules(rules, mesh.axis_names))

    ours = lambda p, h: moe.moe_mlp(cfg, p, h, constrain)[0]  # noqa: E731
    np.testing.assert_allclose(jax.jit(ours)(p, h_BTD), ref_out, rtol=1e-5, atol=1e-5)
    g_ours = jax.jit(jax.grad(lambda p, h: jnp.sum(jnp.sin(ours(p, h))), argnums=(0, 1)))(
        p, h_BTD)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def _stats_of_logits(logits_LNE, k):
    """Router sums as models.moe.route makes them, from given logits (h = logits, W = I)."""
    L, N, n = logits_LNE.shape
    cfg = ModelConfig(vocab_size=256, d_model=n, num_heads=1, dtype="float32",
                      moe=MoeConfig(num_experts=n, experts_per_token=k))
    per_layer = [moe.route(cfg, jnp.eye(n), logits_LNE[i][None], no_constraint)[2]
                 for i in range(L)]
    return cfg, jax.tree.map(lambda *s: jnp.stack(s), *per_layer)


def test_aux_loss_equals_transformers_load_balancing_loss():
    torch = pytest.importorskip("torch")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    logits_LNE = np.random.default_rng(0).normal(size=(3, 20, E)).astype(np.float32)
    cfg, stats_L = _stats_of_logits(jnp.asarray(logits_LNE), K)
    ours = moe.aux_losses(cfg, stats_L)
    theirs = load_balancing_loss_func(tuple(torch.from_numpy(x) for x in logits_LNE), E, K)
    np.testing.assert_allclose(float(ours["moe_aux_loss"]), float(theirs), rtol=1e-5)
    lse = np.log(np.exp(logits_LNE.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(float(ours["moe_z_loss"]), np.mean(lse ** 2), rtol=1e-5)


def test_aux_loss_and_load_by_hand():
    # 2 experts, top-1, one layer of 2 tokens: token 0 to expert 0 with p = (0.75, 0.25),
    # token 1 to expert 0 with p = (0.5 + e, 0.5 - e): routed fractions (1, 0), mean
    # probabilities (0.625 + e/2, 0.375 - e/2): loss 2 * (0.625 + e/2).
    eps = 1e-3
    logits = np.log(np.array([[[0.75, 0.25], [0.5 + eps, 0.5 - eps]]], np.float32))
    cfg, stats_L = _stats_of_logits(jnp.asarray(logits), 1)
    out = moe.aux_losses(cfg, stats_L)
    np.testing.assert_allclose(float(out["moe_aux_loss"]), 2 * (0.625 + eps / 2), rtol=1e-5)
    assert float(out["expert_load"]) == pytest.approx(2.0)  # E / k: all on one expert


def test_a_router_sending_every_token_to_the_same_experts_shows_the_maximum_load():
    logits_LNE = np.zeros((2, 32, E), np.float32)
    logits_LNE[:, :, 3], logits_LNE[:, :, 5] = 8.0, 7.0  # every token picks experts 3, 5
    logits_LNE[0] += np.random.default_rng(1).normal(size=(32, E)) * 0.1
    cfg, stats_L = _stats_of_logits(jnp.asarray(logits_LNE), K)
    assert float(moe.aux_losses(cfg, stats_L)["expert_load"]) == pytest.approx(E / K)
    balanced = np.tile(np.eye(E, dtype=np.float32) * 9, (1, 4, 1))  # 4 tokens per expert
    cfg, stats_L = _stats_of_logits(jnp.asarray(balanced), 1)
    assert float(moe.aux_losses(cfg, stats_L)["expert_load"]) == pytest.approx(1.0)


def run_moe(cfg, mesh_shape, rules, devices, steps=3):
    """(terms, grads, per-step losses) of `cfg` on the given mesh and rules."""
    n = int(np.prod(list(mesh_shape.values())))
    mesh = sharding.make_mesh(mesh_shape, devices=devices[:n])
    rules = sharding.make_rules(rules, mesh.axis_names)
    state, state_shardings = build_state(cfg, mesh, rules)
    batch_sharding = NamedSharding(mesh, P(None, rules["batch"], None))
    batches = WindowBatches(cfg, batch_sharding, corpus=None)
    terms, grads = jax.jit(compute_grads)(state, batches.batch(0))
    step = jit_train_step(state_shardings, {"inputs": batch_sharding, "targets": batch_sharding})
    losses = []
    for i in range(steps):
        state, metrics = step(state, batches.batch(i))
        losses.append(float(metrics["loss"]))
    return jax.device_get(terms), jax.device_get(grads), losses


@pytest.fixture(scope="module")
def moe_reference(devices):
    cfg = small_config(*MOE)
    return cfg, run_moe(cfg, {"fsdp": 1}, "fsdp", devices)


# CI's first Python only (the layer test runs the expert mesh on both); the local
# dispatch (experts not split) is the one-device layer test's
@ONCE
@pytest.mark.parametrize("mesh_shape,rules,extra", [
    # remat and unscanned layers change nothing in the values
    ({"fsdp": 2, "expert": 4}, "fsdp_ep", ["model.remat=full", "model.scan_layers=false"]),
    ({"fsdp": 2, "expert": 2, "model": 2}, "fsdp_tp_ep", [])],
    ids=["fsdp2_expert4_remat", "fsdp2_expert2_model2"])
def test_sharded_moe_model_matches_single_device(moe_reference, mesh_shape, rules, extra,
                                                 devices):
    cfg, (ref_terms, ref_grads, ref_losses) = moe_reference
    terms, grads, losses = run_moe(small_config(*MOE, *extra), mesh_shape, rules, devices)
    assert set(terms) == {"loss", "z_loss", "moe_aux_loss", "moe_z_loss", "expert_load"}
    for key in terms:
        np.testing.assert_allclose(terms[key], ref_terms[key], rtol=1e-5, err_msg=key)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    for (path, b), a in zip(flat_ref, jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()),
                                   err_msg=jax.tree_util.keystr(path))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    assert ref_losses[-1] < ref_losses[0]


def test_expert_weights_are_split_over_the_expert_axis(devices):
    cfg = small_config(*MOE, "mesh.fsdp=2", "mesh.expert=2", "mesh.model=2",
                       "sharding.rules=fsdp_tp_ep")
    p = plan(cfg)
    blocks = p.shardings.params["moe_blocks"]
    spec = lambda name: tuple(blocks[name].get_value().spec)  # noqa: E731
    assert spec("w_gate") == (None, "expert", "fsdp", "model")
    assert spec("w_out") == (None, "expert", "model", "fsdp")
    # attention and the dense layer: FSDP over fsdp x expert, never replicated over expert
    assert spec("wq")[:3] == (None, ("fsdp", "expert"), "model")
    assert tuple(p.shardings.params["blocks"]["w_gate"].get_value().spec) == (
        None, ("fsdp", "expert"), "model")
    assert p.rules["batch"] == ("data", "fsdp", "expert")


@ONCE
def test_generation_on_an_expert_mesh_equals_one_device(devices):
    prompts = [[5, 9, 2, 77, 31], [100], [42, 7, 19]]
    outs = []
    for mesh_axes, rules in ((["mesh.fsdp=1"], "fsdp"),
                             (["mesh.fsdp=2", "mesh.expert=4"], "fsdp_ep")):
        cfg = small_config(*MOE, "model.vocab_size=128", *mesh_axes, f"sharding.rules={rules}")
        n = 1 if rules == "fsdp" else 8
        mesh = sharding.make_mesh(cfg.mesh.axes(), devices=devices[:n])
        table = sharding.make_rules(cfg.sharding.rules, mesh.axis_names)
        state, _ = build_state(cfg, mesh, table)
        outs.append(Generator(state.model(), mesh, table, eos_id=127).generate(prompts, 12))
    assert outs[0].tokens == outs[1].tokens
    assert len(set(map(tuple, outs[0].tokens))) > 1  # not a degenerate constant output


@pytest.mark.parametrize("chunks", [2, 5])
def test_row_chunks_equal_one_pass(chunks):
    """The weighted expert rows in chunks (own backward pass: the expert outputs
    recomputed, weight gradients added chunk by chunk) equal one pass: groups that are
    empty or cut by a chunk boundary, rows past the groups (dropped, as the layer does),
    values and the gradients of the rows, their weights and the expert weights."""
    sizes_G = jnp.array([0, 7, 0, 20, 3], jnp.int32)  # 30 of 37 rows in groups
    ks = jax.random.split(jax.random.key(5), 5)
    x_mD = jax.random.normal(ks[0], (37, D))
    w_m = jax.random.uniform(ks[4], (37,))
    weights = (0.3 * jax.random.normal(ks[1], (5, D, F)),
               0.3 * jax.random.normal(ks[2], (5, D, F)),
               0.3 * jax.random.normal(ks[3], (5, F, D)))
    ops = experts.grouped_ops("ragged_dot", "cpu", D, F)

    def loss(c, x, w, *ws):
        return jnp.sum(jnp.sin(experts.swiglu_rows(ops, c, x, sizes_G, w, *ws)[:30]))

    args = range(5)
    ref = jax.jit(jax.value_and_grad(functools.partial(loss, 1), argnums=args))
    ours = jax.jit(jax.value_and_grad(functools.partial(loss, chunks), argnums=args))
    (v_ref, g_ref), (v, g) = ref(x_mD, w_m, *weights), ours(x_mD, w_m, *weights)
    np.testing.assert_allclose(v, v_ref, rtol=1e-6)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a[:30], b[:30], rtol=1e-5,
                                   atol=1e-6 * float(jnp.abs(b).max()))


def _loss(fn, a):  # a loss with a non-zero second derivative
    y = fn(a)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape))


def _grad_and_second(fn, a):  # the gradient, and the gradient of its squared norm
    grad = jax.grad(functools.partial(_loss, fn))
    return grad(a), jax.grad(lambda a: jnp.sum(grad(a) ** 2))(a)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_spread_and_collect_equal_plain_indexing(k):
    """The pairs' rows and back by gathers in both directions (each op's gradient is the
    other) equal plain indexing and its autodiff (a scatter-add): values, gradients,
    and gradients of the gradients."""
    n, X = 6, 4
    order_m = jax.random.permutation(jax.random.key(3), n * k)
    unorder_m = jnp.argsort(order_m)
    cases = [
        (lambda x: moe.spread(x, order_m, unorder_m, k), lambda x: x[order_m // k],
         jax.random.normal(jax.random.key(4), (n, X))),
        (lambda y: moe.collect(y, order_m, unorder_m, k),
         lambda y: y[unorder_m].reshape(n, k, X).sum(1),
         jax.random.normal(jax.random.key(5), (n * k, X)))]
    for ours, ref, a in cases:
        np.testing.assert_allclose(ours(a), ref(a), rtol=1e-6)
        for got, want in zip(_grad_and_second(ours, a), _grad_and_second(ref, a)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides,message", [
    (["model.moe.experts_per_token=9"],
     "model.moe.experts_per_token=9 must be between 1 and model.moe.num_experts=8"),
    (["model.moe.first_dense_layers=2"], "model.moe.first_dense_layers=2 must be in [0, "),
    (["model.moe.row_chunks=0"], "model.moe.row_chunks must be >= 1"),
])
def test_bad_moe_config_is_one_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        small_config(*MOE, *overrides)


@pytest.mark.parametrize("option", ["model.moe.aux_loss_coef=0.5", "model.qk_norm=true"])
def test_moe_options_on_a_gpt2_model_are_refused(option):
    with pytest.raises(ConfigError, match=f"{option.split('=')[0]} is for model.style=llama"):
        small_config("model.style=gpt2", "model.num_kv_heads=8", option)


@pytest.mark.parametrize("overrides,message", [
    (["model.moe.num_experts=6", "mesh.fsdp=2", "mesh.expert=4"],
     "model.moe.num_experts=6 does not divide by the 4 expert ways"),
    (["mesh.fsdp=4", "mesh.expert=2", "sharding.rules=fsdp"],
     "mesh.expert=2 but sharding.rules 'fsdp' splits nothing over it"),
])
def test_expert_mesh_errors_name_the_keys(overrides, message, devices):
    with pytest.raises(ConfigError, match=message):
        plan(small_config(*MOE, "sharding.rules=fsdp_ep", *overrides))


@ONCE
def test_moe_run_logs_the_auxiliary_losses_and_expert_load(moe_run):
    rows = [json.loads(line) for line in (moe_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, MOE_STEPS + 1))
    for r in rows:
        assert r["moe_aux_loss"] >= 1.0 - 1e-4  # E * sum f_e P_e >= 1, equal when balanced
        assert 1.0 <= r["expert_load"] <= E / K
        assert r["moe_z_loss"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"]
    board = tensorboard_scalars(moe_run / "tensorboard")
    for key in ("moe_aux_loss", "moe_z_loss", "expert_load"):
        assert board[key] == pytest.approx({r["step"]: r[key] for r in rows}, rel=1e-6)


@ONCE
def test_moe_checkpoint_restores_onto_another_expert_mesh(tmp_path, devices):
    """Trained on fsdp=2 x expert=4, restored onto fsdp=2 x expert=2 x model=2: the next
    step's loss and gradient norm are the same."""
    from train.checkpoint import Checkpoints
    cfg = small_config(*MOE)

    def on(shape, rules):
        mesh = sharding.make_mesh(shape)
        table = sharding.make_rules(rules, mesh.axis_names)
        bs = NamedSharding(mesh, P(None, table["batch"], None))
        return mesh, table, bs, WindowBatches(cfg, bs, None)

    mesh1, rules1, bs1, batches1 = on({"fsdp": 2, "expert": 4}, "fsdp_ep")
    state, shardings1 = build_state(cfg, mesh1, rules1)
    step1 = jit_train_step(shardings1, {"inputs": bs1, "targets": bs1})
    for i in range(2):
        state, _ = step1(state, batches1.batch(i))
    ckpts = Checkpoints(str(tmp_path / "ckpt"))
    ckpts.save(2, state, {"step": 2}, {})
    ckpts.wait()
    _, m_same = step1(state, batches1.batch(2))
    mesh2, rules2, bs2, batches2 = on({"fsdp": 2, "expert": 2, "model": 2}, "fsdp_tp_ep")
    p2 = plan(cfg, mesh=mesh2, rules=rules2)
    step2 = jit_train_step(p2.shardings, {"inputs": bs2, "targets": bs2})
    arrays, _ = Checkpoints(str(tmp_path / "ckpt")).restore(2, p2.state_target(), "adamw")
    state2 = p2.abstract.replace(**arrays)
    w = state2.params["moe_blocks"]["w_gate"].get_value()
    assert tuple(w.sharding.spec) == (None, "expert", "fsdp", "model")
    assert w.sharding.mesh.shape["expert"] == 2
    _, m_other = step2(state2, batches2.batch(2))
    for key in ("loss", "grad_norm", "moe_aux_loss"):
        np.testing.assert_allclose(float(m_other[key]), float(m_same[key]), rtol=1e-4)


@ONCE
def test_megablox_kernel_equals_ragged_dot(devices):
    """The TPU grouped matmul (megablox, interpreted here) inside the expert-parallel
    layer on fsdp x expert x model: the same values and gradients as ragged_dot. Each
    device's expert slice is 128 x 128 (the kernel's tiles), the rows are padded up; and
    with the rows in two chunks."""
    d, f = 128, 256
    ks = jax.random.split(jax.random.key(3), 5)
    p = {"router": jax.random.normal(ks[0], (d, E)),
         "w_gate": 0.1 * jax.random.normal(ks[1], (E, d, f)),
         "w_up": 0.1 * jax.random.normal(ks[2], (E, d, f)),
         "w_out": 0.1 * jax.random.normal(ks[3], (E, f, d))}
    h_BTD = jax.random.normal(ks[4], (8, 4, d))
    mesh = sharding.make_mesh({"fsdp": 2, "expert": 2, "model": 2})
    constrain = sharding.ActivationSharding.create(
        mesh, sharding.make_rules("fsdp_tp_ep", mesh.axis_names))
    results = []
    # interpreted megablox leaves NaN in the rows it does not write: none may leak
    for kernel, row_chunks in (("ragged_dot", 1), ("megablox", 1), ("megablox", 2)):
        cfg = ModelConfig(vocab_size=256, d_model=d, num_heads=2, mlp_dim=f, dtype="float32",
                          moe=MoeConfig(num_experts=E, experts_per_token=K, kernel=kernel,
                                        row_chunks=row_chunks))
        loss = lambda p, h, cfg=cfg: jnp.sum(jnp.sin(moe.moe_mlp(cfg, p, h, constrain)[0]))  # noqa: E731
        results.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(p, h_BTD))
    (ref, ref_grads), *others = results
    for out, grads in others:
        np.testing.assert_allclose(out, ref, rtol=1e-5)  # a sum of 1,024 fp32 terms
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
