"""The vocabulary-chunked head + loss against the plain one (full logits, then
cross-entropy): same loss and same gradients for every parameter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import Transformer
from models.head import logsumexp_and_target, num_chunks
from models.layers import no_constraint
from train.step import loss_from_stats

from helpers import cross_entropy, small_config


def test_num_chunks_is_a_divisor():
    assert num_chunks(256, 8) == 8
    assert num_chunks(384, 5) == 4  # largest divisor of 384 not above 5
    assert num_chunks(50257, 8) == 1  # a prime-ish vocabulary: all at once
    assert num_chunks(128256, 8) == 8


def test_stats_match_logsumexp_with_large_logits():
    """Running logsumexp stays exact where a naive exp() would overflow."""
    key = jax.random.split(jax.random.key(0), 3)
    x = 30.0 * jax.random.normal(key[0], (2, 5, 16))
    w = jax.random.normal(key[1], (16, 64))
    targets = jax.random.randint(key[2], (2, 5), 0, 64)
    logits = x @ w
    lse, target = logsumexp_and_target(x, w, targets, 8, no_constraint, jnp.float32)
    np.testing.assert_allclose(lse, jax.nn.logsumexp(logits, axis=-1), rtol=1e-6)
    np.testing.assert_allclose(target, jnp.take_along_axis(logits, targets[..., None], -1)[..., 0],
                               rtol=1e-6)


@pytest.mark.parametrize("chunks,tie", [(8, True), (3, False)])
def test_chunked_loss_and_grads_equal_full_logits(chunks, tie):
    cfg = small_config(f"model.vocab_chunks={chunks}", f"model.tie_embeddings={tie}").model
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    key = jax.random.split(jax.random.key(1), 3)
    tokens = jax.random.randint(key[0], (4, 16), 0, cfg.vocab_size)
    targets = jax.random.randint(key[1], (4, 16), 0, cfg.vocab_size)
    weights = (jax.random.uniform(key[2], (4, 16)) > 0.3).astype(jnp.float32)
    graphdef, params = nnx.split(model)

    def full(params):
        logits = nnx.merge(graphdef, params)(tokens)
        return cross_entropy(logits, targets, 1e-3, weights)[0]

    def chunked(params):
        lse, target, _ = nnx.merge(graphdef, params).logsumexp_and_target(tokens, targets)
        return loss_from_stats(lse, target, 1e-3, weights)[0]

    loss_full, grads_full = jax.value_and_grad(full)(params)
    loss_chunked, grads_chunked = jax.value_and_grad(chunked)(params)
    np.testing.assert_allclose(loss_chunked, loss_full, rtol=1e-6)
    flat_full = dict(nnx.to_flat_state(grads_full))
    for path, g in nnx.to_flat_state(grads_chunked):
        ref = flat_full[path].get_value()
        np.testing.assert_allclose(g.get_value(), ref, rtol=1e-5,
                                   atol=1e-6 * float(np.abs(ref).max()), err_msg=str(path))


def test_dot_f32_backward_runs_in_the_input_dtype():
    """fp32 inputs: the plain einsum's gradients (to fp32 rounding). bf16 inputs: fp32 result, the
    backward matmuls take bf16 operands (no fp32 dot in the program) and their result
    is the reference gradient within bf16 rounding."""
    from models.attention import dot_f32
    ka, kb, kg = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(ka, (2, 8, 16))
    b = jax.random.normal(kb, (16, 32))
    probe = jax.random.normal(kg, (2, 8, 32))
    spec = "btd,dc->btc"

    def loss(fn):
        return lambda a, b: jnp.sum(fn(a, b) * probe)

    def ours(a, b):
        return dot_f32(spec, a, b)

    def plain(a, b):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)

    for g, ref in zip(jax.grad(loss(ours), (0, 1))(a, b), jax.grad(loss(plain), (0, 1))(a, b)):
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)  # jax may reorder sums
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    assert ours(a16, b16).dtype == jnp.float32
    grads = jax.grad(loss(ours), (0, 1))(a16, b16)
    refs = jax.grad(loss(plain), (0, 1))(a16.astype(jnp.float32), b16.astype(jnp.float32))
    for g, ref in zip(grads, refs):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(g.astype(jnp.float32), ref, rtol=0.05, atol=0.05)
    hlo = jax.jit(jax.grad(loss(ours), (0, 1))).lower(a16, b16).as_text()
    operands = [line.split(": (")[1].split(") ->")[0]
                for line in hlo.splitlines() if "dot_general" in line]
    assert len(operands) == 2  # da and db (the loss is linear: no forward dot needed)
    for types in operands:
        assert types.count("bf16>") == 2 and "f32>" not in types.replace("bf16>", ""), types
