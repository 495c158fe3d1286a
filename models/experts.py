"""The routed experts' SwiGLU over rows sorted by expert: grouped matmuls (group g's
rows times expert g's weights) by `jax.lax.ragged_dot` or, on TPUs, the megablox Pallas
kernels; optionally over the rows in chunks with a hand-written backward pass, so that
only one chunk's (rows, F) transients are live and the weight gradients accumulate in
place (megablox's tgmm adds into its output).

Shapes: m rows, c rows of a chunk, C chunks, D d_model, F expert width, G groups
(experts), K/N a matmul's input/output width.
"""

from __future__ import annotations

import importlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models.layers import swiglu_f32, swiglu_f32_grads

# the kernels' module (the package's `gmm` is the differentiable op, not this module)
_megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")
_TILES = (128, 128, 128)


class GroupedOps(NamedTuple):
    """One kernel's grouped matmuls; rows past the groups give undefined rows (0 from
    ragged_dot; megablox leaves them unwritten) and are dropped by the callers."""

    matmul: Callable  # (x_mK, w_GKN, sizes_G) -> (m, N), differentiable
    matmul_t: Callable  # (dy_mN, w_GKN, sizes_G) -> (m, K): dy times w[g] transposed
    add_wgrad: Callable  # (x_mK, dy_mN, sizes_G, acc_GKN) -> acc + x_g^T dy_g per group
    row_multiple: int  # chunks are cut at multiples of this many rows


def _ragged_ops() -> GroupedOps:
    def add_wgrad(x_mK, dy_mN, sizes_G, acc_GKN):
        _, vjp = jax.vjp(lambda w: jax.lax.ragged_dot(x_mK, w, sizes_G), acc_GKN)
        return acc_GKN + vjp(dy_mN)[0]

    return GroupedOps(jax.lax.ragged_dot,
                      lambda dy, w, sizes: jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), sizes),
                      add_wgrad, 1)


def _megablox_ops(interpret: bool) -> GroupedOps:
    """Rows padded to whole tiles; no masks on the (rows, N) results (a mask is a copy
    of each): the rows past the groups stay apart from the real ones in every matmul
    here and in the backward pass (tgmm selects each group's rows)."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    def pad(x_mK):
        return jnp.pad(x_mK, ((0, -x_mK.shape[0] % _TILES[0]), (0, 0)))

    def matmul(x_mK, w_GKN, sizes_G):
        return gmm(pad(x_mK), w_GKN, sizes_G, x_mK.dtype, _TILES,
                   interpret=interpret)[:x_mK.shape[0]]

    def matmul_t(dy_mN, w_GKN, sizes_G):
        return _megablox.gmm(pad(dy_mN), w_GKN, sizes_G, dy_mN.dtype, _TILES,
                             transpose_rhs=True, interpret=interpret)[:dy_mN.shape[0]]

    def add_wgrad(x_mK, dy_mN, sizes_G, acc_GKN):
        return _megablox.tgmm(pad(x_mK).T, pad(dy_mN), sizes_G, acc_GKN.dtype, _TILES,
                              existing_out=acc_GKN, interpret=interpret)

    return GroupedOps(matmul, matmul_t, add_wgrad, _TILES[0])


def grouped_ops(kernel: str, platform: str, K: int, N: int) -> GroupedOps:
    """The grouped matmuls of `kernel` (model.moe.kernel) for (K, N) weights; megablox
    needs both divisible by its 128 tiles (else ragged_dot) and runs interpreted off
    TPUs (tests)."""
    if kernel == "auto":
        kernel = "megablox" if platform == "tpu" else "ragged_dot"
    if kernel == "megablox" and not (K % _TILES[1] or N % _TILES[2]):
        return _megablox_ops(interpret=platform != "tpu")
    return _ragged_ops()


def _swiglu(ops: GroupedOps, x_mD, sizes_G, w_gate_GDF, w_up_GDF, w_out_GFD) -> jax.Array:
    gate_mF = ops.matmul(x_mD, w_gate_GDF, sizes_G)
    up_mF = ops.matmul(x_mD, w_up_GDF, sizes_G)
    return ops.matmul(swiglu_f32(gate_mF, up_mF), w_out_GFD, sizes_G)


def _weighted(y_mD: jax.Array, w_m: jax.Array) -> jax.Array:
    return (y_mD.astype(jnp.float32) * w_m[:, None]).astype(y_mD.dtype)


def swiglu_rows(ops: GroupedOps, chunks: int, x_mD: jax.Array, sizes_G: jax.Array,
                w_m: jax.Array, w_gate_GDF: jax.Array, w_up_GDF: jax.Array,
                w_out_GFD: jax.Array) -> jax.Array:
    """Each group's rows of x_mD through its own SwiGLU expert, times the row's weight
    w_m (fp32), (m, D) in x's dtype; rows past the groups undefined.

    With chunks > 1 the rows go in `chunks` consecutive chunks, one at a time, forward
    and backward, and the backward pass recomputes a chunk's expert outputs from its
    input rows, adding its weight gradients into one accumulator per weight (in the
    weights' dtype). As the row weights are applied in here, nothing after the layer's
    forward pass needs the expert outputs: under remat the recomputed forward pass
    skips the experts (dead code), so the chunks cost no extra matmuls."""
    weights = (w_gate_GDF, w_up_GDF, w_out_GFD)
    if chunks == 1:
        return _weighted(_swiglu(ops, x_mD, sizes_G, *weights), w_m)
    m, D = x_mD.shape
    step = ops.row_multiple
    c = -(-m // (chunks * step)) * step
    los_C = np.arange(chunks, dtype=np.int32) * c  # a constant: the closures below use it

    def split(a_m):
        pad = [(0, c * chunks - m)] + [(0, 0)] * (a_m.ndim - 1)
        return jnp.pad(a_m, pad).reshape(chunks, c, *a_m.shape[1:])

    def chunk_sizes(sizes_G, lo):  # each group's rows inside [lo, lo + c)
        ends_G = jnp.cumsum(sizes_G)
        return jnp.clip(jnp.minimum(ends_G, lo + c) - jnp.maximum(ends_G - sizes_G, lo), 0)

    @jax.custom_vjp
    def rows(x_mD, sizes_G, w_m, w_gate_GDF, w_up_GDF, w_out_GFD):
        def body(_, xs):
            x_cD, w_c, lo = xs
            y_cD = _swiglu(ops, x_cD, chunk_sizes(sizes_G, lo), w_gate_GDF, w_up_GDF,
                           w_out_GFD)
            return None, _weighted(y_cD, w_c)

        _, y_CcD = jax.lax.scan(body, None, (split(x_mD), split(w_m), los_C))
        return y_CcD.reshape(chunks * c, D)[:m]

    def fwd(x_mD, sizes_G, w_m, *weights):
        return rows(x_mD, sizes_G, w_m, *weights), (x_mD, sizes_G, w_m, weights)

    def bwd(res, dy_mD):
        x_mD, sizes_G, w_m, (w_gate_GDF, w_up_GDF, w_out_GFD) = res

        def body(acc, xs):
            d_gate_GDF, d_up_GDF, d_out_GFD = acc
            x_cD, dy_cD, w_c, lo = xs
            sizes = chunk_sizes(sizes_G, lo)
            gate_cF = ops.matmul(x_cD, w_gate_GDF, sizes)
            up_cF = ops.matmul(x_cD, w_up_GDF, sizes)
            act_cF = swiglu_f32(gate_cF, up_cF)
            y_cD = ops.matmul(act_cF, w_out_GFD, sizes)
            dw_c = jnp.sum(y_cD.astype(jnp.float32) * dy_cD.astype(jnp.float32), -1)
            dy_cD = _weighted(dy_cD, w_c)  # the gradient of the unweighted outputs
            d_out_GFD = ops.add_wgrad(act_cF, dy_cD, sizes, d_out_GFD)
            d_gate_cF, d_up_cF = swiglu_f32_grads(gate_cF, up_cF,
                                                  ops.matmul_t(dy_cD, w_out_GFD, sizes))
            d_gate_GDF = ops.add_wgrad(x_cD, d_gate_cF, sizes, d_gate_GDF)
            d_up_GDF = ops.add_wgrad(x_cD, d_up_cF, sizes, d_up_GDF)
            dx_cD = (ops.matmul_t(d_gate_cF, w_gate_GDF, sizes)
                     + ops.matmul_t(d_up_cF, w_up_GDF, sizes))
            return (d_gate_GDF, d_up_GDF, d_out_GFD), (dx_cD, dw_c)

        zeros = tuple(jnp.zeros_like(w) for w in (w_gate_GDF, w_up_GDF, w_out_GFD))
        d_weights, (dx_CcD, dw_Cc) = jax.lax.scan(
            body, zeros, (split(x_mD), split(dy_mD), split(w_m), los_C))
        return (dx_CcD.reshape(chunks * c, D)[:m], None, dw_Cc.reshape(-1)[:m], *d_weights)

    rows.defvjp(fwd, bwd)
    return rows(x_mD, sizes_G, w_m, *weights)
