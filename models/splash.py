"""The Pallas TPU "splash" kernel: flash attention with a block-sparse mask (blocks with
no visible key are skipped), grouped kv heads natively, for the arrays one device holds
(call it inside shard_map). Off TPUs `interpret=True` runs the kernel's Python (tests).

Imported only where a kernel is built: loading the Pallas TPU kernels takes a process
about half a second.

Shapes: B batch, T queries, S keys, N query heads, K kv heads, H head size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from models.context import balanced_order

BLOCK = 512  # queries and keys per kernel block (MaxText's default); 128 if T needs


def block_size(length: int) -> int:
    return BLOCK if length % BLOCK == 0 else 128


def original_index(x, chunk: int, ways: int):
    """The original index of layout index x (numpy or in-kernel int32 arrays) in the
    load-balanced layout of `ways` shards with chunks of `chunk` tokens: balanced_order's
    values, computed without integer division (a float multiply, exact below 2^24)."""
    pair = ((x.astype(np.float32) + 0.5) * (1.0 / (2 * chunk))).astype(np.int32)
    r = x - pair * (2 * chunk)  # position inside the shard's two chunks
    second = (r >= chunk).astype(np.int32)
    return (pair + second * (2 * ways - 1 - 2 * pair)) * chunk + r - second * chunk


class BalancedCausalMask(masks._ComputableMask):
    """The causal mask of a whole sequence in the load-balanced layout
    (models/context.py): the query and the key at layout indices (i, j) see each other
    when order[j] <= order[i]. The queries' original indices are the mask's q_sequence
    (sharded with the queries), the keys' are computed in the kernel."""

    def __init__(self, length: int, ways: int):
        self.ways = ways
        chunk = length // (2 * ways)
        super().__init__((length, length),
                         lambda q, kv: original_index(kv, chunk, ways) <= q)
        self.q_sequence = balanced_order(length, ways).astype(np.int32)

    def __getitem__(self, idx) -> np.ndarray:
        q_slice, kv_slice = idx  # blocks while the kernel is built: by table, quickly
        return self.q_sequence[q_slice][:, None] >= self.q_sequence[kv_slice][None, :]

    def __eq__(self, other: object):
        return (isinstance(other, BalancedCausalMask) and self.shape == other.shape
                and self.ways == other.ways)

    def __hash__(self):
        return hash((BalancedCausalMask, self.shape, self.ways))


def make_kernel(mask: masks.Mask, heads: int, q_shards: int, interpret: bool,
                residuals: bool = False):
    """A splash kernel for `heads` query heads under one 2-D mask, its mask tables
    split `q_shards` ways along the queries (each shard of the queries takes its own);
    with `residuals` it returns each query's log-sum-exp too."""
    b = block_size(mask.shape[0] // q_shards)
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                              block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                              block_kv_dq=b)
    return splash.make_splash_mha(masks.MultiHeadMask([mask] * heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=q_shards, interpret=interpret,
                                  save_residuals=residuals)


def attend(kernel, q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
           qseg_BT: jax.Array | None = None, kseg_BS: jax.Array | None = None
           ) -> jax.Array:
    """The kernel's attention of these queries to these keys (B, T, N, H), with document
    masks when segment ids are given."""
    H = q_BTNH.shape[-1]
    q_BNTH = (q_BTNH * (1.0 / H ** 0.5)).astype(q_BTNH.dtype).transpose(0, 2, 1, 3)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    if qseg_BT is None:
        out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH)
    else:
        out_BNTH = jax.vmap(lambda q, k, v, qs, ks: kernel(
            q, k, v, segment_ids=splash.SegmentIds(qs, ks)))(
            q_BNTH, k_BKSH, v_BKSH, qseg_BT, kseg_BS)
    return out_BNTH.transpose(0, 2, 1, 3)


def splash_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                     segment_ids_BT: jax.Array | None = None, interpret: bool = False
                     ) -> jax.Array:
    """Causal attention of whole sequences by the splash kernel; same contract as
    models.attention.blocked_attention."""
    T, N = q_BTNH.shape[1:3]
    kernel = make_kernel(masks.CausalMask((T, T)), N, 1, interpret)
    return attend(kernel, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, segment_ids_BT)


# The ring (models/context.py) folds one block of keys at a time into its queries'
# outputs and needs each product's log-sum-exp, and in the backward pass each product's
# gradients against the final output and log-sum-exp: the kernel's own backward pass,
# given those as its residuals (its `_splash_attention_bwd`, private in jax 0.10 and
# 0.12 alike; tests/test_context.py checks it against dense attention).

def ring_kernels(length: int, heads: int, interpret: bool):
    """Kernels for a ring's products on a shard of `length` tokens: its own block
    (causal: the shard's two chunks are in order) and the half-by-half products with a
    visiting block (every pair visible but for document masks)."""
    h = length // 2
    return (make_kernel(masks.CausalMask((length, length)), heads, 1, interpret, True),
            make_kernel(masks.FullMask((h, h)), heads, 1, interpret, True))


def _kernel_layout(q_BCKGH, k_BSKH, v_BSKH):
    B, C, K, G, H = q_BCKGH.shape
    q_BNCH = (q_BCKGH * (1.0 / H ** 0.5)).astype(q_BCKGH.dtype).reshape(
        B, C, K * G, H).transpose(0, 2, 1, 3)
    return q_BNCH, k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)


def _heads_last(x_BNC_, K):
    """(B, N, C, ...) -> (B, C, K, G, ...)."""
    B, N, C = x_BNC_.shape[:3]
    return jnp.moveaxis(x_BNC_, 1, 2).reshape(B, C, K, N // K, *x_BNC_.shape[3:])


def _heads_first(x_BCKG_):
    B, C, K, G = x_BCKG_.shape[:4]
    return jnp.moveaxis(x_BCKG_.reshape(B, C, K * G, *x_BCKG_.shape[4:]), 2, 1)


def ring_attend_with_lse(kernel, q_BCKGH, k_BSKH, v_BSKH, qseg_BC, kseg_BS):
    """Output (B, C, K, G, H) and log-sum-exp (B, C, K, G), fp32, of these queries
    against these keys (a ring product)."""
    q_BNCH, k_BKSH, v_BKSH = _kernel_layout(q_BCKGH, k_BSKH, v_BSKH)

    def one(q, k, v, qs, ks):
        o, (lse,) = kernel(q, k, v, segment_ids=splash.SegmentIds(qs, ks))
        return o, lse

    o_BNCH, lse_BNC = jax.vmap(one)(q_BNCH, k_BKSH, v_BKSH, qseg_BC, kseg_BS)
    K = k_BSKH.shape[2]
    return _heads_last(o_BNCH, K).astype(jnp.float32), _heads_last(lse_BNC, K)


def ring_attend_grads(kernel, q_BCKGH, k_BSKH, v_BSKH, qseg_BC, kseg_BS, do_BCKGH,
                      lse_BCKG, o_BCKGH):
    """Gradients (q, k, v; fp32) of these keys' share of the attention, given the
    output's gradient and the final output and log-sum-exp of these queries."""
    kw = kernel.kwargs
    q_BNCH, k_BKSH, v_BKSH = _kernel_layout(q_BCKGH, k_BSKH, v_BSKH)
    dt = q_BCKGH.dtype

    def one(q, k, v, qs, ks, o, lse, do):
        res = (q, k, v, splash.SegmentIds(qs, ks), None, o, lse, kernel.dq_mask_info,
               kernel.dkv_mask_info)
        grads = splash._splash_attention_bwd(
            kw["save_residuals"], kw["mask_value"], kw["is_mqa"], kw["block_sizes"],
            kw["residual_checkpoint_name"], kw["mask_function"],
            kw["attn_logits_soft_cap"], kw["interpret"], res, do)
        return grads[3:6]

    dq_BNCH, dk_BKSH, dv_BKSH = jax.vmap(one)(
        q_BNCH, k_BKSH, v_BKSH, qseg_BC, kseg_BS, _heads_first(o_BCKGH.astype(dt)),
        _heads_first(lse_BCKG), _heads_first(do_BCKGH.astype(dt)))
    H = q_BCKGH.shape[-1]
    K = k_BSKH.shape[2]
    dq = _heads_last(dq_BNCH.astype(jnp.float32), K) * (1.0 / H ** 0.5)
    return (dq, dk_BKSH.transpose(0, 2, 1, 3).astype(jnp.float32),
            dv_BKSH.transpose(0, 2, 1, 3).astype(jnp.float32))
