"""Exact causal attention computed a block of queries at a time, in plain JAX (the
Pallas TPU splash kernel is models/splash.py); and attention over a KV cache
(generation).

XLA's dot_product_attention materializes fp32 scores for every (query, key) pair:
B x N x T x T, the largest activation of a layer at long sequences. Here the queries
are split into blocks of `block` and a loop (lax.scan, each step rematerialized in the
backward pass) computes one block's scores at a time against all keys, so the scores
held at once are B x N x block x T. Runs on every backend; the result equals
dot_product_attention's.

Shapes: B batch, T length (queries), S length (keys), N query heads, K kv heads,
G = N / K queries per kv head, H head size, n blocks, C = T / n queries per block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def dot_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum(spec, a, b) with inputs in their (compute) dtype and an fp32 result, for
    logits and attention scores that a softmax reads in fp32. The backward matmuls also
    run in the inputs' dtype (the fp32 cotangent is rounded to it first; fp32
    accumulation), as flash-attention kernels do: without this, bf16 inputs meet an
    fp32 cotangent and XLA runs both backward matmuls in fp32, the slow path.
    b's gradient (the head weight's, for logits) comes out of the matmul in b's dtype,
    so when its contraction is sharded (FSDP) the partial sums are reduced in bf16, as
    every other weight gradient is, not in fp32 (twice the traffic)."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _dot_f32_fwd(spec, a, b):
    return dot_f32(spec, a, b), (a, b)


def _dot_f32_bwd(spec, residuals, g):
    a, b = residuals
    (in_a, in_b), out = spec.split("->")[0].split(","), spec.split("->")[1]
    g_a, g_b = g.astype(a.dtype), g.astype(b.dtype)
    da = jnp.einsum(f"{out},{in_b}->{in_a}", g_a, b, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{out},{in_a}->{in_b}", g_b, a)
    return da.astype(a.dtype), db.astype(b.dtype)


dot_f32.defvjp(_dot_f32_fwd, _dot_f32_bwd)


def num_blocks(length: int, block: int) -> int:
    """Blocks of at most `block` queries that divide `length` evenly (fewest such)."""
    return next(n for n in range(max(1, -(-length // max(block, 1))), length + 1)
                if length % n == 0)


def blocked_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                      block: int, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Causal softmax(q k^T / sqrt(H)) v with grouped kv heads; with segment ids a query
    attends only to keys of its own segment. fp32 scores and softmax, output in q's
    dtype, (B, T, N, H)."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G, n = N // K, num_blocks(T, block)
    C = T // n
    q_nBCKGH = jnp.moveaxis(q_BTNH.reshape(B, n, C, K, G, H), 1, 0)
    starts_n = jnp.arange(n, dtype=jnp.int32) * C
    seg_nBC = (jnp.zeros((n, B, C), jnp.int32) if segment_ids_BT is None
               else jnp.moveaxis(segment_ids_BT.reshape(B, n, C), 1, 0))
    scale = 1.0 / jnp.sqrt(jnp.float32(H))

    def one_block(q_BCKGH, start, seg_BC):
        scores_BKGCS = dot_f32("bckgh,bskh->bkgcs", q_BCKGH, k_BSKH) * scale
        keep_BCS = ((start + jnp.arange(C))[:, None] >= jnp.arange(S)[None, :])[None]
        if segment_ids_BT is not None:
            keep_BCS = keep_BCS & (seg_BC[:, :, None] == segment_ids_BT[:, None, :])
        scores_BKGCS = jnp.where(keep_BCS[:, None, None], scores_BKGCS,
                                 jnp.finfo(jnp.float32).min)
        probs_BKGCS = jax.nn.softmax(scores_BKGCS, axis=-1).astype(v_BSKH.dtype)
        return jnp.einsum("bkgcs,bskh->bckgh", probs_BKGCS, v_BSKH)

    if n == 1:  # a single block needs no loop
        return one_block(q_nBCKGH[0], starts_n[0], seg_nBC[0]).reshape(B, T, N, H)
    step = jax.checkpoint(lambda _, xs: (None, one_block(*xs)))
    _, out_nBCKGH = jax.lax.scan(step, None, (q_nBCKGH, starts_n, seg_nBC))
    return jnp.moveaxis(out_nBCKGH, 0, 1).reshape(B, T, N, H)


def splash_fits(length: int) -> bool:
    """The TPU kernel (models/splash.py) tiles the sequence in blocks of 128 or more."""
    return length % 128 == 0


def cached_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                     slots_BT: jax.Array, pad_B: jax.Array) -> jax.Array:
    """Each query (at cache slot slots_BT) attends to the slots from its sequence's first
    real one (pad_B) up to its own; fp32 scores, output in q's dtype, (B, T, N, H)."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    scores_BKGTS = dot_f32("btkgh,bskh->bkgts", q_BTKGH, k_BSKH) / jnp.sqrt(jnp.float32(H))
    slot_S = jnp.arange(S, dtype=jnp.int32)
    keep_BTS = ((slot_S[None, None, :] <= slots_BT[:, :, None])
                & (slot_S[None, None, :] >= pad_B[:, None, None]))
    scores_BKGTS = jnp.where(keep_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)
