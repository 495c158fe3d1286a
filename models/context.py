"""Context parallelism: attention over a sequence whose length is split across devices.

The length of every activation is split over the mesh axes of "act_length" (the
`context` axis). Causal attention would leave the first shard almost idle and the last
one with most of the work, so the data layout is load balanced (`balanced_order`): the
sequence is cut into 2 x ways chunks and shard i holds chunks i and 2 x ways - 1 - i.
Inputs, targets, weights, positions and segment ids are all permuted alike, the loss is
a sum over tokens, and attention masks by positions (a key is visible when it is no
later than the query, in the same segment), so the permutation changes nothing but who
computes what.

Two ways to attend across shards (`model.context_attention`):
- all_gather: each shard gathers every shard's keys and values and attends its own
  queries to all of them (the keys' gradients are reduced back).
- ring: key/value blocks travel around the ring of shards (`ppermute`), each shard
  folding one block at a time into its queries' output with an online softmax (each
  block's log-sum-exp), so no shard ever holds the whole sequence's keys and values.
  Each step sends the next block before computing on the current one, so the transfer
  can overlap the compute. The backward pass goes around the ring again, the keys' and
  values' gradients travelling with their block back to its owner.

Inside a shard both use `attend`: exact attention a block of queries at a time with a
hand-written backward pass (flash attention's, in plain JAX), so neither the scores nor
the probabilities of all (query, key) pairs are ever held.

Shapes: B batch, T local queries, S local keys, N query heads, K kv heads,
G = N / K, H head size, C queries per block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models.attention import num_blocks

NEG = float(jnp.finfo(jnp.float32).min)


def balanced_order(length: int, ways: int) -> np.ndarray:
    """order[j]: the original index of the token at layout index j. Shard i (layout
    indices i*T/ways ...) holds chunks i and 2*ways-1-i of 2*ways equal chunks."""
    if ways == 1:
        return np.arange(length)
    chunks = np.arange(length).reshape(2 * ways, length // (2 * ways))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * ways - 1 - i]])
                           for i in range(ways)])


def _keep(qpos_BC, kpos_BS, qseg_BC, kseg_BS):
    """(B, C, S): the key is no later than the query and in its segment."""
    return ((kpos_BS[:, None, :] <= qpos_BC[:, :, None])
            & (kseg_BS[:, None, :] == qseg_BC[:, :, None]))


def _blocks(x_BT, n):
    """(B, T, ...) -> (n, B, T/n, ...)."""
    B, T = x_BT.shape[:2]
    return jnp.moveaxis(x_BT.reshape(B, n, T // n, *x_BT.shape[2:]), 1, 0)


def _unblocks(x_nBC):
    n, B, C = x_nBC.shape[:3]
    return jnp.moveaxis(x_nBC, 0, 1).reshape(B, n * C, *x_nBC.shape[3:])


def attend_with_lse(q_BTKGH, k_BSKH, v_BSKH, qpos_BT, kpos_BS, qseg_BT, kseg_BS, block):
    """Output (B, T, K, G, H) fp32 and log-sum-exp (B, T, K, G) fp32 of the queries
    against these keys. A query with no visible key gets a log-sum-exp near fp32's
    minimum (its output then weighs nothing when blocks are combined)."""
    H = q_BTKGH.shape[-1]
    n = num_blocks(q_BTKGH.shape[1], block)
    scale = 1.0 / np.sqrt(H)

    def one(_, xs):
        q_BCKGH, qpos_BC, qseg_BC = xs
        s_BKGCS = jnp.einsum("bckgh,bskh->bkgcs", q_BCKGH, k_BSKH,
                             preferred_element_type=jnp.float32) * scale
        keep_B11CS = _keep(qpos_BC, kpos_BS, qseg_BC, kseg_BS)[:, None, None]
        s_BKGCS = jnp.where(keep_B11CS, s_BKGCS, NEG)
        m_BKGC = jnp.max(s_BKGCS, axis=-1)
        p_BKGCS = jnp.exp(s_BKGCS - m_BKGC[..., None])
        l_BKGC = jnp.sum(p_BKGCS, axis=-1)
        o_BCKGH = jnp.einsum("bkgcs,bskh->bckgh", p_BKGCS.astype(v_BSKH.dtype), v_BSKH,
                             preferred_element_type=jnp.float32)
        o_BCKGH = o_BCKGH / jnp.moveaxis(l_BKGC, -1, 1)[..., None]
        return None, (o_BCKGH, jnp.moveaxis(m_BKGC + jnp.log(l_BKGC), -1, 1))

    _, (o_nBCKGH, lse_nBCKG) = jax.lax.scan(
        one, None, (_blocks(q_BTKGH, n), _blocks(qpos_BT, n), _blocks(qseg_BT, n)))
    return _unblocks(o_nBCKGH), _unblocks(lse_nBCKG)


def attend_grads(q_BTKGH, k_BSKH, v_BSKH, qpos_BT, kpos_BS, qseg_BT, kseg_BS, block,
                 do_BTKGH, lse_BTKG, delta_BTKG):
    """Gradients (q, k, v) of these keys' share of the attention, given the output's
    gradient, the final log-sum-exp and delta = sum(do * out) over H: flash attention's
    backward pass, a block of queries at a time. dq in fp32; dk, dv fp32 sums."""
    H = q_BTKGH.shape[-1]
    n = num_blocks(q_BTKGH.shape[1], block)
    scale = 1.0 / np.sqrt(H)

    def one(carry, xs):
        dk_BSKH, dv_BSKH = carry
        q_BCKGH, qpos_BC, qseg_BC, do_BCKGH, lse_BCKG, delta_BCKG = xs
        s_BKGCS = jnp.einsum("bckgh,bskh->bkgcs", q_BCKGH, k_BSKH,
                             preferred_element_type=jnp.float32) * scale
        keep_B11CS = _keep(qpos_BC, kpos_BS, qseg_BC, kseg_BS)[:, None, None]
        lse_BKGC = jnp.moveaxis(lse_BCKG, 1, -1)
        p_BKGCS = jnp.where(keep_B11CS, jnp.exp(s_BKGCS - lse_BKGC[..., None]), 0.0)
        do_c = do_BCKGH.astype(v_BSKH.dtype)
        dv_BSKH = dv_BSKH + jnp.einsum("bkgcs,bckgh->bskh", p_BKGCS.astype(do_c.dtype),
                                       do_c, preferred_element_type=jnp.float32)
        dp_BKGCS = jnp.einsum("bckgh,bskh->bkgcs", do_c, v_BSKH,
                              preferred_element_type=jnp.float32)
        ds_BKGCS = p_BKGCS * (dp_BKGCS - jnp.moveaxis(delta_BCKG, 1, -1)[..., None]) * scale
        ds_c = ds_BKGCS.astype(q_BCKGH.dtype)
        dq_BCKGH = jnp.einsum("bkgcs,bskh->bckgh", ds_c, k_BSKH,
                              preferred_element_type=jnp.float32)
        dk_BSKH = dk_BSKH + jnp.einsum("bkgcs,bckgh->bskh", ds_c, q_BCKGH,
                                       preferred_element_type=jnp.float32)
        return (dk_BSKH, dv_BSKH), dq_BCKGH

    zeros = jnp.zeros(k_BSKH.shape, jnp.float32)
    xs = tuple(_blocks(x, n) for x in (q_BTKGH, qpos_BT, qseg_BT, do_BTKGH, lse_BTKG,
                                       delta_BTKG))
    (dk_BSKH, dv_BSKH), dq_nBCKGH = jax.lax.scan(one, (zeros, zeros), xs)
    return _unblocks(dq_nBCKGH), dk_BSKH, dv_BSKH


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def attend(q_BTKGH, k_BSKH, v_BSKH, qpos_BT, kpos_BS, qseg_BT, kseg_BS, block):
    """Exact masked attention of these queries to these keys, (B, T, K, G, H) in q's
    dtype; the backward pass recomputes the scores a block at a time."""
    o, _ = attend_with_lse(q_BTKGH, k_BSKH, v_BSKH, qpos_BT, kpos_BS, qseg_BT, kseg_BS, block)
    return o.astype(q_BTKGH.dtype)


def _attend_fwd(q, k, v, qpos, kpos, qseg, kseg, block):
    o, lse = attend_with_lse(q, k, v, qpos, kpos, qseg, kseg, block)
    o = o.astype(q.dtype)
    return o, (q, k, v, qpos, kpos, qseg, kseg, o, lse)


def _attend_bwd(block, res, do):
    q, k, v, qpos, kpos, qseg, kseg, o, lse = res
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    dq, dk, dv = attend_grads(q, k, v, qpos, kpos, qseg, kseg, block, do, lse, delta)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None,
            None)


attend.defvjp(_attend_fwd, _attend_bwd)


def _ring_perm(ways: int) -> list[tuple[int, int]]:
    return [(j, (j + 1) % ways) for j in range(ways)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def ring_attend(q_BTKGH, k_BSKH, v_BSKH, qpos_BT, kpos_BS, qseg_BT, kseg_BS, axes, block):
    """`attend` of this shard's queries to every shard's keys, the key/value blocks
    passed around the ring of `axes` (inside shard_map)."""
    return _ring_fwd(q_BTKGH, k_BSKH, v_BSKH, qpos_BT, kpos_BS, qseg_BT, kseg_BS, axes,
                     block)[0]


def _ring_fwd(q, k, v, qpos, kpos, qseg, kseg, axes, block):
    ways = jax.lax.axis_size(axes)
    perm = _ring_perm(ways)

    def fold(o, lse, blk):
        o_i, lse_i = attend_with_lse(q, *blk[:2], qpos, blk[2], qseg, blk[3], block)
        new = jnp.logaddexp(lse, lse_i)
        return o * jnp.exp(lse - new)[..., None] + o_i * jnp.exp(lse_i - new)[..., None], new

    def step(carry, _):
        o, lse, blk = carry
        nxt = jax.lax.ppermute(blk, axes, perm)  # sent first: overlaps the compute
        o, lse = fold(o, lse, blk)
        return (o, lse, nxt), None

    o = jnp.zeros(q.shape, jnp.float32)
    lse = jnp.full(q.shape[:-1], -jnp.inf, jnp.float32)
    (o, lse, blk), _ = jax.lax.scan(step, (o, lse, (k, v, kpos, kseg)), None,
                                    length=ways - 1)
    o, lse = fold(o, lse, blk)
    o = o.astype(q.dtype)
    return o, (q, k, v, qpos, kpos, qseg, kseg, o, lse)


def _ring_bwd(axes, block, res, do):
    q, k, v, qpos, kpos, qseg, kseg, o, lse = res
    ways = jax.lax.axis_size(axes)
    perm = _ring_perm(ways)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)

    def grads(dq, blk, dk, dv):
        dq_i, dk_i, dv_i = attend_grads(q, blk[0], blk[1], qpos, blk[2], qseg, blk[3], block,
                                        do, lse, delta)
        return dq + dq_i, dk + dk_i, dv + dv_i

    def step(carry, _):
        dq, blk, dk, dv = carry
        dq, dk, dv = grads(dq, blk, dk, dv)
        blk, dk, dv = jax.lax.ppermute((blk, dk, dv), axes, perm)
        return (dq, blk, dk, dv), None

    zeros = jnp.zeros(k.shape, jnp.float32)
    dq = jnp.zeros(q.shape, jnp.float32)
    (dq, blk, dk, dv), _ = jax.lax.scan(step, (dq, (k, v, kpos, kseg), zeros, zeros), None,
                                        length=ways - 1)
    dq, dk, dv = grads(dq, blk, dk, dv)
    dk, dv = jax.lax.ppermute((dk, dv), axes, perm)  # the last block's gradients home
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None,
            None)


ring_attend.defvjp(_ring_fwd, _ring_bwd)


def context_attention(mode: str, q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT,
                      block: int, per_shard, axes: tuple[str, ...]):
    """Causal attention of length-sharded q, k, v (B, T, N|K, H) laid out by the logical
    axes; `per_shard(fn, args, logical_axes)` runs fn on each device's shards."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    seg_BT = (jnp.zeros((B, T), jnp.int32) if segment_ids_BT is None
              else segment_ids_BT.astype(jnp.int32))
    pos_BT = positions_BT.astype(jnp.int32)
    q_ax = ("batch", "act_length", "act_heads", None)
    kv_ax = ("batch", "act_length", "act_kv_heads", None)
    tok_ax = ("batch", "act_length")

    def local(q, k, v, qpos, kpos, qseg, kseg):
        b, t = q.shape[:2]
        q_BTKGH = q.reshape(b, t, k.shape[2], N // K, H)
        if mode == "ring":
            o = ring_attend(q_BTKGH, k, v, qpos, kpos, qseg, kseg, axes, block)
        else:
            o = attend(q_BTKGH, k, v, qpos, kpos, qseg, kseg, block)
        return o.reshape(q.shape)

    if mode == "ring":
        args = (q_BTNH, k_BTKH, v_BTKH, pos_BT, pos_BT, seg_BT, seg_BT)
        specs = (q_ax, kv_ax, kv_ax, tok_ax, tok_ax, tok_ax, tok_ax)
    else:  # all_gather: the keys' side laid out whole along the length
        gathered_kv, gathered_tok = ("batch", None, "act_kv_heads", None), ("batch", None)
        args = (q_BTNH, k_BTKH, v_BTKH, pos_BT, pos_BT, seg_BT, seg_BT)
        specs = (q_ax, gathered_kv, gathered_kv, tok_ax, gathered_tok, tok_ax, gathered_tok)
    return per_shard(local, args, specs)
