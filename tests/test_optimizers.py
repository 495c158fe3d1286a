"""optimizer.name and optimizer.schedule: each optimizer's first steps against a NumPy
update written here from the papers' definitions (or torch), fp32, on the tiny model's
own parameters (widths of 128 and more, so Adafactor factors); their state sharded as
the parameters; schedules by hand; bad settings."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import sharding
from models import Transformer
from train.data.batches import WindowBatches
from train.errors import ConfigError
from train.matrices import AdafactorState
from train.optimizer import make_optimizer, make_schedule
from train.optimizer_config import OptimizerConfig
from train.plan import build_state
from train.step import jit_train_step

from helpers import padded_spec, run_cli, small_config

# Each weight's matrix, written out by hand: (stacked axes, rows, columns).
MATRICES = {"wq": ((0,), (1,), (2, 3)), "wk": ((0,), (1,), (2, 3)), "wv": ((0,), (1,), (2, 3)),
            "wo": ((0,), (1, 2), (3,)), "w_gate": ((0,), (1,), (2,)), "w_up": ((0,), (1,), (2,)),
            "w_out": ((0,), (1,), (2,)), "embedding": ((), (0,), (1,)),
            "attn_norm_scale": ((0,), (), (1,)), "mlp_norm_scale": ((0,), (), (1,)),
            "final_norm_scale": ((), (), (0,))}
DECAYED = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_out"}
LR, WD, STEPS = 0.01, 0.1, 3


def tiny_params():
    """The tiny model (2 layers, d_model 128, mlp 512, 4 x 32 heads) as {name: array} and
    as the nnx State the optimizer sees."""
    cfg = small_config("model.d_model=128", "model.mlp_dim=512", "model.num_heads=4",
                       "model.num_kv_heads=2")
    _, state = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(0)))
    return state


def named(tree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {[k.key for k in path if hasattr(k, "key")][-1]: np.asarray(x, np.float64)
            for path, x in flat}


def run_ours(cfg: OptimizerConfig, state, grads_seq):
    tx, _ = make_optimizer(cfg, total_steps=100)
    opt_state = tx.init(state)
    update = jax.jit(tx.update)
    for grads in grads_seq:
        updates, opt_state = update(grads, opt_state, state)
        state = optax.apply_updates(state, updates)
    return named(state)


def gradients(state, steps=STEPS):
    keys = jax.random.split(jax.random.key(1), steps)
    return [jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape) * 0.1, state)
            for k in keys]


def as_matrices(x, name):
    """(stacked, rows, cols) view of a parameter, per MATRICES."""
    batch, rows, cols = MATRICES[name]
    order = (*batch, *rows, *cols)
    shape = [x.shape[i] for i in order]
    prod = lambda axes: math.prod(x.shape[i] for i in axes)  # noqa: E731
    return x.transpose(order).reshape(prod(batch), prod(rows), prod(cols)), \
        lambda m: m.reshape(shape).transpose(np.argsort(order))


def constant(name, **settings):
    return OptimizerConfig(name=name, lr=LR, schedule="constant", warmup_steps=0,
                           weight_decay=WD, grad_clip=0.0, **settings)


def adamw_np(p, gs, decay, b1=0.9, b2=0.95, eps=1e-8, lr=LR):
    m = v = 0
    for t, g in enumerate(gs, 1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        p = p - lr * (u + WD * p * decay)
    return p


def check(ours, want, rtol=2e-5):
    assert ours.keys() == want.keys()
    for name in want:
        scale = np.abs(want[name]).max()
        np.testing.assert_allclose(ours[name], want[name], rtol=rtol, atol=rtol * scale,
                                   err_msg=name)


def test_lion_equals_its_definition():
    state = tiny_params()
    grads = gradients(state)
    ours = run_ours(constant("lion", b1=0.9, b2=0.99), state, grads)
    p0, gs = named(state), [named(g) for g in grads]
    want = {}
    for name, p in p0.items():
        m = 0
        for g in (g[name] for g in gs):
            u = np.sign(0.9 * m + 0.1 * g)
            m = 0.99 * m + 0.01 * g
            p = p - LR * (u + WD * p * (name in DECAYED))
        want[name] = p
    check(ours, want)


def test_sgd_equals_torch():
    torch = pytest.importorskip("torch")
    state = tiny_params()
    grads = gradients(state)
    cfg = OptimizerConfig(name="sgd", lr=LR, schedule="constant", warmup_steps=0,
                          weight_decay=0.0, grad_clip=0.0, momentum=0.9, nesterov=True)
    ours = run_ours(cfg, state, grads)
    p0, gs = named(state), [named(g) for g in grads]
    tp = {n: torch.nn.Parameter(torch.tensor(p)) for n, p in p0.items()}
    opt = torch.optim.SGD(tp.values(), lr=LR, momentum=0.9, nesterov=True)
    for g in gs:
        for n, t in tp.items():
            t.grad = torch.tensor(g[n])
        opt.step()
    check(ours, {n: t.detach().numpy() for n, t in tp.items()})


def adafactor_np(p, gs, name):
    """Shazeer and Stern's Adafactor (decay 1 - t^-0.8, update clipping 1, relative step)
    on each of the weight's matrices; second moments factored where rows and columns
    both have at least 128 entries."""
    P, back = as_matrices(p, name)
    factored = min(P.shape[1:]) >= 128
    vr, vc, v = 0, 0, 0
    for t, g in enumerate(gs, 1):
        beta = 1 - t ** -0.8
        G = as_matrices(g, name)[0]
        sq = G * G + 1e-30
        if factored:
            vr = beta * vr + (1 - beta) * sq.mean(2)
            vc = beta * vc + (1 - beta) * sq.mean(1)
            V = vr[:, :, None] / vr.mean(1)[:, None, None] * vc[:, None, :]
        else:
            V = v = beta * v + (1 - beta) * sq
        U = G / np.sqrt(V)
        rms = lambda x: np.sqrt((x * x).mean((1, 2), keepdims=True))  # noqa: E731
        U = U / np.maximum(1, rms(U))
        U = U * np.maximum(rms(P), 1e-3)
        P = P - LR * (U + WD * P * (name in DECAYED))
    return back(P), factored


def test_adafactor_equals_its_definition_factored_over_each_matrix():
    state = tiny_params()
    grads = gradients(state)
    ours = run_ours(constant("adafactor"), state, grads)
    p0, gs = named(state), [named(g) for g in grads]
    want, factored = {}, set()
    for name, p in p0.items():
        want[name], f = adafactor_np(p, [g[name] for g in gs], name)
        factored |= {name} if f else set()
    assert factored == {"wq", "wo", "w_gate", "w_up", "w_out", "embedding"}  # wk: 128 x 64
    check(ours, want, rtol=1e-4)


def newton_schulz_np(x, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / max(np.linalg.norm(x), 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def test_muon_equals_its_definition_with_adamw_for_the_rest():
    """Muon (torch.optim.Muon's definition, Newton-Schulz in fp32) on the blocks'
    matrices, AdamW on the embedding and the norms."""
    state = tiny_params()
    grads = gradients(state)
    ours = run_ours(constant("muon", muon_lr=0.02), state, grads)
    p0, gs = named(state), [named(g) for g in grads]
    want = {}
    for name, p in p0.items():
        seq = [g[name] for g in gs]
        if name not in DECAYED:
            want[name] = adamw_np(p, seq, decay=False)
            continue
        P, back = as_matrices(p, name)
        buf = 0
        for g in seq:
            G = as_matrices(g, name)[0]
            buf = 0.95 * buf + 0.05 * G
            blend = 0.05 * G + 0.95 * buf
            ortho = np.stack([newton_schulz_np(m) for m in blend])
            scale = math.sqrt(max(1, P.shape[2] / P.shape[1]))
            P = P - 0.02 * (scale * ortho + WD * P)
        want[name] = back(P)
    check(ours, want, rtol=2e-4)


def test_muon_direction_agrees_with_torch_muon_on_a_matrix():
    """One torch.optim.Muon step (its Newton-Schulz runs in bf16) on a 256 x 128 matrix
    agrees with ours to bf16 precision."""
    torch = pytest.importorskip("torch")
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no optim.Muon")
    rng = np.random.default_rng(0)
    w, g = rng.normal(size=(256, 128)).astype(np.float32), rng.normal(size=(256, 128))
    state = nnx.State({"blocks": {"w_up": nnx.Param(jnp.asarray(w.T)[None],
                                                    logical_axes=("layers", "embed", "mlp"))}})
    grads = jax.tree.map(lambda _: jnp.asarray(g.T, jnp.float32)[None], state)
    ours = run_ours(constant("muon", muon_lr=0.02, momentum=0.9), state, [grads])["w_up"][0].T
    t = torch.nn.Parameter(torch.tensor(w))  # torch's layout: (out, in)
    opt = torch.optim.Muon([t], lr=0.02, weight_decay=WD, momentum=0.9)
    t.grad = torch.tensor(g, dtype=torch.float32)
    opt.step()
    step_ours, step_torch = ours - w, t.detach().numpy() - w
    np.testing.assert_allclose(step_ours, step_torch, atol=0.02 * np.abs(step_torch).max())


def test_schedules_by_hand():
    def lr(schedule, steps, **kw):
        cfg = OptimizerConfig(lr=1.0, schedule=schedule, **kw)
        fn = make_schedule(cfg, total_steps=110)
        return [float(fn(s)) for s in steps]

    np.testing.assert_allclose(lr("linear", [0, 5, 10, 60, 110, 200], warmup_steps=10),
                               [0, 0.5, 1, 0.55, 0.1, 0.1], atol=1e-6)
    np.testing.assert_allclose(lr("constant", [0, 5, 10, 1000], warmup_steps=10),
                               [0, 0.5, 1, 1], atol=1e-6)
    # wsd: stable until 110 - 0.2 * 110 = 88, then linear to 0.1 at 110
    np.testing.assert_allclose(lr("wsd", [5, 10, 50, 88, 99, 110], warmup_steps=10),
                               [0.5, 1, 1, 1, 0.55, 0.1], atol=1e-6)
    np.testing.assert_allclose(lr("wsd", [0, 70, 90, 100], warmup_steps=0,
                                  decay_fraction=0.5, decay_steps=100, min_lr_ratio=0.0),
                               [1, 0.6, 0.2, 0], atol=1e-6)
    np.testing.assert_allclose(lr("rsqrt", [0, 8, 16, 64, 400], warmup_steps=16),
                               [0, 0.5, 1, 0.5, 0.2], atol=1e-6)


def train_on(cfg, shape, devices, steps=3):
    """(per-step losses, final parameters by name, the state) on a (data, fsdp, model) mesh."""
    mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "model"), shape)),
                              devices=devices[:math.prod(shape)])
    rules = sharding.make_rules("fsdp_tp", mesh.axis_names)
    state, shardings = build_state(cfg, mesh, rules)
    batch_sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None))
    batches = WindowBatches(cfg, batch_sharding, corpus=None)
    step = jit_train_step(shardings, {"inputs": batch_sharding, "targets": batch_sharding})
    losses = []
    for i in range(steps):
        state, metrics = step(state, batches.batch(i))
        losses.append(float(metrics["loss"]))
    return losses, named(state.params), state


@pytest.mark.parametrize("name,shape,layers", [("adafactor", (1, 4, 2), 2),
                                               ("muon", (2, 2, 2), 4)])
def test_state_is_sharded_like_the_parameters_and_training_matches_one_device(
        name, shape, layers, devices):
    """On a sharded mesh the factored moments and the momentum follow their weights'
    layout (a moment's reduced axis unsplit), and 3 steps equal one device's. Muon on 4
    layers over fsdp 2 x model 2 orthogonalises whole matrices per device (4 per weight
    over 4 ways); where the layers do not divide, the products run split, as XLA lays
    them out (the code path of one device)."""
    cfg = small_config(f"optimizer.name={name}", "optimizer.warmup_steps=1",
                       "model.d_model=128", "model.mlp_dim=128", f"model.num_layers={layers}")
    ref_losses, ref_params, _ = train_on(cfg, (1, 1, 1), devices)
    losses, params, state = train_on(cfg, shape, devices)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    check(params, ref_params, rtol=1e-4)
    if name == "adafactor":  # each moment as its weight, the averaged axes unsplit
        found = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
            x, AdafactorState)) if isinstance(x, AdafactorState)]
        flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
        factored = 0
        for (path, weight), moments in zip(flat, found[0].moments):
            name = [k.key for k in path if hasattr(k, "key")][-1]
            if moments.rows.ndim == 0:
                continue
            factored += 1
            _, rows, cols = MATRICES[name]
            spec = padded_spec(weight)
            assert padded_spec(moments.rows) == tuple(
                None if i in cols else a for i, a in enumerate(spec)), name
            assert padded_spec(moments.cols) == tuple(
                None if i in rows else a for i, a in enumerate(spec)), name
            assert any(a is not None for a in padded_spec(moments.rows)), name
        assert factored == 6  # wq, wo, w_gate, w_up, w_out, embedding (wk, wv: 128 x 64)
    else:  # every momentum and moment is laid out as a parameter of its shape
        layouts = {(x.shape, padded_spec(x)) for x in jax.tree.leaves(state.params)}
        arrays = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
        assert len(arrays) == 7 + 2 * 4  # muon: 7 block matrices; adamw: 2 x (embedding, 3 norms)
        assert {padded_spec(x) for x in arrays} >= {(None, "fsdp", "model")}  # w_up's
        assert all((x.shape, padded_spec(x)) in layouts for x in arrays)


@pytest.mark.parametrize("overrides,message", [
    (["optimizer.name=sgd", "optimizer.b2=0.9"],
     "optimizer.b2 is set but optimizer.name=sgd with optimizer.schedule=cosine does not use "
     "it (only optimizer.name=adamw, optimizer.name=lion, optimizer.name=muon do)"),
    (["optimizer.decay_fraction=0.1"], "optimizer.decay_fraction is set but"),
    (["optimizer.schedule=constant", "optimizer.min_lr_ratio=0"], "optimizer.min_lr_ratio is set"),
    (["optimizer.name=adamw", "optimizer.momentum=0.9"], "optimizer.momentum is set"),
    (["optimizer.name=sgd", "optimizer.nesterov=true"], "optimizer.nesterov=true needs"),
    (["optimizer.name=muon", "optimizer.ns_steps=0"], "optimizer.ns_steps must be at least 1"),
    (["optimizer.schedule=wsd", "optimizer.decay_fraction=1.5"], "optimizer.decay_fraction=1.5"),
    (["optimizer.name=rmsprop"], "optimizer.name"),
])
def test_bad_optimizer_settings_are_one_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")
                       .replace(")", r"\)").replace("=", "=")):
        small_config(*overrides)


@pytest.mark.once
def test_resuming_with_another_optimizer_is_one_line(tmp_path):
    common = ["--config", "configs/tiny.yaml", f"output_dir={tmp_path}", "train.steps=2",
              "checkpoint.every_steps=2", "model.num_layers=1", "train.batch_size=8",
              "train.seq_len=32", "eval.every_steps=0"]
    first = run_cli(*common, "optimizer.name=adafactor")
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli(*common[:3], "train.steps=4", *common[4:], "optimizer.name=lion")
    assert again.returncode == 2
    lines = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: checkpoint step 2 in {tmp_path}/checkpoints holds the state of "
                     "optimizer.name=adafactor, not lion: resume with optimizer.name=adafactor, "
                     f"or start a new output_dir from its weights (model.init_from={tmp_path}"
                     "/checkpoints/2)"]


def test_muon_spreads_stacked_matrices_over_the_largest_set_of_axes_that_divides():
    """Which of a weight's mesh axes Muon spreads its stacked matrices over (whole
    matrices per device): the largest set whose ways divide their number."""
    from types import SimpleNamespace

    from train.matrices import _spread_axes

    rules = {"layers": (), "experts": ("expert",), "embed": ("fsdp",), "mlp": ("model",)}

    def spread(mesh_shape, axes, n):
        constrain = SimpleNamespace(mesh=SimpleNamespace(shape=mesh_shape),
                                    mesh_axes=lambda name: rules[name])
        var = nnx.Param(jnp.zeros((1,) * len(axes)), logical_axes=axes)
        spread = _spread_axes(var, constrain, n)
        return None if spread is None else spread[0]

    w_up = ("layers", "embed", "mlp")
    assert spread({"fsdp": 2, "model": 2}, w_up, 4) == ("fsdp", "model")
    assert spread({"fsdp": 4, "model": 2}, w_up, 2) == ("model",)
    assert spread({"fsdp": 4, "model": 2}, w_up, 12) == ("fsdp",)
    assert spread({"fsdp": 16, "model": 1}, w_up, 32) == ("fsdp",)
    assert spread({"fsdp": 256, "model": 1}, w_up, 32) is None
    assert spread({"fsdp": 1, "model": 1}, w_up, 32) is None
    moe = ("layers", "experts", "embed", "mlp")  # 4 layers x 8 experts over 64 ways
    assert spread({"fsdp": 8, "expert": 8, "model": 1}, moe, 32) == ("expert",)
