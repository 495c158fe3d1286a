"""DP-SGD (privacy.dp_sgd): per-sequence clipping against a plain loop, noise of the
stated std, plain SGD as its limit, sharded == one device, Poisson sampling, the
accountant against dp_accounting itself, a killed run resuming bit for bit, bad input."""

import json
import math
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from flax import nnx
from scipy import stats

import sharding
from models import layers
from train.config import ConfigError, validate
from train.data.batches import to_global
from train.data.poisson import PoissonRows, sample
from train.errors import DataError
from train.plan import plan
from train.privacy import Privacy, check_resume, default_expected_batch, epsilon_after, noise_for
from train.state import combine, init_state, split_trainable
from train.step import compute_grads, train_step

from helpers import run_cli, small_config
from runs import RUN, logged_steps, start, wait_for

DP = ["data.path=unused", "model.vocab_size=256", "privacy.dp_sgd=true"]


def dp_state(cfg, devices, mesh_shape=None, rules="fsdp_tp", **privacy):
    """The train state of `cfg` on a mesh (default data 2 x fsdp 2 x model 2) and its
    plan, DP-SGD resolved as given."""
    mesh_shape = mesh_shape or {"data": 2, "fsdp": 2, "model": 2}
    mesh = sharding.make_mesh(mesh_shape, devices=devices[:math.prod(mesh_shape.values())])
    settings = dict(num_sequences=1000, expected_batch=5.0, noise_multiplier=0.0,
                    clip_norm=1.0, delta=1e-5)
    settings.update(privacy)
    rules = sharding.make_rules(rules, mesh.axis_names)
    p = plan(cfg, mesh=mesh, rules=rules, privacy=Privacy(**settings))
    return init_state(p.init, p.shardings, cfg.train.seed), p


def batch_of(p, seed=0, empty_rows=(), full=False):
    """A batch of the plan's shape and layout: random tokens, each row's weights a
    random prefix (all of them with `full`), the rows in `empty_rows` padding."""
    t = p.cfg.train
    rng = np.random.default_rng(seed)
    shape = (t.batch_size, t.seq_len)
    rows = {"inputs": rng.integers(0, p.cfg.model.vocab_size, shape, dtype=np.int32),
            "targets": rng.integers(0, p.cfg.model.vocab_size, shape, dtype=np.int32),
            "positions": np.tile(np.arange(t.seq_len, dtype=np.int32), (t.batch_size, 1)),
            "segment_ids": np.ones(shape, np.int32)}
    lengths = np.full(t.batch_size, t.seq_len) if full else \
        rng.integers(3, t.seq_len + 1, t.batch_size)
    rows["weights"] = (np.arange(t.seq_len)[None] < lengths[:, None]).astype(np.float32)
    rows["weights"][list(empty_rows)] = 0
    return to_global(rows, p.cfg, p.batch_sharding)


def per_sequence_grads(state, batch, lora=False):
    """Each row's gradient of its own mean loss (of the adapters with LoRA), one at a
    time, outside any mesh."""
    model = nnx.merge(state.graphdef, jax.device_get(state.params))
    graphdef, params = nnx.split(model)
    trained, frozen = split_trainable(params, lora)
    host = {k: np.asarray(v).reshape(-1, v.shape[-1]) for k, v in batch.items()}

    def loss(trained, row):
        m = nnx.merge(graphdef, combine(trained, frozen))
        m.constrain = layers.no_constraint
        lse, target, _ = m.logsumexp_and_target(row["inputs"][None], row["targets"][None])
        w = row["weights"][None]
        return jnp.sum((lse - target) * w) / jnp.maximum(jnp.sum(w), 1.0)

    grad = jax.jit(jax.grad(loss))
    return [grad(trained, {k: v[i] for k, v in host.items()})
            for i in range(len(host["inputs"]))]


@pytest.mark.parametrize("lora", [False, True])
def test_clipped_sum_equals_a_loop_over_sequences(devices, lora):
    """Two microbatches of 4 on fsdp x model, one padding row: each sequence's gradient
    clipped to C (some clipped, not all), summed, / the expected batch. With LoRA, of
    the adapters alone (B initialised away from 0, so every adapter has a gradient)."""
    clip = 2.0 if lora else 4.0
    cfg = small_config(*DP, "train.microbatches=2", "privacy.noise_multiplier=0",
                       f"privacy.clip_norm={clip}", *(["model.lora.rank=4"] if lora else []))
    state, p = dp_state(cfg, devices, clip_norm=clip, expected_batch=5.0)
    if lora:
        adapters, base = split_trainable(state.params, True)
        state = state.replace(params=combine(jax.tree.map(lambda a: a + 0.01, adapters), base))
    batch = batch_of(p, empty_rows=[5])
    terms, grads = jax.jit(compute_grads)(state, batch)

    singles = per_sequence_grads(state, batch, lora)
    assert len(jax.tree.leaves(singles[0])) == len(jax.tree.leaves(grads))
    norms = [float(optax_norm(g)) for g in singles]
    weights = np.asarray(batch["weights"]).reshape(8, -1).sum(1)
    present = weights > 0
    assert 0 < sum(n > clip for n, p in zip(norms, present) if p) < present.sum()
    expected = jax.tree.map(lambda *g: sum(
        x * min(1.0, clip / n) for x, n, p in zip(g, norms, present) if p) / 5.0, *singles)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * float(np.abs(b).max()))
    assert float(terms["sequences"]) == 7
    assert float(terms["clipped_fraction"]) == pytest.approx(
        sum(n > clip for n, p in zip(norms, present) if p) / 7)


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_without_noise_and_clipping_it_is_sgd_on_the_mean_gradient(devices):
    """Every row full (so the token mean is the mean of the rows' means), a clip norm
    no gradient reaches, no noise, the expected batch equal to the rows: one DP-SGD step
    equals one plain step with the same SGD (the plain path, no per-sequence gradients)."""
    opt = ["optimizer.name=sgd", "optimizer.lr=0.5", "optimizer.warmup_steps=0",
           "optimizer.schedule=constant", "optimizer.grad_clip=0", "optimizer.weight_decay=0"]
    plain_cfg = small_config(*opt)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2}, devices=devices)
    plain_plan = plan(plain_cfg, mesh=mesh)
    plain = init_state(plain_plan.init, plain_plan.shardings, plain_cfg.train.seed)
    cfg = small_config(*opt, *DP, "privacy.noise_multiplier=0", "privacy.clip_norm=1e6")
    private, p = dp_state(cfg, devices, clip_norm=1e6, expected_batch=8.0)
    batch = {k: v for k, v in batch_of(p, full=True).items()
             if k in ("inputs", "targets", "weights")}
    after_plain, m_plain = jax.jit(train_step)(plain, batch)
    after_private, m_private = jax.jit(train_step)(private, batch)
    assert float(m_private["clipped_fraction"]) == 0
    np.testing.assert_allclose(m_private["loss"], m_plain["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(after_private.params), jax.tree.leaves(after_plain.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_noise_has_the_stated_std_and_is_drawn_by_step(devices):
    """A batch of padding only: the gradient is the noise / the expected batch, every
    element N(0, (sigma C / E)^2): the sample std within 5 standard errors."""
    cfg = small_config(*DP, "privacy.noise_multiplier=2.0", "privacy.clip_norm=0.5")
    state, p = dp_state(cfg, devices, noise_multiplier=2.0, clip_norm=0.5,
                           expected_batch=4.0)
    batch = batch_of(p, empty_rows=range(8))
    grads_fn = jax.jit(compute_grads)
    terms, grads = grads_fn(state, batch)
    x = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]).astype(np.float64)
    n, std = x.size, 2.0 * 0.5 / 4.0
    assert n > 50_000 and float(terms["sequences"]) == 0
    assert abs(x.mean()) < 5 * std / math.sqrt(n)
    assert abs(x.std() / std - 1) < 5 / math.sqrt(2 * n)
    assert stats.kstest(x[:20_000] / std, "norm").pvalue > 1e-3
    _, again = grads_fn(state, batch)  # the same step: the same noise
    _, later = grads_fn(state.replace(step=state.step + 1), batch)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(grads)):
        np.testing.assert_array_equal(a, b)
    y = np.concatenate([np.ravel(g) for g in jax.tree.leaves(later)])
    assert abs(np.corrcoef(x, y)[0, 1]) < 5 / math.sqrt(n)


@pytest.mark.parametrize("mesh_shape,rules", [
    ({"data": 2, "fsdp": 2, "model": 2}, "fsdp_tp"),
    ({"data": 4, "fsdp": 2}, "dp"),
    ({"data": 2, "fsdp": 2, "context": 2}, "fsdp_cp"),
])
def test_sharded_dp_sgd_equals_one_device(devices, mesh_shape, rules):
    """Two steps with noise and clipping, microbatches of 8: a mesh of 8 (sequences split
    over data, data x fsdp under the dp rules; each sequence's length over context, ring
    attention) against one device."""
    cfg = small_config(*DP, "train.batch_size=16", "train.microbatches=2",
                       "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.5",
                       "optimizer.warmup_steps=0", "model.context_attention=ring",
                       f"sharding.rules={rules}",
                       *(f"mesh.{a}={mesh_shape.get(a, 1)}" for a in ("data", "fsdp",
                                                                      "context", "model")))
    settings = dict(noise_multiplier=1.0, clip_norm=0.5, expected_batch=6.0)
    results = []
    for shape in (mesh_shape, {"data": 1}):
        state, p = dp_state(cfg, devices, shape, rules, **settings)
        step = jax.jit(train_step)
        for i in range(2):
            state, metrics = step(state, batch_of(p, seed=i, empty_rows=[3, 12]))
        results.append((jax.device_get(state.params), float(metrics["loss"])))
    (sharded, loss_s), (single, loss_1) = results
    assert loss_s == pytest.approx(loss_1, rel=1e-5)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_poisson_sampling_is_seeded_unbiased_and_splits_over_hosts():
    n, q = 500, 0.02
    assert np.array_equal(sample(3, 7, n, q), sample(3, 7, n, q))
    assert not np.array_equal(sample(3, 7, n, q), sample(3, 8, n, q))
    steps = 2000
    counts = np.zeros(n)
    sizes = []
    for s in range(steps):
        picked = sample(0, s, n, q)
        assert len(set(picked.tolist())) == len(picked)
        counts[picked] += 1
        sizes.append(len(picked))
    # each sequence joins with probability q: totals and per-sequence counts binomial
    assert abs(np.mean(sizes) - n * q) < 5 * math.sqrt(n * q * (1 - q) / steps)
    assert abs(np.var(sizes) / (n * q * (1 - q)) - 1) < 0.15
    assert stats.chisquare(counts).pvalue > 1e-3

    sequences = [{"inputs": np.full(4, i, np.int32), "weights": np.ones(4, np.float32)}
                 for i in range(n)]
    whole = PoissonRows(sequences, 24, range(0, 24), 0, q)(5)
    halves = [PoissonRows(sequences, 24, rows, 0, q)(5) for rows in (range(0, 12),
                                                                     range(12, 24))]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
    k = len(sample(0, 5, n, q))
    assert whole["weights"][:k].all() and not whole["weights"][k:].any()
    np.testing.assert_array_equal(whole["inputs"][:k, 0], sample(0, 5, n, q))
    with pytest.raises(DataError, match="more than train.batch_size=2 rows"):
        PoissonRows(sequences, 2, range(0, 2), 0, 0.5)(0)


def test_the_accountant_is_dp_accountings_and_a_target_is_met_within_one_percent():
    q, steps, delta = 0.01, 400, 1e-5
    direct = rdp.RdpAccountant()
    direct.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(1.1)), steps)
    assert epsilon_after(steps, 1.1, q, delta) == pytest.approx(direct.get_epsilon(delta),
                                                                rel=1e-12)
    run = Privacy(num_sequences=1000, expected_batch=10.0, noise_multiplier=1.1,
                  clip_norm=1.0, delta=delta)  # what a run logs per row
    assert run.epsilon(steps) == pytest.approx(direct.get_epsilon(delta), rel=1e-12)
    for target in (1.0, 8.0):
        sigma = noise_for(target, steps, q, delta, "this run")
        spent = epsilon_after(steps, sigma, q, delta)
        assert spent <= target * (1 + 1e-9) and spent == pytest.approx(target, rel=0.01)
    with pytest.raises(ConfigError, match="privacy.epsilon=0.001 is unreachable"):
        noise_for(0.001, steps, q, delta, "this run")
    assert epsilon_after(steps, 0.0, q, delta) == math.inf
    e = default_expected_batch(64, 10_000)
    assert stats.binom.sf(64, 10_000, e / 10_000) <= 1e-6 < stats.binom.sf(
        64, 10_000, (e + 0.5) / 10_000)


@pytest.mark.parametrize("overrides,message", [
    ([*DP[1:], "privacy.epsilon=1"], "privacy.dp_sgd=true samples the sequences of a prepared"),
    ([*DP], "needs exactly one of privacy.noise_multiplier"),
    ([*DP, "privacy.epsilon=1", "privacy.noise_multiplier=1"], "needs exactly one of"),
    ([*DP, "privacy.epsilon=1", "privacy.clip_norm=0"], "privacy.clip_norm=0.0 must be > 0"),
    ([*DP, "privacy.epsilon=-1"], "privacy.epsilon=-1.0 must be > 0"),
    ([*DP, "privacy.epsilon=1", "privacy.delta=1"], "privacy.delta=1.0 must be in"),
    (["privacy.clip_norm=1"], "privacy.clip_norm is set but privacy.dp_sgd is false"),
    ([*DP, "privacy.epsilon=1", "train.objective=dpo"], "needs train.objective=lm"),
    ([*DP, "privacy.epsilon=1", "model.moe.num_experts=4"], "cannot train a mixture of experts"),
    ([*DP, "privacy.epsilon=1", "privacy.expected_batch_size=9"],
     "exceeds train.batch_size=8"),
    ([*DP, "privacy.noise_multiplier=1", "optimizer.momentum=0.9"],
     "optimizer.momentum is set but optimizer.name=adamw"),
])
def test_bad_settings_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(small_config(*overrides))


def test_a_resume_with_other_privacy_settings_is_refused():
    saved = Privacy(1000, 5.0, 1.2, 1.0, 1e-5)
    check_resume(saved.record(), Privacy(1000, 5.0, 1.2, 1.0, 1e-5), "step 4")
    with pytest.raises(ConfigError, match=r"noise_multiplier 1.2 -> 1.5.*noise_multiplier=1.2"):
        check_resume(saved.record(), Privacy(1000, 5.0, 1.5, 1.0, 1e-5), "step 4")
    with pytest.raises(ConfigError, match="trained with DP-SGD and this run is without it"):
        check_resume(saved.record(), None, "step 4")
    with pytest.raises(ConfigError, match="trained without DP-SGD and this run is with it"):
        check_resume(None, saved, "step 4")


def rows(out):
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.once
def test_a_killed_dp_run_resumes_bit_for_bit_and_logs_the_budget(tmp_path):
    """Prepared data read by a Grain worker process, on fsdp x model, a target epsilon:
    SIGKILL after step 6 and a rerun give the uninterrupted run's rows; each row's
    epsilon is dp_accounting's for its step; changed privacy settings on resume are
    refused."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"record {i}: " + "abc def ghi " * (i % 9)})
                              + "\n" for i in range(400)))
    args = [f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=8",
            "data.num_workers=1", "eval.every_steps=0", "privacy.dp_sgd=true", "privacy.epsilon=4",
            "privacy.expected_batch_size=4", "privacy.clip_norm=0.5"]
    ref_out = tmp_path / "reference"
    proc = run_cli(*RUN, *args, f"output_dir={ref_out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = rows(ref_out)
    assert sorted(reference) == list(range(1, 9))
    line = next(ln for ln in proc.stdout.splitlines() if "privacy: DP-SGD" in ln)
    n = int(line.split("each of ")[1].split(" sequences")[0].replace(",", ""))
    sigma = float(line.split("noise multiplier ")[1].split(";")[0])
    for step, row in reference.items():
        direct = rdp.RdpAccountant()
        direct.compose(dp_event.PoissonSampledDpEvent(
            4 / n, dp_event.GaussianDpEvent(sigma)), step)
        assert row["epsilon"] == pytest.approx(direct.get_epsilon(1e-5), rel=1e-3)
    assert reference[8]["epsilon"] == pytest.approx(4, rel=0.01)
    assert {reference[s]["sequences"] for s in reference} != {4.0}  # Poisson, not fixed

    out = tmp_path / "run"
    proc = start(out, *args)
    wait_for(lambda: logged_steps(out) >= 6, proc)  # checkpoint 4 exists
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc = run_cli(*RUN, *args, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = rows(out)
    for step, row in reference.items():
        for key in ("loss", "grad_norm", "epsilon", "sequences", "clipped_fraction"):
            assert resumed[step][key] == row[key], (step, key)

    proc = run_cli(*RUN, *args[:-1], "privacy.clip_norm=1", "train.steps=12",
                   f"output_dir={out}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the checkpoint at step 8 "
                                                           "was trained with other privacy")
