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
  queries to all of them (the keys' gradients are reduce-scattered back).
- ring: key/value blocks travel around the ring of shards (`ppermute`), each shard
  folding one block at a time into its queries' output with an online softmax (each
  block's log-sum-exp), so no shard ever holds the whole sequence's keys and values.
  Each step sends the next block before computing on the current one, so the transfer
  can overlap the compute. The backward pass goes around the ring again, the keys' and
  values' gradients travelling with their block back to its owner (in the compute
  dtype, as all_gather's reduce-scatter sends them).

Inside a shard both use `attend`: exact attention a block of queries by a block of keys
at a time (an online softmax over the key blocks) with a hand-written backward pass
(flash attention's, in plain JAX), so the scores held at once are one block's,
B x N x block x block, whatever the length. On TPUs both run the splash kernel instead
(models/splash.py): all_gather with the causal mask in the load-balanced layout (blocks
with no visible key skipped), the ring for each of its products.

Shapes: B batch, T local queries, S local keys, N query heads, K kv heads,
G = N / K, H head size, C queries per block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

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


def balanced_rows(rows_bT: dict[str, np.ndarray], ways: int) -> dict[str, np.ndarray]:
    """A batch's (b, T) entries in the load-balanced order for `ways` context shards,
    with explicit positions (0..T-1 before the permutation) when it has none."""
    if ways == 1:
        return rows_bT
    b, T = next(iter(rows_bT.values())).shape
    order_T = balanced_order(T, ways)
    rows_bT = {"positions": np.broadcast_to(np.arange(T, dtype=np.int32), (b, T)), **rows_bT}
    return {k: np.ascontiguousarray(x_bT[:, order_T]) for k, x_bT in rows_bT.items()}


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


def _scores(q_BCKGH, k_BSKH, qpos_BC, kpos_BS, qseg_BC, kseg_BS, scale):
    """Masked fp32 scores (B, K, G, C, S) and the mask (B, 1, 1, C, S)."""
    s_BKGCS = jnp.einsum("bckgh,bskh->bkgcs", q_BCKGH, k_BSKH,
                         preferred_element_type=jnp.float32) * scale
    keep_B11CS = _keep(qpos_BC, kpos_BS, qseg_BC, kseg_BS)[:, None, None]
    return jnp.where(keep_B11CS, s_BKGCS, NEG), keep_B11CS


def attend_with_lse(q_BTKGH, k_BSKH, v_BSKH, qpos_BT, kpos_BS, qseg_BT, kseg_BS, block):
    """Output (B, T, K, G, H) fp32 and log-sum-exp (B, T, K, G) fp32 of the queries
    against these keys, `block` queries by `block` keys at a time (an online softmax
    over the key blocks). A query with no visible key gets a log-sum-exp near fp32's
    minimum (its output then weighs nothing when blocks are combined)."""
    H = q_BTKGH.shape[-1]
    nq, nk = num_blocks(q_BTKGH.shape[1], block), num_blocks(k_BSKH.shape[1], block)
    scale = 1.0 / np.sqrt(H)
    keys = tuple(_blocks(x, nk) for x in (k_BSKH, v_BSKH, kpos_BS, kseg_BS))

    def one(_, xs):
        q_BCKGH, qpos_BC, qseg_BC = xs
        B, C, K, G, _h = q_BCKGH.shape

        def fold(carry, ys):
            m_BKGC, l_BKGC, o_BKGCH = carry
            k_BSKH, v_BSKH, kpos_BS, kseg_BS = ys
            s_BKGCS, _ = _scores(q_BCKGH, k_BSKH, qpos_BC, kpos_BS, qseg_BC, kseg_BS, scale)
            m_new = jnp.maximum(m_BKGC, jnp.max(s_BKGCS, axis=-1))
            p_BKGCS = jnp.exp(s_BKGCS - m_new[..., None])
            fix = jnp.exp(m_BKGC - m_new)
            o_BKGCH = o_BKGCH * fix[..., None] + jnp.einsum(
                "bkgcs,bskh->bkgch", p_BKGCS.astype(v_BSKH.dtype), v_BSKH,
                preferred_element_type=jnp.float32)
            return (m_new, l_BKGC * fix + jnp.sum(p_BKGCS, axis=-1), o_BKGCH), None

        init = (jnp.full((B, K, G, C), NEG, jnp.float32), jnp.zeros((B, K, G, C), jnp.float32),
                jnp.zeros((B, K, G, C, H), jnp.float32))
        (m_BKGC, l_BKGC, o_BKGCH), _ = jax.lax.scan(fold, init, keys)
        o_BCKGH = jnp.moveaxis(o_BKGCH / l_BKGC[..., None], 3, 1)
        return None, (o_BCKGH, jnp.moveaxis(m_BKGC + jnp.log(l_BKGC), -1, 1))

    _, (o_nBCKGH, lse_nBCKG) = jax.lax.scan(
        one, None, (_blocks(q_BTKGH, nq), _blocks(qpos_BT, nq), _blocks(qseg_BT, nq)))
    return _unblocks(o_nBCKGH), _unblocks(lse_nBCKG)


def attend_grads(q_BTKGH, k_BSKH, v_BSKH, qpos_BT, kpos_BS, qseg_BT, kseg_BS, block,
                 do_BTKGH, lse_BTKG, delta_BTKG, kv_dtype=jnp.float32):
    """Gradients (q, k, v) of these keys' share of the attention, given the output's
    gradient, the final log-sum-exp and delta = sum(do * out) over H: flash attention's
    backward pass, `block` keys by `block` queries at a time (keys outside, so a key
    block's gradients are summed in a small carry and only dq, the local queries', is
    held whole). dq in fp32, dk and dv in `kv_dtype`."""
    H = q_BTKGH.shape[-1]
    nq, nk = num_blocks(q_BTKGH.shape[1], block), num_blocks(k_BSKH.shape[1], block)
    scale = 1.0 / np.sqrt(H)
    queries = tuple(_blocks(x, nq) for x in (q_BTKGH, qpos_BT, qseg_BT, do_BTKGH))
    lse_nBKGC, delta_nBKGC = (jnp.moveaxis(_blocks(x, nq), 2, -1)
                              for x in (lse_BTKG, delta_BTKG))

    def per_key_block(dq_nBCKGH, ys):
        k_BSKH, v_BSKH, kpos_BS, kseg_BS = ys

        def per_query_block(carry, xs):
            dk_BSKH, dv_BSKH = carry
            q_BCKGH, qpos_BC, qseg_BC, do_BCKGH, lse_BKGC, delta_BKGC, dq_BCKGH = xs
            do_c = do_BCKGH.astype(v_BSKH.dtype)
            s_BKGCS, keep_B11CS = _scores(q_BCKGH, k_BSKH, qpos_BC, kpos_BS, qseg_BC,
                                          kseg_BS, scale)
            p_BKGCS = jnp.where(keep_B11CS, jnp.exp(s_BKGCS - lse_BKGC[..., None]), 0.0)
            dv_BSKH = dv_BSKH + jnp.einsum("bkgcs,bckgh->bskh", p_BKGCS.astype(do_c.dtype),
                                           do_c, preferred_element_type=jnp.float32)
            dp_BKGCS = jnp.einsum("bckgh,bskh->bkgcs", do_c, v_BSKH,
                                  preferred_element_type=jnp.float32)
            ds_c = (p_BKGCS * (dp_BKGCS - delta_BKGC[..., None]) * scale).astype(
                q_BCKGH.dtype)
            dq_BCKGH = dq_BCKGH + jnp.einsum("bkgcs,bskh->bckgh", ds_c, k_BSKH,
                                             preferred_element_type=jnp.float32)
            dk_BSKH = dk_BSKH + jnp.einsum("bkgcs,bckgh->bskh", ds_c, q_BCKGH,
                                           preferred_element_type=jnp.float32)
            return (dk_BSKH, dv_BSKH), dq_BCKGH

        zeros = jnp.zeros(k_BSKH.shape, jnp.float32)
        (dk_BSKH, dv_BSKH), dq_nBCKGH = jax.lax.scan(
            per_query_block, (zeros, zeros),
            (*queries, lse_nBKGC, delta_nBKGC, dq_nBCKGH))
        return dq_nBCKGH, (dk_BSKH.astype(kv_dtype), dv_BSKH.astype(kv_dtype))

    dq_nBCKGH = jnp.zeros(queries[0].shape, jnp.float32)
    keys = tuple(_blocks(x, nk) for x in (k_BSKH, v_BSKH, kpos_BS, kseg_BS))
    dq_nBCKGH, (dk_nBSKH, dv_nBSKH) = jax.lax.scan(per_key_block, dq_nBCKGH, keys)
    return _unblocks(dq_nBCKGH), _unblocks(dk_nBSKH), _unblocks(dv_nBSKH)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def attend(q_BTKGH, k_BSKH, v_BSKH, qpos_BT, kpos_BS, qseg_BT, kseg_BS, block):
    """Exact masked attention of these queries to these keys, (B, T, K, G, H) in q's
    dtype; the backward pass recomputes the scores a block at a time."""
    return _attend_fwd(q_BTKGH, k_BSKH, v_BSKH, qpos_BT, kpos_BS, qseg_BT, kseg_BS, block)[0]


def _attend_fwd(q, k, v, qpos, kpos, qseg, kseg, block):
    q, qpos, kpos, qseg, kseg = _tied(q, qpos, kpos, qseg, kseg)
    o, lse = attend_with_lse(q, k, v, qpos, kpos, qseg, kseg, block)
    o = o.astype(q.dtype)
    return o, (q, k, v, qpos, kpos, qseg, kseg, o, lse)


def _attend_bwd(block, res, do):
    q, k, v, qpos, kpos, qseg, kseg, o, lse = res
    q, qpos, kpos, qseg, kseg = _tied(q, qpos, kpos, qseg, kseg)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    dq, dk, dv = attend_grads(q, k, v, qpos, kpos, qseg, kseg, block, do, lse, delta,
                              k.dtype)
    return (dq.astype(q.dtype), dk, dv.astype(v.dtype), None, None, None, None)


attend.defvjp(_attend_fwd, _attend_bwd)


def _ring_perm(ways: int) -> list[tuple[int, int]]:
    return [(j, (j + 1) % ways) for j in range(ways)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def ring_attend(q_BTKGH, k_BSKH, v_BSKH, qpos_BT, kpos_BS, qseg_BT, kseg_BS, axes, block,
                kernel="blocked", interpret=False):
    """`attend` of this shard's queries to every shard's keys, the key/value blocks
    passed around the ring of `axes` (inside shard_map). Each product is computed by
    `kernel`: blocked (`attend_with_lse`, `attend_grads`) or splash (the TPU kernel,
    models/splash.py; `interpret` off TPUs)."""
    return _ring_fwd(q_BTKGH, k_BSKH, v_BSKH, qpos_BT, kpos_BS, qseg_BT, kseg_BS, axes,
                     block, kernel, interpret)[0]


def _products(kernel, block, length, heads, interpret):
    """(forward, backward) of one ring product of queries qs = (q, qpos, qseg, do, lse,
    delta, o) (the backward's first three for the forward) against a block (k, v,
    kpos, kseg); `own` marks the shard's own block (a causal product of whole shards,
    the others are half by half and unmasked but for documents)."""
    if kernel == "splash":
        from models import splash
        own_kernel, half_kernel = splash.ring_kernels(length, heads, interpret)

        def fwd(qs, blk, own):
            return splash.ring_attend_with_lse(own_kernel if own else half_kernel, qs[0],
                                               blk[0], blk[1], qs[2], blk[3])

        def bwd(qs, blk, own):
            return splash.ring_attend_grads(own_kernel if own else half_kernel, qs[0],
                                            blk[0], blk[1], qs[2], blk[3], qs[3], qs[4], qs[6])
        return fwd, bwd

    def fwd(qs, blk, own):
        return attend_with_lse(qs[0], blk[0], blk[1], qs[1], blk[2], qs[2], blk[3], block)

    def bwd(qs, blk, own):
        return attend_grads(qs[0], blk[0], blk[1], qs[1], blk[2], qs[2], blk[3], block,
                            *qs[3:6])
    return fwd, bwd


def _visiting_half(axes, step, length):
    """Where the half of the queries (and of the visiting block's keys) that meet
    begins, `step` blocks round the ring. In the load-balanced layout shard i holds
    chunks i and 2w-1-i: from an earlier shard j < i, both query chunks see the block's
    first chunk j and none of its second; from a later one, only the second query chunk
    sees anything, both of the block's chunks. So every off-diagonal step is two
    half-by-half products: (second queries, first keys) always, and (first, first) or
    (second, second), the pair beginning at the index returned (0 or length / 2). The
    skipped quarters are masked entirely (positions rise along each document), so the
    result is the same as attending to all of the block, at half the work."""
    ways = jax.lax.axis_size(axes)
    earlier = (jax.lax.axis_index(axes) - step) % ways < jax.lax.axis_index(axes)
    return jnp.where(earlier, 0, length // 2)


def _half(x, start, h):
    return jax.lax.dynamic_slice_in_dim(x, start, h, axis=1)


def _ring_fwd(q, k, v, qpos, kpos, qseg, kseg, axes, block, kernel, interpret):
    q, qpos, kpos, qseg, kseg = _tied(q, qpos, kpos, qseg, kseg)
    ways = jax.lax.axis_size(axes)
    perm = _ring_perm(ways)
    T = q.shape[1]
    h = T // 2
    product, _ = _products(kernel, block, T, q.shape[2] * q.shape[3], interpret)

    def merge(o, lse, start, blk, qs, own=False):
        """(o, lse) of the queries qs (a slice at `start`) against blk folded in."""
        o_i, lse_i = product(qs, blk, own)
        o_s, lse_s = _half(o, start, o_i.shape[1]), _half(lse, start, o_i.shape[1])
        new = jnp.logaddexp(lse_s, lse_i)
        o_s = o_s * jnp.exp(lse_s - new)[..., None] + o_i * jnp.exp(lse_i - new)[..., None]
        return (jax.lax.dynamic_update_slice_in_dim(o, o_s, start, axis=1),
                jax.lax.dynamic_update_slice_in_dim(lse, new, start, axis=1))

    def fold_visiting(o, lse, blk, step):
        start = _visiting_half(axes, step, T)
        o, lse = merge(o, lse, h, [x[:, :h] for x in blk], [x[:, h:] for x in (q, qpos, qseg)])
        return merge(o, lse, start, [_half(x, start, h) for x in blk],
                     [_half(x, start, h) for x in (q, qpos, qseg)])

    def step_fn(carry, step):
        o, lse, blk = carry
        nxt = jax.lax.ppermute(blk, axes, perm)  # sent first: overlaps the compute
        o, lse = fold_visiting(o, lse, blk, step)
        return (o, lse, nxt), None

    own = (k, v, kpos, kseg)
    blk = jax.lax.ppermute(own, axes, perm)
    o = jnp.zeros(q.shape, jnp.float32)
    lse = jnp.full(q.shape[:-1], NEG, jnp.float32)
    o, lse = merge(o, lse, 0, own, (q, qpos, qseg), own=True)  # the diagonal: causal
    (o, lse, blk), _ = jax.lax.scan(step_fn, (o, lse, blk), jnp.arange(1, ways - 1))
    o, lse = fold_visiting(o, lse, blk, ways - 1)
    # named for model.remat=save_ring, which keeps them rather than run the ring again
    o = checkpoint_name(o.astype(q.dtype), "ring_out")
    lse = checkpoint_name(lse, "ring_out")
    return o, (q, k, v, qpos, kpos, qseg, kseg, o, lse)


def _tied(q, *ints):
    """Positions and segment ids tied to this layer's queries by an optimization
    barrier: the masks made from them cannot be hoisted out of the layer loop (they are
    the same in every layer, and XLA would otherwise compute every ring step's and
    block's mask once and hold them all: 30 GiB per chip for Llama-3-8B at 128k)."""
    return jax.lax.optimization_barrier((q, *ints))


def _ring_bwd(axes, block, kernel, interpret, res, do):
    """The forward pass's steps again, each visiting block's gradients travelling with
    it round the ring (every shard adds its share) and reaching its owner after the
    last step. They travel in the compute dtype (k's), as an all_gather's
    reduce-scatter would send them; each shard sums its own queries' and keys'
    gradients in fp32."""
    q, k, v, qpos, kpos, qseg, kseg, o, lse = res
    q, qpos, kpos, qseg, kseg = _tied(q, qpos, kpos, qseg, kseg)
    ways = jax.lax.axis_size(axes)
    perm = _ring_perm(ways)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    T = q.shape[1]
    h = T // 2
    queries = (q, qpos, qseg, do, lse, delta, o)
    _, product_grads = _products(kernel, block, T, q.shape[2] * q.shape[3], interpret)

    def add(x, start, dx):
        """x with dx added at `start` along the length (summed in fp32, kept in x's dtype)."""
        x_s = _half(x, start, dx.shape[1]).astype(jnp.float32) + dx
        return jax.lax.dynamic_update_slice_in_dim(x, x_s.astype(x.dtype), start, axis=1)

    def grads(dq, dk, dv, qstart, qs, kstart, blk, own=False):
        """Gradients of the queries qs (a slice at qstart) against blk (a slice of the
        visiting block at kstart), added in."""
        dq_i, dk_i, dv_i = product_grads(qs, blk, own)
        return add(dq, qstart, dq_i), add(dk, kstart, dk_i), add(dv, kstart, dv_i)

    def grads_visiting(dq, dk, dv, blk, step):
        start = _visiting_half(axes, step, T)
        dq, dk, dv = grads(dq, dk, dv, h, [x[:, h:] for x in queries], 0,
                           [x[:, :h] for x in blk])
        return grads(dq, dk, dv, start, [_half(x, start, h) for x in queries], start,
                     [_half(x, start, h) for x in blk])

    def step_fn(carry, step):
        dq, blk, dk, dv = carry
        dq, dk, dv = grads_visiting(dq, dk, dv, blk, step)
        blk, dk, dv = jax.lax.ppermute((blk, dk, dv), axes, perm)
        return (dq, blk, dk, dv), None

    own = (k, v, kpos, kseg)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dq, dk_own, dv_own = grads(jnp.zeros(q.shape, jnp.float32), zeros, zeros, 0, queries, 0,
                               own, own=True)
    blk = jax.lax.ppermute(own, axes, perm)
    travelling = jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype)
    (dq, blk, dk, dv), _ = jax.lax.scan(step_fn, (dq, blk, *travelling),
                                        jnp.arange(1, ways - 1))
    dq, dk, dv = grads_visiting(dq, dk, dv, blk, ways - 1)
    dk, dv = jax.lax.ppermute((dk, dv), axes, perm)  # the last block's gradients home
    return (dq.astype(q.dtype), add(dk_own, 0, dk).astype(k.dtype),
            add(dv_own, 0, dv).astype(v.dtype), None, None, None, None)


ring_attend.defvjp(_ring_fwd, _ring_bwd)


def gather_length(x_BT, axes):
    """Every shard's x (B, T, ...) along the length, in the layout's order (inside
    shard_map), gathered as a flat (T, rest) array. For the splash kernel's keys: XLA on
    TPUs turned the gradient of their gather along axis 1 (a reduce-scatter) into an
    all-reduce, twice the bytes (Llama-3-8B, 32k: 53.5 vs 49.7 GiB per step). Blocked
    attention's gather stays along axis 1: flat, its gradients became all-reduces
    (53.7 vs 51.6 GiB)."""
    x_T_ = jnp.moveaxis(x_BT, 1, 0)
    x_Tr = jax.lax.all_gather(x_T_.reshape(x_T_.shape[0], -1), axes, axis=0, tiled=True)
    return jnp.moveaxis(x_Tr.reshape(-1, *x_T_.shape[1:]), 0, 1)


def context_attention(mode: str, q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT,
                      block: int, per_shard, axes: tuple[str, ...], ways: int,
                      kernel: str = "blocked", interpret: bool = False):
    """Causal attention of length-sharded q, k, v (B, T, N|K, H) laid out by the logical
    axes, split `ways` over the mesh axes `axes`; `per_shard(fn, args, logical_axes)`
    runs fn on each device's shards. Inside a shard, `kernel` is `blocked` (`attend`)
    or `splash` (models/splash.py, the TPU kernel; for all_gather block-sparse over the
    load-balanced causal mask; `interpret` runs it off TPUs, for tests)."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    masked = segment_ids_BT is not None
    seg_BT = (jnp.zeros((B, T), jnp.int32) if segment_ids_BT is None
              else segment_ids_BT.astype(jnp.int32))
    pos_BT = positions_BT.astype(jnp.int32)
    q_ax = ("batch", "act_length", "act_heads", None)
    kv_ax = ("batch", "act_length", "act_kv_heads", None)
    tok_ax = ("batch", "act_length")
    tables, tables_ax, treedef = [], [], None
    gathered_splash = kernel == "splash" and mode == "all_gather"
    if gathered_splash:  # the mask's tables split with the queries
        from models import splash
        tables, treedef = jax.tree.flatten(splash.make_kernel(
            splash.BalancedCausalMask(T, ways), N, ways, interpret))
        tables_ax = [(None, "act_length", None) if x.ndim == 3 else ("act_length",)
                     for x in tables]

    def local(q, k, v, qpos, kpos, qseg, kseg, *tables):
        b, t = q.shape[:2]
        if gathered_splash:  # positions unused: the mask knows the layout
            k, v, kseg = (gather_length(x, axes) for x in (k, v, kseg))
            return splash.attend(jax.tree.unflatten(treedef, tables), q, k, v,
                                 *((qseg, kseg) if masked else ()))
        q_BTKGH = q.reshape(b, t, k.shape[2], N // K, H)
        if mode == "ring":
            o = ring_attend(q_BTKGH, k, v, qpos, kpos, qseg, kseg, axes, block, kernel,
                            interpret)
        else:  # all_gather: every shard's keys, in the layout's order (masks use positions)
            k, v, kpos, kseg = (jax.lax.all_gather(x, axes, axis=1, tiled=True)
                                for x in (k, v, kpos, kseg))
            o = attend(q_BTKGH, k, v, qpos, kpos, qseg, kseg, block)
        return o.reshape(q.shape)

    # the gathers run inside: their gradients are reduce-scattered back to the shards
    return per_shard(local, (q_BTNH, k_BTKH, v_BTKH, pos_BT, pos_BT, seg_BT, seg_BT, *tables),
                     (q_ax, kv_ax, kv_ax, tok_ax, tok_ax, tok_ax, tok_ax, *tables_ax))
