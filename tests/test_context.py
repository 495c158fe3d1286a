"""Context parallelism: the load-balanced layout, all-gather and ring attention, and
training with the length split over `context` equal to the unsharded run."""

import functools
import importlib.util
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import sharding
from models.context import attend, balanced_order, ring_attend
from train.data.batches import to_global
from train.plan import plan
from train.state import init_state
from train.step import compute_grads, jit_train_step

from helpers import small_config

ONCE = pytest.mark.once
T, BLOCK = 256, 16  # each of 4 shards holds 64 queries: 4 blocks


def dense_reference(q_BTNH, k_BTKH, v_BTKH, pos_BT, seg_BT):
    """Plain softmax attention with the position/segment mask (independent of ours)."""
    B, T, N, H = q_BTNH.shape
    k = jnp.repeat(k_BTKH, N // k_BTKH.shape[2], axis=2)
    v = jnp.repeat(v_BTKH, N // k_BTKH.shape[2], axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k) / np.sqrt(H)
    keep = (pos_BT[:, None, :] <= pos_BT[:, :, None]) & (seg_BT[:, None, :] == seg_BT[:, :, None])
    s = jnp.where(keep[:, None], s, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), v)


def documents(B, T, seed):
    """Segment ids and positions of packed documents (positions restart per document)."""
    rng = np.random.default_rng(seed)
    seg = np.cumsum(rng.random((B, T)) < 0.02, axis=1).astype(np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        for t in range(1, T):
            pos[b, t] = 0 if seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
    return seg, pos


def attention_inputs(B, L, N, K, H, seed, masked):
    """q, k, v (B, L, N|K, H), an output cotangent, and segment ids and positions:
    packed documents, or one segment with positions 0..L-1."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, L, N, H))
    k = jax.random.normal(keys[1], (B, L, K, H))
    v = jax.random.normal(keys[2], (B, L, K, H))
    dout = jax.random.normal(keys[3], (B, L, N, H))
    seg, pos = documents(B, L, seed + 1) if masked else (
        np.zeros((B, L), np.int32), np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)))
    return q, k, v, dout, seg, pos


def test_balanced_order_is_a_permutation_and_balances_causal_work():
    for length, ways in [(16, 1), (16, 2), (64, 4), (96, 8)]:
        order = balanced_order(length, ways)
        assert sorted(order) == list(range(length))
        inverse = np.argsort(order)
        x = np.random.default_rng(0).random(length)
        np.testing.assert_array_equal(x[order][inverse], x)
        # unmasked (query, key) pairs per shard: query at original index i sees i + 1 keys
        work = (order + 1).reshape(ways, -1).sum(axis=1)
        assert len(set(work)) == 1, work
    # without the layout the last of 4 shards would do 7x the first's work
    plain = (np.arange(64) + 1).reshape(4, -1).sum(axis=1)
    assert plain[-1] > 6 * plain[0]


@pytest.mark.parametrize("masked", [pytest.param(False, marks=ONCE), True],
                         ids=["causal", "documents"])
def test_ring_and_all_gather_attention_equal_dense_in_values_and_gradients(devices, masked):
    mesh = jax.sharding.Mesh(np.array(devices[:4]), ("context",))
    B, N, K, H = 2, 4, 2, 8
    q, k, v, dout, seg, pos = attention_inputs(B, T, N, K, H, 0, masked)
    order = balanced_order(T, 4)
    inverse = np.argsort(order)

    def ref_loss(q, k, v):
        return jnp.sum(dense_reference(q, k, v, jnp.asarray(pos), jnp.asarray(seg)) * dout)

    ref, ref_grads = jax.value_and_grad(ref_loss, argnums=(0, 1, 2))(q, k, v)

    def ours(mode):
        def local(q, k, v, pos, seg, kpos, kseg):
            q5 = q.reshape(*q.shape[:2], K, N // K, H)
            o = (ring_attend(q5, k, v, pos, kpos, seg, kseg, "context", BLOCK) if mode == "ring"
                 else attend(q5, k, v, pos, kpos, seg, kseg, BLOCK))
            return o.reshape(q.shape)

        kv = P(None, "context") if mode == "ring" else P()
        fn = jax.shard_map(local, mesh=mesh, out_specs=P(None, "context"), check_vma=False,
                           in_specs=(P(None, "context"), kv, kv, P(None, "context"),
                                     P(None, "context"), kv, kv))

        def loss(q, k, v):  # in the balanced layout, as training lays it out
            lay = lambda x: x[:, order]  # noqa: E731
            out = fn(lay(q), lay(k), lay(v), lay(pos), lay(seg), lay(pos), lay(seg))
            return jnp.sum(out[:, inverse] * dout)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for mode in ("ring", "all_gather"):
        value, grads = ours(mode)
        np.testing.assert_allclose(value, ref, rtol=1e-5)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def compiled_step_hlo(cfg) -> str:
    """The optimized HLO text of cfg's train step, compiled for its mesh."""
    p = plan(cfg)
    batch = {k: jax.ShapeDtypeStruct(p.batch_shape, jnp.int32, sharding=p.batch_sharding)
             for k in ("inputs", "targets", "positions")}
    return jit_train_step(p.shardings, {k: p.batch_sharding for k in batch}).lower(
        p.abstract_state(), batch).compile().as_text()


def test_the_ring_step_holds_no_array_of_the_whole_sequences_keys(devices):
    """Compiled: every (B, S, K, H) key/value array in the ring's program is one
    shard's block (S = T / 4), never the whole length."""
    cfg = small_config("mesh.fsdp=2", "mesh.context=4", "sharding.rules=fsdp_cp",
                       f"train.seq_len={T}", "model.max_seq_len=256",
                       "model.context_attention=ring", f"model.attention_block={BLOCK}")
    hlo = compiled_step_hlo(cfg)
    K, H = cfg.model.kv_heads, cfg.model.head_size
    whole = [f"[{b},{T},{K},{H}]" for b in (1, 2, 4, 8)]
    assert not any(w in hlo for w in whole), [w for w in whole if w in hlo]
    assert f",{T // 4},{K},{H}]" in hlo  # the blocks are there
    assert "collective-permute" in hlo
    # the embedding is looked up in the table's own layout (D over fsdp x context): its
    # backward pass scatter-adds into the table's shard, never a (V, D / fsdp) gradient
    # gathered over context (then summed there)
    V = cfg.model.vocab_size
    scattered = set(re.findall(rf"= f32\[{V},(\d+)\]\S* scatter\(", hlo))
    assert scattered == {str(cfg.model.d_model // 8)}, scattered


def matmul_flops(jaxpr) -> int:
    """2 x the multiply-adds of every dot_general in a jaxpr, loops counted as many
    times as they run (XLA's cost analysis counts a loop body once)."""
    total = 0
    for e in jaxpr.eqns:
        if e.primitive.name == "dot_general":
            (contract, _), _ = e.params["dimension_numbers"]
            size = np.prod([e.invars[0].aval.shape[d] for d in contract])
            total += 2 * int(np.prod(e.outvars[0].aval.shape)) * int(size)
        times = e.params.get("length", 1) if e.primitive.name == "scan" else 1
        for v in e.params.values():
            for inner in (v if isinstance(v, (tuple, list)) else (v,)):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    total += times * matmul_flops(inner)
    return total


def test_the_ring_skips_the_quarters_of_a_visiting_block_that_are_masked(devices):
    """Forward and backward, a ring over 4 shards computes 1 + 3 / 2 blocks' worth of
    query-key products per shard (its own block, half of each visiting one), against
    all_gather's 4: 0.625 of the work (1.0 without the skip)."""
    mesh = jax.sharding.Mesh(np.array(devices[:4]), ("context",))
    B, N, K, H = 1, 4, 2, 8
    x = jnp.zeros((B, T, N, H))
    kv, ids = jnp.zeros((B, T, K, H)), jnp.zeros((B, T), jnp.int32)

    def flops(mode):
        def local(q, k, v, pos, seg):
            q5 = q.reshape(*q.shape[:2], K, N // K, H)
            if mode == "ring":
                o = ring_attend(q5, k, v, pos, pos, seg, seg, "context", BLOCK)
            else:
                kk, vv, kpos, kseg = (jax.lax.all_gather(a, "context", axis=1, tiled=True)
                                      for a in (k, v, pos, seg))
                o = attend(q5, kk, vv, pos, kpos, seg, kseg, BLOCK)
            return o.reshape(q.shape)

        fn = jax.shard_map(local, mesh=mesh, in_specs=P(None, "context"),
                           out_specs=P(None, "context"), check_vma=False)
        fwd = matmul_flops(jax.make_jaxpr(fn)(x, kv, kv, ids, ids).jaxpr)
        grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, ids, ids)), argnums=(0, 1, 2))
        return fwd, matmul_flops(jax.make_jaxpr(grad)(x, kv, kv).jaxpr)

    (ring_fwd, ring_all), (gather_fwd, gather_all) = flops("ring"), flops("all_gather")
    assert ring_fwd == pytest.approx(0.625 * gather_fwd, rel=0.02), (ring_fwd, gather_fwd)
    assert ring_all == pytest.approx(0.625 * gather_all, rel=0.02), (ring_all, gather_all)


def ppermuted_dtypes(jaxpr) -> set[str]:
    """The dtypes of every array a jaxpr (loops and calls included) ppermutes."""
    out = set()
    for e in jaxpr.eqns:
        if e.primitive.name == "ppermute":
            out |= {str(v.aval.dtype) for v in e.invars}
        for v in e.params.values():
            for inner in (v if isinstance(v, (tuple, list)) else (v,)):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    out |= ppermuted_dtypes(inner)
    return out


def test_the_ring_sends_bf16_gradients_of_bf16_keys(devices):
    """A bf16 model's ring sends its blocks and their travelling gradients in bf16 (half
    the bytes of fp32 gradients, as an all_gather's reduce-scatter sends them), and its
    gradients stay within bf16 rounding of fp32 dense attention's."""
    mesh = jax.sharding.Mesh(np.array(devices[:4]), ("context",))
    B, N, K, H = 1, 4, 2, 8
    q, k, v, dout, seg, pos = attention_inputs(B, T, N, K, H, 3, True)
    order = balanced_order(T, 4)
    lay = lambda x: jnp.asarray(x)[:, order]  # noqa: E731

    def local(q, k, v, pos, seg):
        q5 = q.reshape(*q.shape[:2], K, N // K, H)
        return ring_attend(q5, k, v, pos, pos, seg, seg, "context", BLOCK).reshape(q.shape)

    fn = jax.shard_map(local, mesh=mesh, in_specs=P(None, "context"),
                       out_specs=P(None, "context"), check_vma=False)

    def loss(q, k, v):
        out = fn(q, k, v, lay(pos), lay(seg)).astype(jnp.float32)
        return jnp.sum(out[:, np.argsort(order)] * dout)

    bf16 = [lay(x).astype(jnp.bfloat16) for x in (q, k, v)]
    grad = jax.grad(loss, argnums=(0, 1, 2))
    assert ppermuted_dtypes(jax.make_jaxpr(grad)(*bf16).jaxpr) == {"bfloat16", "int32"}
    ref_grads = jax.grad(lambda q, k, v: jnp.sum(dense_reference(
        q, k, v, jnp.asarray(pos), jnp.asarray(seg)) * dout), argnums=(0, 1, 2))(q, k, v)
    inverse = np.argsort(order)
    for g, r in zip(jax.jit(grad)(*bf16), ref_grads):
        g = np.asarray(g.astype(jnp.float32))[:, inverse]
        np.testing.assert_allclose(g, r, atol=0.015 * np.abs(r).max())


def batches_for(cfg, p, masked):
    """Three global batches laid out for plan `p` (the load-balanced order when the
    length is split), the same rows whatever the mesh. Unmasked batches are one
    segment with positions 0..T-1, so both kinds run through one compiled program."""
    B, L = cfg.train.batch_size, cfg.train.seq_len
    out = []
    for step in range(3):
        rng = np.random.default_rng(step)
        tokens = rng.integers(0, cfg.model.vocab_size, (B, L + 1)).astype(np.int32)
        seg, pos = documents(B, L, step + 10) if masked else (
            np.zeros((B, L), np.int32), np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)))
        rows = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
                "positions": pos, "weights": np.ones((B, L), np.float32)}
        out.append(to_global(rows, cfg, p.batch_sharding))
    return out


def test_the_splash_mask_knows_the_balanced_layout():
    """The kernel's in-kernel index arithmetic equals balanced_order (up to 128k tokens,
    16 ways), and the mask equals the causal mask permuted into the layout."""
    from models.splash import BalancedCausalMask, original_index
    for length, ways in [(1024, 4), (4096, 2), (131072, 16)]:
        x = np.arange(length, dtype=np.int32)
        np.testing.assert_array_equal(original_index(x, length // (2 * ways), ways),
                                      balanced_order(length, ways))
    mask = BalancedCausalMask(1024, 4)
    order = balanced_order(1024, 4)
    want = order[None, :] <= order[:, None]
    np.testing.assert_array_equal(mask[:, :], want)
    np.testing.assert_array_equal(mask.mask_function(order[:, None], np.arange(1024)[None]), want)


@pytest.mark.parametrize("masked", [pytest.param(False, marks=ONCE), True],
                         ids=["causal", "documents"])
@pytest.mark.parametrize("mode", ["all_gather", "ring"])
def test_splash_context_attention_equals_dense(devices, masked, mode):
    """The splash kernel (interpreted) on 4 context shards: all_gather's mask tables
    split with the queries, the ring's products each a kernel call and their gradients
    the kernel's backward pass against the final output and log-sum-exp. Values and
    gradients of dense attention, grouped kv heads."""
    from models.context import context_attention
    from models.layers import per_shard
    mesh = jax.sharding.Mesh(np.array(devices[:4]), ("context",))
    constrain = sharding.ActivationSharding.create(mesh, {"act_length": ("context",), "batch": (),
                                                          "act_heads": (), "act_kv_heads": ()})
    B, L, N, K, H = 1, 1024, 4, 2, 64
    q, k, v, dout, seg, pos = attention_inputs(B, L, N, K, H, 2, masked)
    order, inverse = balanced_order(L, 4), np.argsort(balanced_order(L, 4))

    def ref_loss(q, k, v):
        return jnp.sum(dense_reference(q, k, v, jnp.asarray(pos), jnp.asarray(seg)) * dout)

    def loss(q, k, v):
        lay = lambda x: jnp.asarray(x)[:, order]  # noqa: E731
        out = context_attention(mode, lay(q), lay(k), lay(v), lay(pos),
                                lay(seg) if masked else None, 128,
                                functools.partial(per_shard, constrain), ("context",), 4,
                                "splash", interpret=True)
        return jnp.sum(out[:, inverse] * dout)

    ref, ref_grads = jax.value_and_grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def train_three_steps(cfg, steps=True):
    """{masked: (first loss, its gradients, three steps' losses)}, one compile each of
    the gradient and the train step for both kinds of batch (`steps=False`: the
    gradients only, no losses, one compile)."""
    p = plan(cfg, devices=jax.devices()[:int(np.prod(list(cfg.mesh.axes().values())))])
    grads_fn, step = None, None
    out = {}
    for masked in (False, True):
        state = init_state(p.init, p.shardings, cfg.train.seed)
        batches = batches_for(cfg, p, masked)
        grads_fn = grads_fn or jax.jit(compute_grads)
        step = step or (steps and jit_train_step(p.shardings,
                                                 {k: p.batch_sharding for k in batches[0]}))
        terms, grads = grads_fn(state, batches[0])
        losses = []
        for batch in batches if steps else ():
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        out[masked] = float(terms["loss"]), jax.device_get(jax.tree.leaves(grads)), losses
    return out


def assert_trains_alike(got, want):
    """train_three_steps' results equal within fp32 tolerance: first loss, every
    gradient, three steps' losses, for causal batches and packed documents."""
    for masked in (False, True):
        (loss, grads, losses), (ref_loss, ref_grads, ref_losses) = got[masked], want[masked]
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=f"masked={masked}")
        scale = max(np.abs(r).max() for r in ref_grads)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6 * scale)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


BASE = (f"train.seq_len={T}", "model.max_seq_len=256", f"model.attention_block={BLOCK}",
        "train.batch_size=4", "optimizer.warmup_steps=1")


@functools.lru_cache(maxsize=None)
def reference_run():
    return train_three_steps(small_config(*BASE, "mesh.fsdp=1"))


MESHES = {"context4": ("mesh.fsdp=1", "mesh.context=4", "sharding.rules=fsdp_cp"),
          "fsdp2_context4": ("mesh.fsdp=2", "mesh.context=4", "sharding.rules=fsdp_cp"),
          "context2_model2_fsdp2": ("mesh.fsdp=2", "mesh.context=2", "mesh.model=2",
                                    "sharding.rules=fsdp_tp_cp")}
# Each mesh once, the two modes taking turns; the ring under tensor parallelism is the
# splash training test's below. fsdp 2 x context 4 ring on both Pythons.
CASES = [pytest.param(mesh, mode, id=f"{mesh}-{mode}",
                      marks=() if (mesh, mode) == ("fsdp2_context4", "ring") else ONCE)
         for mesh, mode in (("context4", "all_gather"), ("fsdp2_context4", "ring"),
                            ("context2_model2_fsdp2", "all_gather"))]


@pytest.mark.parametrize("mesh,mode", CASES)
def test_context_parallel_training_equals_the_unsharded_run(devices, mesh, mode):
    """Causal batches and packed documents (document masking) alike."""
    cfg = small_config(*BASE, *MESHES[mesh], f"model.context_attention={mode}")
    got, want = train_three_steps(cfg), reference_run()
    assert_trains_alike(got, want)


def ring_permute_bytes(cfg) -> float:
    """Bytes per step of the compiled train step's collective-permutes over `context`."""
    from train.preflight.hlo_collectives import collectives
    items, _ = collectives(compiled_step_hlo(cfg), dict(plan(cfg).mesh.shape))
    return sum(c.bytes_per_step for c in items
               if c.op == "collective-permute" and c.axes == "context")


def test_remat_save_ring_trains_alike_and_skips_the_recomputed_ring(devices):
    """model.remat=save_ring: the ring's output and log-sum-exp are kept across remat,
    so the backward pass does not send the blocks round the ring again for the
    recomputed forward. It trains as the unsharded run does, and its compiled step moves
    over `context` what the step without remat moves, less than full remat's."""
    ring = (*BASE, *MESHES["fsdp2_context4"], "model.context_attention=ring")
    cfg = small_config(*ring, "model.remat=save_ring")
    assert_trains_alike(train_three_steps(cfg), reference_run())
    sent = {remat: ring_permute_bytes(small_config(*ring, f"model.remat={remat}"))
            for remat in ("none", "full", "save_ring")}
    assert sent["save_ring"] == sent["none"] < sent["full"], sent


SPLASH_LONG = ("train.seq_len=512", "model.max_seq_len=512", "model.attention_block=128",
               "train.batch_size=4", "optimizer.warmup_steps=1")


@functools.lru_cache(maxsize=None)
def splash_reference_run():
    return train_three_steps(small_config(*SPLASH_LONG, "mesh.fsdp=1"))


@ONCE
def test_splash_context_training_equals_the_unsharded_run(devices):
    """The splash kernel (interpreted) inside the shards of the ring, heads split over
    `model` too: causal batches and packed documents train as on one device with blocked
    attention (the splash kernel under all_gather: test_splash_context_attention_equals_dense
    and the TPU pre-flight below)."""
    want = splash_reference_run()
    got = train_three_steps(small_config(*SPLASH_LONG, *MESHES["context2_model2_fsdp2"],
                                         "model.attention=splash",
                                         "model.context_attention=ring"))
    assert_trains_alike(got, want)


def test_context_parameters_are_fsdp_sharded_over_fsdp_and_context(devices):
    cfg = small_config(*BASE, "mesh.fsdp=2", "mesh.context=4", "sharding.rules=fsdp_cp")
    p = plan(cfg, devices=devices)
    specs = {tuple(s.spec) for s in jax.tree.leaves(p.shardings.params)}
    assert any(("fsdp", "context") in spec for spec in specs), specs
    assert sharding.batch_ways(p.mesh, p.rules) == 2


CLI_RUN = ["--config", "configs/tiny.yaml", "train.steps=6", "train.log_every=1",
           "train.seq_len=64", "train.batch_size=8", "model.num_layers=2", "model.d_model=64",
           "model.mlp_dim=128", "model.attention_block=8", "checkpoint.every_steps=4",
           "checkpoint.async_save=false", "eval.every_steps=3", "eval.batches=1",
           "data.max_bytes=2000000", "optimizer.decay_steps=6", "compile_cache_dir=null"]


@ONCE
def test_a_context_parallel_checkpoint_continues_on_one_context_way_and_generates(tmp_path):
    """Trained with the length split 4 ways (ring), evaluated along the way; the step-4
    checkpoint restored with context=1 continues with the same losses, and the run
    generates on the default mesh."""
    from helpers import run_cli
    from runs import losses
    cp = tmp_path / "cp"
    r = run_cli(*CLI_RUN, f"output_dir={cp}", "mesh.fsdp=2", "mesh.context=4",
                "sharding.rules=fsdp_cp", "model.context_attention=ring")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "val_loss" in (cp / "metrics.jsonl").read_text()
    one = tmp_path / "one"
    r = run_cli(*CLI_RUN, f"output_dir={one}", "mesh.fsdp=-1",
                f"checkpoint.resume_from={cp / 'checkpoints'}/4")
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = losses(one), losses(cp)
    assert sorted(got) == [5, 6]
    for step in (5, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-4), step
    r = run_cli("--checkpoint", str(cp), "--prompt", "def f(", "--max-new-tokens", "8",
                module="train.generate")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-3000:]


@pytest.mark.parametrize("overrides,message", [
    (("mesh.context=4", "sharding.rules=fsdp_cp", "train.seq_len=36"),
     "error: train.seq_len=36 does not divide by 2 x the 4 context ways"),
    (("mesh.context=4", "sharding.rules=fsdp_cp", "model.context_attention=ring",
      "model.attention=cudnn"), "error: model.context_attention=ring needs each block's"),
    (("mesh.context=4", "sharding.rules=fsdp"), "error: mesh.context=4 but sharding.rules "
     "'fsdp' splits nothing over it; use the fsdp_cp or fsdp_tp_cp rules"),
    (("mesh.fsdp=1", "mesh.context=4", "sharding.rules=fsdp_cp"),
     "error: mesh (data=1, fsdp=1, context=4, model=1) needs 4 devices but 8 exist"),
    (("mesh.context=4", "sharding.rules=fsdp_cp", "model.attention=splash",
      "train.seq_len=128"), "error: model.attention=splash needs chunks of a multiple of 128"),
], ids=["length", "ring-cudnn", "rules", "devices", "splash-chunk"])
@ONCE
def test_bad_context_settings_fail_with_one_line_and_exit_2(overrides, message):
    from helpers import run_cli
    r = run_cli("--config", "configs/tiny.yaml", "train.steps=1", "compile_cache_dir=null",
                *overrides, devices=8)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(message), r.stderr[-2000:]


@ONCE
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_tpu_preflight_of_the_ring_sends_blocks_asynchronously(tmp_path):
    """Compiled for a v5e 2x2 slice (libtpu on this CPU): the ring's block transfers are
    asynchronous collective-permute start/done pairs, the overlap CPU timing cannot show."""
    from helpers import run_cli
    hlo, out = tmp_path / "step.hlo", tmp_path / "report.json"
    r = run_cli("--config", "configs/tiny.yaml", "data.source=synthetic", "compile_cache_dir=null",
                "--topology", "v5e:2x2", "mesh.fsdp=1", "mesh.context=4",
                "sharding.rules=fsdp_cp", "model.context_attention=ring", f"train.seq_len={T}",
                "train.batch_size=4", "--hlo", str(hlo), "--json", str(out),
                module="train.compile")
    assert r.returncode == 0, r.stderr[-3000:]
    text = hlo.read_text()
    assert "collective-permute-start" in text and "collective-permute-done" in text
    report = json.loads(out.read_text())
    assert any(c["op"] == "collective-permute" and c["axes"] == "context"
               for c in report["collectives"]), report["collectives"]


@ONCE
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]')")
@pytest.mark.parametrize("mode", ["all_gather", "ring"])
def test_tpu_preflight_runs_the_splash_kernel_inside_the_shards(tmp_path, mode):
    """Compiled for a v5e 2x2 slice, attention inside a shard is the splash kernel
    (model.attention=auto), forward and both backward kernels."""
    from helpers import run_cli
    hlo = tmp_path / "step.hlo"
    r = run_cli("--config", "configs/tiny.yaml", "data.source=synthetic", "compile_cache_dir=null",
                "--topology", "v5e:2x2", "mesh.fsdp=1", "mesh.context=4",
                "sharding.rules=fsdp_cp", "train.seq_len=1024", "model.max_seq_len=1024",
                f"model.context_attention={mode}", "train.batch_size=4", "--hlo", str(hlo),
                module="train.compile")
    assert r.returncode == 0, r.stderr[-3000:]
    text = hlo.read_text()
    for kernel in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):
        assert kernel in text, kernel


@ONCE
@pytest.mark.parametrize("family", [
    ("model.moe.num_experts=4", "model.moe.experts_per_token=2"),
    ("model.style=gpt2", "model.num_kv_heads=8")], ids=["moe", "gpt2"])
def test_moe_layers_and_learned_positions_train_on_split_sequences(devices, family):
    """A mixture of experts (routing per token on each shard) and GPT-2's learned
    position table (looked up at the permuted positions) under fsdp 2 x context 4 ring:
    the loss and every gradient (the train step itself is the matrix's above)."""
    ref = train_three_steps(small_config(*BASE, *family, "mesh.fsdp=1"), steps=False)
    got = train_three_steps(small_config(*BASE, *family, "mesh.fsdp=2", "mesh.context=4",
                                         "sharding.rules=fsdp_cp",
                                         "model.context_attention=ring"), steps=False)
    assert_trains_alike(got, ref)
